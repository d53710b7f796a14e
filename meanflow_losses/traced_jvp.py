r"""Forward-mode rules for the operators whose JVP ``torch.compile`` cannot trace (torch 2.13).

Under ``torch.compile``, ``torch.func.jvp`` fails to trace PyTorch's own forward-AD formulas of convolutions,
LayerNorm, GroupNorm, BatchNorm and scaled-dot-product attention ("RuntimeError when making fake tensor call").
A ``torch.autograd.Function`` with an explicit ``jvp`` rule does trace. While a JVP is traced (see
:func:`meanflow_losses.forward_ad.forward_ad_context`), calls of these operators are routed to the Functions below,
whose forward is the original operator and whose ``jvp`` is the exact tangent:

* convolutions (bilinear): :math:`\dot y = \mathrm{conv}(\dot x, w) + \mathrm{conv}(x, \dot w) + \dot b`;
* normalisation over a set of axes with :math:`\hat x = (x - \mu) / \sigma`:
  :math:`\dot{\hat x} = (\dot x - \overline{\dot x} - \hat x\,\overline{\dot x \hat x}) / \sigma`, then the affine
  :math:`\dot y = \dot{\hat x}\,w + \hat x\,\dot w + \dot b` (LayerNorm: the last axes; GroupNorm: each group;
  BatchNorm in train mode: every axis but the channel's; BatchNorm in eval mode is affine in ``x``);
* attention: the blockwise tangent of :mod:`meanflow_losses.jvp_attention`.

These routes serve no-grad JVPs only (PyTorch's compiler refuses a custom ``jvp`` whose output needs grad); the
engine runs every traced JVP under ``torch.no_grad``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from meanflow_losses.jvp_attention import DEFAULT_BLOCK, attention_jvp_blockwise

__all__ = ["CONV_ROUTES", "TRACED_ROUTES"]


def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    return a if b is None else a + b


def _bias_shape(bias: Tensor, ndim: int) -> Tensor:
    return bias.reshape(1, -1, *([1] * (ndim - 2)))


class _Conv(torch.autograd.Function):
    @staticmethod
    def forward(x, w, b, conv, stride, padding, dilation, groups):
        return conv(x, w, b, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # a missing tangent arrives as None, not as zeros to compute with
        x, w, b, conv, stride, padding, dilation, groups = inputs
        ctx.save_for_forward(x, w)
        ctx.save_for_backward(x, w, b)
        ctx.opts = (conv, stride, padding, dilation, groups)

    @staticmethod
    def jvp(ctx, dx, dw, db, *_):
        x, w = ctx.saved_tensors
        conv, stride, padding, dilation, groups = ctx.opts
        out = None
        if dx is not None:
            out = conv(dx, w, None, stride, padding, dilation, groups)
        if dw is not None:
            out = _add(out, conv(x, dw, None, stride, padding, dilation, groups))
        if db is not None:
            ref = out if out is not None else conv(x, w, None, stride, padding, dilation, groups)
            out = _add(out, torch.zeros_like(ref) + _bias_shape(db, ref.ndim))
        return out

    @staticmethod
    def backward(ctx, g):
        """The convolution's gradient, by differentiating a recomputed convolution (the eager ``"joint"`` JVP)."""
        if g is None:
            return (None,) * 8
        x, w, b = ctx.saved_tensors
        conv, stride, padding, dilation, groups = ctx.opts
        with torch.enable_grad():
            leaves = [None if a is None else a.detach().requires_grad_(a.requires_grad) for a in (x, w, b)]
            y = conv(leaves[0], leaves[1], leaves[2], stride, padding, dilation, groups)
            wanted = [a for a in leaves if a is not None and a.requires_grad]
            grads = iter(torch.autograd.grad(y, wanted, g) if wanted else ())
        found = [next(grads) if a is not None and a.requires_grad else None for a in leaves]
        return (*found, None, None, None, None, None)


def _normalise_tangent(x: Tensor, dx: Tensor, dims: tuple[int, ...], eps: float) -> tuple[Tensor, Tensor]:
    """``(x_hat, d x_hat)`` of the normalisation of ``x`` over ``dims`` along the tangent ``dx``."""
    mu = x.mean(dims, keepdim=True)
    var = (x - mu).square().mean(dims, keepdim=True)
    rstd = torch.rsqrt(var + eps)
    xhat = (x - mu) * rstd
    dxhat = (dx - dx.mean(dims, keepdim=True) - xhat * (dx * xhat).mean(dims, keepdim=True)) * rstd
    return xhat, dxhat


class _LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(x, shape, w, b, eps):
        return F.layer_norm(x, shape, w, b, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # a missing tangent arrives as None, not as zeros to compute with
        x, shape, w, _b, eps = inputs
        ctx.save_for_forward(x, w)
        ctx.opts = (tuple(shape), eps)

    @staticmethod
    def jvp(ctx, dx, _dshape, dw, db, _deps):
        x, w = ctx.saved_tensors
        shape, eps = ctx.opts
        dims = tuple(range(-len(shape), 0))
        xhat, dxhat = _normalise_tangent(x, dx if dx is not None else torch.zeros_like(x), dims, eps)
        out = dxhat if w is None else dxhat * w
        if dw is not None:
            out = out + xhat * dw
        return out if db is None else out + db


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(x, groups, w, b, eps):
        return F.group_norm(x, groups, w, b, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # a missing tangent arrives as None, not as zeros to compute with
        x, groups, w, _b, eps = inputs
        ctx.save_for_forward(x, w)
        ctx.opts = (groups, eps)

    @staticmethod
    def jvp(ctx, dx, _dgroups, dw, db, _deps):
        x, w = ctx.saved_tensors
        groups, eps = ctx.opts
        n = x.shape[0]
        xg = x.reshape(n, groups, -1)
        dxg = (dx if dx is not None else torch.zeros_like(x)).reshape(n, groups, -1)
        xhat, dxhat = _normalise_tangent(xg, dxg, (2,), eps)
        xhat, out = xhat.reshape(x.shape), dxhat.reshape(x.shape)
        if w is not None:
            out = out * _bias_shape(w, x.ndim)
        if dw is not None:
            out = out + xhat * _bias_shape(dw, x.ndim)
        return out if db is None else out + _bias_shape(db, x.ndim)


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(x, mean, var, w, b, training, momentum, eps):
        return F.batch_norm(x, mean, var, w, b, training, momentum, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # a missing tangent arrives as None, not as zeros to compute with
        x, mean, var, w, _b, training, _momentum, eps = inputs
        ctx.save_for_forward(x, w, mean, var)
        ctx.opts = (training or var is None, eps)

    @staticmethod
    def jvp(ctx, dx, _dm, _dv, dw, db, *_):
        x, w, mean, var = ctx.saved_tensors
        batch_stats, eps = ctx.opts
        dx = dx if dx is not None else torch.zeros_like(x)
        xhat: Tensor | None
        if batch_stats:
            dims = (0, *range(2, x.ndim))
            xhat, out = _normalise_tangent(x, dx, dims, eps)
        else:
            rstd = _bias_shape(torch.rsqrt(var + eps), x.ndim)
            out = dx * rstd
            xhat = (x - _bias_shape(mean, x.ndim)) * rstd if dw is not None else None
        if w is not None:
            out = out * _bias_shape(w, x.ndim)
        if dw is not None:
            assert xhat is not None  # both branches set it whenever dw is given
            out = out + xhat * _bias_shape(dw, x.ndim)
        return out if db is None else out + _bias_shape(db, x.ndim)


def _attention_primal(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, scale: float | None, enable_gqa: bool
) -> Tensor:
    """SDPA written in primitive operations (the compiler cannot fake-run the fused kernels inside a traced JVP)."""
    if enable_gqa and q.ndim >= 3 and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    if is_causal:
        rows = torch.arange(q.shape[-2], device=q.device)
        cols = torch.arange(k.shape[-2], device=q.device)
        s = s.masked_fill(cols[None, :] > rows[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    if mask is not None or is_causal:  # a row with every key masked attends to nothing: 0, as PyTorch gives
        p = p.masked_fill((s == float("-inf")).all(dim=-1, keepdim=True), 0.0)
    return p @ v


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, mask, is_causal, scale, enable_gqa):
        return _attention_primal(q, k, v, mask, is_causal, scale, enable_gqa)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)  # a missing tangent arrives as None, not as zeros to compute with
        q, k, v, mask, is_causal, scale, enable_gqa = inputs
        ctx.save_for_forward(q, k, v, output)
        ctx.mask, ctx.opts = mask, (is_causal, scale, enable_gqa)

    @staticmethod
    def jvp(ctx, dq, dk, dv, dmask, *_):
        if dmask is not None:
            raise NotImplementedError(
                "an attention mask computed from z or t (it carries a tangent) inside a torch.compile-d JVP is not "
                "supported: compute the mask from the conditioning only, or run the JVP eagerly (an eager network "
                "or a compiled one called outside a compiled step)"
            )
        q, k, v, out = ctx.saved_tensors
        is_causal, scale, enable_gqa = ctx.opts
        return attention_jvp_blockwise(
            q, k, v, out, dq, dk, dv, attn_mask=ctx.mask, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa, block=DEFAULT_BLOCK,
        )  # fmt: skip


def _bind(names: tuple[str, ...], defaults: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list:
    bound = {**defaults, **dict(zip(names, args, strict=False)), **kwargs}
    return [bound[n] for n in names]


def _conv(conv: Callable[..., Tensor]) -> Callable[..., Tensor]:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}

    def handler(func: Callable[..., Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        x, w, b, stride, padding, dilation, groups = _bind(names, defaults, args, kwargs)
        return _Conv.apply(x, w, b, conv, stride, padding, dilation, groups)

    return handler


def _layer_norm(func: Callable[..., Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    x, shape, w, b, eps = _bind(names, {"weight": None, "bias": None, "eps": 1e-5}, args, kwargs)
    return _LayerNorm.apply(x, shape, w, b, eps)


def _group_norm(func: Callable[..., Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    names = ("input", "num_groups", "weight", "bias", "eps")
    x, groups, w, b, eps = _bind(names, {"weight": None, "bias": None, "eps": 1e-5}, args, kwargs)
    return _GroupNorm.apply(x, groups, w, b, eps)


def _batch_norm(func: Callable[..., Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    return _BatchNorm.apply(*_bind(names, defaults, args, kwargs))


def _attention(func: Callable[..., Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    q, k, v, mask, dropout_p, is_causal, scale, gqa = _bind(names, defaults, args, kwargs)
    if dropout_p:
        raise NotImplementedError(
            "attention dropout inside a torch.compile-d JVP is not supported: set dropout_p=0 in the JVP (eval-mode "
            "attention) or run the JVP eagerly"
        )
    return _Attention.apply(q, k, v, mask, bool(is_causal), scale, bool(gqa))


#: Convolutions with an explicit forward-mode rule: also a speed route of the eager JVP (PyTorch's own rule is
#: about 1.4x slower on the CPU; the numbers are the same).
CONV_ROUTES: dict[Callable[..., Any], Callable[..., Any]] = {
    F.conv1d: _conv(F.conv1d),
    F.conv2d: _conv(F.conv2d),
    F.conv3d: _conv(F.conv3d),
}

#: Function -> handler used while a JVP is traced by ``torch.compile``.
TRACED_ROUTES: dict[Callable[..., Any], Callable[..., Any]] = {
    **CONV_ROUTES,
    F.layer_norm: _layer_norm,
    F.group_norm: _group_norm,
    F.batch_norm: _batch_norm,
    F.scaled_dot_product_attention: _attention,
}
