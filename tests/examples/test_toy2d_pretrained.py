"""The toy's paths from a pretrained flow-matching network: initialisation, teacher, reflow pairs, the study."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import meanflow_losses as mfl
from examples.cli import ConfigError
from examples.toy2d import train as toy_train
from examples.toy2d.pretrained import run_pretrained_study
from examples.toy2d.train import ReflowPool, TrainConfig, load_network, load_teacher, main, train
from tests.examples.test_toy2d import TINY


@pytest.fixture(scope="module")
def fm_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("fm")
    train(TrainConfig(method="fm", out=str(out), figures=False, **TINY))
    return str(out / "checkpoint.pt")


def test_init_from_starts_at_the_checkpoint_network(fm_checkpoint, monkeypatch):
    seen = {}
    real = toy_train.build_objective

    def spy(cfg):
        objective = real(cfg)

        def call(model, x, **kw):
            if "state" not in seen:
                seen["state"] = {k: v.clone() for k, v in model.state_dict().items()}
            return objective(model, x, **kw)

        return call

    monkeypatch.setattr(toy_train, "build_objective", spy)
    train(TrainConfig(method="meanflow", init_from=fm_checkpoint, checkpoint=False, **TINY))
    fm = load_network(fm_checkpoint).state_dict()
    assert seen["state"].keys() == fm.keys()
    assert all(torch.equal(seen["state"][k], fm[k]) for k in fm)


def test_teacher_velocity_reaches_the_objective(fm_checkpoint, monkeypatch):
    seen = []
    real = toy_train.build_objective

    def spy(cfg):
        objective = real(cfg)

        def call(model, x, **kw):
            seen.append(kw.get("teacher"))
            return objective(model, x, **kw)

        return call

    monkeypatch.setattr(toy_train, "build_objective", spy)
    rec = train(TrainConfig(method="meanflow", teacher=fm_checkpoint, checkpoint=False, **TINY))
    teacher = seen[0]
    assert len(seen) == TINY["steps"] and all(t is teacher for t in seen)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    fm = load_network(fm_checkpoint).state_dict()
    assert all(torch.equal(teacher.state_dict()[k], fm[k]) for k in fm)
    assert all(torch.isfinite(torch.tensor(v)) for v in rec["history"]["loss"])


def test_teacher_replaces_the_conditional_velocity_in_the_target(fm_checkpoint):
    # with the teacher, FM regresses onto the teacher's velocity: zero loss for the teacher itself
    teacher = load_teacher(fm_checkpoint, TrainConfig(**TINY))
    x = torch.randn(32, 2)
    out = mfl.FlowMatchingLoss()(load_network(fm_checkpoint), x, teacher=teacher)
    assert float(out.loss.detach()) < 1e-12
    assert float(mfl.FlowMatchingLoss()(load_network(fm_checkpoint), x).loss.detach()) > 1e-3


def test_reflow_pool_holds_the_teachers_ode_endpoints(fm_checkpoint):
    cfg = TrainConfig(
        method="meanflow", coupling="reflow", reflow_from=fm_checkpoint, reflow_pool=128, reflow_steps=4, **TINY
    )
    pool = ReflowPool(cfg)
    expected = mfl.couplings.reflow_pairs(load_teacher(fm_checkpoint, cfg), pool.noise, steps=4)
    assert torch.equal(pool.x, expected) and pool.x.shape == (128, 2)
    assert torch.equal(ReflowPool(cfg).noise, pool.noise)  # deterministic in the seed (resuming rebuilds it)
    x, _, noise = pool.batch(64, torch.Generator().manual_seed(0))
    rows = [int(torch.nonzero((pool.noise == n).all(1))[0]) for n in noise]
    assert torch.equal(pool.x[rows], x)  # each drawn noise row comes with its own endpoint
    train(replace(cfg, checkpoint=False))


def test_pretrained_options_are_checked(fm_checkpoint, tmp_path, capsys):
    with pytest.raises(ConfigError, match="reflow_from"):
        TrainConfig(coupling="reflow", **TINY)
    with pytest.raises(ConfigError, match=r"init_from=.*not a file"):
        TrainConfig(init_from=str(tmp_path / "missing.pt"), **TINY)
    with pytest.raises(ConfigError, match="another architecture: width 32 there, 16 here"):
        train(TrainConfig(init_from=fm_checkpoint, **{**TINY, "width": 16}))
    with pytest.raises(SystemExit):
        main(["--reflow-pool", "10", "--steps", "1"])
    err = capsys.readouterr().err
    assert "--reflow-pool" in err and "--coupling reflow" in err


@pytest.mark.slow
def test_pretrained_study_writes_its_table_and_figure(tmp_path):
    base = TrainConfig(**{**TINY, "eval_steps": (1, 2, 3)}, reflow_pool=256, reflow_steps=4)
    result = run_pretrained_study([0, 1], 3, 2, base, tmp_path / "runs", tmp_path, jobs=1, command="test")
    table = (tmp_path / "toy2d_pretrained.md").read_text()
    for label in (
        "FM (pretrained, Euler)",
        "MeanFlow from scratch",
        "MeanFlow fine-tune",
        "MeanFlow distil",
        "MeanFlow reflow",
    ):
        assert f"| {label} |" in table, label
        assert len(result["rows"][label]["sw2"]["1"]) == 2
    assert result["rows"]["MeanFlow from scratch"]["steps"] == 5 and result["rows"]["MeanFlow distil"]["steps"] == 2
    assert (tmp_path / "figures" / "toy2d_pretrained.png").stat().st_size > 0
