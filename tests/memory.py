"""Peak bytes of the tensors a block creates, on any device (the CPU has no allocator peak counter)."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """Track the storages of every op output created inside the block; ``peak`` is the most alive at once.

    Storages are keyed by data pointer and count while any tensor created in the block views them, so views are
    not double counted. Inputs that existed before the block are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, list[Any]] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int, tid: int) -> None:
        entry = self.live.get(key)
        if entry is None:
            return
        entry[0].discard(tid)
        if not entry[0]:
            self.current -= entry[1]
            del self.live[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            try:
                storage = t.untyped_storage()
                key = storage.data_ptr()
            except (RuntimeError, NotImplementedError):  # a wrapper without storage of its own
                continue
            if key == 0:
                continue
            if key not in self.live:
                self.live[key] = [set(), storage.nbytes()]
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            self.live[key][0].add(id(t))
            weakref.finalize(t, self._release, key, id(t))
        return out
