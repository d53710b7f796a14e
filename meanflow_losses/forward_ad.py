r"""Forward-mode AD made safe on the operators that break under it, for the duration of a JVP only.

PyTorch's forward-mode AD (``torch.autograd.forward_ad``, ``torch.func.jvp``) fails, or silently loses the
tangent, on several operators that ordinary networks use. The JVP engine enters :func:`forward_ad_context`
around every forward-mode pass; inside it, the calls of ANY user network are routed, with no change to its code:

* ``F.scaled_dot_product_attention``: the fused kernels (flash, flash-for-CPU, memory-efficient, cuDNN) have no
  forward-AD formula. A network's own SDPA calls are routed to a JVP-capable implementation selected by name
  (:mod:`meanflow_losses.jvp_attention`: the blockwise JVP by default, the optional flash kernel on CUDA, or the
  math backend); SDPA is also switched to the math backend globally, which reaches the attention that
  PyTorch's own ``F.multi_head_attention_forward`` calls.
* ``F.group_norm``: its forward-AD formula views its input, which fails with "view size is not compatible with
  input tensor's size and stride" on the non-contiguous tensors attention blocks leave behind (diffusers'
  ``UNet2DModel``). The explicit rule of :mod:`meanflow_losses.tangent_rules` takes any layout (and where it does
  not apply, the input is made contiguous before PyTorch's rule).
* ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` fast paths (``_native_multi_head_attention``,
  ``_transformer_encoder_layer_fwd``) have no forward-AD formula: the fast path is switched off.
* Speed routes (:data:`meanflow_losses.tangent_rules.TANGENT_RULES`): arithmetic with a tangent-free operand (a
  parameter, a constant), the normalisations with their affine parameters, ``F.linear`` and the convolutions,
  and the common activations get explicit rules: the primal by the network's own call, the tangent from plain
  tensors without autograd history. PyTorch's own rules take a slow zero-tensor path there (5x to 30x a plain
  call on the CPU) or record the tangent on the autograd graph; the numbers are the same.
* ``torch.compile``-d modules drop or refuse the tangent (compiled graphs hold ``out=`` kernels): compiled
  code runs eagerly inside the context (``torch.compiler.set_stance("force_eager")``), so a compiled model, or a
  model with compiled blocks, gets the exact du/dt of the eager network.

The routing is a :class:`torch.overrides.TorchFunctionMode` holding a table from function to handler
(:data:`ROUTES`), so a new fragile operator is one entry. Outside the context nothing changes: the gradient
forward keeps the fused attention kernels and the compiled graph.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from meanflow_losses._validate import compiling as _compiling
from meanflow_losses.jvp_attention import DEFAULT_BLOCK, check_attention, sdpa_with_jvp
from meanflow_losses.tangent_rules import TANGENT_RULES
from meanflow_losses.traced_jvp import TRACED_ROUTES

__all__ = ["ROUTES", "ForwardADRoutes", "eager_module", "forward_ad_context", "no_mha_fastpath"]

Handler = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]


def _math_sdpa() -> contextlib.AbstractContextManager[Any]:
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        return contextlib.nullcontext()
    return sdpa_kernel(SDPBackend.MATH)


#: Function -> handler ``(func, args, kwargs) -> output`` applied inside :func:`forward_ad_context`.
#: A routed call's own inner torch calls are not seen by the mode (PyTorch pops a mode while it handles a call), so
#: switches that must reach nested calls (the SDPA backend, the MHA fast path, the compile stance) are global.
ROUTES: dict[Callable[..., Any], Handler] = dict(TANGENT_RULES)


class ForwardADRoutes(TorchFunctionMode):
    """A ``TorchFunctionMode`` that sends the calls listed in :data:`ROUTES` (and SDPA) to their handlers.

    Args:
        attention: How SDPA calls are differentiated (:data:`meanflow_losses.jvp_attention.JVP_ATTENTION`).
        block: Query rows per block of the blockwise attention JVP.
        traced: The JVP is traced by ``torch.compile``: use :data:`meanflow_losses.traced_jvp.TRACED_ROUTES`.
    """

    def __init__(self, attention: str = "auto", block: int = DEFAULT_BLOCK, traced: bool = False) -> None:
        super().__init__()
        check_attention(attention)
        if traced:
            self.routes = dict(TRACED_ROUTES)
            return
        self.routes = dict(ROUTES)
        if attention != "math":
            self.routes[F.scaled_dot_product_attention] = functools.partial(
                sdpa_with_jvp, attention=attention, block=block
            )

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """Route ``func`` if it has a handler, else call it unchanged."""
        kwargs = kwargs or {}
        handler = self.routes.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        return func(*args, **kwargs)


_SET_STANCE = getattr(getattr(torch, "compiler", None), "set_stance", None)


def _eager_stance() -> contextlib.AbstractContextManager[Any]:
    if _SET_STANCE is None:  # pragma: no cover - torch < 2.6: see eager_module
        return contextlib.nullcontext()
    return _SET_STANCE("force_eager")


def eager_module(model: Any) -> Any:
    """The module to run forward AD on: ``model``, or its eager module on a torch without ``set_stance``.

    On torch < 2.6 (no ``torch.compiler.set_stance``) a top-level ``torch.compile`` wrapper is unwrapped; compiled
    submodules cannot be reached there, and the runtime checks report what they break.
    """
    if _SET_STANCE is None:  # pragma: no cover - torch < 2.6
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, torch.nn.Module):
            return inner
    return model


@contextlib.contextmanager
def no_mha_fastpath() -> Iterator[None]:
    """``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` without their fast path (no forward-mode formula)."""
    mha = getattr(torch.backends, "mha", None)
    if mha is None or not hasattr(mha, "set_fastpath_enabled"):  # pragma: no cover - old torch
        yield
        return
    before = mha.get_fastpath_enabled()
    mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        mha.set_fastpath_enabled(before)


@contextlib.contextmanager
def forward_ad_context(attention: str = "auto", block: int = DEFAULT_BLOCK) -> Iterator[None]:
    """Everything a forward-mode pass through an arbitrary network needs (see the module docstring).

    Inside ``torch.compile``-d code only the routes of :mod:`meanflow_losses.traced_jvp` apply (primitive forms of
    the operators whose forward-mode formulas the compiler cannot trace), with the math SDPA backend for the
    attention inside PyTorch's own modules; the caller of a compiled JVP region switches the MHA fast path off.

    Args:
        attention: How the network's SDPA calls are differentiated: ``"auto"``, ``"blockwise"``, ``"flash"`` or
            ``"math"`` (:mod:`meanflow_losses.jvp_attention`).
        block: Query rows per block of the blockwise attention JVP.
    """
    if _compiling():  # the math backend reaches the SDPA inside nn.MultiheadAttention (not seen by the mode)
        with _math_sdpa(), ForwardADRoutes(attention, block, traced=True):
            yield
        return
    with _eager_stance(), no_mha_fastpath(), _math_sdpa(), ForwardADRoutes(attention, block):
        yield
