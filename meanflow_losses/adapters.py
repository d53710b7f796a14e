r"""The one model protocol and adapters from the other network signatures users have.

Every objective and sampler calls a network as ``model(z, r, t, **model_kwargs) -> u`` with ``z`` of shape
``(B, *D)``, ``r`` and ``t`` of shape ``(B,)`` and ``u`` shaped like ``z``: the average velocity over
``[r, t]`` (for ``r = t`` the instantaneous velocity).

The JVP tangents always follow from this protocol: the engine differentiates along
:math:`(\dot z, \dot r, \dot t) = (\tilde v, 0, 1)`. An adapter computes its network's own inputs from
``(r, t)`` inside ``forward``, so forward-mode AD derives the right tangents for them (for ``(t, h = t - r)``
inputs: :math:`(\dot t, \dot h) = (1, 1)`). A user can therefore never pass wrong tangents.

The adapters are ``nn.Module`` s that share their network's parameters, buffers and submodules under the
network's own names: ``adapter.state_dict()``, ``named_parameters()`` and ``named_buffers()`` equal the bare
network's, so checkpoints, EMA code written for the bare network (DiT's ``update_ema``) and optimizers' parameter
groups work on either, and a bare-network checkpoint loads into the adapter and back.

Which networks are refused unwrapped (:func:`check_protocol`), so that ``r`` is never silently fed where a network
expects ``t``:

* a class that declares ``meanflow_inputs = "t_h"`` (it takes ``(z, t, h)``) or ``"t"`` (it takes ``(z, t)``);
* a network (module, function, method or ``functools.partial``) whose second positional parameter is named like a
  time (``t``, ``time``, ``timestep``, ``timesteps``, ``sigma``, ...), or that takes fewer than three positional
  arguments. A class declaring ``meanflow_inputs = "r_t"`` opts out of the name check.

Anything else is called as ``model(z, r, t, **model_kwargs)``; a binding ``TypeError`` on that call (for example
DiT's ``got multiple values for argument 'y'``) is re-raised with the adapter to use.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Literal, Protocol, runtime_checkable

from torch import Tensor, nn

from meanflow_losses._validate import check_model_output, compiling
from meanflow_losses.passes import PROTOCOL_HINT

__all__ = [
    "IntervalNetAdapter",
    "VelocityModel",
    "VelocityNetAdapter",
    "check_protocol",
    "from_interval_net",
    "from_velocity_net",
]

TimeConvention = Literal["data_at_0", "noise_at_0"]
_CONVENTIONS = ("data_at_0", "noise_at_0")


@runtime_checkable
class VelocityModel(Protocol):
    """``u = model(z, r, t, **model_kwargs)``: average velocity over ``[r, t]``, shaped like ``z``."""

    def __call__(self, z: Tensor, r: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor:
        """Average velocity ``u(z, r, t)``, shape of ``z``."""
        ...


def _check_net(net: Any, who: str) -> None:
    if isinstance(net, _SharedNamesAdapter):
        raise ValueError(f"{who}: net is already an adapter ({type(net).__name__}); wrap the raw network once")
    if not callable(net):
        raise TypeError(f"{who}: net must be callable (an nn.Module or function), got {type(net).__name__}")


def _check_convention(time_convention: str) -> None:
    if time_convention not in _CONVENTIONS:
        raise ValueError(f"time_convention must be one of {_CONVENTIONS}, got {time_convention!r}")


class _SharedNamesAdapter(nn.Module):
    """An ``nn.Module`` whose parameters, buffers and submodules are its network's, under the network's names.

    The adapter holds the network's own ``_parameters``, ``_buffers`` and ``_modules`` dicts (not a child called
    ``net``), so every name-based API (``state_dict``, ``named_parameters``, ``load_state_dict``, ``.to()``) sees
    exactly the bare network. The network itself stays reachable as ``adapter.net``.
    """

    ignores_r = False
    net: Callable[..., Tensor]  # set through __dict__ (not registered as a child); declared for the type checker

    def __init__(self, net: Callable[..., Tensor], time_convention: TimeConvention, who: str) -> None:
        super().__init__()
        _check_net(net, who)
        _check_convention(time_convention)
        if isinstance(net, nn.Module):
            for shared_state in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
                self.__dict__[shared_state] = getattr(net, shared_state)
            self.training = net.training
        self.__dict__["net"] = net  # not registered as a child: its contents already are the adapter's
        self.time_convention = time_convention

    def train(self, mode: bool = True) -> _SharedNamesAdapter:
        """Set train/eval mode on the adapter and on the network (its root module included)."""
        super().train(mode)
        if isinstance(self.net, nn.Module):
            self.net.train(mode)
        return self

    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False) -> Any:
        """The network's own ``state_dict`` (its hooks included), under its own names."""
        if isinstance(self.net, nn.Module):
            return self.net.state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        if isinstance(self.net, nn.Module):
            self.net._save_to_state_dict(destination, prefix, keep_vars)
        else:
            super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        if isinstance(self.net, nn.Module):
            self.net._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        else:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load a state dict of the bare network (also one saved by an adapter of version 0.1, ``net.*`` keys)."""
        own = set(self.state_dict().keys())
        given = set(state_dict.keys())
        stripped = {k[4:] for k in given}
        if given and not (given & own) and all(k.startswith("net.") for k in given) and stripped <= own:
            warnings.warn(
                "loading a state dict with 'net.'-prefixed keys (saved by meanflow_losses 0.1 adapters); adapters "
                "now use the bare network's names: re-save it",
                FutureWarning,
                stacklevel=2,
            )
            state_dict = {k[4:]: v for k, v in state_dict.items()}
        if isinstance(self.net, nn.Module):  # the network's own loading, its hooks included
            return self.net.load_state_dict(state_dict, strict=strict, assign=assign)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_repr(self) -> str:
        return f"net={type(self.net).__name__}, time_convention={self.time_convention!r}"


class IntervalNetAdapter(_SharedNamesAdapter):
    r"""Adapt ``net(z, t, h, **kw)`` with ``h = t - r`` (the MeanFlow / alpha-Flow DiTs) to the protocol.

    With ``time_convention="noise_at_0"`` the network is assumed to use ``t' = 1 - t`` and to predict the
    velocity towards data (``x - e``); the adapter feeds ``1 - t`` and negates the output. JVP tangents on
    the network's inputs follow automatically: :math:`(\dot t, \dot h) = (1, 1)` (or ``(-1, 1)`` with the
    flipped convention).

    Attributes:
        net: The wrapped network; its parameters, buffers and submodules are the adapter's, under their own names.
    """

    ignores_r = False

    def __init__(self, net: Callable[..., Tensor], time_convention: TimeConvention = "data_at_0") -> None:
        super().__init__(net, time_convention, "from_interval_net")

    def forward(self, z: Tensor, r: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor:
        """Return ``net(z, t, t - r)`` (or its flipped-convention equivalent), shape of ``z``."""
        if r.shape != t.shape:
            raise ValueError(f"r and t must have the same shape, got {tuple(r.shape)} and {tuple(t.shape)}")
        h = t - r
        if self.time_convention == "noise_at_0":
            out = -self.net(z, 1 - t, h, **model_kwargs)
        else:
            out = self.net(z, t, h, **model_kwargs)
        return check_model_output(out, z, who="net")


class VelocityNetAdapter(_SharedNamesAdapter):
    """Adapt a flow-matching network ``net(z, t, **kw)`` to the protocol; ``r`` is ignored.

    Such a model predicts the instantaneous velocity only, so it is valid for flow matching and as a
    teacher (``v_target``), and MeanFlow-type objectives refuse it on rows with ``r != t``.
    With ``time_convention="noise_at_0"`` (torchcfm, flow_matching) the adapter feeds ``1 - t`` and negates
    the output.
    """

    ignores_r = True

    def __init__(self, net: Callable[..., Tensor], time_convention: TimeConvention = "data_at_0") -> None:
        super().__init__(net, time_convention, "from_velocity_net")

    def forward(self, z: Tensor, r: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor:
        """Return ``net(z, t)`` (or ``-net(z, 1 - t)``), shape of ``z``."""
        if self.time_convention == "noise_at_0":
            out = -self.net(z, 1 - t, **model_kwargs)
        else:
            out = self.net(z, t, **model_kwargs)
        return check_model_output(out, z, who="net")


def from_interval_net(net: Callable[..., Tensor], time_convention: TimeConvention = "data_at_0") -> IntervalNetAdapter:
    """Wrap ``net(z, t, h, **kw)`` (``h = t - r``) as ``model(z, r, t, **kw)``.

    Args:
        net: The network.
        time_convention: ``"data_at_0"`` (this package's) or ``"noise_at_0"``.
    """
    return IntervalNetAdapter(net, time_convention)


def from_velocity_net(net: Callable[..., Tensor], time_convention: TimeConvention = "data_at_0") -> VelocityNetAdapter:
    """Wrap a flow-matching network ``net(z, t, **kw)`` as ``model(z, r, t, **kw)`` (``r`` ignored)."""
    return VelocityNetAdapter(net, time_convention)


def _unwrap(model: Any) -> Any:
    """The object that declares the network's inputs: through DDP / FSDP / ``torch.compile`` wrappers and partials."""
    for _ in range(16):
        if isinstance(model, _SharedNamesAdapter):
            return model
        if isinstance(model, functools.partial):
            model = model.func
            continue
        inner = next(
            (m for m in (getattr(model, a, None) for a in ("module", "_orig_mod")) if isinstance(m, nn.Module)), None
        )
        if inner is None:
            return model
        model = inner
    return model


#: Names that mark a parameter as a time: a network whose second positional parameter has one, or contains one of
#: :data:`TIME_PARTS`, takes (z, t, ...) (EDM's ``noise_labels``, k-diffusion's ``sigma``, DDPM's ``timesteps``).
TIME_NAMES: frozenset[str] = frozenset({"t", "ts", "tau", "c_noise", "temb", "t_emb"})
TIME_PARTS: tuple[str, ...] = ("time", "sigma", "noise")
_SIGNATURE_VERDICTS: weakref.WeakKeyDictionary[type, str | None] = weakref.WeakKeyDictionary()


def _signature(model: Any) -> inspect.Signature | None:
    """The call signature that ``model(z, r, t, ...)`` binds to (a module's ``forward``, a partial's remainder)."""
    target = model
    args: tuple[Any, ...] = ()
    keywords: dict[str, Any] = {}
    while isinstance(target, functools.partial):
        args, keywords = (*target.args, *args), {**target.keywords, **keywords}
        target = target.func
    if isinstance(target, nn.Module):
        inner = _unwrap(target)
        target = inner.forward if isinstance(inner, nn.Module) else inner
    try:
        fn = functools.partial(target, *args, **keywords) if (args or keywords) else target
        return inspect.signature(fn)
    except (TypeError, ValueError):
        return None


def _signature_problem(model: Any) -> str | None:
    """Why ``model``'s signature cannot be ``(z, r, t, ...)``, or ``None`` when it can (or cannot be read)."""
    sig = _signature(model)
    if sig is None:
        return None
    params = list(sig.parameters.values())
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    positional = [p for p in params if p.kind in kinds]
    names = [p.name for p in positional]
    if len(positional) < 3:
        return f"its signature ({', '.join(names)}) takes fewer than the three positional inputs (z, r, t)"
    second = names[1].lower()
    if second in TIME_NAMES or any(part in second for part in TIME_PARTS):
        return (
            f"its second positional parameter is named {names[1]!r}, so it looks like a network of "
            f"({', '.join(names[:3])}, ...) where the package passes (z, r, t)"
        )
    return None


def check_protocol(model: Any, name: str = "model") -> None:
    """Refuse networks that declare, or visibly have, another signature than ``(z, r, t)``.

    Raises:
        TypeError: ``model`` is not callable.
        ValueError: ``model`` declares ``meanflow_inputs = "t_h"`` / ``"t"``, or its signature shows a time as
            the second positional input or fewer than three positional inputs (see the module docstring).
    """
    if not callable(model):
        raise TypeError(f"{name} must be callable as {name}(z, r, t, **model_kwargs), got {type(model).__name__}")
    inner = _unwrap(model)
    inputs = getattr(inner, "meanflow_inputs", None)
    if inputs == "t_h":
        raise ValueError(
            f"{name} declares inputs (z, t, h); wrap it with meanflow_losses.adapters.from_interval_net(net) "
            "so that r and t are converted to (t, h = t - r) and the JVP tangents follow"
        )
    if inputs == "t":
        raise ValueError(f"{name} declares inputs (z, t); wrap it with meanflow_losses.adapters.from_velocity_net(net)")
    if inputs == "r_t" or isinstance(inner, _SharedNamesAdapter):
        return
    if compiling():
        # the signature check is host-side introspection, done by the eager calls: traced, its verdict cache (a
        # WeakKeyDictionary) would become a Dynamo guard on a dict whose keys the garbage collector may drop mid-trace
        return
    key = type(inner) if isinstance(inner, nn.Module) and not isinstance(model, functools.partial) else None
    if key is not None and key in _SIGNATURE_VERDICTS:
        problem = _SIGNATURE_VERDICTS[key]
    else:
        problem = _signature_problem(model)
        if key is not None:
            _SIGNATURE_VERDICTS[key] = problem
    if problem is not None:
        raise ValueError(
            f"{name} cannot be called as {name}(z, r, t, **model_kwargs): {problem}. {PROTOCOL_HINT}. A network "
            'that really takes (z, r, t) under other names can declare meanflow_inputs = "r_t".'
        )


def ignores_r(model: Any) -> bool:
    """Whether ``model`` is known to ignore ``r`` (a wrapped flow-matching velocity network)."""
    return bool(getattr(_unwrap(model), "ignores_r", False))
