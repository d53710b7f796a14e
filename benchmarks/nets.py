"""The benchmark networks: ``model(z, r, t)`` with raw-time sinusoidal embeddings of ``t`` and ``t - r``.

* ``mlp``: 4 x 256 MLP on 2-D data (batch 4096), the toy examples' network shape.
* ``dit``: a small DiT-like transformer (4 blocks, width 192, 4 heads, adaLN, SDPA, patch 2 on 4 x 16 x 16).
* ``unet``: a small convolutional U-Net (GroupNorm + SiLU residual blocks, one self-attention block at the lowest
  resolution, time embeddings added in every block) on 4 x 16 x 16.
* ``timm_dit``: a DiT written in the structure of facebookresearch/DiT with timm's ``Attention`` and ``Mlp``
  (qkv reshape/permute, identity q/k norms, fused SDPA, GELU-tanh MLP, adaLN-Zero modulation), the layout of the
  third-party DiTs users port; timm itself is not imported (it needs torchvision).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NETWORKS", "build"]


def sinusoid(t: Tensor, dim: int, max_freq: float = 16.0) -> Tensor:
    """Raw-time sinusoidal features, angular frequencies geometric in [1, max_freq]."""
    freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), dim // 2, device=t.device))
    ang = t[:, None].to(freqs.dtype) * freqs
    return torch.cat([ang.sin(), ang.cos()], 1)


class ToyMLP(nn.Module):
    """4 x 256 MLP on 2-D data with low-frequency embeddings of t and t - r."""

    def __init__(self, width: int = 256, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(2 + 32, width), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 2))

    def forward(self, z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        return self.net(torch.cat([z, sinusoid(t, 16), sinusoid(t - r, 16)], 1))


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.n1 = nn.LayerNorm(width, elementwise_affine=False)
        self.n2 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
        self.ada = nn.Linear(width, 6 * width)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        b, n, w = x.shape
        s1, g1, a1, s2, g2, a2 = self.ada(F.silu(c))[:, None].chunk(6, dim=2)
        h = self.n1(x) * (1 + g1) + s1
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w)
        x = x + a1 * self.proj(att)
        return x + a2 * self.mlp(self.n2(x) * (1 + g2) + s2)


class SmallDiT(nn.Module):
    """A DiT-like transformer on 4 x 16 x 16 latents, patch 2 (64 tokens), adaLN conditioning on (t, t - r)."""

    def __init__(self, width: int = 192, depth: int = 4, heads: int = 4, size: int = 16) -> None:
        super().__init__()
        self.size = size
        tokens = (size // 2) ** 2
        self.patch = nn.Conv2d(4, width, 2, 2)
        self.pos = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.temb = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.out = nn.Linear(width, 4 * 4)

    def forward(self, z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        b, g = z.shape[0], self.size // 2
        c = self.temb(torch.cat([sinusoid(t, 32), sinusoid(t - r, 32)], 1))
        x = self.patch(z).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            x = blk(x, c)
        x = self.out(x).view(b, g, g, 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, 4, self.size, self.size)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int) -> None:
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.t = nn.Linear(temb, cout)
        self.n2, self.c2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.c1(F.silu(self.n1(x))) + self.t(emb)[:, :, None, None]
        return self.skip(x) + self.c2(F.silu(self.n2(h)))


class AttnBlock(nn.Module):
    def __init__(self, ch: int, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.norm = heads, nn.GroupNorm(8, ch)
        self.qkv, self.proj = nn.Conv2d(ch, 3 * ch, 1), nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        att = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(att.transpose(-1, -2).reshape(b, c, h, w))


class SmallUNet(nn.Module):
    """Two resolutions (16 and 8), residual GroupNorm blocks, self-attention at 8 x 8, on 4 x 16 x 16."""

    def __init__(self, ch: int = 64) -> None:
        super().__init__()
        self.temb = nn.Sequential(nn.Linear(64, 4 * ch), nn.SiLU(), nn.Linear(4 * ch, 4 * ch))
        self.inp = nn.Conv2d(4, ch, 3, padding=1)
        self.d1, self.down = ResBlock(ch, ch, 4 * ch), nn.Conv2d(ch, 2 * ch, 3, stride=2, padding=1)
        self.m1, self.attn = ResBlock(2 * ch, 2 * ch, 4 * ch), AttnBlock(2 * ch)
        self.m2 = ResBlock(2 * ch, 2 * ch, 4 * ch)
        self.up = nn.ConvTranspose2d(2 * ch, ch, 2, stride=2)
        self.u1 = ResBlock(2 * ch, ch, 4 * ch)
        self.out = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.Conv2d(ch, 4, 3, padding=1))

    def forward(self, z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        emb = self.temb(torch.cat([sinusoid(t, 32), sinusoid(t - r, 32)], 1))
        h0 = self.d1(self.inp(z), emb)
        h = self.m2(self.attn(self.m1(self.down(h0), emb)), emb)
        return self.out(self.u1(torch.cat([self.up(h), h0], 1), emb))


# --------------------------------------------------------------------- a DiT in facebookresearch/DiT + timm layout
class TimmAttention(nn.Module):
    """timm's ``Attention``: qkv, identity q/k norms, fused SDPA, projection."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        self.attn_drop, self.proj, self.proj_drop = nn.Dropout(0.0), nn.Linear(dim, dim), nn.Dropout(0.0)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class TimmMlp(nn.Module):
    """timm's ``Mlp`` with DiT's GELU(tanh)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.act, self.drop1 = nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Dropout(0.0)
        self.norm, self.fc2, self.drop2 = nn.Identity(), nn.Linear(hidden, dim), nn.Dropout(0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimmDiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = TimmAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = TimmMlp(dim, 4 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        sm, scm, gm, sp, scp, gp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gm.unsqueeze(1) * self.attn(modulate(self.norm1(x), sm, scm))
        return x + gp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), sp, scp))


class TimestepEmbedder(nn.Module):
    """DiT's timestep embedder on the RAW time (frequencies 1e-4 .. 1 rad per unit) and an MLP."""

    def __init__(self, dim: int, freq: int = 256) -> None:
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        half = self.freq // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class TimmStyleDiT(nn.Module):
    """DiT (facebookresearch layout, timm blocks) of ``model(z, r, t)``: embeddings of t and h = t - r."""

    def __init__(self, dim: int = 192, depth: int = 4, heads: int = 4, size: int = 16, patch: int = 2) -> None:
        super().__init__()
        self.size, self.patch = size, patch
        self.x_embedder = nn.Conv2d(4, dim, patch, patch)
        self.pos_embed = nn.Parameter(torch.randn(1, (size // patch) ** 2, dim) * 0.02, requires_grad=False)
        self.t_embedder, self.h_embedder = TimestepEmbedder(dim), TimestepEmbedder(dim)
        self.blocks = nn.ModuleList(TimmDiTBlock(dim, heads) for _ in range(depth))
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * 4)
        self.adaLN_final = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        x = self.x_embedder(z).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.t_embedder(t) + self.h_embedder(t - r)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.adaLN_final(c).chunk(2, dim=1)
        x = self.linear(modulate(self.norm_final(x), shift, scale))
        g, p = self.size // self.patch, self.patch
        x = x.reshape(x.shape[0], g, g, p, p, 4)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], 4, g * p, g * p)


#: name -> (constructor, batch shape)
NETWORKS: dict[str, tuple[type[nn.Module], tuple[int, ...]]] = {
    "mlp": (ToyMLP, (4096, 2)),
    "dit": (SmallDiT, (64, 4, 16, 16)),
    "unet": (SmallUNet, (32, 4, 16, 16)),
    "timm_dit": (TimmStyleDiT, (64, 4, 16, 16)),
}


def build(name: str, device: str = "cpu", batch: int | None = None) -> tuple[nn.Module, Tensor]:
    """The network ``name`` (seeded) and a data batch for it."""
    cls, shape = NETWORKS[name]
    torch.manual_seed(0)
    shape = (batch or shape[0], *shape[1:])
    return cls().to(device), torch.randn(shape, device=device)
