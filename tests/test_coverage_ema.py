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


def test_multi_avg_fn_copies_integer_tensors_and_averages_the_rest_with_a_device_count():
    """Warm-up with a tensor count and a mixed group: integers are copied, floats averaged on the device."""
    fn = mfl.ema.ema_multi_avg_fn(1.0, warmup_ratio=1.0)
    avg = [torch.tensor([0, 10]), torch.tensor([1.0, 2.0]), torch.tensor([True, False])]
    cur = [torch.tensor([4, 20]), torch.tensor([3.0, 6.0]), torch.tensor([False, True])]
    fn(avg, cur, torch.tensor(1))  # h = min(1, 1 * 1) = 1: beta = 0.5, weight 0.5
    assert avg[0].dtype == torch.int64 and avg[0].tolist() == [4, 20]
    assert avg[1].tolist() == [2.0, 4.0]
    assert avg[2].tolist() == [False, True]


def test_multi_avg_fn_copies_integer_tensors_without_warmup():
    fn = mfl.ema.ema_multi_avg_fn(1.0)  # beta = 0.5 at every update
    avg, cur = [torch.tensor([0, 8])], [torch.tensor([4, 16])]
    fn(avg, cur, 5)
    assert avg[0].tolist() == [4, 16]


@pytest.mark.parametrize("multi", [True, False], ids=["multi_avg_fn", "avg_fn"])
def test_averaged_batchnorm_keeps_the_model_batch_count(multi):
    """``AveragedModel(use_buffers=True)`` at alpha-Flow's half-life: an average of the integer counter
    ``num_batches_tracked`` truncated towards its old value (at beta = 0.9999 it stayed at the first update's 1
    until the model was 10^4 batches ahead); it is copied, and the running statistics are averaged."""
    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    fns = {"multi_avg_fn": mfl.ema.ema_multi_avg_fn(6931.0)} if multi else {"avg_fn": mfl.ema.ema_avg_fn(6931.0)}
    ema = AveragedModel(model, use_buffers=True, **fns)
    for _ in range(20):
        model(torch.randn(8, 3) + 2.0)
        ema.update_parameters(model)
    bn, ema_bn = model[1], ema.module[1]
    assert int(ema_bn.num_batches_tracked) == int(bn.num_batches_tracked) == 20
    # the running mean is averaged: the first update copies the model's (0.1 of a batch mean), later ones barely
    # move it towards the model's
    assert 0 < float(ema_bn.running_mean.norm()) < 0.5 * float(bn.running_mean.norm())
