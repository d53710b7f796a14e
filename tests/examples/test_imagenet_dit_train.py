"""train.py of examples/imagenet_dit in one process: exact resume, crash-safe checkpoints, clear errors."""

import json
import math
import os
import re
import signal

import pytest
import torch

from examples.imagenet_dit import dit_runtime, train
from examples.imagenet_dit.dit_config import ConfigError
from examples.imagenet_dit.dit_runtime import CKPT_FORMAT
from examples.imagenet_dit.dit_smoke import TINY_OVERRIDES, build_tiny_latents
from examples.imagenet_dit.latent_data import LatentDataError

pytestmark = pytest.mark.usefixtures("one_thread")


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

    def step_then_preempt(self, *args):
        out = original(self, *args)
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # what a scheduler sends before preemption
        return out

    monkeypatch.setattr(train.Trainer, "optimizer_step", step_then_preempt)
    assert run("meanflow_b2", latents, tmp_path)["step"] == 1
    monkeypatch.setattr(train.Trainer, "optimizer_step", original)
    assert signal.getsignal(signal.SIGTERM) is not None  # our handler was removed again
    run("meanflow_b2", latents, tmp_path, "--resume")
    assert_same_state(final_state(tmp_path), straight["meanflow_b2"])


@pytest.mark.slow
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
    with pytest.raises(ConfigError, match=r"train.max_nonfinite_steps must be >= 1, got 0"):
        run("flow_matching_b2", latents, tmp_path / "run", "--set", "train.max_nonfinite_steps=0")


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


# ------------------------------------------------------------------------------------------ non-finite steps
def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def all_finite(state):
    return all(torch.isfinite(v).all() for key in ("model", "ema") for v in state[key].values())


@pytest.mark.slow
def test_inf_in_the_weights_keeps_the_last_finite_checkpoint_and_resume_works(latents, tmp_path, straight, monkeypatch):
    original = train.Trainer.optimizer_step

    def step_then_poison(self, *args):
        out = original(self, *args)
        if self.step == 3:  # after the step-2 checkpoint: one inf in the weights
            with torch.no_grad():
                next(self.module.parameters()).view(-1)[0] = math.inf
        return out

    monkeypatch.setattr(train.Trainer, "optimizer_step", step_then_poison)
    with pytest.raises(train.NonFiniteError, match=r"step 4: the weights hold non-finite values \(model\.x_embedder"):
        run("meanflow_b2", latents, tmp_path, "--set", "train.keep_checkpoints=1")
    monkeypatch.setattr(train.Trainer, "optimizer_step", original)
    ckpts = tmp_path / "checkpoints"
    # no step-4 checkpoint from the poisoned weights, and rotation (keep 1) did not delete the finite one
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_0000002.pt", "step_0000002.pt.sha256"]
    assert (ckpts / "latest").read_text().strip() == "step_0000002.pt"
    assert all_finite(final_state(tmp_path))
    skipped = [r for r in read_log(tmp_path) if r.get("event") == "skipped_step"]
    assert [(r["step"], r["nonfinite"], r["skipped_steps"]) for r in skipped] == [(4, "loss and gradient norm", 1)]
    # the run resumes from the finite checkpoint and ends where the uninterrupted run ends
    assert run("meanflow_b2", latents, tmp_path, "--resume", "--set", "train.keep_checkpoints=1")["step"] == 4
    assert_same_state(final_state(tmp_path), straight["meanflow_b2"])


def poison_gradients(monkeypatch, steps):
    """NaN in one gradient at each step index in ``steps``; records the weights after every optimizer step."""
    original_backward, original_step = train.Trainer.loss_and_backward, train.Trainer.optimizer_step
    after = {}

    def backward(self, *args, **kwargs):
        out = original_backward(self, *args, **kwargs)
        if self.step in steps:
            next(self.module.parameters()).grad.view(-1)[0] = math.nan
        return out

    def step(self, *args):
        out = original_step(self, *args)
        modules = {"model": self.module, "ema": self.ema.module}
        after[self.step] = {key: {k: v.clone() for k, v in m.state_dict().items()} for key, m in modules.items()}
        return out

    monkeypatch.setattr(train.Trainer, "loss_and_backward", backward)
    monkeypatch.setattr(train.Trainer, "optimizer_step", step)
    return after


def test_a_non_finite_step_is_skipped_counted_and_logged(latents, tmp_path, monkeypatch):
    after = poison_gradients(monkeypatch, steps={1})
    out = run("flow_matching_b2", latents, tmp_path)
    assert out == {"step": 4, "run_dir": str(tmp_path), "skipped_steps": 1}
    for key in ("model", "ema"):  # step 2 changed nothing, step 3 updated again
        assert all(torch.equal(after[1][key][k], after[2][key][k]) for k in after[1][key]), key
        assert not all(torch.equal(after[2][key][k], after[3][key][k]) for k in after[2][key]), key
    state = final_state(tmp_path)
    assert state["skipped_steps"] == 1 and all_finite(state)
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {3}  # Adam stepped 3 times of 4
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [2, 2, 4]
    assert log[0] == {**log[0], "event": "skipped_step", "nonfinite": "gradient norm", "consecutive": 1}
    assert log[1]["skipped_steps"] == 1 and math.isfinite(log[1]["loss"]) and math.isfinite(log[1]["grad_norm"])
    assert log[2]["skipped_steps"] == 1


def test_a_run_that_keeps_producing_non_finite_steps_stops(latents, tmp_path, monkeypatch):
    poison_gradients(monkeypatch, steps={1, 2, 3})
    pattern = r"steps 2 to 3: 2 consecutive steps with a non-finite gradient norm \(train.max_nonfinite_steps = 2\)"
    with pytest.raises(train.NonFiniteError, match=pattern):
        run("flow_matching_b2", latents, tmp_path, "--set", "train.max_nonfinite_steps=2")
    state = final_state(tmp_path)  # step 2 was skipped, but the weights stayed finite: its checkpoint is fine
    assert state["step"] == 2 and state["skipped_steps"] == 1 and all_finite(state)


# ---------------------------------------------------------------------------------------- checksums, pointer
def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_byte_in_the_newest_checkpoint_falls_back_to_the_previous(latents, tmp_path, straight, capsys):
    run("flow_matching_b2", latents, tmp_path)
    ckpts = tmp_path / "checkpoints"
    flip_byte(ckpts / "step_0000004.pt")
    capsys.readouterr()
    assert dit_runtime.find_latest_checkpoint(tmp_path).name == "step_0000002.pt"
    err = capsys.readouterr().err
    assert re.search(r"skipping unreadable checkpoint \S*step_0000004\.pt: .*does not match its checksum", err)
    assert run("flow_matching_b2", latents, tmp_path, "--resume")["step"] == 4  # resumes from step 2
    assert_same_state(final_state(tmp_path), straight["flow_matching_b2"])
    # a checkpoint without its .sha256 (an older train.py) still loads, with a note
    (ckpts / "step_0000004.pt.sha256").unlink()
    assert dit_runtime.find_latest_checkpoint(tmp_path).name == "step_0000004.pt"
    assert "step_0000004.pt has no step_0000004.pt.sha256; loading it unverified" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("pointer", "why"),
    [
        (b"\xff\xfe\x00garbage", r"UnicodeDecodeError"),
        (b"../../elsewhere/step_0000004.pt\n", r"not a step_XXXXXXX.pt name"),
        (b"step_0000006.pt\n", r"step_0000006.pt does not exist"),
        (b"", r"not a step_XXXXXXX.pt name"),
    ],
)
def test_garbage_latest_pointer_falls_back_to_the_newest_intact_checkpoint(latents, tmp_path, capsys, pointer, why):
    run("flow_matching_b2", latents, tmp_path, "--set", "train.ckpt_every=1", steps=2)
    ckpts = tmp_path / "checkpoints"
    (ckpts / "latest").write_bytes(pointer)
    capsys.readouterr()
    assert dit_runtime.find_latest_checkpoint(tmp_path).name == "step_0000002.pt"
    assert re.search(rf"ignoring the checkpoint pointer \S*latest \(.*{why}", capsys.readouterr().err)
    flip_byte(ckpts / "step_0000002.pt")  # and a corrupt newest file too: the previous one
    assert dit_runtime.find_latest_checkpoint(tmp_path).name == "step_0000001.pt"
    err = capsys.readouterr().err
    assert "ignoring the checkpoint pointer" in err and "skipping unreadable checkpoint" in err


def test_rotation_keeps_the_newest_and_removes_checksums_with_their_files(tmp_path):
    def save(step, keep):
        return dit_runtime.save_checkpoint(tmp_path, step, {"format": CKPT_FORMAT, "w": torch.ones(3) * step}, keep)

    ckpts = tmp_path / "checkpoints"

    def steps_on_disk():
        files = sorted(p.name for p in ckpts.glob("step_*"))
        assert files[1::2] == [f"{f}.sha256" for f in files[::2]]  # each file with its checksum
        return [dit_runtime.checkpoint_step(ckpts / f) for f in files[::2]]

    for step in (2, 4, 6, 8):
        save(step, keep=3)
    assert steps_on_disk() == [4, 6, 8]
    save(6, keep=1)  # saving an earlier step again (a resumed run): older files go, later ones stay
    assert steps_on_disk() == [6, 8]
    assert dit_runtime.find_latest_checkpoint(tmp_path).name == "step_0000006.pt"
    assert (ckpts / "step_0000006.pt.sha256").read_text() == (
        f"{dit_runtime.file_sha256(ckpts / 'step_0000006.pt')}  step_0000006.pt\n"  # sha256sum -c format
    )
