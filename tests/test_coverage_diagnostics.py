"""Gradient cosines and the conflict tracker: argument checks and pairs without a finite cosine."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import meanflow_losses as mfl

gradient_cosines = mfl.diagnostics.gradient_cosines
ConflictTracker = mfl.diagnostics.ConflictTracker


def _losses():
    w = nn.Parameter(torch.tensor([1.0, 2.0]))
    return w, {"a": (w * torch.tensor([1.0, 0.0])).sum(), "b": (w * torch.tensor([1.0, 1.0])).sum()}


def test_model_must_hold_tensors_that_require_grad():
    _, losses = _losses()
    with pytest.raises(TypeError, match=r"model must hold tensors \(parameters\), got str"):
        gradient_cosines(["w"], losses)
    with pytest.raises(ValueError, match=r"model has no parameters that require grad"):
        gradient_cosines([torch.zeros(2)], losses)
    w, losses = _losses()
    with pytest.raises(ValueError, match=r"param_groups\['head'\] has no parameters that require grad"):
        gradient_cosines([w], losses, param_groups={"head": []})


def test_losses_must_be_scalars():
    w, losses = _losses()
    with pytest.raises(ValueError, match=r"named_losses\['v'\] must be a scalar tensor"):
        gradient_cosines([w], {**losses, "v": w * 2})


def test_cosines_accept_either_order_and_only_pairs():
    w, losses = _losses()
    res = gradient_cosines([w], losses)
    # grads (1, 0) and (1, 1): cos = 1 / sqrt(2)
    assert res["b", "a"] == pytest.approx(1 / math.sqrt(2))
    assert ("b", "a") in res and ("a", "b") in res
    assert "a" not in res and ("a", "b", "c") not in res and ("a", "c") not in res


def test_tracker_refuses_a_negative_start():
    with pytest.raises(ValueError, match=r"start must be a non-negative integer, got -1"):
        ConflictTracker(10, start=-1)
    with pytest.raises(ValueError, match=r"start must be a non-negative integer, got True"):
        ConflictTracker(10, start=True)


def test_tracker_history_of_an_unknown_pair_names_the_known_ones():
    tracker = ConflictTracker(1)
    w, losses = _losses()
    tracker.measure([w], losses, step=4)
    steps, cos = tracker.history("b", "a")
    assert steps.tolist() == [4] and cos.tolist() == pytest.approx([1 / math.sqrt(2)])
    with pytest.raises(KeyError, match=r"no measurements for the pair \('a', 'c'\); known pairs: \[\('a', 'b'\)\]"):
        tracker.history("a", "c")


def test_summary_of_a_pair_without_finite_cosines_is_nan_with_zero_count():
    tracker = ConflictTracker(1)
    w = nn.Parameter(torch.ones(2))
    # "zero" has a zero gradient: every cosine with it is NaN
    losses = {"a": w.sum(), "zero": (w * 0).sum()}
    tracker.measure([w], losses)
    stats = tracker.summary()[("a", "zero")]
    assert stats.count == 0
    assert all(math.isnan(v) for v in (stats.mean, stats.p5, stats.p95, stats.frac_negative))
