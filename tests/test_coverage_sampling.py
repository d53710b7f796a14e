"""Samplers: grid checks and the consistency sampler's re-noising from a generator."""

from __future__ import annotations

import pytest
import torch

import meanflow_losses as mfl
from meanflow_losses.sampling import make_grid


def _double(z, r, t):
    return 2 * z


def test_make_grid_refuses_short_and_out_of_range_grids():
    with pytest.raises(ValueError, match=r"grid must hold at least two times \(start and 0\), got \[0\.0\]"):
        make_grid(grid=[0.0])
    with pytest.raises(ValueError, match=r"grid values must lie in \[0, 1\], got \[1\.5, 0\.0\]"):
        make_grid(grid=torch.tensor([1.5, 0.0]))
    with pytest.raises(ValueError, match=r"steps must be a positive integer, got 0"):
        make_grid(steps=0)
    with pytest.raises(ValueError, match=r"steps must be a positive integer, got None"):
        make_grid()


def test_sample_refuses_an_unknown_method_and_a_wrong_number_of_renoises():
    noise = torch.randn(2, 3)
    with pytest.raises(ValueError, match=r"method must be one of \('ode', 'consistency'\), got 'euler'"):
        mfl.sample(_double, noise, method="euler")
    with pytest.raises(ValueError, match=r"renoise must hold 1 tensors \(one per intermediate time\), got 2"):
        mfl.sample(_double, noise, grid=[1.0, 0.5, 0.0], method="consistency", renoise=[noise, noise])


def test_consistency_sampler_renoises_with_the_generator():
    noise = torch.randn(3, 2, generator=torch.Generator().manual_seed(1))
    out, traj = mfl.sample(
        _double,
        noise,
        grid=[1.0, 0.5, 0.0],
        method="consistency",
        generator=torch.Generator().manual_seed(7),
        return_trajectory=True,
    )
    e = torch.randn(3, 2, generator=torch.Generator().manual_seed(7))
    x1 = noise - 1.0 * 2 * noise  # x_hat = z - t u(z, 0, t) at t = 1
    z1 = 0.5 * x1 + 0.5 * e
    x2 = z1 - 0.5 * 2 * z1  # t = 0.5: x_hat = z - 0.5 * u
    assert len(traj) == 3
    torch.testing.assert_close(traj[1], z1)
    torch.testing.assert_close(out, x2)
    torch.testing.assert_close(traj[2], x2)
