"""train.py of examples/imagenet_dit in one process: exact resume, crash-safe checkpoints, clear errors."""

import json
import os
import signal

import pytest
import torch

from examples.imagenet_dit import dit_runtime, train
from examples.imagenet_dit.dit_config import ConfigError
from examples.imagenet_dit.dit_smoke import TINY_OVERRIDES, build_tiny_latents
from examples.imagenet_dit.latent_data import LatentDataError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread (and the CI machine's two cores are shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    return build_tiny_latents(tmp_path_factory.mktemp("dit"))["latents"]


def run(config, latents, run_dir, *extra, steps=4):
    sets = [
        x
        for o in [*TINY_OVERRIDES, f"train.steps={steps}", "optim.warmup_steps=2", "optim.grad_clip=1.0"]
        for x in ("--set", o)
    ]
    return train.main(
        ["--config", config, "--data", str(latents), "--run-dir", str(run_dir), "--device", "cpu", *sets, *extra]
    )


def final_state(run_dir):
    return torch.load(dit_runtime.find_latest_checkpoint(run_dir), weights_only=True)


def assert_same_state(a, b):
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for kk in sa[k]:
            assert torch.equal(torch.as_tensor(sa[k][kk]), torch.as_tensor(sb[k][kk])), (k, kk)
    assert a["scheduler"] == b["scheduler"]


@pytest.fixture(scope="module")
def straight(latents, tmp_path_factory):
    """Uninterrupted 4-step runs, one per config."""
    out = {}
    for config in ("meanflow_b2", "flow_matching_b2"):
        d = tmp_path_factory.mktemp(f"straight_{config}")
        run(config, latents, d)
        out[config] = final_state(d)
    return out


@pytest.mark.parametrize("config", ["meanflow_b2", "flow_matching_b2"])
def test_stop_and_resume_gives_identical_weights(config, latents, tmp_path, straight):
    assert run(config, latents, tmp_path, "--stop-at", "2")["step"] == 2
    assert run(config, latents, tmp_path, "--resume")["step"] == 4
    assert_same_state(final_state(tmp_path), straight[config])
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]
    assert log[0]["lr"] == pytest.approx(1e-4)  # 2 warm-up steps done
    assert all(k in log[0] for k in ("loss", "grad_norm", "img_per_s"))


def test_sigterm_saves_and_the_resumed_run_is_identical(latents, tmp_path, straight, monkeypatch):
    original = train.Trainer.optimizer_step

    def step_then_preempt(self):
        out = original(self)
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends before preemption
        return out

    monkeypatch.setattr(train.Trainer, "optimizer_step", step_then_preempt)
    assert run("meanflow_b2", latents, tmp_path)["step"] == 1
    monkeypatch.setattr(train.Trainer, "optimizer_step", original)
    assert signal.getsignal(signal.SIGTERM) is not None  # our handler was removed again
    run("meanflow_b2", latents, tmp_path, "--resume")
    assert_same_state(final_state(tmp_path), straight["meanflow_b2"])


def test_crash_while_saving_leaves_the_previous_checkpoint_usable(latents, tmp_path, straight, monkeypatch):
    original = dit_runtime.write_checkpoint_file
    calls = []

    def torn_write(state, path):
        calls.append(path)
        if len(calls) == 2:  # the step-4 checkpoint: half a file, then the process "dies"
            original(state, path)
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            raise KeyboardInterrupt("killed mid-save")
        original(state, path)

    monkeypatch.setattr(dit_runtime, "write_checkpoint_file", torn_write)
    with pytest.raises(KeyboardInterrupt):
        run("meanflow_b2", latents, tmp_path)
    monkeypatch.setattr(dit_runtime, "write_checkpoint_file", original)
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_0000002.pt"
    assert any(p.name.startswith(".step_0000004.pt.tmp") for p in ckpts.iterdir())  # the torn file
    assert dit_runtime.find_latest_checkpoint(tmp_path).name == "step_0000002.pt"
    assert run("meanflow_b2", latents, tmp_path, "--resume")["step"] == 4
    assert_same_state(final_state(tmp_path), straight["meanflow_b2"])


def test_unreadable_newest_checkpoint_falls_back_to_the_previous(latents, tmp_path, capsys):
    run("flow_matching_b2", latents, tmp_path)
    newest = tmp_path / "checkpoints" / "step_0000004.pt"
    newest.write_bytes(b"garbage")
    assert dit_runtime.find_latest_checkpoint(tmp_path).name == "step_0000002.pt"
    assert "skipping unreadable checkpoint" in capsys.readouterr().err


def test_checkpoint_of_another_model_size_is_refused(latents, tmp_path):
    run("flow_matching_b2", latents, tmp_path, steps=2)
    with pytest.raises(ConfigError, match=r"checkpoint .* is a DiT-B/2 \(depth 2.*differing: depth"):
        run("flow_matching_b2", latents, tmp_path, "--resume", "--set", "model.depth=3")
    with pytest.raises(ConfigError, match=r"differing: hidden_size"):
        run("flow_matching_b2", latents, tmp_path, "--resume", "--set", "model.hidden_size=48")


def test_existing_run_needs_resume(latents, tmp_path):
    run("flow_matching_b2", latents, tmp_path, steps=2)
    with pytest.raises(SystemExit, match=r"pass --resume"):
        run("flow_matching_b2", latents, tmp_path, steps=2)


def test_bad_inputs(latents, tmp_path):
    with pytest.raises(LatentDataError, match=r"does not exist; run prepare_latents.py"):
        run("flow_matching_b2", tmp_path / "missing", tmp_path / "run")
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) train\.step\b"):
        run("flow_matching_b2", latents, tmp_path / "run", "--set", "train.step=3")
    with pytest.raises(ConfigError, match=r"needs train.init_from"):
        run("flow_matching_b2", latents, tmp_path / "run", "--set", "train.init_step=2")


def test_init_from_continues_the_step_counter(latents, tmp_path):
    run("flow_matching_b2", latents, tmp_path / "first", steps=2)
    out = run(
        "flow_matching_b2",
        latents,
        tmp_path / "second",
        "--set",
        f"train.init_from={tmp_path / 'first'}",
        "--set",
        "train.init_step=2",
        steps=3,
    )
    assert out["step"] == 3
    a, b = final_state(tmp_path / "first"), final_state(tmp_path / "second")
    assert b["step"] == 3 and not torch.equal(
        a["model"]["final_layer.linear.weight"], b["model"]["final_layer.linear.weight"]
    )


def test_resume_with_changed_settings_says_so(latents, tmp_path, capsys):
    run("flow_matching_b2", latents, tmp_path, "--stop-at", "2")
    capsys.readouterr()
    run("flow_matching_b2", latents, tmp_path, "--resume", "--set", "optim.lr=3e-4")
    err = capsys.readouterr().err
    assert "config differs from the checkpoint's in optim.lr (0.0001 -> 0.0003)" in err
