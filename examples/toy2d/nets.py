"""The toy velocity network: a 4 x 256 MLP with low-frequency sinusoidal embeddings of ``t`` and ``t - r``.

Why low frequency: every JVP objective (MeanFlow, alpha-Flow's alpha -> 0 phase) differentiates the network in
``t``, and so differentiates the time embedding. A DDPM-style embedding (times scaled by 1000, frequencies up to
1000 rad per unit time) makes ``du/dt`` huge and noisy; on this toy it leaves one-step MeanFlow no better than an
untrained network (reference section 7). Here the highest angular frequency is ``max_freq`` (default 8 rad per unit
time) and the raw ``t`` in ``[0, 1]`` is embedded, as in the official MeanFlow and alpha-Flow DiTs.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["SinusoidalEmbedding", "VelocityMLP"]


class SinusoidalEmbedding(nn.Module):
    """``t -> [sin(w_k t), cos(w_k t)]`` with ``dim / 2`` angular frequencies ``w_k`` geometric in
    ``[min_freq, max_freq]`` (radians per unit time).

    Args:
        dim: Output width (even).
        max_freq: Highest angular frequency. Keep it small (tens at most) for JVP objectives.
        min_freq: Lowest angular frequency.
    """

    def __init__(self, dim: int = 32, max_freq: float = 8.0, min_freq: float = 1.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"dim must be even, got {dim}")
        if not 0 < min_freq <= max_freq:
            raise ValueError(f"need 0 < min_freq <= max_freq, got min_freq={min_freq}, max_freq={max_freq}")
        freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), dim // 2))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, t: Tensor) -> Tensor:
        """``t`` of shape ``(B,)`` -> embedding ``(B, dim)``."""
        angle = t[:, None].to(self.freqs.dtype) * self.freqs
        return torch.cat([angle.sin(), angle.cos()], dim=-1)


class VelocityMLP(nn.Module):
    """Average-velocity network ``u(z, r, t, y=None)`` in the package's protocol (``r, t`` of shape ``(B,)``).

    Input: ``[z, emb_t(t), emb_h(t - r), emb_y(y)]``; ``depth`` hidden SiLU layers of width ``hidden``.
    With ``num_classes > 0`` the label ``y`` (shape ``(B,)``) is embedded, index ``num_classes`` being the null
    class used for guidance dropout.

    Args:
        dim: Data dimension.
        hidden: Width of the hidden layers.
        depth: Number of hidden layers.
        emb_dim: Width of each time embedding (and of the label embedding).
        max_freq: Highest angular frequency of the time embeddings.
        num_classes: Number of classes; 0 for an unconditional network.
    """

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 4, emb_dim: int = 32, max_freq: float = 8.0,
                 num_classes: int = 0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.emb_t = SinusoidalEmbedding(emb_dim, max_freq)
        self.emb_h = SinusoidalEmbedding(emb_dim, max_freq)
        self.emb_y = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        width = dim + 2 * emb_dim + (emb_dim if num_classes > 0 else 0)
        layers: list[nn.Module] = []
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, z: Tensor, r: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """``z (B, dim)``, ``r, t (B,)``, optional ``y (B,)`` -> ``u (B, dim)``."""
        parts = [z, self.emb_t(t).to(z.dtype), self.emb_h(t - r).to(z.dtype)]
        if self.emb_y is not None:
            if y is None:
                y = torch.full((z.shape[0],), self.num_classes, dtype=torch.long, device=z.device)
            parts.append(self.emb_y(y).to(z.dtype))
        return self.net(torch.cat(parts, dim=-1))
