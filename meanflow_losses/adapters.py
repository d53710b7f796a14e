r"""The one model protocol and adapters from the other network signatures users have.

Every objective and sampler calls a network as ``model(z, r, t, **model_kwargs) -> u`` with ``z`` of shape
``(B, *D)``, ``r`` and ``t`` of shape ``(B,)`` and ``u`` shaped like ``z``: the average velocity over
``[r, t]`` (for ``r = t`` the instantaneous velocity).

The JVP tangents always follow from this protocol: the engine differentiates along
:math:`(\dot z, \dot r, \dot t) = (\tilde v, 0, 1)`. An adapter computes its network's own inputs from
``(r, t)`` inside ``forward``, so forward-mode AD derives the right tangents for them (for ``(t, h = t - r)``
inputs: :math:`(\dot t, \dot h) = (1, 1)`). A user can therefore never pass wrong tangents.

A network class may declare ``meanflow_inputs = "t_h"`` (it takes ``(z, t, h)``) or ``"t"`` (it takes
``(z, t)``); objectives then refuse it until it is wrapped, instead of silently feeding ``r`` as ``t``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, Protocol, runtime_checkable

from torch import Tensor, nn

from meanflow_losses._validate import check_model_output

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
    if isinstance(net, (IntervalNetAdapter, VelocityNetAdapter)):
        raise ValueError(f"{who}: net is already an adapter ({type(net).__name__}); wrap the raw network once")
    if not callable(net):
        raise TypeError(f"{who}: net must be callable (an nn.Module or function), got {type(net).__name__}")


def _check_convention(time_convention: str) -> None:
    if time_convention not in _CONVENTIONS:
        raise ValueError(f"time_convention must be one of {_CONVENTIONS}, got {time_convention!r}")


class IntervalNetAdapter(nn.Module):
    r"""Adapt ``net(z, t, h, **kw)`` with ``h = t - r`` (the MeanFlow / alpha-Flow DiTs) to the protocol.

    With ``time_convention="noise_at_0"`` the network is assumed to use ``t' = 1 - t`` and to predict the
    velocity towards data (``x - e``); the adapter feeds ``1 - t`` and negates the output. JVP tangents on
    the network's inputs follow automatically: :math:`(\dot t, \dot h) = (1, 1)` (or ``(-1, 1)`` with the
    flipped convention).

    Attributes:
        net: The wrapped network (its parameters are registered when it is an ``nn.Module``).
    """

    ignores_r = False

    def __init__(self, net: Callable[..., Tensor], time_convention: TimeConvention = "data_at_0") -> None:
        super().__init__()
        _check_net(net, "from_interval_net")
        _check_convention(time_convention)
        self.net = net
        self.time_convention = time_convention

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


class VelocityNetAdapter(nn.Module):
    """Adapt a flow-matching network ``net(z, t, **kw)`` to the protocol; ``r`` is ignored.

    Such a model predicts the instantaneous velocity only, so it is valid for flow matching and as a
    teacher (``v_target``), and MeanFlow-type objectives refuse it on rows with ``r != t``.
    With ``time_convention="noise_at_0"`` (torchcfm, flow_matching) the adapter feeds ``1 - t`` and negates
    the output.
    """

    ignores_r = True

    def __init__(self, net: Callable[..., Tensor], time_convention: TimeConvention = "data_at_0") -> None:
        super().__init__()
        _check_net(net, "from_velocity_net")
        _check_convention(time_convention)
        self.net = net
        self.time_convention = time_convention

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
    # DistributedDataParallel, FSDP and torch.compile wrappers keep the real module here.
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return _unwrap(inner)
    return model


def check_protocol(model: Any, name: str = "model") -> None:
    """Refuse networks that declare another signature than ``(z, r, t)``."""
    if not callable(model):
        raise TypeError(f"{name} must be callable as {name}(z, r, t, **model_kwargs), got {type(model).__name__}")
    inputs = getattr(_unwrap(model), "meanflow_inputs", "r_t")
    if inputs == "t_h":
        raise ValueError(
            f"{name} declares inputs (z, t, h); wrap it with meanflow_losses.adapters.from_interval_net(net) "
            "so that r and t are converted to (t, h = t - r) and the JVP tangents follow"
        )
    if inputs == "t":
        raise ValueError(f"{name} declares inputs (z, t); wrap it with meanflow_losses.adapters.from_velocity_net(net)")


def ignores_r(model: Any) -> bool:
    """Whether ``model`` is known to ignore ``r`` (a wrapped flow-matching velocity network)."""
    return bool(getattr(_unwrap(model), "ignores_r", False))
