r"""The JVP engine: the total time derivative of the average velocity, by strategy.

MeanFlow needs

.. math::
    \frac{d}{dt} u_\theta(z_t, r, t) = \partial_z u_\theta\,\tilde v + \partial_t u_\theta,

one forward-mode JVP of ``model(z, r, t)`` along the tangent :math:`(\dot z, \dot r, \dot t) =
(\tilde v, 0, 1)`. Strategies, selected by name:

* ``"nograd"`` (default): forward-mode AD (``torch.autograd.forward_ad``) under ``torch.no_grad`` on the
  ``target_model``; the objective then runs one ordinary gradient forward. Memory like flow matching;
  works with DDP (JVP on the unwrapped module, the gradient forward through the wrapper) and with
  activation checkpointing. A stochastic network (dropout) draws its own masks in the JVP pass.
* ``"joint"``: forward-mode AD with gradient through the primal output, so one call yields both ``u``
  (differentiable) and ``du/dt`` with the SAME dropout masks, and the ``r != t`` rows' primal is computed once.
  The routed operators (:mod:`meanflow_losses.tangent_rules`: linear layers, convolutions, normalisations, the
  common activations and arithmetic) compute their tangents without autograd history; PyTorch's own rules for the
  other operators record theirs on the autograd graph (more activation memory). Fails through DDP and
  checkpointing.
* ``"finite_difference"``: :math:`[u(z + a\tilde v, r, t + a) - u(z + b\tilde v, r, t + b)] / (a - b)`, two no-grad
  passes that draw the same dropout masks; central (:math:`a = \epsilon = -b`) wherever
  :math:`[t - \epsilon, t + \epsilon] \subset [r, 1]`, and shifted into the domain at its edges (so a network never
  sees ``t > 1`` or ``t < r``); works with any attention kernel; error :math:`O(\epsilon^2)` in the interior.

Every forward-mode pass runs inside :func:`~meanflow_losses.forward_ad.forward_ad_context`, which makes the
operators that break under forward AD safe (fused attention, non-contiguous GroupNorm, the MHA fast path,
compiled modules). Every no-grad pass leaves the network's buffers untouched. With ``fp32=True`` half-precision
inputs, autocast and half-precision weights are all taken to float32 for the JVP.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from meanflow_losses._dtypes import is_half, upcast
from meanflow_losses._validate import _values_on, compiling
from meanflow_losses.conditioning import Conditioning
from meanflow_losses.conventions import append_dims
from meanflow_losses.forward_ad import eager_module, forward_ad_context, no_mha_fastpath
from meanflow_losses.jvp_attention import JVPAttention
from meanflow_losses.passes import call, layers_where, preserve_buffers, same_randomness
from meanflow_losses.traced_jvp import DropZeroProducts

__all__ = [
    "JVP_STRATEGIES",
    "JVPResult",
    "JVPStrategy",
    "MissingTangentError",
    "default_fd_eps",
    "finite_difference_points",
    "jvp_context",
    "time_derivative",
]

JVPStrategy = Literal["nograd", "joint", "finite_difference"]
JVP_STRATEGIES: tuple[str, ...] = ("nograd", "joint", "finite_difference")


class MissingTangentError(RuntimeError):
    """Forward-mode AD produced no tangent although the output depends on ``z`` or ``t``."""


@dataclass
class JVPResult:
    """Output of :func:`time_derivative`.

    Attributes:
        dudt: :math:`du/dt`, shape ``(n, *D)``, detached, in the dtype the JVP was computed in (float32 for
            half-precision inputs under ``fp32=True``, else the dtype of ``z``).
        u: The primal ``u(z, r, t)``, shape ``(n, *D)``: differentiable for ``"joint"``, detached for
            ``"nograd"``, ``None`` for ``"finite_difference"``.
    """

    dudt: Tensor
    u: Tensor | None


def check_strategy(strategy: Any) -> str:
    """Check that ``strategy`` names a JVP strategy."""
    if not isinstance(strategy, str) or strategy not in JVP_STRATEGIES:
        raise ValueError(f"jvp must be one of {JVP_STRATEGIES}, got {strategy!r}")
    return strategy


@contextlib.contextmanager
def jvp_context(
    device_type: str, *, fp32: bool = True, math_attention: bool = True, attention: str = "auto"
) -> Iterator[bool]:
    """Autocast disabled when ``fp32`` and, when ``math_attention``, the forward-AD-safe operator routing.

    Args:
        device_type: ``"cpu"`` or ``"cuda"``: which autocast to disable.
        fp32: Disable autocast inside the block.
        math_attention: Enter :func:`~meanflow_losses.forward_ad.forward_ad_context` (the operator routes).
        attention: How SDPA calls are differentiated (:mod:`meanflow_losses.jvp_attention`).

    Yields:
        Whether autocast was switched off.
    """
    with contextlib.ExitStack() as stack:
        if math_attention:
            stack.enter_context(forward_ad_context(attention))
        cast = False
        if fp32 and torch.is_autocast_enabled(device_type):
            cast = True
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield cast


def default_fd_eps(dtype: torch.dtype) -> float:
    r"""Step of the central difference: :math:`\epsilon_{mach}^{1/3}` (6e-6 in float64, 5e-3 in float32)."""
    return float(torch.finfo(dtype).eps) ** (1.0 / 3.0)


def finite_difference_points(r: Tensor, t: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    r"""The two times :math:`t + a \ge t + b` of the difference quotient, inside :math:`[r, 1]`.

    Central :math:`(t + \epsilon, t - \epsilon)` where the whole stencil fits; at an edge the stencil keeps its
    width :math:`2\epsilon` and is shifted into the domain (one-sided), and where the domain is shorter than
    :math:`2\epsilon` it spans the whole domain.

    Args:
        r: End times, shape ``(n,)``.
        t: Start times, shape ``(n,)``, ``r <= t <= 1``.
        eps: Half-width :math:`\epsilon > 0`.

    Returns:
        ``(hi, lo)``, shape ``(n,)`` each, with ``r <= lo <= hi <= 1``.
    """
    hi = torch.clamp(t + eps, max=1.0)
    lo = torch.maximum(t - eps, r)
    top = hi < t + eps  # the stencil hit t = 1: push it down
    lo = torch.where(top, torch.maximum(hi - 2 * eps, r), lo)
    bottom = (~top) & (lo > t - eps)  # the stencil hit r: push it up
    hi = torch.where(bottom, torch.clamp(lo + 2 * eps, max=1.0), hi)
    return hi, lo


def _has_half_weights(model: Any) -> bool:
    if not isinstance(model, nn.Module):
        return False
    return any(is_half(p) for p in model.parameters()) or any(is_half(b) for b in model.buffers())


def half_plain_function(model: Any, z: Tensor) -> bool:
    """Whether a JVP with ``fp32=True`` still runs in half precision: half inputs, no autocast, not a Module."""
    return is_half(z) and not isinstance(model, nn.Module) and not torch.is_autocast_enabled(z.device.type)


def float32_view(model: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``model`` evaluated with float32 copies of its half-precision parameters and buffers (differentiable)."""
    if not isinstance(model, nn.Module):
        return model
    tensors = {name: upcast(v) for name, v in [*model.named_parameters(), *model.named_buffers()]}

    def run(z: Tensor, r: Tensor, t: Tensor, **kwargs: Any) -> Tensor:
        return torch.func.functional_call(model, tensors, (z, r, t), kwargs, strict=False)

    return run


def time_derivative(
    model: Callable[..., Tensor],
    z: Tensor,
    r: Tensor,
    t: Tensor,
    tangent: Tensor,
    model_kwargs: Conditioning | Mapping[str, Any] | None = None,
    *,
    strategy: JVPStrategy = "nograd",
    fp32: bool = True,
    math_attention: bool = True,
    fd_eps: float | None = None,
    attention: JVPAttention = "auto",
) -> JVPResult:
    r"""Total derivative :math:`du/dt = \partial_z u\,\dot z + \partial_t u` along ``(tangent, 0, 1)``.

    Args:
        model: ``model(z, r, t, **model_kwargs)``.
        z: Inputs ``z_t``, shape ``(n, *D)``.
        r: End times, shape ``(n,)``.
        t: Start times, shape ``(n,)``.
        tangent: :math:`\dot z` (the guided velocity), shape ``(n, *D)``.
        model_kwargs: Conditioning with ``n`` rows: a dict (its per-row entries are decided against ``n``) or a
            :class:`~meanflow_losses.conditioning.Conditioning` decided earlier against the whole batch.
        strategy: ``"nograd"``, ``"joint"`` or ``"finite_difference"``.
        fp32: Run the JVP in float32: under autocast, autocast is disabled and half-precision inputs are cast; an
            ``nn.Module`` with half-precision weights (``.half()`` / ``.bfloat16()``) is evaluated with float32
            copies of them (and float32 inputs). A plain function with half inputs runs in their dtype.
        math_attention: Make forward AD safe on the fragile operators (the routes of
            :mod:`meanflow_losses.forward_ad`); only for the AD strategies.
        fd_eps: Finite-difference step (default :func:`default_fd_eps` of the compute dtype).
        attention: How the network's SDPA calls are differentiated by the AD strategies: ``"auto"`` (the
            flash kernel on CUDA when installed, else blockwise), ``"blockwise"``, ``"flash"`` or ``"math"``
            (:mod:`meanflow_losses.jvp_attention`).

    Returns:
        :class:`JVPResult`.

    Raises:
        MissingTangentError: forward AD lost the tangent although the output depends on ``z`` or ``t``.
    """
    check_strategy(strategy)
    if strategy != "finite_difference" and not compiling() and torch.is_inference_mode_enabled():
        raise RuntimeError(
            "time_derivative was called under torch.inference_mode(), where forward-mode AD produces no tangents: "
            "call the loss outside inference_mode (torch.no_grad is fine), or use jvp='finite_difference'"
        )
    cond = model_kwargs
    if not isinstance(cond, Conditioning):
        cond = Conditioning.from_kwargs(model_kwargs, z.shape[0])
    compiled = compiled_module(model)
    if compiled is not None and strategy != "finite_difference" and not compiling():
        # a torch.compile-d network: its JVP runs compiled too (traced with torch.func.jvp), not eagerly
        with _batch_counters_detached(compiled), no_mha_fastpath():
            res = _compiled_time_derivative()(
                compiled, z, r, t, tangent, cond, strategy="nograd", fp32=fp32, attention=attention, fd_eps=fd_eps
            )
        return JVPResult(dudt=res.dudt, u=None)
    z_in, tan_in, r_in, t_in = z.detach(), tangent.detach(), r.detach(), t.detach()
    use_routes = math_attention and strategy != "finite_difference"
    with jvp_context(z.device.type, fp32=fp32, math_attention=use_routes, attention=attention) as autocast_off:
        half_weights = fp32 and _has_half_weights(model)
        if autocast_off or half_weights:
            z_in, tan_in, r_in, t_in = (upcast(a) for a in (z_in, tan_in, r_in, t_in))
        fn = float32_view(model) if half_weights else model
        if use_routes:
            fn = eager_module(fn)
        if strategy == "finite_difference":
            eps = default_fd_eps(z_in.dtype) if fd_eps is None else float(fd_eps)
            if not eps > 0:
                raise ValueError(f"fd_eps must be > 0, got {fd_eps}")
            with torch.no_grad(), preserve_buffers(model):
                dudt = _difference_quotient(fn, z_in, r_in, t_in, tan_in, cond, eps, who="target_model")
            return JVPResult(dudt=dudt, u=None)
        who = "target_model" if strategy == "nograd" else "model"
        if compiling():  # traced: torch.func.jvp under no_grad (a "joint" primal is recomputed by the objective)
            counting = layers_where(model, _counts_batches)
            if counting:
                raise RuntimeError(
                    f"the network has BatchNorm layers in train mode ({', '.join(counting[:3])}) inside a compiled "
                    "training step: they count batches in place (num_batches_tracked += 1), which a traced JVP "
                    "cannot do. Compile the network only (torch.compile(model)) and keep the loss eager, put those "
                    "layers in eval mode, or use GroupNorm/LayerNorm"
                )
            with torch.no_grad(), preserve_buffers(model):
                u, dudt = _traced_dual_call(fn, z_in, r_in, t_in, tan_in, cond, who)
            return JVPResult(dudt=dudt.detach(), u=None if strategy == "joint" else u.detach())
        if strategy == "nograd":
            with torch.no_grad(), preserve_buffers(model):
                u, dudt = _dual_call(fn, z_in, r_in, t_in, tan_in, cond, who)
            return JVPResult(dudt=dudt.detach(), u=u.detach())
        u, dudt = _dual_call(fn, z_in, r_in, t_in, tan_in, cond, who)
        return JVPResult(dudt=dudt.detach(), u=u)


def _difference_quotient(
    model: Callable[..., Tensor],
    z: Tensor,
    r: Tensor,
    t: Tensor,
    tangent: Tensor,
    cond: Conditioning,
    eps: float,
    *,
    who: str,
) -> Tensor:
    """Two passes at the :func:`finite_difference_points`, with the same random draws; shape of ``z``."""
    hi, lo = finite_difference_points(r, t, eps)
    width = hi - lo
    if _values_on() and bool((width <= 0).any()):
        i = int((width <= 0).nonzero()[0])
        raise ValueError(
            f"finite_difference needs r < t or t < 1 on every row (row {i}: r = t = {float(t[i])}): the domain "
            "[r, 1] of the time derivative is a single point there"
        )
    with same_randomness(z.device), preserve_buffers(model):  # the second half sees the first's RNG and buffers
        u_hi = call(model, z + append_dims(hi - t, z).to(z.dtype) * tangent, r, hi, cond, who=who)
    u_lo = call(model, z + append_dims(lo - t, z).to(z.dtype) * tangent, r, lo, cond, who=who)
    return (u_hi - u_lo) / append_dims(width, u_hi).to(u_hi.dtype)


def _counts_batches(m: nn.Module) -> bool:
    """A BatchNorm layer that adds 1 to ``num_batches_tracked`` in place when called (train mode, tracked)."""
    return (
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.training
        and m.track_running_stats
        and m.num_batches_tracked is not None
    )


@contextlib.contextmanager
def _batch_counters_detached(model: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm without its batch counter for the duration of a compiled JVP.

    A train-mode BatchNorm adds 1 to ``num_batches_tracked`` in place, which a traced ``torch.func.jvp`` refuses
    (an in-place update of a captured tensor). The JVP leaves every buffer as it found it anyway (its BatchNorm
    route does not update the running statistics), so the counter is set aside and put back.
    """
    found = [m for m in model.modules() if _counts_batches(m)]
    saved = [m.num_batches_tracked for m in found]
    try:
        for m in found:
            m.num_batches_tracked = None  # type: ignore[assignment]  # a registered buffer may be None
        yield
    finally:
        for m, counter in zip(found, saved, strict=True):
            m.num_batches_tracked = counter


def compiled_module(model: Any) -> nn.Module | None:
    """The eager module inside a ``torch.compile`` wrapper (``torch.compile(net)``), else ``None``."""
    inner = getattr(model, "_orig_mod", None) if type(model).__name__ == "OptimizedModule" else None
    return inner if isinstance(inner, nn.Module) else None


_COMPILED: list[Callable[..., JVPResult]] = []


def _compiled_time_derivative() -> Callable[..., JVPResult]:
    """:func:`time_derivative` under ``torch.compile`` (built once; the compiler guards on the module).

    The compiler pass :class:`~meanflow_losses.traced_jvp.DropZeroProducts` removes the products of the primal
    with the weights' zero tangents that PyTorch's traced formulas leave in. Inductor's locality reordering is off
    for this region: it moved every attention block's tangent product ``P_i dV`` after the last block, so all the
    blocks' softmax matrices ``P_i`` stayed alive at once (N = 4096 tokens: 272 MiB against 37.5 MiB without it,
    the math backend's 644 MiB; no slower on the benchmark networks on the CPU). Static shapes (``dynamic=False``): the
    number of ``r != t`` rows is fixed per batch size, so a new shape is a new, cached compilation.
    """
    if not _COMPILED:
        options: dict[str, Any] = {"post_grad_custom_pre_pass": DropZeroProducts(), "reorder_for_locality": False}
        _COMPILED.append(torch.compile(time_derivative, dynamic=False, options=options))
    return _COMPILED[0]


def _traced_dual_call(
    model: Callable[..., Tensor], z: Tensor, r: Tensor, t: Tensor, tangent: Tensor, cond: Conditioning, who: str
) -> tuple[Tensor, Tensor]:
    """The JVP as ``torch.func.jvp``, which ``torch.compile`` traces (``torch.autograd.forward_ad`` it does not)."""
    out = torch.func.jvp(lambda z_, t_: call(model, z_, r, t_, cond, who=who), (z, t), (tangent, torch.ones_like(t)))
    return cast("tuple[Tensor, Tensor]", out)  # (primal, tangent): has_aux=False; the stub also allows an aux


def _dual_call(
    model: Callable[..., Tensor], z: Tensor, r: Tensor, t: Tensor, tangent: Tensor, cond: Conditioning, who: str
) -> tuple[Tensor, Tensor]:
    """One forward-mode pass with dual inputs ``(z, v)`` and ``(t, 1)``; ``r`` carries no tangent.

    ``torch.autograd.forward_ad`` is used rather than ``torch.func.jvp``: it computes the same JVP with less
    per-operation overhead (measured about 10% faster on the benchmark MLP) and composes with reverse-mode
    autograd for the ``"joint"`` strategy.
    """
    with fwAD.dual_level():
        z_d = fwAD.make_dual(z, tangent)
        t_d = fwAD.make_dual(t, torch.ones_like(t))
        out = call(model, z_d, r, t_d, cond, who=who)
        u, dudt = fwAD.unpack_dual(out)
    if dudt is not None:
        return u, dudt
    # No tangent came back. Zeros are right only if the output does not depend on (z, t) at all.
    with torch.no_grad(), preserve_buffers(model):
        moved = _difference_quotient(model, z, r, t, tangent, cond, 0.05, who=who)
    if not bool((moved == 0).all()):
        raise MissingTangentError(
            f"forward-mode AD returned no tangent for {who}(z, r, t), yet its output changes with z and t: the "
            "derivative is cut inside the network. Likely causes: a custom torch.autograd.Function without a "
            "forward-AD rule (jvp), a .detach() / .data / .item() / integer cast of z or t, or a compiled region "
            "that the engine could not run eagerly. Remove the cut, or use jvp='finite_difference'."
        )
    return u, torch.zeros_like(u)
