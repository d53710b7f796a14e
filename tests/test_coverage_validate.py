"""Argument checks: each message names the argument and what was expected."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from meanflow_losses._validate import (
    check_batch,
    check_interval,
    check_model_output,
    check_same_shape,
    check_times,
)


def test_check_interval_refuses_what_is_not_a_pair():
    with pytest.raises(TypeError, match=r"guidance\.interval must be a pair \(t_min, t_max\), got 0\.5"):
        check_interval("guidance.interval", 0.5)
    with pytest.raises(TypeError, match=r"iv must be a pair \(t_min, t_max\), got \(0\.1, 0\.2, 0\.3\)"):
        check_interval("iv", (0.1, 0.2, 0.3))
    assert check_interval("iv", [0, 1]) == (0.0, 1.0)


def test_check_batch_refuses_an_empty_batch():
    with pytest.raises(ValueError, match=r"x must hold at least one sample, got batch size 0"):
        check_batch("x", torch.zeros(0, 3))


def test_check_same_shape_names_the_argument_and_the_reference():
    ref = torch.zeros(2, 3)
    with pytest.raises(TypeError, match=r"v_target must be a torch\.Tensor, got list"):
        check_same_shape("v_target", [[0.0] * 3] * 2, "x", ref)
    with pytest.raises(TypeError, match=r"v_target must be a floating-point tensor, got dtype torch\.int64"):
        check_same_shape("v_target", torch.zeros(2, 3, dtype=torch.long), "x", ref)
    with pytest.raises(ValueError, match=r"v_target must be on the device of x \(cpu\), got meta"):
        check_same_shape("v_target", torch.empty(2, 3, device="meta"), "x", ref)
    assert (
        check_same_shape("v", torch.ones(2, 3, dtype=torch.float64), "x", ref, same_dtype=False).dtype == torch.float64
    )


def test_check_times_refuses_non_tensors_and_integer_times():
    with pytest.raises(TypeError, match=r"t must be a torch\.Tensor of shape \(4,\), got list"):
        check_times("t", [0.5] * 4, 4)
    with pytest.raises(TypeError, match=r"r must be a floating-point tensor, got dtype torch\.int64"):
        check_times("r", torch.zeros(4, dtype=torch.long), 4)


def test_check_model_output_hints_at_output_objects():
    z = torch.zeros(2, 3)
    with pytest.raises(
        TypeError, match=r"net\(z, r, t, \*\*model_kwargs\) must return a Tensor, got tuple \(a diffusers"
    ):
        check_model_output((z,), z, who="net")
    with pytest.raises(TypeError, match=r"must return a Tensor, got SimpleNamespace \(a diffusers model returns"):
        check_model_output(SimpleNamespace(sample=z), z)
    with pytest.raises(TypeError, match=r"^model\(z, r, t, \*\*model_kwargs\) must return a Tensor, got list$"):
        check_model_output([z], z)
