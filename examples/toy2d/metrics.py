"""Sample-quality metrics on point clouds: sliced Wasserstein-2 and energy distance."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["energy_distance", "sliced_w2"]


def _check(a: Tensor, b: Tensor) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must be (n, d) with the same d, got {tuple(a.shape)} and {tuple(b.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("a and b must be finite")


def sliced_w2(a: Tensor, b: Tensor, projections: int = 512, generator: torch.Generator | None = None) -> float:
    """Sliced Wasserstein-2 distance, ``sqrt(E_theta W2^2(<a, theta>, <b, theta>))``.

    ``theta`` is uniform on the unit sphere (``projections`` draws). The 1-D W2 between the projected sets is exact
    for equal sizes (sorted matching); unequal sets are compared at ``min(n_a, n_b)`` evenly spaced quantiles.

    Args:
        a: Points ``(n_a, d)``.
        b: Points ``(n_b, d)``.
        projections: Number of random directions.
        generator: Random source for the directions.

    Returns:
        The distance, a Python float (same units as the data).
    """
    _check(a, b)
    a, b = a.double(), b.double()
    theta = torch.randn(a.shape[1], projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa, _ = torch.sort((a @ theta).T.contiguous(), dim=1)  # (projections, n_a): sorting rows is faster
    pb, _ = torch.sort((b @ theta).T.contiguous(), dim=1)
    n = min(pa.shape[1], pb.shape[1])
    if pa.shape[1] != pb.shape[1]:
        q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        pa = torch.quantile(pa, q, dim=1)
        pb = torch.quantile(pb, q, dim=1)
    return float((pa - pb).pow(2).mean().sqrt())


def _mean_dist(a: Tensor, b: Tensor, same: bool, chunk: int = 2048) -> Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for i in range(0, a.shape[0], chunk):
        total += torch.cdist(a[i : i + chunk], b).sum()
    n_pairs = a.shape[0] * (b.shape[0] - 1) if same else a.shape[0] * b.shape[0]
    return total / n_pairs


def energy_distance(a: Tensor, b: Tensor, max_points: int = 4096) -> float:
    """Energy distance ``2 E|A - B| - E|A - A'| - E|B - B'|`` (U-statistics for the within-set terms).

    Zero in expectation when ``a`` and ``b`` come from the same law; it is a squared-distance-like quantity (units of
    the data, not squared). Only the first ``max_points`` points of each set are used (the cost is quadratic).

    Args:
        a: Points ``(n_a, d)``.
        b: Points ``(n_b, d)``.
        max_points: Cap on the points used from each set.

    Returns:
        The energy distance, a Python float.
    """
    _check(a, b)
    a, b = a[:max_points].double(), b[:max_points].double()
    return float(2 * _mean_dist(a, b, False) - _mean_dist(a, a, True) - _mean_dist(b, b, True))
