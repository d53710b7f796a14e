r"""The package's one convention: the linear path between data and noise.

Convention (stated once, used everywhere):

* ``t = 0`` is data, ``t = 1`` is noise, and ``r <= t``.
* The linear path is :math:`z_t = (1 - t)\,x + t\,e` with :math:`e \sim N(0, I)`.
* The conditional (instantaneous) velocity is :math:`v = dz_t/dt = e - x`.
* One step of any sampler is :math:`z_r = z_t - (t - r)\,u(z_t, r, t)`.

Libraries that put noise at ``t = 0`` (torchcfm, facebookresearch/flow_matching, Shortcut models) are
converted at the boundary by :mod:`meanflow_losses.adapters`, never inside an objective.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["append_dims", "conditional_velocity", "interpolate", "step"]


def append_dims(t: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample vector so that it broadcasts against a batch.

    Args:
        t: Per-sample values, shape ``(B,)``.
        like: A batch, shape ``(B, *D)``.

    Returns:
        ``t`` viewed as ``(B, 1, ..., 1)`` with ``like.ndim`` dimensions.
    """
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


def interpolate(x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    r"""Point on the linear path, :math:`z_t = (1 - t)\,x + t\,e`.

    Args:
        x: Data, shape ``(B, *D)``.
        noise: Noise ``e``, shape ``(B, *D)``.
        t: Times in ``[0, 1]``, shape ``(B,)``.

    Returns:
        ``z_t``, shape ``(B, *D)``.
    """
    tt = append_dims(t, x).to(x.dtype)
    return (1 - tt) * x + tt * noise


def conditional_velocity(x: Tensor, noise: Tensor) -> Tensor:
    """Conditional velocity of the linear path, :math:`v = e - x`.

    Args:
        x: Data, shape ``(B, *D)``.
        noise: Noise, shape ``(B, *D)``.

    Returns:
        ``v``, shape ``(B, *D)``.
    """
    return noise - x


def step(z: Tensor, u: Tensor, r: Tensor, t: Tensor) -> Tensor:
    r"""One average-velocity step, :math:`z_r = z_t - (t - r)\,u`.

    Args:
        z: Current state ``z_t``, shape ``(B, *D)``.
        u: Average velocity over ``[r, t]``, shape ``(B, *D)``.
        r: End times, shape ``(B,)``.
        t: Start times, shape ``(B,)``.

    Returns:
        ``z_r``, shape ``(B, *D)``.
    """
    gap = append_dims(t - r, z)
    return (z - gap.to(torch.promote_types(z.dtype, gap.dtype)) * u).to(z.dtype)
