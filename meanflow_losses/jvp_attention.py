r"""Scaled-dot-product attention with an exact forward-mode derivative, without the quadratic math kernel.

PyTorch's fused attention kernels have no forward-AD rule, and the math backend that has one materialises the
whole ``(L, S)`` attention matrix and its tangent. During a JVP the engine routes every top-level
``F.scaled_dot_product_attention`` call of the network (no change to its code; see
:mod:`meanflow_losses.forward_ad`) to one of these implementations, selected by name (``jvp_attention=``):

* ``"blockwise"``: the primal through the fused kernel; the tangent computed block by block over the queries,
  with :math:`S = \mathrm{scale}\,QK^\top + M`, :math:`P = \mathrm{softmax}(S)`, :math:`O = PV`,

  .. math::
      \dot S = \mathrm{scale}\,(\dot Q K^\top + Q \dot K^\top), \qquad
      \dot O = P \dot V + (P \odot \dot S) V - \mathrm{rowsum}(P \odot \dot S) \odot O,

  so the JVP's attention memory grows like ``O(L_block x S)`` instead of ``O(L x S)``. Exact (the same formula as
  forward AD through the math backend, to rounding); masks (boolean or additive), ``is_causal``, ``scale`` and
  grouped-query attention (``enable_gqa``) are supported.
* ``"flash"``: the optional ``jvp-flash-attention`` Triton kernel (``pip install jvp_flash_attention``, CUDA only)
  where it supports the call (4-D self-attention, equal head counts, no dropout); anything else falls back to
  ``"blockwise"`` (with a warning the first time).
* ``"auto"`` (default): ``"flash"`` on CUDA when the package is installed, else ``"blockwise"``; silent fallback.
* ``"math"``: the math backend, as PyTorch would need without routing (the reference of the tests).

Attention dropout (``dropout_p > 0``) always uses the math backend: a fused kernel's dropout mask cannot be
reproduced outside it. So does a mask that carries a tangent (one computed from ``z`` or ``t``): its tangent
enters :math:`\dot S`. A query row whose keys are all masked gives 0 (primal and tangent), as PyTorch's kernels do.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import warnings
from collections.abc import Callable
from typing import Any, Literal, overload

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor

from meanflow_losses._dtypes import compute_dtype, is_half

__all__ = [
    "JVP_ATTENTION",
    "JVPAttention",
    "attention_dual_blockwise",
    "attention_jvp_blockwise",
    "flash_kernel",
    "sdpa_with_jvp",
]

JVPAttention = Literal["auto", "blockwise", "flash", "math"]
JVP_ATTENTION: tuple[str, ...] = ("auto", "blockwise", "flash", "math")
#: Query rows per block of the blockwise tangent.
DEFAULT_BLOCK = 256

_FLASH: list[Any] = []  # [module or None], resolved once
_WARNED: set[str] = set()


def check_attention(name: Any) -> str:
    """Check that ``name`` names a JVP attention implementation."""
    if not isinstance(name, str) or name not in JVP_ATTENTION:
        raise ValueError(f"jvp_attention must be one of {JVP_ATTENTION}, got {name!r}")
    return name


def flash_kernel() -> Any:
    """The ``jvp_flash_attention.jvp_attention`` module if it can be imported (cached), else ``None``."""
    if not _FLASH:
        try:
            _FLASH.append(importlib.import_module("jvp_flash_attention.jvp_attention"))
        except Exception:
            _FLASH.append(None)
    return _FLASH[0]


@contextlib.contextmanager
def _all_backends() -> Any:
    """Let SDPA pick its fused kernels again (the JVP context restricts it to the math backend)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        yield
        return
    backends = [b for name, b in SDPBackend.__members__.items() if name not in ("ERROR", "OVERRIDEABLE")]
    with sdpa_kernel(backends):
        yield


@overload
def _expand_gqa(x: Tensor, heads: int) -> Tensor: ...
@overload
def _expand_gqa(x: None, heads: int) -> None: ...
def _expand_gqa(x: Tensor | None, heads: int) -> Tensor | None:
    if x is None or x.ndim < 3 or x.shape[-3] == heads:
        return x
    return x.repeat_interleave(heads // x.shape[-3], dim=-3)


def _mask_rows(mask: Tensor | None, start: int, stop: int, rows: int) -> Tensor | None:
    if mask is None or mask.ndim < 2 or mask.shape[-2] != rows:
        return mask
    return mask[..., start:stop, :]


def _block_probabilities(s: Tensor, mask: Tensor | None, start: int, is_causal: bool) -> Tensor:
    r"""Attention weights :math:`P = \mathrm{softmax}(S + M)` of the query rows ``start : start + L_b``.

    Args:
        s: Scaled scores :math:`\mathrm{scale}\,Q_b K^\top`, shape ``(..., L_b, S)``.
        mask: The rows' attention mask (boolean: ``True`` attends; additive: added, cast to ``s``'s dtype),
            broadcastable to ``s``, or ``None``.
        start: Index of the block's first query row (for ``is_causal``).
        is_causal: Top-left aligned causal mask, as PyTorch's: key ``j`` is visible from query ``i`` if ``j <= i``.

    Returns:
        ``P``, shape ``(..., L_b, S)``; a row whose keys are all masked is 0, as PyTorch's kernels give.
    """
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(s.dtype)
    if is_causal:
        rows = torch.arange(start, start + s.shape[-2], device=s.device)
        cols = torch.arange(s.shape[-1], device=s.device)
        s = s.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    if mask is not None or is_causal:  # a row with every key masked attends to nothing
        p = p.masked_fill((s == float("-inf")).all(dim=-1, keepdim=True), 0.0)
    return p


def attention_jvp_blockwise(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    dq: Tensor | None,
    dk: Tensor | None,
    dv: Tensor | None,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    block: int = DEFAULT_BLOCK,
) -> Tensor:
    r"""Tangent :math:`\dot O` of ``O = sdpa(q, k, v)`` along ``(dq, dk, dv)``, one block of queries at a time.

    Args:
        q: Queries ``(..., L, E)``.
        k: Keys ``(..., S, E)``.
        v: Values ``(..., S, Ev)``.
        out: The primal output ``(..., L, Ev)`` (from the fused kernel).
        dq: Tangent of ``q`` (or ``None`` for zero).
        dk: Tangent of ``k`` (or ``None``).
        dv: Tangent of ``v`` (or ``None``).
        attn_mask: Boolean (``True`` takes part) or additive mask broadcastable to ``(..., L, S)``.
        is_causal: Top-left-aligned causal mask (PyTorch's convention).
        scale: Softmax scale (default :math:`1/\sqrt{E}`).
        enable_gqa: Keys and values have fewer heads (dimension ``-3``) than the queries.
        block: Query rows per block.

    Returns:
        :math:`\dot O`, shape and dtype of ``out``. Computed in float32 at least.
    """
    _, tangent = _blockwise(q, k, v, out, dq, dk, dv, attn_mask, is_causal, scale, enable_gqa, block)
    return tangent


def attention_dual_blockwise(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dq: Tensor | None,
    dk: Tensor | None,
    dv: Tensor | None,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    block: int = DEFAULT_BLOCK,
) -> tuple[Tensor, Tensor]:
    r"""Primal :math:`O = PV` and tangent :math:`\dot O` together, one block of queries at a time (no fused call).

    The no-grad JVP's route: the block's :math:`P` that the tangent needs gives the primal for one more matrix
    product, so the fused kernel's separate pass is saved. Arguments as :func:`attention_jvp_blockwise` (without
    ``out``).

    Returns:
        ``(O, dO)``, shape ``(..., L, Ev)``, dtype of ``q``; the primal equals the fused kernel's to rounding.
    """
    return _blockwise(q, k, v, None, dq, dk, dv, attn_mask, is_causal, scale, enable_gqa, block)


def _blockwise(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor | None,  # the fused kernel's primal, or None: computed here
    dq: Tensor | None,
    dk: Tensor | None,
    dv: Tensor | None,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    block: int,
) -> tuple[Tensor, Tensor]:
    """``(primal, tangent)``; the primal blocks are computed (``P V``) when ``out`` is ``None``."""
    L = q.shape[-2]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if enable_gqa:
        heads = q.shape[-3]
        k, v, dk, dv = _expand_gqa(k, heads), _expand_gqa(v, heads), _expand_gqa(dk, heads), _expand_gqa(dv, heads)
    dtype, cdtype = q.dtype, compute_dtype(q.dtype)  # SDPA's output dtype; the arithmetic's
    single = L <= block
    # contiguous once (a permuted or transposed operand would be copied by every matmul that reads it)
    q, dq = q.to(cdtype).contiguous(), (dq.to(cdtype).contiguous() if dq is not None else None)
    k_t = k.to(cdtype).transpose(-2, -1).contiguous()
    dk_t = dk.to(cdtype).transpose(-2, -1).contiguous() if dk is not None else None
    v_c = v.to(cdtype).contiguous()
    dv_c = dv.to(cdtype).contiguous() if dv is not None else None
    pieces, primal = [], []
    for start in range(0, L, block):
        stop = min(start + block, L)
        qb = q[..., start:stop, :]
        p = _block_probabilities((qb @ k_t) * scale, _mask_rows(attn_mask, start, stop, L), start, is_causal)
        ds = None  # scale (dq K^T + Q dK^T), one scaling
        if dq is not None:
            ds = dq[..., start:stop, :] @ k_t
        if dk_t is not None:
            ds = qb @ dk_t if ds is None else ds + qb @ dk_t
        if ds is not None:
            ds = ds * scale
        if out is None:
            ob = p @ v_c
            primal.append(ob)
        else:
            ob = out[..., start:stop, :].to(cdtype)
        tangent = torch.zeros_like(ob) if dv_c is None else p @ dv_c
        if ds is not None:
            pds = p * ds
            del ds
            tangent = tangent + pds @ v_c - pds.sum(dim=-1, keepdim=True) * ob
            del pds
        pieces.append(tangent)
    if out is None:
        out = (primal[0] if single else torch.cat(primal, dim=-2)).to(dtype)
    return out, (pieces[0] if single else torch.cat(pieces, dim=-2)).to(out.dtype)


class _BlockwiseAttention(torch.autograd.Function):
    """SDPA whose forward uses the fused kernel and whose forward-mode rule is :func:`attention_jvp_blockwise`."""

    @staticmethod
    def forward(q, k, v, attn_mask, is_causal, scale, enable_gqa, block):
        with _all_backends():
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
            )

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, attn_mask, is_causal, scale, enable_gqa, block = inputs
        ctx.set_materialize_grads(False)  # a missing tangent (e.g. of the keys) arrives as None: no wasted matmuls
        ctx.save_for_forward(q, k, v, output)
        ctx.save_for_backward(q, k, v)
        ctx.attn_mask, ctx.opts = attn_mask, (is_causal, scale, enable_gqa, block)

    @staticmethod
    def jvp(ctx, dq, dk, dv, *_):
        q, k, v, out = ctx.saved_tensors
        is_causal, scale, enable_gqa, block = ctx.opts
        with torch.no_grad():  # the tangent carries no autograd history (du/dt enters the target detached)
            return attention_jvp_blockwise(
                q, k, v, out, dq, dk, dv,
                attn_mask=ctx.attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, block=block,
            )  # fmt: skip

    @staticmethod
    def backward(ctx, grad_out):
        if grad_out is None:
            return None, None, None, None, None, None, None, None
        q, k, v = ctx.saved_tensors
        is_causal, scale, enable_gqa, _ = ctx.opts
        with torch.enable_grad(), _all_backends():
            leaves = [x.detach().requires_grad_(x.requires_grad) for x in (q, k, v)]
            o = F.scaled_dot_product_attention(
                leaves[0],
                leaves[1],
                leaves[2],
                attn_mask=ctx.attn_mask,
                is_causal=is_causal,
                scale=scale,
                enable_gqa=enable_gqa,
            )
            wanted = [x for x in leaves if x.requires_grad]
            grads = iter(torch.autograd.grad(o, wanted, grad_out) if wanted else ())
        return (*(next(grads) if x.requires_grad else None for x in leaves), None, None, None, None, None)


def _flash_supported(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, enable_gqa: bool) -> bool:
    return (
        q.is_cuda
        and q.ndim == 4
        and k.ndim == 4
        and v.ndim == 4
        and q.shape[-2] == k.shape[-2]
        and q.shape[-3] == k.shape[-3] == v.shape[-3]
        and q.shape[-1] == k.shape[-1] == v.shape[-1]
        and (is_half(q) or q.dtype == torch.float32)
        and (attn_mask is None or attn_mask.ndim <= 4)
    )


def _flash(mod: Any, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool, scale: Any) -> Tensor:
    if attn_mask is not None:
        attn_mask = attn_mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    kernel = getattr(getattr(mod, "JVPAttn", None), "fwd_dual", None) or mod.attention
    return kernel(q, k, v, attn_mask=attn_mask, causal=is_causal, sm_scale=scale)


def sdpa_with_jvp(
    func: Callable[..., Tensor],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    attention: str = "auto",
    block: int = DEFAULT_BLOCK,
) -> Tensor:
    """Handle one ``F.scaled_dot_product_attention(*args, **kwargs)`` call inside a JVP (see the module docstring).

    Args:
        func: The original ``F.scaled_dot_product_attention``.
        args: Its positional arguments.
        kwargs: Its keyword arguments.
        attention: ``"auto"``, ``"blockwise"``, ``"flash"`` or ``"math"``.
        block: Query rows per block of the blockwise tangent.
    """
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args, strict=False))
    bound.update(kwargs)
    q, k, v = bound["query"], bound["key"], bound["value"]
    attn_mask = bound.get("attn_mask")
    is_causal, scale = bool(bound.get("is_causal", False)), bound.get("scale")
    enable_gqa = bool(bound.get("enable_gqa", False))
    unknown = set(bound) - set(names)
    mask_tangent = isinstance(attn_mask, Tensor) and fwAD.unpack_dual(attn_mask).tangent is not None
    if attention == "math" or float(bound.get("dropout_p", 0.0) or 0.0) > 0 or unknown or mask_tangent:
        # the global math-backend switch of the JVP context applies; a mask that depends on z or t (its tangent
        # enters dS) is differentiated by PyTorch's own rule there
        return func(*args, **kwargs)
    if attention in ("auto", "flash"):
        mod = flash_kernel()
        if mod is not None and _flash_supported(q, k, v, attn_mask, enable_gqa):
            try:
                return _flash(mod, q, k, v, attn_mask, is_causal, scale)
            except Exception as err:
                _warn_once(f"jvp-flash-attention failed ({type(err).__name__}: {err}); using the blockwise JVP")
        elif attention == "flash":
            why = "is not installed" if mod is None else "does not support this call (CUDA, 4-D, L = S, equal heads)"
            _warn_once(f"jvp_attention='flash': jvp-flash-attention {why}; using the blockwise JVP")
    if not torch.is_grad_enabled():  # the no-grad JVP: primal and tangent from the same blocks, no fused pass
        (qp, dq), (kp, dk), (vp, dv) = (fwAD.unpack_dual(x) for x in (q, k, v))
        if dq is not None or dk is not None or dv is not None:
            out, tangent = attention_dual_blockwise(
                qp, kp, vp, dq, dk, dv,
                attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa, block=int(block),
            )  # fmt: skip
            return fwAD.make_dual(out, tangent)
    return _BlockwiseAttention.apply(q, k, v, attn_mask, is_causal, scale, enable_gqa, int(block))


def _warn_once(message: str) -> None:
    key = message.split(";")[0][:80]
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, UserWarning, stacklevel=4)
