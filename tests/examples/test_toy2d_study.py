"""Smoke test of the toy study: tiny runs, the markdown table, the figures, and the skip of a missing method."""

from __future__ import annotations

import pytest

from examples.toy2d import registry
from examples.toy2d.study import ENTRIES, Entry, run_study
from examples.toy2d.train import TrainConfig


@pytest.mark.slow
def test_study_writes_table_and_figures_and_skips_missing_methods(tmp_path, monkeypatch):
    ghost = registry.MethodSpec(
        "ghost", "needs an objective the core lacks", lambda cfg: registry.need("NoSuchLoss", "ghost"), 0.5
    )
    monkeypatch.setitem(registry.METHODS, "ghost", ghost)
    base = TrainConfig(
        steps=3,
        batch=64,
        width=32,
        depth=2,
        emb_dim=8,
        eval_points=256,
        energy_points=128,
        eval_steps=(1, 2, 4),
        progress=False,
        conflict_every=2,
    )
    entries = tuple(e for e in ENTRIES if e.method in ("fm", "meanflow"))
    entries += (Entry("Ghost", "ghost", "missing"),)
    result = run_study(entries, [0, 1], base, tmp_path, jobs=1, run_dir=tmp_path / "runs")
    table = (tmp_path / "toy2d_study.md").read_text()
    assert "| FM |" in table and "| MeanFlow |" in table and "1-step / FM-4" in table
    assert "Skipped Ghost" in table and "meanflow_losses.NoSuchLoss" in result["skipped"]["Ghost"]
    assert "Gradient conflict during MeanFlow" in table
    assert result["baseline"] is not None and len(result["rows"]["MeanFlow"]["ratio"]) == 2
    for name in ("toy2d_study.png", "toy2d_meanflow_samples.png", "toy2d_meanflow_conflict.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 0, name


def test_study_compares_ot_rows_with_the_fm_run_of_their_own_coupling(tmp_path):
    base = TrainConfig(
        steps=2,
        batch=64,
        width=16,
        depth=2,
        emb_dim=8,
        eval_points=128,
        energy_points=64,
        eval_steps=(1, 3),
        progress=False,
        conflict_every=0,
    )
    labels = ("FM", "FM (OT)", "MeanFlow", "MeanFlow (OT)")
    by_label = {e.label: e for e in ENTRIES}
    entries = tuple(by_label[label] for label in labels)
    result = run_study(entries, [0], base, tmp_path, jobs=1, run_dir=None)
    rows = result["rows"]
    sw2 = {label: (rows[label]["sw2"]["1"][0], rows[label]["sw2"]["3"][0]) for label in labels}
    assert rows["FM (OT)"]["coupling"] == "ot" and rows["MeanFlow"]["coupling"] == "independent"
    assert result["baseline"] == pytest.approx(sw2["FM"][1])
    assert rows["MeanFlow (OT)"]["ratio"] == [pytest.approx(sw2["MeanFlow (OT)"][0] / sw2["FM"][1])]
    assert rows["MeanFlow (OT)"]["ratio_same"] == [pytest.approx(sw2["MeanFlow (OT)"][0] / sw2["FM (OT)"][1])]
    assert rows["MeanFlow"]["ratio_same"] == rows["MeanFlow"]["ratio"]
    table = (tmp_path / "toy2d_study.md").read_text()
    assert "1-step / FM-3 same coupling" in table and "FM (OT) baseline (3 Euler steps)" in table


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--steps", "0"], "argument --steps: must be an integer >= 1, got 0"),
        (["--jobs", "0"], "argument --jobs: must be an integer >= 1, got 0"),
        (["--seeds", "0", "-1"], "argument --seeds: must be an integer in [0, 4294967295]"),
        (["--eval-points", "1"], "argument --eval-points: must be an integer >= 2"),
        (["--dataset", "circles"], "argument --dataset: invalid choice"),
        (["--methods", "nope"], "argument --methods: invalid choice: 'nope'"),
    ],
)
def test_study_cli_errors_are_usage_errors(argv, expected, capsys):
    from examples.toy2d.study import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and expected in capsys.readouterr().err
