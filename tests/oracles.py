"""Closed-form oracles for tests (reference section 8): Gaussian data x ~ N(mu, sigma^2 I).

s_t^2 = (1 - t)^2 sigma^2 + t^2
v(z, t) = -mu + (t - (1 - t) sigma^2) / s_t^2 * (z - (1 - t) mu)
z_r = (1 - r) mu + (s_r / s_t) (z_t - (1 - t) mu),   u(z_t, r, t) = (z_t - z_r) / (t - r)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

MU = 0.7
SIGMA = 0.5


def _col(t: Tensor, like: Tensor) -> Tensor:
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


def std_t(t: Tensor, sigma: float = SIGMA) -> Tensor:
    return torch.sqrt((1 - t) ** 2 * sigma**2 + t**2)


def marginal_velocity(z: Tensor, t: Tensor, mu: float = MU, sigma: float = SIGMA) -> Tensor:
    tt = _col(t, z)
    return -mu + (tt - (1 - tt) * sigma**2) / std_t(tt, sigma) ** 2 * (z - (1 - tt) * mu)


def flow_map(z: Tensor, r: Tensor, t: Tensor, mu: float = MU, sigma: float = SIGMA) -> Tensor:
    tt, rr = _col(t, z), _col(r, z)
    return (1 - rr) * mu + std_t(rr, sigma) / std_t(tt, sigma) * (z - (1 - tt) * mu)


def exact_u(z: Tensor, r: Tensor, t: Tensor, mu: float = MU, sigma: float = SIGMA) -> Tensor:
    """Exact average velocity; the marginal velocity on rows with r = t."""
    eq = _col(r == t, z).bool()
    gap = torch.where(eq, torch.ones_like(_col(t, z)), _col(t - r, z))
    u = (z - flow_map(z, r, t, mu, sigma)) / gap
    return torch.where(eq, marginal_velocity(z, t, mu, sigma), u)


class ExactAverageVelocity(nn.Module):
    """The exact u as a 'network' (with one dummy parameter so that optimisers and DDP accept it)."""

    def __init__(self, mu: float = MU, sigma: float = SIGMA) -> None:
        super().__init__()
        self.mu, self.sigma = mu, sigma
        self.dummy = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        return exact_u(z, r, t, self.mu, self.sigma) + 0 * self.dummy.to(z.dtype)


def gaussian_batch(batch: int, dim: int, seed: int = 0, mu: float = MU, sigma: float = SIGMA):
    g = torch.Generator().manual_seed(seed)
    x = mu + sigma * torch.randn(batch, dim, generator=g, dtype=torch.float64)
    e = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    return x, e, g
