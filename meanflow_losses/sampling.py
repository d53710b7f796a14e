r"""One- and few-step samplers for average-velocity models.

On a descending time grid :math:`1 = t_0 > t_1 > \dots > t_N = 0`:

* ODE step (``method="ode"``): :math:`z_{t_{n+1}} = z_{t_n} - (t_n - t_{n+1})\,u(z_{t_n}, t_{n+1}, t_n)`.
  With one step this is one-step generation :math:`x = e - u(e, 0, 1)`.
* Consistency step (``method="consistency"``): :math:`\hat x = z - t_n\,u(z, 0, t_n)`, then re-noise
  :math:`z = (1 - t_{n+1})\,\hat x + t_{n+1}\,e'` with fresh noise :math:`e'` (the last step returns
  :math:`\hat x`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from meanflow_losses._dtypes import compute_dtype
from meanflow_losses._validate import check_batch, check_model_kwargs
from meanflow_losses.adapters import check_protocol
from meanflow_losses.conventions import step as ode_step
from meanflow_losses.passes import call

__all__ = ["SAMPLING_METHODS", "make_grid", "sample"]

SAMPLING_METHODS = ("ode", "consistency")


def make_grid(steps: int | None = None, grid: Sequence[float] | Tensor | None = None) -> list[float]:
    """A descending time grid from 1 to 0.

    Args:
        steps: Number of uniform steps (``grid`` omitted).
        grid: Explicit grid, strictly decreasing, first value <= 1, last value 0.

    Returns:
        The grid as a list of floats.
    """
    if grid is not None:
        vals = [float(v) for v in (grid.tolist() if isinstance(grid, Tensor) else grid)]
        if len(vals) < 2:
            raise ValueError(f"grid must hold at least two times (start and 0), got {vals}")
        if not all(0.0 <= v <= 1.0 for v in vals):
            raise ValueError(f"grid values must lie in [0, 1], got {vals}")
        if any(b >= a for a, b in itertools.pairwise(vals)):
            raise ValueError(f"grid must be strictly decreasing (from noise t=1 to data t=0), got {vals}")
        if vals[-1] != 0.0:
            raise ValueError(f"grid must end at 0 (data), got {vals[-1]}")
        if steps is not None and steps != len(vals) - 1:
            raise ValueError(f"steps={steps} disagrees with the grid, which has {len(vals) - 1} steps")
        return vals
    if steps is None or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps}")
    return [1.0 - i / steps for i in range(steps)] + [0.0]


@torch.no_grad()
def sample(
    model: Callable[..., Tensor],
    noise: Tensor,
    steps: int | None = None,
    *,
    grid: Sequence[float] | Tensor | None = None,
    method: str = "ode",
    model_kwargs: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    renoise: Sequence[Tensor] | None = None,
    return_trajectory: bool = False,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Generate samples from noise in a few steps.

    Args:
        model: ``model(z, r, t, **model_kwargs)``.
        noise: Initial noise ``z_{t_0}``, shape ``(B, *D)``.
        steps: Number of uniform steps (default 1); with ``grid`` it must match the grid or be omitted.
        grid: Explicit descending grid ending at 0, e.g. ``[1.0, 0.55, 0.0]``.
        method: ``"ode"`` or ``"consistency"``.
        model_kwargs: Conditioning.
        generator: Random generator for the consistency re-noising.
        renoise: Explicit fresh noises for the consistency steps (one per intermediate time).
        return_trajectory: Also return the list of states ``[z_{t_0}, ..., z_{t_N}]``.

    Returns:
        Samples ``(B, *D)`` (and the trajectory when asked).

    The times handed to the network are float32 at least (a bf16 grid would merge nearby times: ``[1, 0.999, 0]``
    would become one step), whatever the dtype of ``noise``.
    """
    if method not in SAMPLING_METHODS:
        raise ValueError(f"method must be one of {SAMPLING_METHODS}, got {method!r}")
    check_protocol(model)
    noise = check_batch("noise", noise)
    kw = check_model_kwargs(model_kwargs)
    times = make_grid(1 if steps is None and grid is None else steps, grid)
    if renoise is not None and len(renoise) != len(times) - 2:
        raise ValueError(f"renoise must hold {len(times) - 2} tensors (one per intermediate time), got {len(renoise)}")
    batch = noise.shape[0]
    tdtype = compute_dtype(noise.dtype)
    z = noise
    traj = [z]
    for n, (t_cur, t_next) in enumerate(itertools.pairwise(times)):
        t = torch.full((batch,), t_cur, dtype=tdtype, device=z.device)
        if method == "ode":
            r = torch.full((batch,), t_next, dtype=tdtype, device=z.device)
            u = call(model, z, r, t, kw)
            z = ode_step(z, u, r, t)
        else:
            r = torch.zeros(batch, dtype=tdtype, device=z.device)
            u = call(model, z, r, t, kw)
            x_hat = ode_step(z, u, r, t)
            if t_next > 0:
                if renoise is not None:
                    e = renoise[n].to(z)
                else:
                    dev = generator.device if generator is not None else z.device
                    e = torch.randn(z.shape, generator=generator, device=dev, dtype=z.dtype).to(z.device)
                z = (1 - t_next) * x_hat + t_next * e
            else:
                z = x_hat
        traj.append(z)
    return (z, traj) if return_trajectory else z
