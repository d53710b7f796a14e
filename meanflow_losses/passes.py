r"""How the package calls a network: the gradient forward and the no-grad passes.

Every objective, the JVP engine, guidance and the samplers call the network through :func:`call`, so that

* conditioning is handed over as decided once against the batch (:class:`~meanflow_losses.conditioning.Conditioning`);
* a ``TypeError`` raised while binding ``model(z, r, t, **model_kwargs)`` (a network of another signature, such as
  a DiT's ``forward(x, t, y)``) is re-raised with the adapter to use;
* the output is checked: a floating tensor shaped like ``z``.

No-grad passes (the JVP on ``target_model``, the finite-difference halves, guidance velocities, alpha-Flow's and
the splitting objectives' teacher passes) go through :func:`no_grad_call` / :func:`preserve_buffers`: they leave
every buffer of the network as they found it, so a BatchNorm layer in train mode updates its running statistics
once per step (in the gradient forward), exactly as in plain training.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from meanflow_losses._validate import check_model_output
from meanflow_losses.conditioning import Conditioning

__all__ = ["batch_stat_layers", "call", "no_grad_call", "preserve_buffers", "same_randomness"]

_BINDING_ERROR = re.compile(
    r"got multiple values for argument|missing \d+ required (positional|keyword-only) argument|"
    r"takes (from )?\d+ (to \d+ )?positional arguments? but \d+ (were|was) given|got an unexpected keyword argument"
)

PROTOCOL_HINT = (
    "meanflow_losses calls every network as model(z, r, t, **model_kwargs) (r <= t, t = 0 data, t = 1 noise); "
    "wrap a network of (z, t, h = t - r) such as the MeanFlow/alpha-Flow DiTs with "
    "meanflow_losses.adapters.from_interval_net(net), a flow-matching network of (z, t) with "
    "meanflow_losses.adapters.from_velocity_net(net), or write a small wrapper module (docs/conventions.md)"
)


def _kwargs(cond: Conditioning | Mapping[str, Any] | None) -> dict[str, Any]:
    if cond is None:
        return {}
    if isinstance(cond, Conditioning):
        return cond.call_kwargs()
    return dict(cond)


def call(
    model: Callable[..., Any],
    z: Tensor,
    r: Tensor,
    t: Tensor,
    cond: Conditioning | Mapping[str, Any] | None = None,
    *,
    who: str = "model",
) -> Tensor:
    """``model(z, r, t, **kwargs)`` with the protocol hint on binding errors and the output checked.

    Args:
        model: The network.
        z: Inputs, shape ``(n, *D)``.
        r: End times, shape ``(n,)``.
        t: Start times, shape ``(n,)``.
        cond: Conditioning with ``n`` rows.
        who: Name used in error messages (``"model"``, ``"target_model"``, ``"teacher"``).

    Returns:
        ``u``, shape ``(n, *D)``, floating point.
    """
    try:
        out = model(z, r, t, **_kwargs(cond))
    except TypeError as err:
        if _BINDING_ERROR.search(str(err)):
            raise TypeError(f"{who}(z, r, t, **model_kwargs) failed: {err}. {PROTOCOL_HINT}") from err
        raise
    except ValueError as err:
        if "Expected more than 1 value per channel when training" in str(err):
            raise ValueError(
                f"{who} was called on {z.shape[0]} row(s) and normalises with batch statistics (BatchNorm in train "
                "mode), which needs at least 2 rows: the objectives run their JVP and target passes on sub-batches "
                "(e.g. the r != t rows). Use more rows, BatchNorm in eval mode, or GroupNorm/LayerNorm"
            ) from err
        raise
    return check_model_output(out, z, who=who)


def _module_of(model: Any) -> nn.Module | None:
    return model if isinstance(model, nn.Module) else None


@contextlib.contextmanager
def preserve_buffers(model: Any) -> Iterator[None]:
    """Give back every buffer of ``model`` as the block found it (BatchNorm running statistics, counters, ...).

    Buffers are copied on entry and copied back on exit (also a buffer the block re-assigned). The version counter
    cannot tell: BatchNorm's kernels update running statistics in place without bumping it. The copies cost a
    memcpy of the buffers per pass and no host sync. A ``model`` that is not an ``nn.Module`` (a plain function)
    has no buffers to protect.
    """
    module = _module_of(model)
    if module is None:
        yield
        return
    saved = [
        (owner, name, buf, buf.detach().clone())
        for owner in module.modules()
        for name, buf in owner._buffers.items()
        if buf is not None and not buf.is_inference()
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for owner, name, buf, value in saved:
                if owner._buffers.get(name) is not buf:
                    owner._buffers[name] = buf
                buf.copy_(value)


def no_grad_call(
    model: Callable[..., Any],
    z: Tensor,
    r: Tensor,
    t: Tensor,
    cond: Conditioning | Mapping[str, Any] | None = None,
    *,
    who: str = "target_model",
) -> Tensor:
    """:func:`call` under ``torch.no_grad`` with every buffer preserved (a target or guidance pass)."""
    with torch.no_grad(), preserve_buffers(model):
        return call(model, z.detach(), r.detach(), t.detach(), cond, who=who)


@contextlib.contextmanager
def same_randomness(device: torch.device) -> Iterator[None]:
    """Run the block, then rewind the random state of the CPU and of ``device`` to where the block started.

    Two passes separated by this rewind draw the same dropout masks and the same in-network label drops, as long
    as their inputs have the same shape: the finite-difference halves and the probes use it.
    """
    devices = [device] if device.type not in ("cpu", "meta") else []
    kwargs: dict[str, Any] = {"devices": devices}
    if devices:
        kwargs["device_type"] = device.type
    with torch.random.fork_rng(**kwargs):
        yield


def batch_stat_layers(model: Any) -> list[str]:
    """Names of the layers of ``model`` that normalise with batch statistics in its current mode.

    These are BatchNorm layers (including ``SyncBatchNorm``) in train mode, or without running statistics: their
    output for one row depends on the other rows of the same call, so a pass on a sub-batch computes another
    function than the gradient forward.
    """
    module = _module_of(model)
    if module is None:
        return []
    return [
        name or type(m).__name__
        for name, m in module.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
    ]
