"""Argument checks shared by every public entry point.

Every check raises a ``ValueError`` (or ``TypeError``) whose message names the offending argument and
what was expected, so that bad input never becomes a silent wrong answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_batch",
    "check_model_output",
    "check_same_shape",
    "check_times",
    "select_rows",
    "value_checks",
]


_VALUE_CHECKS = [True]


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Switch the value checks (finite values, times in ``[0, 1]``, ``r <= t``) on or off in a block.

    Each value check reads a result back to the host, which costs a device synchronisation per loss call on a
    GPU. Shape, dtype and option checks always run. Turn value checks off only in a training loop whose
    inputs were validated once::

        with mfl.value_checks(False):
            out = loss_fn(model, x)
    """
    _VALUE_CHECKS.append(bool(enabled))
    try:
        yield
    finally:
        _VALUE_CHECKS.pop()


def _values_on() -> bool:
    return _VALUE_CHECKS[-1]


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


def check_same_shape(name: str, y: Any, ref_name: str, ref: Tensor) -> Tensor:
    """Check that ``y`` is a finite floating tensor with exactly the shape of ``ref``."""
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if tuple(y.shape) != tuple(ref.shape):
        raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(y.shape)}")
    if not y.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {y.dtype}")
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
        raise TypeError(f"{who}(z, r, t, **model_kwargs) must return a Tensor, got {type(u).__name__}")
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


def select_rows(model_kwargs: Mapping[str, Any], index: Tensor, batch_size: int) -> dict[str, Any]:
    """Select rows of every batched entry of ``model_kwargs``.

    A tensor whose first dimension equals ``batch_size`` is treated as per-sample and indexed; every
    other value (scalars, non-batched tensors, strings) is passed through unchanged.

    Args:
        model_kwargs: Conditioning for the model.
        index: Row indices, shape ``(n,)``, integer dtype.
        batch_size: ``B``, the batch size of the data.

    Returns:
        A new dict with the selected rows.
    """
    out: dict[str, Any] = {}
    for k, val in model_kwargs.items():
        if isinstance(val, Tensor) and val.ndim > 0 and val.shape[0] == batch_size:
            out[k] = val.index_select(0, index.to(val.device))
        else:
            out[k] = val
    return out


def where_rows(mask: Tensor, a: Mapping[str, Any], b: Mapping[str, Any], batch_size: int) -> dict[str, Any]:
    """Row-wise choice between two conditioning dicts: ``a`` where ``mask`` else ``b``.

    Args:
        mask: Boolean rows, shape ``(B,)``.
        a: Conditioning used on rows where ``mask`` is true (for example the null condition).
        b: Conditioning used elsewhere.
        batch_size: ``B``.

    Raises:
        ValueError: if the two dicts have different keys, or a non-batched entry differs.
    """
    if set(a) != set(b):
        raise ValueError(
            f"guidance.null_condition must return the same keys as model_kwargs, got {sorted(a)} vs {sorted(b)}"
        )
    out: dict[str, Any] = {}
    for k in b:
        va, vb = a[k], b[k]
        if isinstance(vb, Tensor) and vb.ndim > 0 and vb.shape[0] == batch_size:
            if not isinstance(va, Tensor) or va.shape != vb.shape:
                raise ValueError(
                    f"guidance.null_condition must keep the shape of model_kwargs[{k!r}] {tuple(vb.shape)}, "
                    f"got {tuple(va.shape) if isinstance(va, Tensor) else type(va).__name__}"
                )
            m = mask.to(vb.device).reshape(batch_size, *([1] * (vb.ndim - 1)))
            out[k] = torch.where(m, va.to(vb.dtype), vb)
        else:
            out[k] = vb
    return out
