"""Time samplers: batch-size and schedule checks, fresh draws for the r = t rows, the curriculum's random rows."""

from __future__ import annotations

import pytest
import torch

import meanflow_losses as mfl
from meanflow_losses.times import resolve_fraction

F64 = torch.float64


def test_samplers_refuse_an_empty_batch():
    with pytest.raises(ValueError, match=r"batch_size must be >= 1, got 0"):
        mfl.TimeSampler().sample(0)
    with pytest.raises(ValueError, match=r"batch_size must be >= 1, got -2"):
        mfl.TimePairSampler().sample(-2)


def test_a_schedule_value_out_of_range_names_the_step():
    with pytest.raises(
        ValueError, match=r"equal_fraction must lie in \[0\.0, 1\.0\], got 1\.5 \(the schedule's value at step 3\)"
    ):
        resolve_fraction(lambda step: 0.5 * step, 3)
    with pytest.raises(TypeError, match=r"must be a real number, got str 'half' \(the schedule's value at step 0\)"):
        resolve_fraction(lambda step: "half", 0, "fm_fraction")
    assert resolve_fraction(lambda step: step / 10, 4) == pytest.approx(0.4)


def test_coin_rows_with_single_draws_take_fresh_times():
    """equal_count='coin', equal_draw='single', every coin up: r = t = the fresh draws after the pair and coins."""
    sampler = mfl.TimePairSampler("uniform", equal_fraction=1.0, equal_count="coin", equal_draw="single")
    pair = sampler.sample(5, generator=torch.Generator().manual_seed(3), dtype=F64)
    g = torch.Generator().manual_seed(3)
    torch.rand(10, generator=g, dtype=F64)  # the pair draws a, b
    torch.rand(5, generator=g, dtype=F64)  # the coins
    fresh = torch.rand(5, generator=g, dtype=F64)
    assert pair.interval_rows is None
    assert torch.equal(pair.t, fresh) and torch.equal(pair.r, fresh)


def test_curriculum_with_single_draws_keeps_the_fresh_times_in_the_stage():
    cur = mfl.DifficultyCurriculum(clusters=4, stage_steps=10)
    sampler = mfl.TimePairSampler("logit_normal", equal_fraction=0.5, equal_draw="single", curriculum=cur)
    pair = sampler.sample(64, step=5, generator=torch.Generator().manual_seed(0))  # stage 0: t >= 0.75
    assert cur.lower_bound(5) == 0.75
    assert bool((pair.t >= 0.75).all()) and bool((pair.r >= 0.75).all())
    equal = pair.r == pair.t
    assert int(equal.sum()) == 32
    interval = torch.ones(64, dtype=torch.bool)
    interval[pair.interval_rows] = False
    assert torch.equal(interval, equal)  # the interval rows are exactly the others


def test_curriculum_on_the_equal_rows_with_a_random_placement():
    """rows='equal': only the r = t rows are conditioned on the stage; they are placed by a permutation."""
    cur = mfl.DifficultyCurriculum(clusters=2, stage_steps=100, rows="equal")
    sampler = mfl.TimePairSampler("uniform", equal_fraction=0.25, curriculum=cur)
    pair = sampler.sample(16, step=0, generator=torch.Generator().manual_seed(1), dtype=F64)  # t >= 0.5 on r = t rows
    rows = pair.interval_rows
    assert rows is not None and rows.tolist() == sorted(rows.tolist()) and rows.numel() == 12
    eq = torch.ones(16, dtype=torch.bool)
    eq[rows] = False
    assert torch.equal(pair.r[eq], pair.t[eq]) and bool((pair.t[eq] >= 0.5).all())
    assert bool((pair.r[rows] < pair.t[rows]).all())
    first = mfl.TimePairSampler("uniform", equal_fraction=0.25, equal_rows="first", curriculum=cur)
    assert first.sample(16, step=0, generator=torch.Generator().manual_seed(1)).interval_rows.tolist() == list(
        range(4, 16)
    )
