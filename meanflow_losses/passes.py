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
import functools
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from meanflow_losses._validate import check_model_output, compiling
from meanflow_losses.conditioning import Conditioning

__all__ = [
    "batch_stat_layers",
    "call",
    "layers_where",
    "modules_of",
    "no_grad_call",
    "preserve_buffers",
    "reseed",
    "same_randomness",
]

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
    return Conditioning(dict(cond), 0, frozenset()).call_kwargs()  # a plain dict: Shared markers removed


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
    except IndexError as err:
        kwargs = _kwargs(cond)
        labels = [
            k
            for k, v in kwargs.items()
            if isinstance(v, Tensor) and not (v.is_floating_point() or v.is_complex()) and v.dtype != torch.bool
        ]
        if "index out of range in self" in str(err) and labels:  # torch.embedding's message (eager, CPU)
            raise IndexError(
                f"{who}(z, r, t, **model_kwargs) failed: {err}. model_kwargs has integer entries ({labels}): if "
                "they are class labels and condition dropout or guidance replaces them by the null class "
                "(mfl.null_class(n) uses the index n), the network needs an embedding row for it: nn.Embedding(n + 1, "
                "dim)"
            ) from err
        raise
    return check_model_output(out, z, who=who)


def modules_of(model: Any, _depth: int = 0) -> list[nn.Module]:
    """The ``nn.Module`` s a callable runs: itself, or those behind a lambda, closure, bound method or partial.

    A network wrapped as ``lambda z, r, t: net(z, r, t)`` still has its buffers protected and its BatchNorm layers
    seen. Looks through closure cells, the modules a function names as globals, ``__self__``, ``__wrapped__`` and
    ``functools.partial`` (func, arguments).
    """
    if isinstance(model, nn.Module):
        return [model]
    if _depth > 4 or model is None:
        return []
    found: list[nn.Module] = []
    candidates: list[Any] = []
    if isinstance(model, functools.partial):
        candidates += [model.func, *model.args, *model.keywords.values()]
    for attr in ("__self__", "__wrapped__"):
        if hasattr(model, attr):
            candidates.append(getattr(model, attr))
    for cell in getattr(model, "__closure__", None) or ():
        try:
            candidates.append(cell.cell_contents)
        except ValueError:  # an empty cell
            continue
    code, namespace = getattr(model, "__code__", None), getattr(model, "__globals__", None)
    if code is not None and isinstance(namespace, dict):  # lambda z, r, t: net(z, r, t) with a global net
        candidates += [namespace[n] for n in code.co_names if isinstance(namespace.get(n), nn.Module)]
    for cand in candidates:
        if callable(cand) or isinstance(cand, nn.Module):
            for m in modules_of(cand, _depth + 1):
                if all(m is not f for f in found):
                    found.append(m)
    return found


@contextlib.contextmanager
def preserve_buffers(model: Any) -> Iterator[None]:
    """Give back every buffer of ``model`` as the block found it (BatchNorm running statistics, counters, ...).

    Buffers are copied on entry and copied back on exit (also a buffer the block re-assigned). The version counter
    cannot tell: BatchNorm's kernels update running statistics in place without bumping it. The copies cost a
    memcpy of the buffers per pass and no host sync. The modules are found with :func:`modules_of`, so a network
    behind a lambda or a partial is protected too.
    """
    modules = modules_of(model)
    if not modules:
        yield
        return
    seen: set[int] = set()
    saved = []
    for module in modules:
        for owner in module.modules():
            for name, buf in owner._buffers.items():
                if buf is not None and not buf.is_inference() and id(buf) not in seen:
                    seen.add(id(buf))
                    saved.append((owner, name, buf, buf.detach().clone()))
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
    if compiling():  # random state cannot be read inside a compiled graph (documented: FD halves draw apart)
        yield
        return
    devices = [device] if device.type not in ("cpu", "meta") else []
    kwargs: dict[str, Any] = {"devices": devices}
    if devices:
        kwargs["device_type"] = device.type
    with torch.random.fork_rng(**kwargs):
        yield


def reseed(device: torch.device, seed: int) -> None:
    """Seed the CPU generator and ``device``'s only (``torch.manual_seed`` would reseed every accelerator)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    elif device.type not in ("cpu", "meta"):
        backend = getattr(torch, device.type, None)
        if backend is not None and hasattr(backend, "manual_seed"):
            backend.manual_seed(seed)


def batch_stat_layers(model: Any) -> list[str]:
    """Names of the layers of ``model`` that normalise with batch statistics in its current mode.

    These are BatchNorm layers (including ``SyncBatchNorm``) in train mode, or without running statistics: their
    output for one row depends on the other rows of the same call, so a pass on a sub-batch computes another
    function than the gradient forward.
    """
    return layers_where(
        model, lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
    )


def layers_where(model: Any, predicate: Callable[[nn.Module], bool]) -> list[str]:
    """Names of the layers of ``model`` (or of the modules it wraps, see :func:`modules_of`) with ``predicate``.

    A layer is named by its path in its module (its class name for the module itself).
    """
    return [
        name or type(m).__name__ for module in modules_of(model) for name, m in module.named_modules() if predicate(m)
    ]
