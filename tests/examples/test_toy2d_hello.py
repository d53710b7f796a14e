"""Smoke test of the hello-world command (``python -m examples.toy2d.hello``) at a tiny size."""

from __future__ import annotations

import math

import pytest

from examples.toy2d import hello


def test_hello_writes_its_figure_and_beats_an_untrained_network(tmp_path, capsys):
    res = hello.main(["--out", str(tmp_path / "hello"), "--steps", "200", "--batch", "128", "--no-progress"])
    assert res["figure"] == tmp_path / "hello" / "meanflow.png" and res["figure"].stat().st_size > 0
    assert all(math.isfinite(v) for v in res["sw2"].values()) and set(res["sw2"]) == {"1", "2"}
    assert res["sw2"]["1"] < res["untrained_sw2"]  # 200 steps already beat the network they start from
    out = capsys.readouterr().out
    assert f"one-step sliced W2 {res['sw2']['1']:.3f}" in out and "meanflow.png" in out


def test_hello_default_run_is_the_small_data_recipe_with_ot_pairs():
    cfg = hello.config()
    assert (cfg.method, cfg.dataset, cfg.coupling, cfg.steps, cfg.batch) == ("meanflow", "checkerboard", "ot", 800, 256)
    assert (cfg.time_dist, cfg.resolved("equal_fraction"), cfg.weight_p, cfg.reduction) == ("uniform", 0.5, 0.0, "mean")


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--coupling", "reflow"]])
def test_hello_cli_errors_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as err:
        hello.main(argv)
    assert err.value.code == 2 and "usage: python -m examples.toy2d.hello" in capsys.readouterr().err
