"""The digits example's paths from a pretrained flow-matching DiT: the training hooks and a tiny end-to-end study."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import meanflow_losses as mfl
from examples.digits import pretrained
from examples.digits import train as digits_train
from examples.digits.data import load_digits
from examples.digits.train import DigitsConfig, _train_generator

TINY = DigitsConfig(
    width=16, depth=1, heads=2, batch=16, warmup=1, classifier_steps=5, per_class=4, fm_sample_steps=2, progress=False
)


def test_train_generator_starts_from_init_and_passes_teacher_and_noise(monkeypatch):
    data = load_digits(seed=0)
    x, y = data.x_train[:64], data.y_train[:64]
    fm, _ = _train_generator(TINY, mfl.FlowMatchingLoss(), 2, x, y, "fm")
    seen = []

    class Spy:
        def __call__(self, model, xb, **kw):
            seen.append(({k: v.clone() for k, v in model.state_dict().items()}, xb, kw))
            return mfl.MeanFlowLoss()(model, xb, **kw)

    noise = torch.randn(x.shape)
    init = fm.state_dict()
    _train_generator(TINY, Spy(), 2, x, y, "mf", init=init, teacher=fm, noise=noise)
    start, xb, kw = seen[0]
    assert all(torch.equal(start[k], v) for k, v in init.items())  # the first step sees the FM weights
    assert kw["teacher"] is fm
    rows = [int(torch.nonzero((x == row).flatten(1).all(1))[0]) for row in xb]
    assert torch.equal(kw["noise"], noise[rows])  # each data row keeps its own noise row
    fresh = digits_train.DiT(width=16, depth=1, heads=2, num_classes=10, max_freq=TINY.max_freq)
    assert not all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), init.values(), strict=True))


@pytest.mark.slow
def test_pretrained_study_runs_every_path_and_writes_its_table(tmp_path):
    per_seed = [pretrained.run_seed(replace(TINY, seed=s), 2, 2) for s in (0, 1)]
    for rec in per_seed:
        assert set(rec) == {pretrained.FM_LABEL, *pretrained.PATHS}
        assert rec["MeanFlow from scratch"]["steps"] == 4 and rec["MeanFlow reflow"]["steps"] == 2
        for label in pretrained.PATHS:
            assert 0.0 <= rec[label]["1"]["accuracy"] <= 1.0 and rec[label]["2"]["frechet"] >= 0.0
    md = pretrained.write_report(per_seed, [0, 1], 2, 2, tmp_path, "test", TINY.per_class)
    text = md.read_text()
    for label in (pretrained.FM_LABEL, *pretrained.PATHS):
        assert f"| {label} |" in text
    assert "4 generated digits per class" in text and "lower on" in text
    assert "figures/digits_pretrained.png" in text and (tmp_path / "figures" / "digits_pretrained.png").is_file()
    record = json.loads((tmp_path / "digits_pretrained.json").read_text())
    assert record["seeds"] == [0, 1] and len(record["runs"]) == 2
    for run, rec in zip(record["runs"], per_seed, strict=True):  # every figure of the table, without the images
        assert run["MeanFlow reflow"]["1"]["frechet"] == rec["MeanFlow reflow"]["1"]["frechet"]
        assert "grid" not in run["MeanFlow reflow"]
    for label in (pretrained.FM_LABEL, *pretrained.PATHS):  # the figure's digits: 10 classes x min(8, per_class)
        assert per_seed[0][label]["grid"].shape == (10 * TINY.per_class, 1, 8, 8)
