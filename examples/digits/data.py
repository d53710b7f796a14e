"""The 8 x 8 handwritten digits that ship with scikit-learn (1797 images, 10 classes), split once and scaled."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["NUM_CLASSES", "Digits", "load_digits"]

NUM_CLASSES = 10


@dataclass
class Digits:
    """Train / held-out split.

    Attributes:
        x_train: Images ``(N, 1, 8, 8)`` in ``[-1, 1]`` (pixel value / 8 - 1).
        y_train: Labels ``(N,)`` int64 in ``[0, 10)``.
        x_test: Held-out images ``(M, 1, 8, 8)``.
        y_test: Held-out labels ``(M,)``.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits(held_out: float = 0.2, seed: int = 0) -> Digits:
    """Load the scikit-learn digits and split them, stratified by class, with a fixed seed.

    Args:
        held_out: Fraction kept out of every training (classifier and generators alike).
        seed: Seed of the split.
    """
    from sklearn.datasets import load_digits as sk_load
    from sklearn.model_selection import train_test_split

    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must lie in (0, 1), got {held_out}")
    ds = sk_load()
    x = torch.tensor(ds.images, dtype=torch.float32)[:, None] / 8.0 - 1.0
    y = torch.tensor(ds.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=held_out, random_state=seed, stratify=y.numpy()
    )
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return Digits(x[idx_train], y[idx_train], x[idx_test], y[idx_test])
