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

__all__ = ["ACTIVATIONS", "ARCHS", "ResidualBlock", "SinusoidalEmbedding", "VelocityMLP"]


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


ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}
ARCHS = ("plain", "residual")


class ResidualBlock(nn.Module):
    """Pre-norm residual block ``h + W2 act(W1 LN(h) + W_c c)``: the conditioning ``c`` (time and label
    embeddings) enters every block, not only the input layer.

    Args:
        hidden: Width of the residual stream.
        cond: Width of the conditioning vector.
        act: Activation class.
    """

    def __init__(self, hidden: int, cond: int, act: type[nn.Module]) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.cond = nn.Linear(cond, hidden, bias=False)
        self.act = act()
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        """``h (B, hidden)``, ``c (B, cond)`` -> ``(B, hidden)``."""
        return h + self.fc2(self.act(self.fc1(self.norm(h)) + self.cond(c)))


class VelocityMLP(nn.Module):
    """Average-velocity network ``u(z, r, t, y=None)`` in the package's protocol (``r, t`` of shape ``(B,)``).

    ``arch="plain"``: input ``[z, emb_t(t), emb_h(t - r), emb_y(y)]`` through ``depth`` hidden layers of width
    ``hidden``. ``arch="residual"``: a linear input layer of the same vector, then ``depth`` pre-norm residual
    blocks (:class:`ResidualBlock`) that each see the time and label embeddings again, then a norm, the activation
    and a linear read-out. With ``num_classes > 0`` the label ``y`` (shape ``(B,)``) is embedded, index
    ``num_classes`` being the null class used for guidance dropout.

    Args:
        dim: Data dimension.
        hidden: Width of the hidden layers.
        depth: Number of hidden layers (plain) or residual blocks (residual).
        emb_dim: Width of each time embedding (and of the label embedding).
        max_freq: Highest angular frequency of the time embeddings.
        num_classes: Number of classes; 0 for an unconditional network.
        act: Activation: ``"silu"``, ``"gelu"`` or ``"relu"``.
        arch: ``"plain"`` or ``"residual"``.
    """

    def __init__(
        self,
        dim: int = 2,
        hidden: int = 256,
        depth: int = 4,
        emb_dim: int = 32,
        max_freq: float = 8.0,
        num_classes: int = 0,
        act: str = "silu",
        arch: str = "plain",
    ) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {list(ARCHS)}, got {arch!r}")
        self.num_classes = num_classes
        self.arch = arch
        act_cls = ACTIVATIONS[act]
        self.emb_t = SinusoidalEmbedding(emb_dim, max_freq)
        self.emb_h = SinusoidalEmbedding(emb_dim, max_freq)
        self.emb_y = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None
        cond = 2 * emb_dim + (emb_dim if num_classes > 0 else 0)
        width = dim + cond
        if arch == "plain":
            layers: list[nn.Module] = []
            for _ in range(depth):
                layers += [nn.Linear(width, hidden), act_cls()]
                width = hidden
            layers.append(nn.Linear(width, dim))
            self.net = nn.Sequential(*layers)
        else:
            self.inp = nn.Linear(width, hidden)
            self.blocks = nn.ModuleList(ResidualBlock(hidden, cond, act_cls) for _ in range(depth))
            self.out = nn.Sequential(nn.LayerNorm(hidden), act_cls(), nn.Linear(hidden, dim))

    def forward(self, z: Tensor, r: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """``z (B, dim)``, ``r, t (B,)``, optional ``y (B,)`` -> ``u (B, dim)``."""
        parts = [self.emb_t(t).to(z.dtype), self.emb_h(t - r).to(z.dtype)]
        if self.emb_y is not None:
            if y is None:
                y = torch.full((z.shape[0],), self.num_classes, dtype=torch.long, device=z.device)
            parts.append(self.emb_y(y).to(z.dtype))
        c = torch.cat(parts, dim=-1)
        x = torch.cat([z, c], dim=-1)
        if self.arch == "plain":
            return self.net(x)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, c)
        return self.out(h)
