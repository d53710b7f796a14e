"""Smoke and unit tests of the digits example (tiny sizes, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

import meanflow_losses as mfl
from examples.cli import ConfigError, Range
from examples.digits.classifier import DigitClassifier, accuracy, frechet_distance
from examples.digits.data import load_digits
from examples.digits.model import DiT
from examples.digits.train import DigitsConfig, _parser, config_from_argv, main, run


@pytest.mark.slow
def test_data_split_is_stratified_scaled_and_fixed():
    d = load_digits()
    assert d.x_train.shape[1:] == (1, 8, 8) and d.x_train.shape[0] + d.x_test.shape[0] == 1797
    assert float(d.x_train.min()) == -1.0 and float(d.x_train.max()) == 1.0
    assert torch.equal(torch.bincount(d.y_test) > 30, torch.ones(10, dtype=torch.bool))
    assert torch.equal(load_digits().y_test, d.y_test)


def test_frechet_distance_known_values():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3000, 4, generator=g)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = torch.tensor([1.0, 2.0, 0.0, 0.0])
    assert frechet_distance(a, a + shift) == pytest.approx(5.0, abs=1e-6)  # ||mu_a - mu_b||^2, same covariance
    # b = 2a: ||mu_a||^2 + tr(S + 4S - 2 * 2S) = ||mu_a||^2 + tr(S)
    a64 = a.double()
    expected = float(a64.mean(0).square().sum() + torch.cov(a64.T).trace())
    assert frechet_distance(a, 2 * a) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="same d"):
        frechet_distance(a, a[:, :3])


def test_dit_protocol_and_meanflow_jvp_through_sdpa():
    model = DiT(width=16, depth=1, heads=2)
    z, y = torch.randn(6, 1, 8, 8), torch.arange(6)
    t = torch.rand(6)
    assert model(z, t * 0.3, t, y).shape == z.shape
    assert model(z, t, t).shape == z.shape  # y omitted = the null class
    loss = mfl.MeanFlowLoss(times=mfl.TimePairSampler("uniform", equal_fraction=0.5))
    out = loss(model, z, model_kwargs={"y": y}, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_patchify_roundtrip():
    model = DiT(width=16, depth=1, heads=2)
    z = torch.randn(3, 1, 8, 8)
    assert torch.equal(model._unpatchify(model._patchify(z)), z)


def test_classifier_shapes_and_accuracy_helper():
    clf = DigitClassifier()
    x = torch.randn(7, 1, 8, 8)
    assert clf(x).shape == (7, 10) and clf.features(x).shape == (7, 128)
    acc, per_class = accuracy(clf, x, torch.zeros(7, dtype=torch.long))
    assert 0.0 <= acc <= 1.0 and len(per_class) == 10


@pytest.mark.slow
def test_example_end_to_end(tmp_path, capsys):
    out = tmp_path / "digits"
    rec = main(
        [
            "--steps",
            "3",
            "--fm-steps",
            "3",
            "--classifier-steps",
            "10",
            "--per-class",
            "4",
            "--fm-sample-steps",
            "3",
            "--width",
            "16",
            "--depth",
            "1",
            "--heads",
            "2",
            "--ema",
            "0.5",
            "--warmup",
            "1",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert "Frechet distance" in capsys.readouterr().out
    res = rec["results"]
    assert {"real training digits", "MeanFlow 1 step", "MeanFlow 2 steps", "FM 3 Euler steps"} <= set(res)
    assert len(res["MeanFlow 1 step"]["per_class_accuracy"]) == 10
    assert json.loads((out / "metrics.json").read_text())["results"].keys() == res.keys()
    assert (out / "samples.png").stat().st_size > 0 and (out / "checkpoint.pt").exists()


@pytest.mark.slow
def test_fm_baseline_can_be_skipped(tmp_path):
    rec = run(
        DigitsConfig(
            steps=2,
            fm_steps=0,
            classifier_steps=5,
            per_class=2,
            width=16,
            depth=1,
            heads=2,
            out=str(tmp_path),
            progress=False,
        )
    )
    assert not any(k.startswith("FM") for k in rec["results"])


def test_every_cli_option_has_help_a_range_or_choices_and_its_default_once():
    import argparse

    parser = _parser()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, action.option_strings
        if not isinstance(action, argparse.BooleanOptionalAction) and action.dest != "out":
            assert action.choices or isinstance(action.type, Range), action.option_strings
    text = " ".join(parser.format_help().split())  # unwrapped
    assert "(default: None)" not in text and text.count("(default: 3000)") == 1
    assert "(default: the same as --steps; 0 skips it)" in text  # --fm-steps explains its None default
    assert "{uniform,logit_normal}" in text


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
        (["--fm-steps", "-1"], "argument --fm-steps: must be an integer >= 0, got -1"),
        (["--lr", "0"], "argument --lr: must be a number > 0, got 0"),
        (["--ema", "1"], "argument --ema: must be a number in [0, 1), got 1"),
        (["--kappa", "1"], "argument --kappa: must be a number < 1, got 1"),
        (["--drop-prob", "nan"], "argument --drop-prob: must be a number in [0, 1), got nan"),
        (["--equal-fraction", "1.5"], "argument --equal-fraction: must be a number in [0, 1], got 1.5"),
        (["--per-class", "0"], "argument --per-class: must be an integer >= 1, got 0"),
        (["--time-dist", "beta"], "argument --time-dist: invalid choice: 'beta'"),
        (["--heads", "3"], "argument --width/--heads: width must be a multiple of heads, got width=64, heads=3"),
        (["--fm-steps", "0", "--fm-sample-steps", "10"], "argument --fm-sample-steps: has no effect with --fm-steps 0"),
    ],
)
def test_cli_errors_are_usage_errors_naming_the_option(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        config_from_argv(argv)
    assert exc.value.code == 2 and expected in capsys.readouterr().err


def test_cli_and_config_accept_valid_options():
    cfg = config_from_argv(["--fm-steps", "0", "--width", "48", "--heads", "3", "--time-dist", "uniform"])
    assert (cfg.fm_steps, cfg.width, cfg.heads, cfg.time_dist) == (0, 48, 3, "uniform")
    assert config_from_argv([]) == DigitsConfig()
    with pytest.raises(ConfigError, match="ema must be a number in \\[0, 1\\)") as exc:
        DigitsConfig(ema=1.0)
    assert exc.value.options == ("ema",)
