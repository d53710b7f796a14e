"""Argument checks shared by every public entry point.

Every check raises a ``ValueError`` (or ``TypeError``) whose message names the offending argument and
what was expected, so that bad input never becomes a silent wrong answer.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_batch",
    "check_bool",
    "check_int",
    "check_interval",
    "check_model_output",
    "check_real",
    "check_same_shape",
    "check_times",
    "value_checks",
]


_VALUE_CHECKS = [True]


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Switch the value checks (finite values, times in ``[0, 1]``, ``r <= t``) on or off in a block.

    Each value check reads a result back to the host, which costs a device synchronisation per loss call on a
    GPU. Shape, dtype and option checks always run. Inside ``torch.compile``-d code value checks are always off
    (a host read would break the graph). Turn value checks off only in a training loop whose inputs were
    validated once::

        with mfl.value_checks(False):
            out = loss_fn(model, x)
    """
    _VALUE_CHECKS.append(bool(enabled))
    try:
        yield
    finally:
        _VALUE_CHECKS.pop()


def compiling() -> bool:
    """Whether the code is being traced by ``torch.compile`` (value checks, probes and host syncs are skipped)."""
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


def _values_on() -> bool:
    return _VALUE_CHECKS[-1] and not compiling()


def check_real(
    name: str,
    value: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """Check that ``value`` is a finite real number (not a bool or a string) within the given bounds.

    Args:
        name: Argument name used in the message.
        value: The value (``int``, ``float``, NumPy or 0-dim tensor scalar).
        lo: Lower bound, or ``None``.
        hi: Upper bound, or ``None``.
        lo_open: Exclude ``lo`` itself.
        hi_open: Exclude ``hi`` itself.

    Returns:
        ``value`` as a ``float``.
    """
    if isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_complex and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    v = float(value)
    left = "(" if lo_open or lo is None else "["
    right = ")" if hi_open or hi is None else "]"
    bounds = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name} must lie in {bounds}, got {value!r}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name} must lie in {bounds}, got {value!r}")
    return v


def check_interval(name: str, value: Any) -> tuple[float, float]:
    """A time interval ``(t_min, t_max)`` with ``0 <= t_min <= t_max <= 1``, as a tuple of floats.

    Raises:
        TypeError: ``value`` is not a pair.
        ValueError: a bound is not a real number in ``[0, 1]``, or ``t_min > t_max``; the message names ``name``.
    """
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise TypeError(f"{name} must be a pair (t_min, t_max), got {value!r}")
    lo = check_real(f"{name}[0]", value[0], lo=0.0, hi=1.0)
    hi = check_real(f"{name}[1]", value[1], lo=0.0, hi=1.0)
    if lo > hi:
        raise ValueError(f"{name} must satisfy 0 <= t_min <= t_max <= 1, got {value}")
    return lo, hi


def check_int(name: str, value: Any, *, lo: int | None = None) -> int:
    """Check that ``value`` is an integer (not a bool, not a float such as ``2.5``), at least ``lo``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if lo is not None and value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """Check that ``value`` is a ``bool`` (``0``, ``1`` or ``"yes"`` are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_batch(name: str, x: Any, *, min_ndim: int = 2) -> Tensor:
    """Check that ``x`` is a finite floating-point batch of at least ``min_ndim`` dimensions."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < min_ndim:
        raise ValueError(
            f"{name} must have shape (B, *D) with at least {min_ndim} dimensions, got shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"{name} must hold at least one sample, got batch size 0")
    if _values_on() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return x


def check_same_shape(name: str, y: Any, ref_name: str, ref: Tensor, *, same_dtype: bool = True) -> Tensor:
    """Check that ``y`` is a finite floating tensor with exactly the shape (and, by default, dtype) of ``ref``."""
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if tuple(y.shape) != tuple(ref.shape):
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(y.shape)}")
    if not y.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {y.dtype}")
    if same_dtype and y.dtype != ref.dtype:
        raise TypeError(
            f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {y.dtype}: cast it with "
            f"{name}.to({ref_name}.dtype) (no silent promotion)"
        )
    if y.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {y.device}")
    if _values_on() and not bool(torch.isfinite(y).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    return y


def check_times(name: str, t: Any, batch_size: int) -> Tensor:
    """Check that ``t`` is a finite floating vector of shape ``(B,)`` with values in ``[0, 1]``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({batch_size},), got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if tuple(t.shape) != (batch_size,):
        raise ValueError(f"{name} must have shape ({batch_size},) (one time per sample), got {tuple(t.shape)}")
    if not _values_on():
        return t
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains non-finite values (NaN or inf)")
    if bool((t < 0).any()) or bool((t > 1).any()):
        lo, hi = float(t.min()), float(t.max())
        raise ValueError(f"{name} must lie in [0, 1] (t = 0 is data, t = 1 is noise), got values in [{lo}, {hi}]")
    return t


def check_r_le_t(r: Tensor, t: Tensor) -> None:
    """Check the ordering ``r <= t`` row by row."""
    if not _values_on():
        return
    bad = r > t
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(
            f"r must satisfy r <= t on every row (r is the end of the interval, t its start), "
            f"got r[{i}] = {float(r[i])} > t[{i}] = {float(t[i])}"
        )


def check_model_output(u: Any, z: Tensor, *, who: str = "model") -> Tensor:
    """Check that a network returned a tensor shaped like its input ``z``."""
    if not isinstance(u, Tensor):
        hint = ""
        if hasattr(u, "sample") or isinstance(u, tuple):
            hint = " (a diffusers model returns an output object: wrap it so that it returns .sample)"
        raise TypeError(f"{who}(z, r, t, **model_kwargs) must return a Tensor, got {type(u).__name__}{hint}")
    if not u.is_floating_point():
        raise TypeError(f"{who}(z, r, t, **model_kwargs) must return a real floating-point tensor, got dtype {u.dtype}")
    if tuple(u.shape) != tuple(z.shape):
        raise ValueError(
            f"{who}(z, r, t, **model_kwargs) must return a tensor of the shape of z {tuple(z.shape)}, "
            f"got {tuple(u.shape)}"
        )
    return u


def check_model_kwargs(model_kwargs: Any) -> dict[str, Any]:
    """Check that conditioning is a mapping of keyword arguments (or ``None``)."""
    if model_kwargs is None:
        return {}
    if not isinstance(model_kwargs, Mapping):
        raise TypeError(
            f"model_kwargs must be a dict of keyword arguments for the model, got {type(model_kwargs).__name__}"
        )
    return dict(model_kwargs)
