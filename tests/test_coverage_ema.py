"""EMA averaging functions: argument checks and non-floating parameter groups."""

from __future__ import annotations

import pytest
import torch

import meanflow_losses as mfl


def test_ema_decay_refuses_a_negative_number_of_updates():
    with pytest.raises(ValueError, match=r"num_updates must be >= 0, got -1"):
        mfl.ema.ema_decay(10.0, -1)


def test_multi_avg_fn_of_an_empty_group_does_nothing():
    fn = mfl.ema.ema_multi_avg_fn(10.0, warmup_ratio=0.5)
    assert fn([], [], torch.tensor(3)) is None


def test_multi_avg_fn_on_integer_tensors_with_a_device_count():
    """Warm-up with a tensor count and a non-floating group: the weight is read back and applied per tensor."""
    fn = mfl.ema.ema_multi_avg_fn(1.0, warmup_ratio=1.0)
    avg = [torch.tensor([0, 10]), torch.tensor([1.0, 2.0])]
    cur = [torch.tensor([4, 20]), torch.tensor([3.0, 6.0])]
    fn(avg, cur, torch.tensor(1))  # h = min(1, 1 * 1) = 1: beta = 0.5, weight 0.5
    assert avg[0].dtype == torch.int64 and avg[0].tolist() == [2, 15]
    assert avg[1].tolist() == [2.0, 4.0]


def test_multi_avg_fn_on_integer_tensors_without_warmup():
    fn = mfl.ema.ema_multi_avg_fn(1.0)  # beta = 0.5 at every update
    avg, cur = [torch.tensor([0, 8])], [torch.tensor([4, 16])]
    fn(avg, cur, 5)
    assert avg[0].tolist() == [2, 12]
