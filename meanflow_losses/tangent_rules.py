r"""Explicit forward-mode rules for the eager JVP: the primal by the network's own call, the tangent without graph.

Two costs of PyTorch's own forward-mode rules are avoided, with the same numbers:

* **Tangent-free operands.** An operand without a tangent (a parameter, a buffer, a constant, a Python number)
  enters PyTorch's formula as an "efficient zero tensor", and arithmetic on zero tensors takes a slow generic path
  in torch 2.13 (decompositions into ``prims`` operators and extra copies). Measured on the CPU, float32, 64 x 64 x
  192 activations (``benchmarks/tangent_rules.py``, one noisy run), against the same call on plain tensors:
  ``x + pos`` (a positional-embedding parameter) 4.7x, ``x * c`` with broadcasting 13.5x, ``x * 2.0`` 9.4x,
  ``y / x`` 13.1x; ``F.layer_norm`` with its affine parameters 24x (3.7x without), ``F.group_norm`` with them 31x,
  eval-mode ``F.batch_norm`` 23x. The routes bring these to 3x to 15x.
* **Recorded tangents.** With gradient enabled (the ``"joint"`` strategy) PyTorch records every tangent
  computation on the autograd graph (memory, and slower differentiable formulas, e.g. SiLU's), although the
  objectives never differentiate du/dt (it enters the target under stop-gradient).

Each rule computes the primal with the original call on the primals (so the gradient forward's graph, when there
is one, is the network's own) and the tangent under ``torch.no_grad`` from plain tensors, then pairs them with
``forward_ad.make_dual``:

* ``a + alpha b``, ``a - alpha b``, ``a b``, ``a / b`` (method, operator and reflected forms):
  :math:`\dot a + \alpha \dot b`, :math:`\dot a b + a \dot b`, :math:`(\dot a - \dot b\,(a / b)) / b`
  (PyTorch's own formulas; the reflected ``b / a`` through ``(1/a) b`` as PyTorch composes it), a missing tangent
  left out of the sum instead of entering as a zero tensor;
* ``F.linear`` and the convolutions with tangent-free weights: :math:`\dot y = \dot x W^\top` (the bare product;
  PyTorch's ``addmm`` rule adds a decomposition and a weight copy), ``conv(\dot x, W)``;
* SiLU, GELU, sigmoid, tanh, ReLU, sin, cos, exp of real tensors with gradient enabled (``"joint"``): PyTorch's own
  derivative kernels (``silu_backward`` ...) applied to the tangent, without the differentiable formulas PyTorch's
  rule records (without gradient PyTorch's rule is as fast and is used; complex inputs keep PyTorch's rule, whose
  kernels conjugate);
* LayerNorm, GroupNorm, RMSNorm and BatchNorm with tangent-free affine parameters (and running statistics):
  :math:`\dot{\hat x} = (\dot x - \overline{\dot x} - \hat x\,\overline{\dot x \hat x}) / \sigma` over the
  normalised axes (RMSNorm :math:`(\dot x - x\,\overline{x \dot x} / \rho^2) / \rho`, eval-mode BatchNorm
  :math:`\dot x / \sigma`), times the weight, with :math:`\hat x` and :math:`1/\sigma` from one fused pass.
  Without affine parameters and without gradient, LayerNorm and RMSNorm go to PyTorch's rule (fast there).

Every other call (two duals where PyTorch's rule is fine, no dual, in-place forms, ``out=``, rounding division, a
tangent on a weight) goes to PyTorch's own rule. Tangents made by these rules carry no autograd history: a caller
that wants to differentiate a JVP's tangent must not use the routes. The rules run only inside
:func:`meanflow_losses.forward_ad.forward_ad_context` in eager code (a traced JVP has its own routes,
:mod:`meanflow_losses.traced_jvp`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Number
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor

from meanflow_losses._dtypes import upcast

__all__ = ["TANGENT_RULES"]

Handler = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]


def _split(x: Any) -> tuple[Any, Tensor | None]:
    """``(primal, tangent)`` of a dual tensor; ``(x, None)`` for a plain tensor or a number."""
    if isinstance(x, Tensor):
        p, d = fwAD.unpack_dual(x)
        return p, d
    return x, None


def _pair(primal: Tensor, tangent: Tensor) -> Tensor:
    """``make_dual`` with the tangent brought to the primal's shape and dtype (and without autograd history)."""
    with torch.no_grad():
        if tangent.dtype != primal.dtype:
            tangent = tangent.to(primal.dtype)
        if tangent.shape != primal.shape:
            tangent = tangent.expand(primal.shape)
    return fwAD.make_dual(primal, tangent)


def _operand(x: Any) -> bool:
    return isinstance(x, (Tensor, Number)) and not isinstance(x, bool)


def _binary(kind: str) -> Handler:
    """Handler of ``func(a, b, ...)`` with the semantics ``kind`` in ``add, sub, rsub, mul, div, rdiv``.

    ``rsub(a, b, alpha)`` is ``b - alpha a`` (``torch.rsub``, ``Tensor.__rsub__``); ``rdiv(a, b)`` is ``b / a``
    (``Tensor.__rdiv__``).
    """
    scaled = kind in ("add", "sub", "rsub")
    allowed = {"alpha"} if scaled else set()

    def handler(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if len(args) != 2 or not set(kwargs) <= allowed or not (_operand(args[0]) and _operand(args[1])):
            return func(*args, **kwargs)
        (ap, at), (bp, bt) = _split(args[0]), _split(args[1])
        if at is None and bt is None:
            return func(*args, **kwargs)
        alpha = kwargs.get("alpha", 1)
        out = func(ap, bp, **kwargs)
        if not isinstance(out, Tensor) or not (out.is_floating_point() or out.is_complex()):
            return func(*args, **kwargs)
        with torch.no_grad():
            tan = _binary_tangent(kind, ap, at, bp, bt, out, alpha)
        return _pair(out, tan)

    return handler


def _binary_tangent(
    kind: str, ap: Any, at: Tensor | None, bp: Any, bt: Tensor | None, out: Tensor, alpha: Any
) -> Tensor:
    """The tangent of :func:`_binary`'s ``kind`` (``at`` or ``bt`` may be ``None``, not both)."""
    if kind == "rdiv":  # Tensor.__rdiv__(a, b) is PyTorch's composition b * a.reciprocal(): its rules, in its dtypes
        r = ap.reciprocal()
        rt = None if at is None else -at * (r * r)
        if rt is None:
            assert bt is not None
            return bt * r
        return rt * bp if bt is None else bt * r + rt * bp
    if at is not None and bt is not None:  # two duals: PyTorch's formulas
        if kind == "add":
            return at + bt if alpha == 1 else at + bt * alpha
        if kind == "sub":
            return at - bt if alpha == 1 else at - bt * alpha
        if kind == "rsub":  # b - alpha a
            return bt - at if alpha == 1 else bt - at * alpha
        if kind == "mul":
            return at * bp + ap * bt
        return (at - bt * out) / bp  # div: a / b
    if at is not None:  # the first operand carries the tangent
        if kind in ("add", "sub"):
            return at.clone()  # a fresh tangent: an in-place op on the output must not reach the input's
        if kind == "rsub":  # b - alpha a
            return -at if alpha == 1 else at * (-alpha)
        if kind == "mul":
            return at * bp
        return at / bp  # div: a / b
    assert bt is not None
    if kind == "add":
        return bt.clone() if alpha == 1 else bt * alpha
    if kind == "sub":
        return -bt if alpha == 1 else bt * (-alpha)
    if kind == "rsub":
        return bt.clone()
    if kind == "mul":
        return ap * bt
    return -(bt * out) / bp  # div


def _bind(names: tuple[str, ...], defaults: dict[str, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> list:
    bound = {**defaults, **dict(zip(names, args, strict=False)), **kwargs}
    return [bound[n] for n in names]


def _normalised(x: Tensor, dx: Tensor, dims: tuple[int, ...], eps: float) -> Tensor:
    r"""Tangent :math:`\dot{\hat x}` of :math:`\hat x = (x - \mu) / \sigma` over ``dims`` (plain tensors)."""
    mu = x.mean(dims, keepdim=True)
    centred = x - mu
    rstd = torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)
    xhat = centred * rstd
    return (dx - dx.mean(dims, keepdim=True) - xhat * (dx * xhat).mean(dims, keepdim=True)) * rstd


def _normalised_from(xhat: Tensor, rstd: Tensor, dx: Tensor, dims: tuple[int, ...]) -> Tensor:
    r"""Normalisation tangent :math:`(\dot x - \overline{\dot x} - \hat x\,\overline{\dot x \hat x}) / \sigma`.

    ``xhat`` and ``rstd`` (:math:`1/\sigma`, broadcastable) come from a fused pass; means over ``dims``.
    """
    return (dx - dx.mean(dims, keepdim=True) - xhat * (dx * xhat).mean(dims, keepdim=True)) * rstd


def _channel(p: Tensor, ndim: int) -> Tensor:
    """A per-channel vector ``(C,)`` shaped to broadcast over ``(N, C, *)``."""
    return p.reshape(1, -1, *([1] * (ndim - 2)))


def _plain(*tensors: Any) -> bool:
    return all(t is None or (isinstance(t, Tensor) and _split(t)[1] is None) for t in tensors)


def _layer_norm(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    x, shape, w, b, eps = _bind(names, {"weight": None, "bias": None, "eps": 1e-5}, args, kwargs)
    xp, dx = _split(x)
    if dx is None or not _plain(w, b) or (w is None and b is None and not torch.is_grad_enabled()):
        return func(*args, **kwargs)  # without affine parameters and gradient PyTorch's rule is fast
    out = F.layer_norm(xp, shape, w, b, eps)
    with torch.no_grad():  # x_hat and 1 / sigma from one fused pass
        xhat, _, rstd = torch.native_layer_norm(xp, shape, None, None, eps)
        tan = _normalised_from(xhat, rstd, dx.contiguous(), tuple(range(-len(shape), 0)))
        tan = tan if w is None else tan * w
    return _pair(out, tan)


def _group_norm(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    names = ("input", "num_groups", "weight", "bias", "eps")
    x, groups, w, b, eps = _bind(names, {"weight": None, "bias": None, "eps": 1e-5}, args, kwargs)
    xp, dx = _split(x)
    if dx is None or not _plain(w, b) or xp.ndim < 2:
        if isinstance(x, Tensor):  # PyTorch's rule views its input: make it contiguous first
            return func(x.contiguous(), groups, w, b, eps)
        return func(*args, **kwargs)
    out = F.group_norm(xp, groups, w, b, eps)
    n, c = xp.shape[:2]
    with torch.no_grad():  # x_hat and 1 / sigma per group from one fused pass
        xc = xp.contiguous()
        xhat, _, rstd = torch.native_group_norm(xc, None, None, n, c, math.prod(xc.shape[2:]), groups, eps)
        g = (n, groups, -1)
        tan = _normalised_from(xhat.reshape(g), rstd.reshape(n, groups, 1), dx.contiguous().reshape(g), (2,))
        tan = tan.reshape(xp.shape)
        tan = tan if w is None else tan * _channel(w, xp.ndim)
    return _pair(out, tan)


def _batch_norm(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
    defaults = {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}
    x, mean, var, w, b, training, momentum, eps = _bind(names, defaults, args, kwargs)
    xp, dx = _split(x)
    if dx is None or not _plain(mean, var, w, b):
        return func(*args, **kwargs)
    out = F.batch_norm(xp, mean, var, w, b, training, momentum, eps)
    with torch.no_grad():
        if training or var is None:
            tan = _normalised(xp, dx, (0, *range(2, xp.ndim)), eps)
        else:
            tan = dx * _channel(torch.rsqrt(var + eps), xp.ndim)
        tan = tan if w is None else tan * _channel(w, xp.ndim)
    return _pair(out, tan)


def _rms_norm(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    names = ("input", "normalized_shape", "weight", "eps")
    x, shape, w, eps = _bind(names, {"weight": None, "eps": None}, args, kwargs)
    xp, dx = _split(x)
    if dx is None or not _plain(w) or (w is None and not torch.is_grad_enabled()):
        return func(*args, **kwargs)  # PyTorch's rule is fast without the weight
    out = func(xp, shape, w, eps)  # the network's own call (and its errors, e.g. an int normalized_shape)
    dims = tuple(range(-len(tuple(shape)), 0))
    with torch.no_grad():  # in float32 at least, with that type's eps by default, as PyTorch's own kernel
        xf, df = upcast(xp), upcast(dx)
        e = torch.finfo(xf.dtype).eps if eps is None else eps
        rstd = torch.rsqrt(xf.square().mean(dims, keepdim=True) + e)
        tan = (df - xf * (rstd * rstd) * (xf * df).mean(dims, keepdim=True)) * rstd
        tan = tan if w is None else tan * w
    return _pair(out, tan)


def _linear(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x, w, b = _bind(("input", "weight", "bias"), {"bias": None}, args, kwargs)
    xp, dx = _split(x)
    if dx is None or not _plain(w, b):
        return func(*args, **kwargs)
    out = F.linear(xp, w, b)
    with torch.no_grad():
        tan = F.linear(dx, w)
    return _pair(out, tan)


def _conv(conv: Callable[..., Tensor], transposed: bool = False) -> Handler:
    """Handler of a convolution (``transposed``: ``conv_transpose``, with ``output_padding`` before ``groups``)."""
    names: tuple[str, ...]
    if transposed:
        names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
        defaults = {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}
    else:
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}

    def handler(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if not set(kwargs) <= set(names):
            return func(*args, **kwargs)
        x, w, b, *opts = _bind(names, defaults, args, kwargs)
        xp, dx = _split(x)
        if dx is None or not _plain(w, b):
            return func(*args, **kwargs)
        out = conv(xp, w, b, *opts)
        with torch.no_grad():
            tan = conv(dx, w, None, *opts)
        return _pair(out, tan)

    return handler


_aten = torch.ops.aten


def _unary(derivative: Callable[[Tensor, Tensor, Tensor], Tensor], flag: str | None = None) -> Handler:
    """Handler of an elementwise ``func(x, ...)`` with tangent ``derivative(dx, x, out)``.

    ``flag`` names a keyword (``inplace``) whose true value sends the call to PyTorch's rule.
    """

    def handler(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if len(args) != 1 or not isinstance(args[0], Tensor) or any(k != flag for k in kwargs):
            return func(*args, **kwargs)
        if flag is not None and kwargs.get(flag):
            return func(*args, **kwargs)
        xp, dx = _split(args[0])
        if dx is None or not torch.is_grad_enabled() or xp.is_complex():  # no-grad: PyTorch's rule is as fast
            return func(*args, **kwargs)
        out = func(xp, **kwargs)
        with torch.no_grad():
            tan = derivative(dx, xp, out)
        return _pair(out, tan)

    return handler


def _gelu(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    x, approximate = _bind(("input", "approximate"), {"approximate": "none"}, args, kwargs)
    xp, dx = _split(x)
    if dx is None or len(args) + len(kwargs) > 2 or not torch.is_grad_enabled():
        return func(*args, **kwargs)  # without gradient PyTorch's rule is as fast
    out = F.gelu(xp, approximate=approximate)
    with torch.no_grad():
        tan = _aten.gelu_backward(dx, xp, approximate=approximate)
    return _pair(out, tan)


_silu = _unary(lambda dx, x, out: _aten.silu_backward(dx, x), flag="inplace")
_relu = _unary(lambda dx, x, out: _aten.threshold_backward(dx, out, 0), flag="inplace")
_sigmoid = _unary(lambda dx, x, out: _aten.sigmoid_backward(dx, out))
_tanh = _unary(lambda dx, x, out: _aten.tanh_backward(dx, out))
_sin = _unary(lambda dx, x, out: dx * x.cos())
_cos = _unary(lambda dx, x, out: dx * -x.sin())
_exp = _unary(lambda dx, x, out: dx * out)

_T = torch.Tensor
_BINARY: dict[str, tuple[Callable[..., Any], ...]] = {
    "add": (torch.add, _T.add, _T.__add__, _T.__radd__),
    "sub": (torch.sub, torch.subtract, _T.sub, _T.subtract, _T.__sub__),
    "rsub": (torch.rsub, _T.__rsub__),
    "mul": (torch.mul, torch.multiply, _T.mul, _T.multiply, _T.__mul__, _T.__rmul__),
    "div": (torch.div, torch.divide, torch.true_divide, _T.div, _T.divide, _T.true_divide, _T.__truediv__),
    "rdiv": (_T.__rdiv__, _T.__rtruediv__),
}

#: Function -> handler: the explicit rules of this module, entered into the eager routes of
#: :data:`meanflow_losses.forward_ad.ROUTES`.
TANGENT_RULES: dict[Callable[..., Any], Handler] = {
    **{f: _binary(kind) for kind, funcs in _BINARY.items() for f in funcs},
    F.linear: _linear,
    F.conv1d: _conv(F.conv1d),
    F.conv2d: _conv(F.conv2d),
    F.conv3d: _conv(F.conv3d),
    F.conv_transpose1d: _conv(F.conv_transpose1d, transposed=True),
    F.conv_transpose2d: _conv(F.conv_transpose2d, transposed=True),
    F.conv_transpose3d: _conv(F.conv_transpose3d, transposed=True),
    F.silu: _silu,
    F.relu: _relu,
    F.gelu: _gelu,
    **dict.fromkeys((torch.sigmoid, _T.sigmoid), _sigmoid),
    **dict.fromkeys((torch.tanh, _T.tanh, F.tanh), _tanh),
    **dict.fromkeys((torch.sin, _T.sin), _sin),
    **dict.fromkeys((torch.cos, _T.cos), _cos),
    **dict.fromkeys((torch.exp, _T.exp), _exp),
    F.layer_norm: _layer_norm,
    F.group_norm: _group_norm,
    F.batch_norm: _batch_norm,
}
if hasattr(F, "rms_norm"):  # torch >= 2.4
    TANGENT_RULES[F.rms_norm] = _rms_norm
