r"""Conditioning (``model_kwargs``) with the per-row decision made ONCE, against the batch size ``B``.

Objectives call the network on subsets of rows (the ``r != t`` rows of the JVP), on doubled rows (guidance's
conditional and null halves) and on rows mixed with the null condition. Each of these needs to know which entries
of ``model_kwargs`` hold one row per sample. That is decided once, when the batch is validated:

* a tensor whose first dimension equals ``B`` is per-row (it is sliced, repeated and mixed with the rows);
* anything else (scalars, tensors of another first dimension, strings, ``None``) is shared and passed unchanged;
* nested dicts (e.g. diffusers' ``added_cond_kwargs``), lists and tuples are searched entry by entry;
* a tensor whose first dimension happens to equal ``B`` but is shared by every row is marked with
  :func:`shared`; the network then receives the tensor itself.

Every later split or doubling reuses that decision, so a shared tensor whose first dimension equals a sub-batch
size (for example the number of ``r != t`` rows) is never mistaken for a per-row one.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Conditioning", "Shared", "shared"]

Path = tuple[str, ...]


@dataclass(frozen=True)
class Shared:
    """Marks a conditioning tensor as shared by every row (never sliced), whatever its first dimension.

    Attributes:
        value: The tensor (or any object) passed to the network unchanged.
    """

    value: Any


def shared(value: Any) -> Shared:
    """Mark ``value`` as shared by every row: ``model_kwargs={"pos": mfl.shared(pos)}``.

    Needed only for a shared tensor whose first dimension equals the batch size ``B``; other shared entries are
    recognised as such. The network receives ``value`` itself.
    """
    return Shared(value)


def _is_row_tensor(value: Any, rows: int) -> bool:
    return isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == rows


def _items(container: Any) -> list[tuple[Any, Any]]:
    """``(key, value)`` pairs of a dict, or ``(index, value)`` of a list or tuple; ``[]`` for anything else."""
    if isinstance(container, Mapping):
        return list(container.items())
    if isinstance(container, (list, tuple)):
        return list(enumerate(container))
    return []


def _rebuild(container: Any, items: list[tuple[Any, Any]]) -> Any:
    if isinstance(container, Mapping):
        return dict(items)
    return type(container)(v for _, v in items) if isinstance(container, tuple) else [v for _, v in items]


def _find_rows(kwargs: Any, rows: int, prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    for key, value in _items(kwargs):
        path = (*prefix, key)
        if isinstance(value, (Mapping, list, tuple)):
            out |= _find_rows(value, rows, path)
        elif _is_row_tensor(value, rows):
            out.add(path)
    return out


def _get(kwargs: Any, path: Path) -> Any:
    value: Any = kwargs
    for key in path:
        value = value[key]
    return value


def _map_rows(kwargs: Any, paths: frozenset[Path], fn: Any, prefix: Path = ()) -> Any:
    """Copy of ``kwargs`` (dicts, lists and tuples inside) with ``fn(path, value)`` applied to the per-row entries."""
    items = []
    for key, value in _items(kwargs):
        path = (*prefix, key)
        if path in paths:
            items.append((key, fn(path, value)))
        elif isinstance(value, (Mapping, list, tuple)) and any(p[: len(path)] == path for p in paths):
            items.append((key, _map_rows(value, paths, fn, path)))
        else:
            items.append((key, value))
    return _rebuild(kwargs, items)


def _unwrap(kwargs: Any) -> Any:
    items = []
    for key, value in _items(kwargs):
        if isinstance(value, Shared):
            value = value.value
        elif isinstance(value, (Mapping, list, tuple)):
            value = _unwrap(value)
        items.append((key, value))
    return _rebuild(kwargs, items)


def _has_shared(kwargs: Any) -> bool:
    return any(
        isinstance(v, Shared) or (isinstance(v, (Mapping, list, tuple)) and _has_shared(v)) for _, v in _items(kwargs)
    )


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, Shared) and isinstance(b, Shared):
        return _same(a.value, b.value)
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b.to(a.device)))
        )
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:
        return False


@dataclass(frozen=True, eq=False)
class Conditioning(Mapping[str, Any]):
    """``model_kwargs`` together with the set of per-row entries, decided once against the batch size.

    It is a read-only mapping of the keyword arguments the network receives, so ``model(z, r, t, **cond)`` works.

    Attributes:
        kwargs: The conditioning as given (possibly holding :class:`Shared` markers).
        rows: Number of rows of every per-row entry.
        per_row: Paths (tuples of keys; nested dicts give longer paths) of the per-row tensors.
    """

    kwargs: dict[str, Any]
    rows: int
    per_row: frozenset[Path]

    @classmethod
    def from_kwargs(cls, model_kwargs: Mapping[str, Any] | None, batch_size: int) -> Conditioning:
        """Decide which entries are per-row: tensors whose first dimension is ``batch_size``.

        Args:
            model_kwargs: Conditioning for the network, or ``None``.
            batch_size: ``B``, the number of rows of the batch.
        """
        if isinstance(model_kwargs, Conditioning):
            if model_kwargs.rows != batch_size:
                raise ValueError(f"conditioning has {model_kwargs.rows} rows, expected {batch_size}")
            return model_kwargs
        kwargs = dict(model_kwargs or {})
        return cls(kwargs, int(batch_size), frozenset(_find_rows(kwargs, int(batch_size))))

    def __getitem__(self, key: str) -> Any:
        value = self.kwargs[key]
        if isinstance(value, Shared):
            return value.value
        return _unwrap(value) if isinstance(value, (Mapping, list, tuple)) and _has_shared(value) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self.kwargs)

    def __len__(self) -> int:
        return len(self.kwargs)

    def call_kwargs(self) -> dict[str, Any]:
        """The keyword arguments handed to the network (:class:`Shared` markers removed)."""
        return _unwrap(self.kwargs) if _has_shared(self.kwargs) else self.kwargs

    def select(self, index: Tensor) -> Conditioning:
        """The rows ``index`` (integer tensor of shape ``(n,)``) of every per-row entry."""
        if not self.per_row:
            return Conditioning(self.kwargs, int(index.numel()), self.per_row)
        kw = _map_rows(self.kwargs, self.per_row, lambda _, v: v.index_select(0, index.to(v.device)))
        return Conditioning(kw, int(index.numel()), self.per_row)

    def repeat(self, times: int) -> Conditioning:
        """Every per-row entry stacked ``times`` times along the rows (``torch.cat([v] * times)``)."""
        if times == 1 or not self.per_row:
            return Conditioning(self.kwargs, self.rows * times, self.per_row)
        kw = _map_rows(self.kwargs, self.per_row, lambda _, v: torch.cat([v] * times, dim=0))
        return Conditioning(kw, self.rows * times, self.per_row)

    def concat(self, other: Conditioning) -> Conditioning:
        """Rows of ``self`` followed by the rows of ``other`` (same entries; shared ones must agree)."""
        self._check_compatible(other, "concat")
        kw = _map_rows(
            self.kwargs,
            self.per_row,
            lambda path, v: torch.cat([v, _get(other.kwargs, path).to(device=v.device, dtype=v.dtype)], dim=0),
        )
        return Conditioning(kw, self.rows + other.rows, self.per_row)

    def where(self, mask: Tensor, other: Conditioning) -> Conditioning:
        """Row-wise choice: ``other``'s rows where ``mask`` (bool ``(rows,)``) is true, ``self``'s elsewhere."""
        self._check_compatible(other, "where")

        def pick(path: Path, v: Tensor) -> Tensor:
            o = _get(other.kwargs, path)
            m = mask.to(v.device).reshape(v.shape[0], *([1] * (v.ndim - 1)))
            return torch.where(m, o.to(device=v.device, dtype=v.dtype), v)

        return Conditioning(_map_rows(self.kwargs, self.per_row, pick), self.rows, self.per_row)

    def replace(self, kwargs: Mapping[str, Any], who: str) -> Conditioning:
        """The same rows with new values (e.g. the null condition), checked against this decision.

        Args:
            kwargs: The new conditioning; it must have the same keys, the same shapes on the per-row entries and
                the same shared entries (a shared entry cannot change on some rows only).
            who: Name used in error messages (e.g. ``"guidance.null_condition"``).

        Raises:
            ValueError: on a missing or extra key, a per-row entry of another shape, or a changed shared entry.
        """
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"{who} must return a dict of model keyword arguments, got {type(kwargs).__name__}")
        new = dict(kwargs)
        _check_same_structure(self.kwargs, new, self.per_row, self.rows, who)
        return Conditioning(new, self.rows, self.per_row)

    def _check_compatible(self, other: Conditioning, op: str) -> None:
        if other.per_row != self.per_row:
            raise ValueError(f"Conditioning.{op}: the two conditionings have different per-row entries")


def _check_same_structure(old: Any, new: Any, per_row: frozenset[Path], rows: int, who: str, prefix: Path = ()) -> None:
    where = "model_kwargs" + "".join(f"[{k!r}]" for k in prefix)
    if isinstance(old, Mapping):
        if not isinstance(new, Mapping) or set(old) != set(new):
            got: object = sorted(new) if isinstance(new, Mapping) else type(new).__name__
            raise ValueError(f"{who} must return the same keys as {where}, got {got} vs {sorted(old)}")
    elif not isinstance(new, (list, tuple)) or len(new) != len(old):
        raise ValueError(f"{who} must keep {where} a sequence of length {len(old)}, got {type(new).__name__}")
    for key, value in _items(old):
        path = (*prefix, key)
        name = "model_kwargs" + "".join(f"[{k!r}]" for k in path)
        nv = new[key]
        if path in per_row:
            if not isinstance(nv, Tensor) or tuple(nv.shape) != tuple(value.shape):
                got = tuple(nv.shape) if isinstance(nv, Tensor) else type(nv).__name__
                raise ValueError(
                    f"{who} must keep the shape of the per-row entry {name} {tuple(value.shape)}, got {got}"
                )
        elif isinstance(value, (Mapping, list, tuple)) and any(p[: len(path)] == path for p in per_row):
            _check_same_structure(value, nv, per_row, rows, who, path)
        elif not _same(value, nv):
            raise ValueError(
                f"{who} changed {name}, which is shared by every row (not a tensor with one row per sample), so "
                f"it cannot be set on the dropped rows only; give it one row per sample (first dimension {rows})"
            )
