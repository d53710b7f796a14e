"""A small DiT-style transformer for 8 x 8 images in the package's protocol ``model(z, r, t, y=None)``.

Patches of 2 x 2 pixels give 16 tokens; each block is pre-norm self-attention (``F.scaled_dot_product_attention``)
and an MLP, both modulated by adaLN-Zero from the condition ``c = E_t(t) + E_h(t - r) + E_y(y)`` (the alpha-Flow
DiT's conditioning). The time embedders are low-frequency sinusoids of the raw ``t`` in ``[0, 1]`` followed by an
MLP (see ``examples/toy2d/nets.py`` for why the frequency scale matters to JVP objectives). The label embedding has
``num_classes + 1`` rows, the last being the null class used by guidance dropout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from examples.toy2d.nets import SinusoidalEmbedding

__all__ = ["DiT"]


class TimeEmbedder(nn.Module):
    """Sinusoidal embedding of a time in ``[0, 1]`` (angular frequencies up to ``max_freq``) and a 2-layer MLP."""

    def __init__(self, width: int, freq_dim: int = 64, max_freq: float = 8.0) -> None:
        super().__init__()
        self.freq = SinusoidalEmbedding(freq_dim, max_freq)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.freq(t))


class Block(nn.Module):
    """Transformer block with adaLN-Zero modulation (shift, scale, gate for attention and MLP)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        b, n, w = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c)[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + gate1 * self.proj(attn.transpose(1, 2).reshape(b, n, w))
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(h)


class DiT(nn.Module):
    """DiT for ``(B, channels, size, size)`` images: ``u = model(z, r, t, y)``.

    Args:
        size: Image side (8).
        channels: Image channels (1).
        patch: Patch side (2 -> 16 tokens).
        width: Token width.
        depth: Number of blocks.
        heads: Attention heads.
        num_classes: Classes; label ``num_classes`` is the null class. 0 for an unconditional model.
        max_freq: Highest angular frequency of the time embedders.
    """

    def __init__(
        self,
        size: int = 8,
        channels: int = 1,
        patch: int = 2,
        width: int = 128,
        depth: int = 4,
        heads: int = 4,
        num_classes: int = 10,
        max_freq: float = 8.0,
    ) -> None:
        super().__init__()
        if size % patch or width % heads:
            raise ValueError(f"need size % patch == 0 and width % heads == 0, got {size}, {patch}, {width}, {heads}")
        self.size, self.channels, self.patch, self.num_classes = size, channels, patch, num_classes
        self.tokens = (size // patch) ** 2
        self.embed = nn.Linear(channels * patch * patch, width)
        self.pos = nn.Parameter(torch.randn(1, self.tokens, width) * 0.02)
        self.emb_t = TimeEmbedder(width, max_freq=max_freq)
        self.emb_h = TimeEmbedder(width, max_freq=max_freq)
        self.emb_y = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, channels * patch * patch)
        for m in (self.ada[1], self.out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def _patchify(self, z: Tensor) -> Tensor:
        b, c, p, g = z.shape[0], self.channels, self.patch, self.size // self.patch
        return z.view(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)

    def _unpatchify(self, x: Tensor) -> Tensor:
        b, c, p, g = x.shape[0], self.channels, self.patch, self.size // self.patch
        return x.view(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, self.size, self.size)

    def forward(self, z: Tensor, r: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        """``z (B, C, H, W)``, ``r, t (B,)``, ``y (B,)`` int64 (``None``: the null class) -> ``u (B, C, H, W)``."""
        c = self.emb_t(t).to(z.dtype) + self.emb_h(t - r).to(z.dtype)
        if self.emb_y is not None:
            if y is None:
                y = torch.full((z.shape[0],), self.num_classes, dtype=torch.long, device=z.device)
            c = c + self.emb_y(y).to(z.dtype)
        x = self.embed(self._patchify(z)) + self.pos
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.ada(c)[:, None].chunk(2, dim=-1)
        return self._unpatchify(self.out(self.norm(x) * (1 + scale) + shift))
