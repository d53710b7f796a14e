r"""Fine-tune a flow-matching network into a mean-flow network that starts as the flow-matching network.

A flow-matching (FM) network ``net(z, t, **kw)`` predicts the instantaneous velocity only. MeanFlow-type objectives
need the average velocity ``u(z, r, t)``, i.e. a network that also sees the interval. :func:`from_flow_matching`
adds a second embedding beside the network's existing time embedding,

.. math::
    \mathrm{emb}(t) \;\longrightarrow\; \mathrm{emb}(t) + E_h(h), \qquad h = t - r \ \text{(or } h = r\text{)},

where :math:`E_h` is a fresh module (a copy of the time embedder's architecture, or a small sinusoidal + MLP
embedder of the same width) whose **last layer is zero-initialised**. At initialisation :math:`E_h \equiv 0`, so the
converted model equals the FM network exactly for every ``r`` (bit for bit: the hook adds an exact zero), and
training starts from it; gradients reach :math:`E_h`'s last layer at the first step (its input features are not
zero) and the layers before it from the second step on.

How it works: the returned module's ``forward(z, r, t, **kw)`` computes ``h`` from ``r`` and ``t`` itself (so the
JVP engine's tangent :math:`(\dot r, \dot t) = (0, 1)` gives :math:`\dot h = 1`, or :math:`\dot h = 0` for
``interval_input="r"``), stores it on the module for the duration of the call and calls ``net(z, t, **kw)``. A
forward hook on the time embedder adds :math:`E_h(h)` to the embedder's output while a call is in progress (and
nothing otherwise, so the bare network keeps working as before). Forward-mode AD, ``torch.compile``, DDP and
``AveragedModel`` (deep copies) work through it.

Names: the converted module's ``state_dict()`` and ``named_parameters()`` are the FM network's own names plus the new
embedder's under ``interval_embedder.``, so an FM checkpoint loads with ``strict=False`` and only the
``interval_embedder.*`` keys missing (or with :meth:`FlowMatchingFineTune.load_fm_state_dict`, which checks exactly
that).

Time conventions are converted as :mod:`meanflow_losses.adapters` does: ``time_convention="noise_at_0"`` feeds
``1 - t`` and negates the output; ``time_scale`` multiplies every time the network and :math:`E_h` receive (``1000``
for a DDPM-style network of ``t`` in ``[0, 1000]``; mind the warning on high-frequency time embeddings in
``docs/conventions.md``).

Example::

    fm_net = MyDiT(...)                                   # forward(x, t, y), trained with flow matching
    fm_net.load_state_dict(torch.load("fm.pt"))
    model = mfl.finetune.from_flow_matching(fm_net, "t_embedder")
    out = mfl.MeanFlowLoss()(model, x, model_kwargs={"y": y})
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from meanflow_losses._validate import check_model_output, compiling
from meanflow_losses.adapters import TimeConvention, _check_convention, _check_net

__all__ = [
    "FlowMatchingFineTune",
    "SinusoidalEmbedder",
    "from_flow_matching",
    "zero_last_layer",
]

IntervalInput = Literal["t_minus_r", "r"]
_INTERVAL_INPUTS = ("t_minus_r", "r")
_EMBEDDER_KINDS = ("copy", "fresh", "sinusoidal")


class SinusoidalEmbedder(nn.Module):
    """Sinusoidal features of a scalar followed by a two-layer MLP: ``(B,) -> (B, out_dim)``.

    The angular frequencies are ``exp(-ln(10000) k / (frequency_dim / 2))``, ``k = 0 .. frequency_dim/2 - 1``, i.e.
    in ``(1e-4, 1]`` rad per unit of the input: smooth in raw times in ``[0, 1]``, so ``du/dt`` stays well behaved.

    Args:
        out_dim: Output width (the time embedding's).
        frequency_dim: Number of sinusoidal features (even).
        hidden_dim: Width of the MLP's hidden layer (default ``out_dim``).
    """

    freqs: Tensor  # a buffer

    def __init__(self, out_dim: int, frequency_dim: int = 256, hidden_dim: int | None = None) -> None:
        super().__init__()
        if out_dim < 1 or frequency_dim < 2 or frequency_dim % 2:
            raise ValueError(f"need out_dim >= 1 and an even frequency_dim >= 2, got {out_dim}, {frequency_dim}")
        half = frequency_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)
        hidden = hidden_dim or out_dim
        first = nn.Linear(frequency_dim, hidden)
        self.mlp = nn.Sequential(first, nn.SiLU(), nn.Linear(hidden, out_dim))
        nn.init.normal_(first.weight, std=0.02)
        nn.init.zeros_(first.bias)

    def forward(self, s: Tensor) -> Tensor:
        """Embed ``s`` of shape ``(B,)`` into ``(B, out_dim)``."""
        args = s.to(self.freqs.dtype)[:, None] * self.freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


def _execution_order(module: nn.Module, probe: Callable[[], Any]) -> list[nn.Module]:
    """The leaf modules with parameters of ``module`` in the order ``probe()`` runs them."""
    order: list[nn.Module] = []
    handles = []
    for m in module.modules():
        if next(m.parameters(recurse=False), None) is not None:
            handles.append(m.register_forward_hook(lambda mod, args, out: order.append(mod)))
    try:
        with torch.no_grad():
            probe()
    finally:
        for h in handles:
            h.remove()
    return order


def zero_last_layer(module: nn.Module, probe: Callable[[], Any]) -> nn.Module:
    """Zero the parameters of the last layer (with parameters) that ``probe()`` runs in ``module``.

    Args:
        module: The embedder.
        probe: Calls ``module`` once on an example input.

    Returns:
        The layer whose parameters were zeroed.

    Raises:
        ValueError: ``module`` runs no layer with parameters.
    """
    order = _execution_order(module, probe)
    if not order:
        raise ValueError(f"{type(module).__name__} runs no layer with parameters: nothing to zero-initialise")
    last = order[-1]
    with torch.no_grad():
        for p in last.parameters(recurse=False):
            p.zero_()
    return last


def _resolve_embedder(net: nn.Module, embedder: str | nn.Module) -> tuple[str, nn.Module]:
    """``(dotted name, module)`` of the time embedder inside ``net``."""
    names = {id(m): n for n, m in net.named_modules()}
    if isinstance(embedder, nn.Module):
        if id(embedder) not in names or embedder is net:
            raise ValueError(
                f"time_embedder ({type(embedder).__name__}) is not a submodule of {type(net).__name__}: pass a "
                "module of the network itself, or its attribute path such as 't_embedder'"
            )
        return names[id(embedder)], embedder
    if not isinstance(embedder, str) or not embedder:
        raise TypeError(f"time_embedder must be an attribute path (str) or an nn.Module, got {embedder!r}")
    try:
        module = net.get_submodule(embedder)
    except AttributeError:
        timeish = [n for n in names.values() if n and any(k in n.lower() for k in ("time", "t_emb", "temb"))]
        top = [n for n, _ in net.named_children()]
        hint = f"modules named like a time embedding: {', '.join(timeish[:8])}" if timeish else f"children: {top}"
        raise ValueError(
            f"{type(net).__name__} has no submodule {embedder!r} (a dotted attribute path); {hint}"
        ) from None
    if module is net:
        raise ValueError("time_embedder must be a submodule of the network, not the network itself")
    return embedder, module


def _param_like(module: nn.Module) -> Tensor | None:
    return next(iter(module.parameters()), None)


class FlowMatchingFineTune(nn.Module):
    r"""A flow-matching network ``net(z, t, **kw)`` with a zero-initialised interval embedding: ``model(z, r, t)``.

    Build it with :func:`from_flow_matching`. The module's parameters are the network's (under the network's own
    names) and the interval embedder's (under ``interval_embedder.``).

    Attributes:
        net: The wrapped FM network (its submodules are this module's, under their own names).
        interval_embedder: :math:`E_h`, output width of the time embedding; zero at initialisation.
        embedder_name: Dotted name of the time embedder inside ``net``.
        interval_input: ``"t_minus_r"`` (:math:`E_h(t - r)`) or ``"r"`` (:math:`E_h(r)`).
        time_convention: ``"data_at_0"`` (the package's) or ``"noise_at_0"``.
        time_scale: Factor applied to every time fed to the network and to :math:`E_h`.
    """

    meanflow_inputs = "r_t"  # the protocol's (z, r, t): the package's signature guard lets it through
    ignores_r = False
    # set through __dict__ (not registered by nn.Module.__setattr__); declared for the type checker
    net: nn.Module
    _interval: Tensor | None
    _hook_calls: int
    _thread: int | None

    def __init__(
        self,
        net: nn.Module,
        embedder_name: str,
        interval_embedder: nn.Module,
        *,
        interval_input: IntervalInput = "t_minus_r",
        time_convention: TimeConvention = "data_at_0",
        time_scale: float = 1.0,
    ) -> None:
        super().__init__()
        for shared_state in ("_parameters", "_buffers", "_non_persistent_buffers_set"):
            self.__dict__[shared_state] = getattr(net, shared_state)
        # the network's children under their own names, plus the new embedder (the network itself is not changed)
        self.__dict__["_modules"] = {**net._modules}
        self.__dict__["net"] = net
        self.training = net.training
        self.interval_embedder = interval_embedder
        self.embedder_name = embedder_name
        self.interval_input = interval_input
        self.time_convention = time_convention
        self.time_scale = float(time_scale)
        self.__dict__["_interval"] = None  # h (or r) of the call in progress, read by the hook
        self.__dict__["_hook_calls"] = 0
        self.__dict__["_thread"] = None  # the thread whose forward is in progress
        self.__dict__["_hook_handle"] = net.get_submodule(embedder_name).register_forward_hook(_AddInterval(self))

    @property
    def time_embedder(self) -> nn.Module:
        """The FM network's time embedder (the hooked module)."""
        return self.net.get_submodule(self.embedder_name)

    def train(self, mode: bool = True) -> FlowMatchingFineTune:
        """Set train/eval mode on this module and on the network (its root included)."""
        super().train(mode)
        self.net.train(mode)
        return self

    def interval_value(self, r: Tensor, t: Tensor) -> Tensor:
        """What :math:`E_h` embeds: ``time_scale * (t - r)`` or ``time_scale * r`` (``1 - r`` flipped), ``(B,)``."""
        if self.interval_input == "t_minus_r":
            s = t - r
        else:
            s = 1 - r if self.time_convention == "noise_at_0" else r
        return s * self.time_scale if self.time_scale != 1.0 else s

    def forward(self, z: Tensor, r: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor:
        """Return ``net(z, t, **kw)`` with :math:`E_h` added to its time embedding, shape of ``z``.

        Args:
            z: Inputs, shape ``(B, *D)``.
            r: End times, shape ``(B,)``.
            t: Start times, shape ``(B,)``.
            **model_kwargs: Passed to the network.
        """
        if r.shape != t.shape:
            raise ValueError(f"r and t must have the same shape, got {tuple(r.shape)} and {tuple(t.shape)}")
        t_net = 1 - t if self.time_convention == "noise_at_0" else t
        if self.time_scale != 1.0:
            t_net = t_net * self.time_scale
        check_calls = not compiling()
        # the state of an outer call (a network that calls this model from inside its own forward) is restored
        # after this one; a call from another thread while one is in progress would share it: refused
        outer = (self._interval, self._hook_calls, self._thread)
        if check_calls:
            me = threading.get_ident()
            if self._interval is not None and self._thread != me:
                raise RuntimeError(
                    "a FlowMatchingFineTune model was called from two threads at once (e.g. nn.DataParallel): its "
                    "interval is held on the module, so one model serves one forward at a time; use DDP, or one "
                    "converted model per thread"
                )
            self.__dict__["_thread"] = me
            self.__dict__["_hook_calls"] = 0
        self.__dict__["_interval"] = self.interval_value(r, t)  # computed here: forward AD derives its tangent
        try:
            out = self.net(z, t_net, **model_kwargs)
            calls = self._hook_calls
        finally:
            self.__dict__["_interval"], self.__dict__["_hook_calls"], self.__dict__["_thread"] = outer
        if check_calls and calls == 0:
            raise RuntimeError(
                f"the time embedder {self.embedder_name!r} was not called by {type(self.net).__name__}.forward, so "
                "the interval embedding had no effect: pass the module that embeds t"
            )
        if check_calls and calls > 1:
            raise RuntimeError(
                f"the time embedder {self.embedder_name!r} was called {calls} times in one forward of "
                f"{type(self.net).__name__}: the interval embedding was added to each call, which is only right if "
                "every call embeds the same t; hook a module called once per forward (or convert a network whose "
                "time embedding is computed once)"
            )
        if self.time_convention == "noise_at_0":
            out = -out
        return check_model_output(out, z, who="net")

    def load_fm_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> list[str]:
        """Load a state dict of the bare FM network; the interval embedder keeps its (zero) initialisation.

        Args:
            state_dict: The FM network's ``state_dict()`` (keys under its own names).
            strict: Require exactly the network's keys (``interval_embedder.*`` excepted).

        Returns:
            The keys that were not in ``state_dict`` (the ``interval_embedder.*`` ones when ``strict``).

        Raises:
            RuntimeError: ``strict`` and the keys do not match the network's (the message lists them).
        """
        result = self.load_state_dict(state_dict, strict=False)
        if strict:
            missing = [k for k in result.missing_keys if not k.startswith("interval_embedder.")]
            unexpected = list(result.unexpected_keys)
            if missing or unexpected:
                raise RuntimeError(
                    "the state dict is not the FM network's: "
                    + (f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}" if missing else "")
                    + ("; " if missing and unexpected else "")
                    + (f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}" if unexpected else "")
                )
        return list(result.missing_keys)

    def extra_repr(self) -> str:
        """The network, the hooked embedder and the options."""
        return (
            f"net={type(self.net).__name__}, time_embedder={self.embedder_name!r}, "
            f"interval_input={self.interval_input!r}, time_convention={self.time_convention!r}, "
            f"time_scale={self.time_scale:g}"
        )


class _AddInterval:
    """Forward hook on the time embedder: adds ``E_h(h)`` while the owner's forward is running."""

    def __init__(self, owner: FlowMatchingFineTune) -> None:
        self.owner = owner

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        owner = self.owner
        s = owner.__dict__.get("_interval")
        if s is None:
            if torch._C._current_graph_task_id() != -1:  # a recompute during backward (activation checkpointing)
                raise RuntimeError(
                    f"the time embedder {owner.embedder_name!r} ran again during backward (activation "
                    "checkpointing around it): the recompute would miss the interval embedding and give wrong "
                    "gradients; keep the time embedder outside checkpointed regions"
                )
            return None  # the bare network called on its own: unchanged
        if not isinstance(output, Tensor):
            raise TypeError(
                f"the time embedder {owner.embedder_name!r} returned {type(output).__name__}, not a tensor: hook "
                "the module whose output is the (B, C) time embedding"
            )
        if not compiling():
            owner.__dict__["_hook_calls"] = owner._hook_calls + 1
            if output.ndim < 1 or output.shape[0] != s.shape[0]:
                raise ValueError(
                    f"the time embedder {owner.embedder_name!r} returned shape {tuple(output.shape)}, whose first "
                    f"dimension is not the batch size {s.shape[0]}: hook the module that embeds the (B,) times"
                )
        emb = owner.interval_embedder(s)
        if emb.shape != output.shape:
            emb = emb.reshape(output.shape)
        return output + emb.to(output.dtype)


def _probe_input(module: nn.Module, time_scale: float) -> Tensor:
    p = _param_like(module)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.dtype.is_floating_point else torch.float32
    return torch.tensor([0.25, 0.75], device=device, dtype=dtype) * time_scale


def _run_embedder(module: nn.Module, s: Tensor, name: str) -> Tensor:
    try:
        with torch.no_grad():
            out = module(s)
    except Exception as err:  # any failure means the shape cannot be probed
        raise ValueError(
            f"cannot determine the output shape of the time embedder {name!r}: calling it on times of shape (2,) "
            f"failed ({type(err).__name__}: {err}); pass interval_embedder= (a module mapping (B,) times to the "
            "embedding's shape)"
        ) from err
    if not isinstance(out, Tensor) or out.ndim < 1 or out.shape[0] != s.shape[0]:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"cannot determine the output shape of the time embedder {name!r}: on times of shape (2,) it returned "
            f"{shape}, not a (2, ...) tensor; hook the module that maps (B,) times to the (B, C) embedding, or pass "
            "interval_embedder="
        )
    return out


def from_flow_matching(
    net: nn.Module,
    time_embedder: str | nn.Module = "t_embedder",
    *,
    interval_input: IntervalInput = "t_minus_r",
    interval_embedder: Literal["copy", "fresh", "sinusoidal"] | nn.Module = "copy",
    time_convention: TimeConvention = "data_at_0",
    time_scale: float = 1.0,
    frequency_dim: int = 256,
) -> FlowMatchingFineTune:
    r"""Convert a flow-matching network ``net(z, t, **kw)`` into a protocol model ``model(z, r, t, **kw)``.

    The model adds :math:`E_h(h)` (``h = t - r``, or ``r``) to the output of ``time_embedder``; :math:`E_h`'s last
    layer is zero-initialised, so at initialisation the model equals the FM network for every ``r``.

    Args:
        net: The FM network (an ``nn.Module`` called as ``net(z, t, **kw)``; its weights are shared, not copied).
        time_embedder: The module of ``net`` that maps the ``(B,)`` times to the time embedding ``(B, C)``: its
            dotted attribute path (``"t_embedder"``, ``"time_embedding"``) or the module itself.
        interval_input: ``"t_minus_r"`` (default; MeanFlow's ablation found conditioning on ``(t, t - r)`` best)
            or ``"r"``.
        interval_embedder: What :math:`E_h` is: ``"copy"`` (default) a deep copy of the time embedder, pretrained
            weights included, with its last layer zeroed; ``"fresh"`` the same architecture re-initialised
            (``reset_parameters()`` of each layer) with its last layer zeroed; ``"sinusoidal"`` a
            :class:`SinusoidalEmbedder` of the embedding's width; or your own module mapping ``(B,)`` to the
            embedding's shape (its last layer is zeroed too).
        time_convention: The FM network's convention: ``"data_at_0"`` (the package's) or ``"noise_at_0"``
            (fed ``1 - t``, output negated), as :mod:`meanflow_losses.adapters`.
        time_scale: Multiplies every time the network and :math:`E_h` receive (e.g. ``1000`` for a network of
            ``t`` in ``[0, 1000]``).
        frequency_dim: Sinusoidal features of ``interval_embedder="sinusoidal"``.

    Returns:
        The converted model, in the package protocol.

    Raises:
        ValueError: ``time_embedder`` is not a submodule of ``net``, its output shape cannot be determined (calling
            it on two times fails or returns no ``(2, ...)`` tensor), the interval embedder's output differs in
            shape, or zeroing its last layer does not make its output zero; an unknown option.
        TypeError: ``net`` is not an ``nn.Module`` (or already an adapter), or an option has the wrong type.
    """
    _check_net(net, "from_flow_matching")
    if not isinstance(net, nn.Module):
        raise TypeError(f"from_flow_matching: net must be an nn.Module, got {type(net).__name__}")
    if isinstance(net, FlowMatchingFineTune):
        raise ValueError("from_flow_matching: net is already converted; convert the FM network once")
    _check_convention(time_convention)
    if interval_input not in _INTERVAL_INPUTS:
        raise ValueError(f"interval_input must be one of {_INTERVAL_INPUTS}, got {interval_input!r}")
    if isinstance(time_scale, bool) or not isinstance(time_scale, (int, float)) or not time_scale > 0:
        raise ValueError(f"time_scale must be a positive number, got {time_scale!r}")
    name, module = _resolve_embedder(net, time_embedder)
    probe = _probe_input(module, float(time_scale))
    reference = _run_embedder(module, probe, name)

    if isinstance(interval_embedder, nn.Module):
        e_h = interval_embedder
    elif interval_embedder in ("copy", "fresh"):
        e_h = copy.deepcopy(module)
        for m in e_h.modules():  # hooks of the original (e.g. another converter's) do not belong on the copy
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()
        if interval_embedder == "fresh":
            for m in e_h.modules():
                reset = getattr(m, "reset_parameters", None)
                if callable(reset):
                    reset()
    elif interval_embedder == "sinusoidal":
        if reference.ndim != 2:
            raise ValueError(
                f"interval_embedder='sinusoidal' needs a (B, C) time embedding; {name!r} returns shape "
                f"{tuple(reference.shape)}: pass interval_embedder='copy' or a module"
            )
        e_h = SinusoidalEmbedder(reference.shape[1], frequency_dim)
        e_h.to(device=reference.device, dtype=reference.dtype)
    else:
        raise ValueError(
            f"interval_embedder must be one of {_EMBEDDER_KINDS} or an nn.Module, got {interval_embedder!r}"
        )
    e_h.requires_grad_(True)
    zero_last_layer(e_h, lambda: e_h(probe))
    with torch.no_grad():
        out = e_h(probe)
    if not isinstance(out, Tensor) or out.numel() != reference.numel():
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"the interval embedder returns {shape} where the time embedder {name!r} returns "
            f"{tuple(reference.shape)}: they must have the same shape"
        )
    if bool(out.any()):
        raise ValueError(
            f"zeroing the last layer of the interval embedder ({type(e_h).__name__}) does not make its output zero "
            "(a layer after it, such as a normalisation, adds a constant): pass interval_embedder= a module whose "
            "last layer is linear"
        )
    return FlowMatchingFineTune(
        net,
        name,
        e_h,
        interval_input=interval_input,
        time_convention=time_convention,
        time_scale=float(time_scale),
    )
