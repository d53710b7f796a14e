"""The DiT of the MeanFlow / alpha-Flow papers, written out in one file.

A vanilla adaLN-Zero Diffusion Transformer (Peebles & Xie 2023) with the few-step conditioning

    c = Emb_t(t) + Emb_h(t - r) + Emb_y(y)

where both time embedders see RAW times in [0, 1]. DDPM-era DiT code multiplies t by 1000 before its sinusoidal
embedding; that puts frequencies of ~1000 rad per unit time into du/dt and ruins every JVP objective (MeanFlow,
alpha-Flow's MeanFlow phase), while plain flow matching barely notices. Keep ``time_scale=1``.

With ``decoupled_last_blocks = k > 0`` (Decoupled MeanFlow, Lee et al. 2025, arXiv 2510.24474) the first
``depth - k`` blocks are conditioned on ``Emb_t(t) + Emb_h(0) + Emb_y(y)`` (t alone: they ignore r) and the last ``k``
blocks and the final layer on ``Emb_t(r) + Emb_h(t - r) + Emb_y(y)``. At ``r = t`` both equal the plain DiT's
condition, so a flow-matching DiT is a valid starting point for every ``k`` (:func:`flow_matching_init_`).

The network takes ``(x, t, h, y)`` with ``h = t - r``; wrap it with
``meanflow_losses.adapters.from_interval_net`` to get the package's ``model(z, r, t, y=y)`` protocol (the adapter
then implies the right JVP tangents, dt = dh = 1).

Precision: under bf16 autocast the residual stream, the layer norms, the adaLN modulation (shift, scale, gate)
and the conditioning MLPs run in float32; the attention and MLP matmuls run in bf16. Attention goes through
``F.scaled_dot_product_attention`` so the gradient forward uses the fused kernels (flash / memory-efficient) and
the package's JVP engine can switch to the math backend for forward-mode AD.

Label ``num_classes`` is the null ("unconditional") class used by classifier-free guidance; the objective's
condition dropout maps dropped rows to it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "DIT_SIZES",
    "GUIDANCE_INPUTS",
    "DiT",
    "DiTConfig",
    "build_dit",
    "flow_matching_init_",
    "guidance_kwargs",
    "make_dit_config",
]


@dataclass(frozen=True)
class DiTConfig:
    """Every number that defines the architecture (stored in checkpoints to refuse a mismatched resume)."""

    input_size: int = 32  # latent side (256 px / VAE factor 8)
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # the null class is index num_classes
    time_scale: float = 1.0  # multiplies t and h before the sinusoidal embedding; 1 = raw times as in the papers
    frequency_dim: int = 256
    # Decoupled MeanFlow (Lee et al. 2025): the last k blocks and the final layer are conditioned on r (through the
    # same time embedder) and h, the first depth - k blocks on t alone; 0 = every block on (t, h)
    decoupled_last_blocks: int = 0
    # Improved MeanFlow (Geng et al. 2025): the guidance scale omega and interval (t_min, t_max) are inputs, each
    # through its own sinusoidal embedder added to the conditioning (the official iMF DiT uses in-context tokens)
    guidance_inputs: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


#: The ``model_kwargs`` names of a guidance-input DiT (those of ``mfl.GuidanceAsInput``'s defaults).
GUIDANCE_INPUTS = ("omega", "t_min", "t_max")

# name -> (depth, hidden size, heads, patch). Parameter counts at 32x32x4 latents: S/2 33M, B/2 131M,
# L/2 459M, XL/2 676M (the extra h-embedder adds ~1% over the original DiT).
DIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "DiT-S/2": (12, 384, 6, 2),
    "DiT-B/2": (12, 768, 12, 2),
    "DiT-B/4": (12, 768, 12, 4),
    "DiT-L/2": (24, 1024, 16, 2),
    "DiT-XL/2": (28, 1152, 16, 2),
}


def _fp32(x: Tensor) -> contextlib.AbstractContextManager:
    """Disable autocast on x's device type: the block runs in the parameters' dtype (float32, or float64 in tests)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` with per-sample (B, C) shift and scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimeEmbedder(nn.Module):
    """Sinusoidal features of a scalar in [0, 1] followed by a two-layer MLP (run in float32).

    Frequencies are exp(-ln(10000) * k / (dim/2)), k = 0..dim/2-1, i.e. in (1e-4, 1] rad per unit of
    ``time_scale * t``: with ``time_scale=1`` the embedding is smooth in t, which keeps du/dt well behaved.
    """

    def __init__(self, hidden_size: int, frequency_dim: int = 256, time_scale: float = 1.0) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.time_scale = float(time_scale)
        half = frequency_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        with _fp32(t):
            args = (t.to(self.freqs.dtype) * self.time_scale)[:, None] * self.freqs[None]
            emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
            if self.frequency_dim % 2:
                emb = F.pad(emb, (0, 1))
            return self.mlp(emb)


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row: index ``num_classes`` is the null class."""

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: Tensor) -> Tensor:
        return self.table(y)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens (a strided convolution)."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden_size {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += gate * f(modulate(LN(x), shift, scale)) for f in (attention, MLP)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        # x: (B, N, C) float32 residual stream; c: (B, C) float32 condition.
        with _fp32(x):
            mod = self.adaLN_modulation(c).chunk(6, dim=1)
            shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod
            h = modulate(self.norm1(x), shift_a, scale_a)
        h = self.attn(h)  # bf16 matmuls under autocast
        with _fp32(x):
            x = x + gate_a.unsqueeze(1) * h.to(x.dtype)
            h = modulate(self.norm2(x), shift_m, scale_m)
        h = self.mlp(h)
        with _fp32(x):
            return x + gate_m.unsqueeze(1) * h.to(x.dtype)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        with _fp32(x):
            shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
            return self.linear(modulate(self.norm(x), shift, scale))


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding, shape (grid * grid, dim)."""
    if dim % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2-D position embedding, got {dim}")
    coords = np.arange(grid, dtype=np.float64)
    gy, gx = np.meshgrid(coords, coords, indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def one_axis(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_axis(gy), one_axis(gx)], axis=1).astype(np.float32)


class DiT(nn.Module):
    """``DiT(config)(x, t, h, y) -> u``: x (B, C, H, W) latents, t and h = t - r of shape (B,), y (B,) labels.

    The output has the shape of x (no learned variance: these objectives regress a velocity).
    """

    meanflow_inputs = "t_h"  # tells meanflow_losses to refuse this net until it is wrapped with from_interval_net

    def __init__(self, config: DiTConfig, *, grad_checkpointing: bool = False) -> None:
        super().__init__()
        if config.input_size % config.patch_size:
            raise ValueError(f"input_size {config.input_size} is not divisible by patch_size {config.patch_size}")
        if not 0 <= config.decoupled_last_blocks <= config.depth:
            raise ValueError(
                f"decoupled_last_blocks must lie in [0, depth = {config.depth}], got {config.decoupled_last_blocks}"
            )
        self.config = config
        self.grad_checkpointing = grad_checkpointing
        C = config.hidden_size
        self.x_embedder = PatchEmbed(config.in_channels, C, config.patch_size)
        self.t_embedder = TimeEmbedder(C, config.frequency_dim, config.time_scale)
        self.h_embedder = TimeEmbedder(C, config.frequency_dim, config.time_scale)
        self.y_embedder = LabelEmbedder(config.num_classes, C)
        self.guidance_embedders = (
            nn.ModuleDict({k: TimeEmbedder(C, config.frequency_dim) for k in GUIDANCE_INPUTS})
            if config.guidance_inputs
            else None
        )
        grid = config.input_size // config.patch_size
        self.register_buffer("pos_embed", torch.from_numpy(sincos_pos_embed_2d(C, grid))[None], persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(C, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = FinalLayer(C, config.patch_size, config.in_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT initialisation: Xavier linears, N(0, 0.02) embeddings, zero adaLN and output (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        extra = list(self.guidance_embedders.values()) if self.guidance_embedders is not None else []
        for emb in (self.t_embedder, self.h_embedder, *extra):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: Tensor) -> Tensor:
        p, c = self.config.patch_size, self.config.in_channels
        g = self.config.input_size // p
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x: Tensor, t: Tensor, h: Tensor, y: Tensor, **guidance: Tensor) -> Tensor:
        """``u`` of shape ``x.shape``; ``guidance`` holds ``omega``, ``t_min``, ``t_max`` (``(B,)`` each) exactly
        when the config has ``guidance_inputs`` (improved MeanFlow's guidance as input)."""
        cfg = self.config
        if x.shape[1:] != (cfg.in_channels, cfg.input_size, cfg.input_size):
            raise ValueError(
                f"x must have shape (B, {cfg.in_channels}, {cfg.input_size}, {cfg.input_size}), got {tuple(x.shape)}"
            )
        if set(guidance) != (set(GUIDANCE_INPUTS) if cfg.guidance_inputs else set()):
            want = f"exactly {list(GUIDANCE_INPUTS)}" if cfg.guidance_inputs else "none (guidance_inputs is off)"
            raise ValueError(f"this DiT takes guidance inputs {want}, got {sorted(guidance)}")
        dtype = self.pos_embed.dtype  # float32 (float64 after .double())
        split = cfg.depth - cfg.decoupled_last_blocks  # blocks [0, split) see t only when decoupled
        with _fp32(x):
            tokens = self.x_embedder(x.to(dtype)) + self.pos_embed
            label = self.y_embedder(y)
            if self.guidance_embedders is not None:
                for key, emb in self.guidance_embedders.items():
                    label = label + emb(guidance[key])
            if split == cfg.depth:
                c = c_first = self.t_embedder(t) + self.h_embedder(h) + label
            else:  # Decoupled MeanFlow: r = t - h (its tangent is dt - dh = 0 under the JVP)
                c_first = self.t_embedder(t) + self.h_embedder(torch.zeros_like(h)) + label
                c = self.t_embedder(t - h) + self.h_embedder(h) + label
        for i, block in enumerate(self.blocks):
            cond = c_first if i < split else c
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, cond, use_reentrant=False)
            else:
                tokens = block(tokens, cond)
        out = self.final_layer(tokens, c)
        return self.unpatchify(out).to(x.dtype)


def guidance_kwargs(
    cfg: DiTConfig, n: int, scale: float, interval: tuple[float, float], device: torch.device | str
) -> dict[str, Tensor]:
    """Sampling-time ``model_kwargs`` entries of a guidance-input DiT (``{}`` for the others)."""
    if not cfg.guidance_inputs:
        return {}
    values = (float(scale), float(interval[0]), float(interval[1]))
    return {k: torch.full((n,), v, device=device) for k, v in zip(GUIDANCE_INPUTS, values, strict=True)}


@torch.no_grad()
def flow_matching_init_(net: DiT) -> DiT:
    """Make a flow-matching DiT the exact starting point of a mean-flow fine-tuning, in place.

    Flow matching trains the DiT at ``h = 0`` only, so its ``Emb_h`` has learnt one vector, ``Emb_h(0)``, and is
    arbitrary elsewhere. This folds that vector into the bias of ``Emb_h``'s last layer and zeroes its weight:
    ``Emb_h(h) = Emb_h(0)`` for every ``h``, so the network's output is unchanged at ``r = t`` and, with
    ``decoupled_last_blocks = 0``, for every ``r``. The last layer's weight gets a gradient at the first step (its
    input features are not zero) and the layers before it from the second step on.

    Args:
        net: The DiT holding the flow-matching weights.

    Returns:
        ``net``.
    """
    emb = net.h_embedder
    last = emb.mlp[-1]
    param = last.weight
    value = emb(torch.zeros(1, device=param.device, dtype=param.dtype))[0]  # Emb_h(0), shape (hidden_size,)
    last.weight.zero_()
    last.bias.copy_(value.to(last.bias.dtype))
    return net


def make_dit_config(
    name: str,
    *,
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    **overrides: int | float,
) -> DiTConfig:
    """The :class:`DiTConfig` of a named size (``"DiT-B/2"``, ...); ``overrides`` replace any field.

    Tests use e.g. ``make_dit_config("DiT-S/2", depth=2, hidden_size=32, num_heads=2)`` for a tiny model.
    """
    if name not in DIT_SIZES:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(DIT_SIZES)}")
    depth, hidden, heads, patch = DIT_SIZES[name]
    fields = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    fields.update(input_size=input_size, in_channels=in_channels, num_classes=num_classes)
    unknown = set(overrides) - set(DiTConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown DiT option(s) {sorted(unknown)}; valid: {sorted(DiTConfig.__dataclass_fields__)}")
    fields.update(overrides)
    return DiTConfig(**fields)


def build_dit(name: str, *, grad_checkpointing: bool = False, **kwargs: int | float) -> DiT:
    """``DiT(make_dit_config(name, **kwargs))``."""
    return DiT(make_dit_config(name, **kwargs), grad_checkpointing=grad_checkpointing)
