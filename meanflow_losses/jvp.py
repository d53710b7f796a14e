r"""The JVP engine: the total time derivative of the average velocity, by strategy.

MeanFlow needs

.. math::
    \frac{d}{dt} u_\theta(z_t, r, t) = \partial_z u_\theta\,\tilde v + \partial_t u_\theta,

one forward-mode JVP of ``model(z, r, t)`` along the tangent :math:`(\dot z, \dot r, \dot t) =
(\tilde v, 0, 1)`. Strategies, selected by name:

* ``"nograd"`` (default): forward-mode AD (``torch.autograd.forward_ad``) under ``torch.no_grad`` on the
  ``target_model``; the objective then runs one ordinary gradient forward. Memory like flow matching;
  works with DDP (JVP on the unwrapped module, the gradient forward through the wrapper) and with
  activation checkpointing.
* ``"joint"``: forward-mode AD with gradient through the primal output, so one call yields both ``u``
  (differentiable) and ``du/dt``. Suits ``torch.compile``; records the tangent computation on the autograd
  graph (several times the activation memory) and fails through DDP and checkpointing.
* ``"finite_difference"``: central difference
  :math:`[u(z + \epsilon\tilde v, r, t + \epsilon) - u(z - \epsilon\tilde v, r, t - \epsilon)] / 2\epsilon`
  in one batched no-grad forward; works with any attention kernel; error :math:`O(\epsilon^2)`.

Fused scaled-dot-product-attention kernels have no forward-AD rule, so the AD strategies switch SDPA to the
math backend for the JVP only (the gradient forward keeps the fast kernel). With ``fp32=True`` autocast is
disabled inside the JVP and low-precision inputs are cast to float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from meanflow_losses._validate import check_model_output

__all__ = ["JVP_STRATEGIES", "JVPResult", "jvp_context", "time_derivative"]

JVP_STRATEGIES: tuple[str, ...] = ("nograd", "joint", "finite_difference")


@dataclass
class JVPResult:
    """Output of :func:`time_derivative`.

    Attributes:
        dudt: :math:`du/dt`, shape ``(n, *D)``, detached.
        u: The primal ``u(z, r, t)``, shape ``(n, *D)``: differentiable for ``"joint"``, detached otherwise
            (``None`` for ``"finite_difference"``).
    """

    dudt: Tensor
    u: Tensor | None


def check_strategy(strategy: str) -> str:
    """Check that ``strategy`` names a JVP strategy."""
    if strategy not in JVP_STRATEGIES:
        raise ValueError(f"jvp must be one of {JVP_STRATEGIES}, got {strategy!r}")
    return strategy


def _math_sdpa() -> contextlib.AbstractContextManager[Any]:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - very old torch
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


@contextlib.contextmanager
def jvp_context(device_type: str, *, fp32: bool = True, math_attention: bool = True) -> Iterator[bool]:
    """Context for a JVP: math SDPA backend, and autocast disabled when ``fp32``.

    Args:
        device_type: ``"cpu"`` or ``"cuda"``: which autocast to disable.
        fp32: Disable autocast inside the block.
        math_attention: Switch scaled-dot-product attention to the math backend.

    Yields:
        Whether autocast was switched off (then half-precision inputs are cast to float32).
    """
    with contextlib.ExitStack() as stack:
        if math_attention:
            stack.enter_context(_math_sdpa())
        cast = False
        if fp32 and torch.is_autocast_enabled(device_type):
            cast = True
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield cast


def _cat_rows(kw: Mapping[str, Any], n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, val in kw.items():
        if isinstance(val, Tensor) and val.ndim > 0 and val.shape[0] == n:
            out[k] = torch.cat([val, val], dim=0)
        else:
            out[k] = val
    return out


def default_fd_eps(dtype: torch.dtype) -> float:
    r"""Step of the central difference: :math:`\epsilon_{mach}^{1/3}` (6e-6 in float64, 5e-3 in float32)."""
    return float(torch.finfo(dtype).eps) ** (1.0 / 3.0)


def time_derivative(
    model: Callable[..., Tensor],
    z: Tensor,
    r: Tensor,
    t: Tensor,
    tangent: Tensor,
    model_kwargs: Mapping[str, Any] | None = None,
    *,
    strategy: str = "nograd",
    fp32: bool = True,
    math_attention: bool = True,
    fd_eps: float | None = None,
) -> JVPResult:
    r"""Total derivative :math:`du/dt = \partial_z u\,\dot z + \partial_t u` along ``(tangent, 0, 1)``.

    Args:
        model: ``model(z, r, t, **model_kwargs)``.
        z: Inputs ``z_t``, shape ``(n, *D)``.
        r: End times, shape ``(n,)``.
        t: Start times, shape ``(n,)``.
        tangent: :math:`\dot z` (the guided velocity), shape ``(n, *D)``.
        model_kwargs: Conditioning, rows aligned with ``z``.
        strategy: ``"nograd"``, ``"joint"`` or ``"finite_difference"``.
        fp32: Under autocast, run the JVP in float32 with autocast disabled. Without autocast the JVP runs in
            the model's own dtype (a model converted with ``.bfloat16()`` stays in bfloat16).
        math_attention: Use the math SDPA backend during forward-mode AD.
        fd_eps: Finite-difference step (default :func:`default_fd_eps` of the compute dtype).

    Returns:
        :class:`JVPResult` with ``dudt`` in the dtype of ``z``.
    """
    check_strategy(strategy)
    kw = dict(model_kwargs or {})
    out_dtype = z.dtype
    z_in, tan_in, r_in, t_in = z.detach(), tangent.detach(), r.detach(), t.detach()
    use_math = math_attention and strategy != "finite_difference"
    with jvp_context(z.device.type, fp32=fp32, math_attention=use_math) as cast:
        if cast and z_in.dtype in (torch.float16, torch.bfloat16):
            z_in, tan_in = z_in.float(), tan_in.float()
            r_in, t_in = r_in.float(), t_in.float()
        if strategy == "finite_difference":
            n = z_in.shape[0]
            eps = default_fd_eps(z_in.dtype) if fd_eps is None else float(fd_eps)
            if not eps > 0:
                raise ValueError(f"fd_eps must be > 0, got {fd_eps}")
            zz = torch.cat([z_in + eps * tan_in, z_in - eps * tan_in])
            rr = torch.cat([r_in, r_in])
            tt = torch.cat([t_in + eps, t_in - eps])
            with torch.no_grad():
                out = check_model_output(model(zz, rr, tt, **_cat_rows(kw, n)), zz, who="target_model")
            dudt = (out[:n] - out[n:]) / (2 * eps)
            return JVPResult(dudt=dudt.to(out_dtype), u=None)

        grad_ctx = torch.no_grad() if strategy == "nograd" else contextlib.nullcontext()
        with grad_ctx:
            u, dudt = _forward_ad_jvp(model, z_in, r_in, t_in, tan_in, kw)
        if strategy == "nograd":
            check_model_output(u, z_in, who="target_model")
            return JVPResult(dudt=dudt.detach().to(out_dtype), u=u.detach())
        check_model_output(u, z_in, who="model")
        return JVPResult(dudt=dudt.detach().to(out_dtype), u=u)


def _forward_ad_jvp(
    model: Callable[..., Tensor], z: Tensor, r: Tensor, t: Tensor, tangent: Tensor, kw: Mapping[str, Any]
) -> tuple[Tensor, Tensor]:
    """One forward-mode pass with dual inputs ``(z, v)`` and ``(t, 1)``; ``r`` carries no tangent.

    ``torch.autograd.forward_ad`` is used rather than ``torch.func.jvp``: it computes the same JVP with
    less per-operation overhead (measured about 10% faster on the benchmark MLP) and composes with
    reverse-mode autograd for the ``"joint"`` strategy.
    """
    with fwAD.dual_level():
        z_d = fwAD.make_dual(z, tangent)
        t_d = fwAD.make_dual(t, torch.ones_like(t))
        out = model(z_d, r, t_d, **kw)
        if not isinstance(out, Tensor):
            raise TypeError(f"model(z, r, t, **model_kwargs) must return a Tensor, got {type(out).__name__}")
        u, dudt = fwAD.unpack_dual(out)
    if dudt is None:  # the output does not depend on z or t
        dudt = torch.zeros_like(u)
    return u, dudt
