"""Networks we did not design, for the hostile-setup tests: the habits of real trainers.

Every class takes the package protocol ``(z, r, t, **kw)`` unless its docstring says otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.nets import time_features


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of a time in one of several styles (the ways users break the JVP).

    * ``"raw"``: raw ``t`` in [0, 1], angular frequencies up to 8 (fine).
    * ``"t1000"``: the DDPM-style ``t * 1000`` into DiT's frequencies (up to 1000 rad per unit time).
    * ``"long"``: a learned table indexed by ``(t * 1000).long()`` (no derivative in t).
    * ``"detach"``: raw sinusoids of ``t.detach()`` (the derivative is cut).
    * ``"round"``: raw sinusoids of ``t`` rounded to 3 decimals (zero derivative almost everywhere).
    """

    def __init__(self, width: int, style: str = "raw") -> None:
        super().__init__()
        self.style = style
        self.table = nn.Embedding(1001, 16) if style == "long" else None
        self.mlp = nn.Sequential(nn.Linear(16, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: Tensor) -> Tensor:
        if self.style == "long":
            assert self.table is not None
            return self.mlp(self.table((t.clamp(0, 1) * 1000).long()))
        if self.style == "t1000":
            half = 8
            freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=t.dtype, device=t.device) / half)
            ang = (t * 1000)[:, None] * freqs[None]
            return self.mlp(torch.cat([ang.cos(), ang.sin()], dim=1))
        if self.style == "detach":
            t = t.detach()
        elif self.style == "round":
            t = torch.round(t * 1000) / 1000
        return self.mlp(time_features(t, dim=16))


class EmbMLP(nn.Module):
    """MLP on ``(z, emb(t), emb(t - r))`` with a selectable time-embedding style and optional extras.

    Args:
        dim: Data dimension.
        width: Hidden width.
        style: Time-embedding style (:class:`TimeEmbedding`).
        dropout: Dropout probability after the first hidden layer.
        batchnorm: Insert a ``BatchNorm1d`` after the first hidden layer.
        n_classes: Label embedding (with a null class) when > 0.
        label_dropout: In-network label dropout probability in train mode (DiT's ``class_dropout_prob``).
    """

    def __init__(
        self,
        dim: int = 2,
        width: int = 32,
        style: str = "raw",
        *,
        dropout: float = 0.0,
        batchnorm: bool = False,
        n_classes: int = 0,
        label_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.emb_t = TimeEmbedding(width, style)
        self.emb_h = TimeEmbedding(width, style)
        self.n_classes = n_classes
        self.label_dropout = label_dropout
        self.emb_y = nn.Embedding(n_classes + 1, width) if n_classes else None
        self.inp = nn.Linear(dim, width)
        self.norm = nn.BatchNorm1d(width) if batchnorm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.hidden = nn.Linear(width, width)
        self.out = nn.Linear(width, dim)

    def forward(self, z: Tensor, r: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        c = self.emb_t(t) + self.emb_h(t - r)
        if self.emb_y is not None:
            assert y is not None
            if self.training and self.label_dropout > 0:
                drop = torch.rand(y.shape[0], device=y.device) < self.label_dropout
                y = torch.where(drop, torch.full_like(y, self.n_classes), y)
            c = c + self.emb_y(y)
        h = F.silu(self.norm(self.inp(z)) + c)
        h = self.drop(h)
        h = F.silu(self.hidden(h))
        return self.out(h)


class SharedContextMLP(nn.Module):
    """``u = mlp(z, t, r) * (1 + ctx.sum(0).mean())``: ``ctx`` is a shared tensor (not one row per sample)."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.net = EmbMLP(dim)

    def forward(self, z: Tensor, r: Tensor, t: Tensor, ctx: Tensor) -> Tensor:
        return self.net(z, r, t) * (1 + ctx.sum(0).mean())


class NestedCondMLP(nn.Module):
    """Conditioning in a nested dict, as diffusers' ``added_cond_kwargs``: ``extra={"emb": (B, width)}``."""

    def __init__(self, dim: int = 2, width: int = 32) -> None:
        super().__init__()
        self.net = EmbMLP(dim, width)
        self.proj = nn.Linear(width, dim)

    def forward(self, z: Tensor, r: Tensor, t: Tensor, extra: dict[str, Tensor]) -> Tensor:
        return self.net(z, r, t) + self.proj(extra["emb"])


class SqrtGapNet(nn.Module):
    """A network of ``sqrt(t - r)``: NaN as soon as a time leaves the domain ``r <= t``."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.lin = nn.Linear(dim + 2, dim)

    def forward(self, z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        gap = torch.sqrt(t - r)
        one_minus = torch.sqrt(1 - t)
        return self.lin(torch.cat([z, gap[:, None], one_minus[:, None]], dim=1))


class ExpScaleNet(nn.Module):
    """``u = lin(z) * exp(12 t) / 10``: in float16 its du/dt (about 12 u) overflows although u does not."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.lin = nn.Linear(dim, dim)

    def forward(self, z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        scale = torch.exp(12 * t) / 10
        return self.lin(z) * scale[:, None].to(z.dtype) * (1 + (t - r)[:, None].to(z.dtype))


class MHAEncoder(nn.Module):
    """``nn.TransformerEncoderLayer`` (its eval-mode fast path has no forward-AD rule) on ``(B, L, C)`` tokens."""

    def __init__(self, channels: int = 4, width: int = 16) -> None:
        super().__init__()
        self.inp = nn.Linear(channels + 16, width)
        self.layer = nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=True)
        self.out = nn.Linear(width, channels)

    def forward(self, z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        c = torch.cat([time_features(t), time_features(t - r)], dim=1).to(z.dtype)
        h = self.inp(torch.cat([z, c[:, None].expand(-1, z.shape[1], -1)], dim=-1))
        return self.out(self.layer(h))


class CompiledBlocks(nn.Module):
    """A network whose hidden block alone is ``torch.compile``-d (users compile blocks, not the whole model)."""

    def __init__(self, dim: int = 2, width: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(dim + 16, width)
        self.block = torch.compile(nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width)))
        self.out = nn.Linear(width, dim)

    def forward(self, z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        c = torch.cat([time_features(t), time_features(t - r)], dim=1).to(z.dtype)
        h = F.silu(self.inp(torch.cat([z, c], dim=1)))
        return self.out(h + self.block(h))


class ThirdPartyDiTLike(nn.Module):
    """A third-party DiT signature, ``forward(x, t, y)``: must be refused unwrapped."""

    def __init__(self, dim: int = 2, n_classes: int = 3) -> None:
        super().__init__()
        self.net = EmbMLP(dim, n_classes=n_classes)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        return self.net(x, t, t, y)


class IntervalWithLabels(nn.Module):
    """A third-party ``forward(z, t, h, y)`` network without the ``meanflow_inputs`` declaration."""

    def __init__(self, dim: int = 2, n_classes: int = 3) -> None:
        super().__init__()
        self.net = EmbMLP(dim, n_classes=n_classes)

    def forward(self, z: Tensor, t: Tensor, h: Tensor, y: Tensor) -> Tensor:
        return self.net(z, t - h, t, y)


# ------------------------------------------------------------------------------------------------ diffusers models
def tiny_unet():
    """diffusers ``UNet2DModel`` with an attention block, the interval fed through ``class_embed_type="timestep"``."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        class_embed_type="timestep",
    )


class UNetVelocity(nn.Module):
    """``UNet2DModel`` as ``model(z, r, t)``: timestep ``t``, class embedding of ``h = t - r`` (raw times)."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, z: Tensor, r: Tensor, t: Tensor) -> Tensor:
        return self.unet(z, t, class_labels=t - r).sample


def tiny_diffusers_dit():
    """diffusers ``DiTTransformer2DModel`` (its label embedding drops labels in train mode, p = 0.1)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )


class DiffusersDiTVelocity(nn.Module):
    """``DiTTransformer2DModel`` as ``model(z, r, t, y)`` (timestep = t, class labels y; r enters as a shift)."""

    def __init__(self, dit: nn.Module) -> None:
        super().__init__()
        self.dit = dit
        self.h_scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, z: Tensor, r: Tensor, t: Tensor, y: Tensor) -> Tensor:
        out = self.dit(z, timestep=t, class_labels=y).sample
        return out * (1 + self.h_scale * (t - r)).reshape(-1, 1, 1, 1).to(out.dtype)
