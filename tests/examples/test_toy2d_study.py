"""Smoke test of the toy study: tiny runs, the markdown table, the figures, and the skip of a missing method."""

from __future__ import annotations

from examples.toy2d import registry
from examples.toy2d.study import ENTRIES, Entry, run_study
from examples.toy2d.train import TrainConfig


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
