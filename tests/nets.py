"""Small networks shared by the tests: an MLP and a tiny transformer with SDPA attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def time_features(t: Tensor, dim: int = 8, max_freq: float = 8.0) -> Tensor:
    """Low-frequency sinusoidal features of t, shape (B, dim)."""
    freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), dim // 2, dtype=t.dtype, device=t.device))
    ang = t[:, None] * freqs[None]
    return torch.cat([ang.sin(), ang.cos()], dim=1)


class MLP(nn.Module):
    """u(z, r, t): an MLP on (z, emb(t), emb(t - r))."""

    def __init__(self, dim: int = 2, width: int = 32, depth: int = 2, n_classes: int = 0) -> None:
        super().__init__()
        self.n_classes = n_classes
        cond = 16 + (width if n_classes else 0)
        self.embed = nn.Embedding(n_classes + 1, width) if n_classes else None
        layers: list[nn.Module] = [nn.Linear(dim + cond, width), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.SiLU()]
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor, r: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        feats = [z, time_features(t).to(z.dtype), time_features(t - r).to(z.dtype)]
        if self.embed is not None:
            assert y is not None
            feats.append(self.embed(y).to(z.dtype))
        return self.net(torch.cat(feats, dim=1))


class TinyTransformer(nn.Module):
    """u(z, r, t) on (B, L, C) tokens with one SDPA self-attention block, conditioned on (t, t - r)."""

    def __init__(self, channels: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.inp = nn.Linear(channels, 16)
        self.cond = nn.Linear(16, 32)
        self.qkv = nn.Linear(16, 48)
        self.proj = nn.Linear(16, 16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.norm1 = nn.LayerNorm(16)
        self.norm2 = nn.LayerNorm(16)
        self.out = nn.Linear(16, channels)

    def forward(self, z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        b, n, _ = z.shape
        c = torch.cat([time_features(t), time_features(t - r)], dim=1).to(z.dtype)
        shift, scale = self.cond(c).chunk(2, dim=1)
        h = self.inp(z)
        a = self.norm1(h) * (1 + scale[:, None]) + shift[:, None]
        q, k, v = self.qkv(a).view(b, n, 3, self.heads, 16 // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v)
        h = h + self.proj(att.transpose(1, 2).reshape(b, n, 16))
        h = h + self.mlp(self.norm2(h))
        return self.out(h)


class IntervalMLP(nn.Module):
    """A network of (z, t, h): what the papers' DiTs take."""

    meanflow_inputs = "t_h"

    def __init__(self, dim: int = 2, width: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 16, width), nn.Tanh(), nn.Linear(width, dim))

    def forward(self, z: Tensor, t: Tensor, h: Tensor) -> Tensor:
        return self.net(torch.cat([z, time_features(t).to(z.dtype), time_features(h).to(z.dtype)], dim=1))


def central_fd_dudt(model, z: Tensor, r: Tensor, t: Tensor, tangent: Tensor, eps: float = 1e-6, **kw) -> Tensor:
    """Float64 central finite difference of u along (tangent, 0, 1)."""
    with torch.no_grad():
        up = model(z + eps * tangent, r, t + eps, **kw)
        dn = model(z - eps * tangent, r, t - eps, **kw)
    return (up - dn) / (2 * eps)
