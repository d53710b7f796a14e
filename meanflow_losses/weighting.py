r"""Per-sample weights and the reduction over data dimensions.

The squared error of one sample is reduced over its data dimensions by an explicit ``reduction``:

* ``"sum"``: :math:`\|D_i\|^2 = \sum_j D_{ij}^2` (official MeanFlow code);
* ``"mean"``: :math:`\|D_i\|^2 = \frac{1}{d}\sum_j D_{ij}^2` (official alpha-Flow code).

The constant ``c`` of adaptive weighting means different things under each, which is why the reduction is
always an explicit option and never guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

__all__ = ["REDUCTIONS", "AdaptiveWeight", "Reduction", "reduce_data_dims", "squared_error"]

Reduction = Literal["sum", "mean"]
REDUCTIONS: tuple[str, ...] = ("sum", "mean")


def check_reduction(reduction: str) -> str:
    """Check that ``reduction`` names a supported reduction over data dimensions."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS} (over data dimensions), got {reduction!r}")
    return reduction


def reduce_data_dims(values: Tensor, reduction: str) -> Tensor:
    """Reduce ``(B, *D)`` to ``(B,)`` by summing or averaging over the data dimensions.

    Args:
        values: Per-element values, shape ``(B, *D)``.
        reduction: ``"sum"`` or ``"mean"``.

    Returns:
        Shape ``(B,)``.
    """
    check_reduction(reduction)
    flat = values.reshape(values.shape[0], -1)
    return flat.sum(dim=1) if reduction == "sum" else flat.mean(dim=1)


def squared_error(pred: Tensor, target: Tensor, reduction: str) -> Tensor:
    r"""Per-sample squared error :math:`\|\mathrm{pred}_i - \mathrm{target}_i\|^2`, shape ``(B,)``."""
    return reduce_data_dims((pred - target).square(), reduction)


@dataclass(frozen=True)
class AdaptiveWeight:
    r"""Adaptive loss weight :math:`w_i = \mathrm{sg}\big(1 / (\|D_i\|^2 + c)^p\big)`.

    The weighted per-sample loss is :math:`w_i \|D_i\|^2`. ``p = 0`` gives plain squared error; MeanFlow
    uses ``p = 1`` (the paper writes ``c = 1e-3``; the official ImageNet code ``c = 0.01`` with the SUM
    reduction; CIFAR-10 ``p = 0.75``).

    Args:
        p: Power, ``p >= 0``.
        c: Positive constant that bounds the weight for tiny errors.
    """

    p: float = 1.0
    c: float = 1e-3

    def __post_init__(self) -> None:
        if not (math.isfinite(self.p) and self.p >= 0):
            raise ValueError(f"p must be a finite number >= 0, got {self.p}")
        if not (math.isfinite(self.c) and self.c > 0):
            raise ValueError(f"c must be a finite number > 0, got {self.c}")

    def __call__(self, sq_error: Tensor) -> Tensor:
        r"""Weights for per-sample squared errors.

        Args:
            sq_error: :math:`\|D_i\|^2`, shape ``(B,)``.

        Returns:
            Detached weights, shape ``(B,)``.
        """
        sq = sq_error.detach()
        if self.p == 0:
            return sq.new_ones(sq.shape)
        return (sq + self.c).pow(-self.p)
