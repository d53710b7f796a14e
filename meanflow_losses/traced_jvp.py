r"""The compiled JVP: primitive forms of the operators whose forward-mode rules ``torch.compile`` cannot trace.

A compiled JVP (``torch.func.jvp`` traced by ``torch.compile``, see :mod:`meanflow_losses.jvp`) applies PyTorch's
own forward-mode formulas to the traced graph. In torch 2.13 two kinds of calls break there:

* LayerNorm, GroupNorm, BatchNorm and InstanceNorm with affine parameters: the fused kernels' formulas fail on
  the compiler's fake tensors ("RuntimeError when making fake tensor call", an internal assert in ``_fw_primal``);
* scaled-dot-product attention: the fused kernels (flash-for-CPU, memory-efficient, ...) have no forward-mode
  formula at all.

While a JVP is traced (see :func:`meanflow_losses.forward_ad.forward_ad_context`) these calls are routed to the
same mathematics in primitive operations, whose formulas trace, and the compiler derives the tangent:

* normalisation over a set of axes: :math:`y = (x - \mu)\,/\sqrt{\sigma^2 + \epsilon}\;w + b` with the biased
  variance (LayerNorm: the last axes; GroupNorm: each group; BatchNorm in train mode and InstanceNorm with input
  statistics: the batch's or the instance's axes; with running statistics the normalisation is affine in ``x``),
  in float32 for half-precision inputs, as PyTorch's kernels compute;
* attention :math:`\mathrm{softmax}(\mathrm{scale}\,QK^\top + M)\,V`, one block of :data:`QUERY_BLOCK` query
  rows at a time (so the JVP's attention intermediates are ``O(block x S)``), with boolean or additive masks
  (a mask that depends on ``z`` or ``t`` is differentiated too), ``is_causal``, ``scale`` and grouped-query heads;
  a query row whose keys are all masked gives 0, as PyTorch's kernels do.

A ``torch.autograd.Function`` with an explicit ``jvp`` would not help here: under ``torch.no_grad`` (every traced
JVP runs there) the compiler inlines its ``forward`` and never calls the rule.

:class:`DropZeroProducts` is a compiler pass for the JVP region: PyTorch's formulas multiply the primal by a
materialised zero tangent of each weight (``x @ 0`` in every linear layer, ``conv(x, 0)`` in every convolution), a
third matrix product per layer that the compiler does not remove.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from meanflow_losses._dtypes import upcast
from meanflow_losses.jvp_attention import DEFAULT_BLOCK, _block_probabilities, _expand_gqa, _mask_rows
from meanflow_losses.tangent_rules import _bind, _channel

__all__ = ["QUERY_BLOCK", "TRACED_ROUTES", "DropZeroProducts"]

#: Query rows per block of the traced attention (read when a JVP is traced).
QUERY_BLOCK = DEFAULT_BLOCK


def _normalise(x: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over ``dims`` (biased variance)."""
    mu = x.mean(dims, keepdim=True)
    c = x - mu
    return c * torch.rsqrt(c.square().mean(dims, keepdim=True) + eps)


def _affine(y: Tensor, w: Tensor | None, b: Tensor | None, shape: Callable[[Tensor], Tensor]) -> Tensor:
    if w is not None:
        y = y * shape(w)
    return y if b is None else y + shape(b)


def _layer_norm(func: Callable[..., Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    x, shape, w, b, eps = _bind(names, {"weight": None, "bias": None, "eps": 1e-5}, args, kwargs)
    n = len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1
    y = _normalise(upcast(x), tuple(range(-n, 0)), eps)
    return _affine(y, w, b, lambda p: p).to(x.dtype)


def _group_norm(func: Callable[..., Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    names = ("input", "num_groups", "weight", "bias", "eps")
    x, groups, w, b, eps = _bind(names, {"weight": None, "bias": None, "eps": 1e-5}, args, kwargs)
    xg = upcast(x).reshape(x.shape[0], groups, -1)
    y = _normalise(xg, (2,), eps).reshape(x.shape)
    return _affine(y, w, b, lambda p: _channel(p, x.ndim)).to(x.dtype)


def _statistics_norm(
    x: Tensor, mean: Tensor | None, var: Tensor | None, w: Tensor | None, b: Tensor | None,
    input_stats: bool, dims: tuple[int, ...], eps: float,
) -> Tensor:  # fmt: skip
    """BatchNorm / InstanceNorm: over ``dims`` with the input's statistics, else with the running ones."""
    xf = upcast(x)
    if input_stats:
        y = _normalise(xf, dims, eps)
    else:
        assert mean is not None and var is not None  # PyTorch's own call refuses running statistics that are None
        y = (xf - _channel(mean, x.ndim)) * _channel(torch.rsqrt(var + eps), x.ndim)
    return _affine(y, w, b, lambda p: _channel(p, x.ndim)).to(x.dtype)


def _batch_norm(func: Callable[..., Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    """Running statistics are not updated: a no-grad JVP leaves every buffer as it found it."""
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    x, mean, var, w, b, training, _momentum, eps = _bind(names, defaults, args, kwargs)
    dims = (0, *range(2, x.ndim))
    return _statistics_norm(x, mean, var, w, b, bool(training) or mean is None, dims, eps)


def _instance_norm(func: Callable[..., Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    names = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps")
    defaults = {"running_mean": None, "running_var": None, "weight": None, "bias": None, "use_input_stats": True,
                "momentum": 0.1, "eps": 1e-5}  # fmt: skip
    x, mean, var, w, b, input_stats, _momentum, eps = _bind(names, defaults, args, kwargs)
    return _statistics_norm(x, mean, var, w, b, bool(input_stats), tuple(range(2, x.ndim)), eps)


def _attention_primal(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool, scale: float | None, enable_gqa: bool,
    block: int,
) -> Tensor:  # fmt: skip
    """SDPA in primitive operations, per block of query rows (the fused kernels have no forward-mode formula)."""
    if enable_gqa and q.ndim >= 3:
        k, v = _expand_gqa(k, q.shape[-3]), _expand_gqa(v, q.shape[-3])
    sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    n, k_t = q.shape[-2], k.transpose(-2, -1)
    outs = []
    for i in range(0, n, block):
        s = (q[..., i : i + block, :] @ k_t) * sc
        outs.append(_block_probabilities(s, _mask_rows(mask, i, i + block, n), i, is_causal) @ v)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def _attention(func: Callable[..., Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    defaults = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}
    q, k, v, mask, dropout_p, is_causal, scale, gqa = _bind(names, defaults, args, kwargs)
    if dropout_p:
        raise NotImplementedError(
            "attention dropout inside a torch.compile-d JVP is not supported: set dropout_p=0 in the JVP (eval-mode "
            "attention) or run the JVP eagerly"
        )
    return _attention_primal(q, k, v, mask, bool(is_causal), scale, bool(gqa), QUERY_BLOCK)


def _reordered(handler: Callable[..., Tensor], names: tuple[str, ...], order: tuple[str, ...]) -> Callable[..., Tensor]:
    """``handler`` for a ``torch.*`` spelling whose positional arguments ``names`` come in another order."""

    def route(func: Callable[..., Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        bound = {**dict(zip(names, args, strict=False)), **kwargs}
        bound.pop("cudnn_enable", None)
        bound.pop("cudnn_enabled", None)
        return handler(func, (), {n: bound[n] for n in order if n in bound})

    return route


_BN = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps", "cudnn_enabled")
_BN_F = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_IN = ("input", "weight", "bias", "running_mean", "running_var", "use_input_stats", "momentum", "eps",
       "cudnn_enabled")  # fmt: skip
_IN_F = ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats", "momentum", "eps")
_LN = ("input", "normalized_shape", "weight", "bias", "eps", "cudnn_enable")
_GN = ("input", "num_groups", "weight", "bias", "eps", "cudnn_enabled")

#: Function -> handler used while a JVP is traced by ``torch.compile`` (the ``F.*`` and the ``torch.*`` spellings).
TRACED_ROUTES: dict[Callable[..., Any], Callable[..., Any]] = {
    F.layer_norm: _layer_norm,
    F.group_norm: _group_norm,
    F.batch_norm: _batch_norm,
    F.instance_norm: _instance_norm,
    F.scaled_dot_product_attention: _attention,
    torch.layer_norm: _reordered(_layer_norm, _LN, _LN[:5]),
    torch.group_norm: _reordered(_group_norm, _GN, _GN[:5]),
    torch.batch_norm: _reordered(_batch_norm, _BN, _BN_F),
    torch.instance_norm: _reordered(_instance_norm, _IN, _IN_F),
}


try:  # the pass interface of torch's compiler (torch >= 2.6)
    from torch._inductor.custom_graph_pass import CustomGraphPass as _PassBase
except ImportError:  # pragma: no cover - older torch: the class still works as a plain callable
    _PassBase = object  # type: ignore[assignment,misc]


def _materialise_written_zeros(graph: torch.fx.Graph) -> None:
    """Replace by ``full(shape, 0)`` the zeros that PyTorch's traced formulas leave which the compiler mishandles.

    Two torch 2.13 compiler faults in JVP graphs: a scatter (``index_put``, ``index_copy`` ...) onto an expanded
    zero (the zero tangent of a tensor written into) writes into the one-element buffer, so every entry comes out
    as one of the written values (a wrong du/dt); and an ``_efficientzerotensor`` scaled by ``addmm(beta != 1)`` or
    ``addcmul(value != 1)`` is written into although it has no storage (a crash). A materialised zero is correct.
    """
    aten = torch.ops.aten
    writers = {aten.index_put.default, aten.index_copy.default, aten.index_add.default, aten.scatter.src,
               aten.scatter.value, aten.scatter_add.default, aten.scatter_reduce.two, aten.masked_scatter.default,
               aten.slice_scatter.default, aten.select_scatter.default, aten.diagonal_scatter.default,
               aten.as_strided_scatter.default}  # fmt: skip
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        base = node.args[0] if node.args else None
        if node.target is aten._efficientzerotensor.default:
            kwargs = dict(node.kwargs)
        elif (
            node.target is aten.expand.default
            and isinstance(base, torch.fx.Node)
            and base.target is aten.full.default
            and base.args[1] == 0
            and any(u.target in writers and u.args and u.args[0] is node for u in node.users)
        ):
            kwargs = dict(base.kwargs)
        else:
            continue
        val = node.meta.get("val")
        if not isinstance(val, Tensor):
            continue
        kwargs.update(dtype=val.dtype, device=val.device, pin_memory=False)
        kwargs.pop("layout", None)
        with graph.inserting_before(node):
            full = graph.call_function(aten.full.default, (list(val.shape), 0), kwargs)
        full.meta = dict(node.meta)
        full.meta["val"] = torch.empty_like(val, memory_format=torch.contiguous_format)  # a fake tensor, no data
        node.replace_all_uses_with(full)
        graph.erase_node(node)


class DropZeroProducts(_PassBase):
    r"""Compiler pass: remove products with a materialised zero and additions of a zero (``post_grad_custom_pre_pass``).

    PyTorch's forward-mode formula of ``addmm`` (a linear layer) is
    :math:`\dot b + \dot x W^\top + x \dot W^\top`; traced, the weight's missing tangent becomes a zero tensor
    and :math:`x \cdot 0` a real matrix product (likewise ``conv(x, 0)`` for a convolution). The pass marks the
    zero tensors (``full(..., 0)``, ``zeros`` and their views), the products and convolutions that take one, and
    replaces ``a + 0`` and ``addmm(c, a, 0)`` by ``a`` and ``c`` where shape, dtype and strides agree (never by a
    graph input); the dead products are then dropped. First, the zeros the compiler mishandles (written into by a
    scatter, ``_efficientzerotensor``) are materialised. Exact for finite values (``x @ 0`` is 0 unless ``x``
    holds an infinity or a NaN).

    The engine applies it to the JVP regions it compiles; a user compiling a whole training step can pass it too:
    ``torch.compile(step, options={"post_grad_custom_pre_pass": DropZeroProducts()})``.
    """

    def __call__(self, graph: torch.fx.Graph) -> None:
        """Rewrite ``graph`` in place."""
        aten = torch.ops.aten
        views = {aten.expand.default, aten.view.default, aten.reshape.default, aten.permute.default, aten.t.default,
                 aten.transpose.int, aten.unsqueeze.default, aten.squeeze.dim, aten.clone.default,
                 aten.alias.default, aten._unsafe_view.default}  # fmt: skip
        _materialise_written_zeros(graph)
        zero: set[torch.fx.Node] = set()

        def is_zero(a: Any) -> bool:
            return isinstance(a, torch.fx.Node) and a in zero

        def from_input(a: torch.fx.Node) -> bool:  # an input or a view of one: a later in-place write reaches it
            while a.op == "call_function" and a.target in views and a.args and isinstance(a.args[0], torch.fx.Node):
                a = a.args[0]
            return a.op == "placeholder"

        def same_layout(a: torch.fx.Node, b: torch.fx.Node) -> bool:
            if from_input(a):  # as inductor's own no-op removal: no new aliasing between inputs and outputs
                return False
            va, vb = a.meta.get("val"), b.meta.get("val")
            if not (isinstance(va, Tensor) and isinstance(vb, Tensor)):
                return False
            return va.shape == vb.shape and va.dtype == vb.dtype and va.stride() == vb.stride()

        changed = False
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            target, args, kwargs = node.target, node.args, node.kwargs
            if target is aten.full.default and len(args) > 1 and args[1] == 0:
                zero.add(node)
            elif target in (aten.zeros.default, aten.zeros_like.default):
                zero.add(node)
            elif target in views and args and is_zero(args[0]):
                zero.add(node)
            elif target in (aten.mm.default, aten.bmm.default) and (is_zero(args[0]) or is_zero(args[1])):
                zero.add(node)
            elif (
                target is aten.convolution.default
                and (args[2] is None or is_zero(args[2]))
                and (is_zero(args[0]) or is_zero(args[1]))
            ):
                zero.add(node)
            elif target is aten.addmm.default and not kwargs and (is_zero(args[1]) or is_zero(args[2])):
                if is_zero(args[0]):
                    zero.add(node)
                elif same_layout(args[0], node):
                    node.replace_all_uses_with(args[0])
                    changed = True
            elif target is aten.add.Tensor and not kwargs and len(args) == 2:
                a, b = args
                keep = a if is_zero(b) else b if is_zero(a) else None
                if isinstance(keep, torch.fx.Node) and same_layout(keep, node):
                    node.replace_all_uses_with(keep)
                    changed = True
                elif is_zero(a) and is_zero(b):
                    zero.add(node)
        if changed:
            graph.eliminate_dead_code()

    def uuid(self) -> Any:
        """Cache key of the compiled graphs: the class and the source of this module."""
        with open(__file__, "rb") as f:
            return f"{type(self).__module__}.{type(self).__qualname__}:{hashlib.sha256(f.read()).hexdigest()}"
