r"""Time distributions and the sorted ``(t, r)`` pair sampler.

A time sampler is a small frozen dataclass selected by name:

* ``"uniform"``: :math:`t \sim U(0, 1)`.
* ``"logit_normal"``: :math:`t = \sigma(m + s\,n)`, :math:`n \sim N(0, 1)`; MeanFlow and alpha-Flow use
  ``m = -0.4, s = 1.0`` on ImageNet.

:class:`TimePairSampler` draws two independent times, sorts them into ``t = max`` and ``r = min``, then sets
``r = t`` on a fixed number of rows, ``floor(equal_fraction * B)``, chosen by a random permutation (the
official MeanFlow code also fixes the count per batch rather than flipping a coin per row). Those ``r = t`` rows
keep ``t = max(a, b)`` (``equal_draw="pair"``, the official MeanFlow code), whose density is skewed towards the
noise end (``2t`` for uniform draws), or take a fresh single draw (``equal_draw="single"``, the official
alpha-Flow code), so that the flow-matching rows see the base distribution itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from meanflow_losses._validate import check_real

__all__ = ["TIME_DISTRIBUTIONS", "TimePair", "TimePairSampler", "TimeSampler", "resolve_fraction"]

TIME_DISTRIBUTIONS = ("uniform", "logit_normal")

FractionLike = float | Callable[[int], float]


def _draw(
    name: str,
    mean: float,
    std: float,
    n: int,
    generator: torch.Generator | None,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> Tensor:
    dev = generator.device if generator is not None else device
    if name == "uniform":
        t = torch.rand(n, generator=generator, device=dev, dtype=torch.float64)
    else:
        t = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=dev, dtype=torch.float64))
    return t.to(device=device if device is not None else dev, dtype=dtype)


@dataclass(frozen=True)
class TimeSampler:
    """Distribution of a single time ``t`` in ``[0, 1]``.

    Args:
        name: ``"uniform"`` or ``"logit_normal"``.
        mean: Location ``m`` of the logit-normal (ignored by ``"uniform"``).
        std: Scale ``s > 0`` of the logit-normal (ignored by ``"uniform"``).
    """

    name: str = "logit_normal"
    mean: float = -0.4
    std: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in TIME_DISTRIBUTIONS:
            raise ValueError(f"name must be one of {TIME_DISTRIBUTIONS}, got {self.name!r}")
        check_real("std", self.std, lo=0.0, lo_open=True)
        check_real("mean", self.mean)

    def sample(
        self,
        batch_size: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Draw ``batch_size`` times, shape ``(B,)``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return _draw(self.name, self.mean, self.std, batch_size, generator, device, dtype)


@dataclass(frozen=True)
class TimePair:
    """A drawn pair of times.

    Attributes:
        t: Start times (closer to noise), shape ``(B,)``.
        r: End times, ``r <= t``, shape ``(B,)``.
        interval_rows: Indices of the rows drawn with ``r < t``, ascending, shape ``(n,)``, when the sampler fixes
            their number (the objectives then select them without a data-dependent ``nonzero``: no host sync, and
            a static shape under ``torch.compile``); ``None`` otherwise.
    """

    t: Tensor
    r: Tensor
    interval_rows: Tensor | None = None


def resolve_fraction(fraction: FractionLike, step: int | None, name: str = "equal_fraction") -> float:
    """Evaluate a constant or scheduled fraction at ``step`` and check that it lies in ``[0, 1]``."""
    if callable(fraction):
        if step is None:
            raise ValueError(f"{name} is a schedule (step -> fraction): call the loss with step=<training step>")
        try:
            return check_real(name, fraction(int(step)), lo=0.0, hi=1.0)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{err} (the schedule's value at step {step})") from None
    return check_real(name, fraction, lo=0.0, hi=1.0)


@dataclass(frozen=True)
class TimePairSampler:
    r"""Sorted ``(t, r)`` pairs with a fixed share of rows where ``r = t``.

    Draws :math:`a, b` i.i.d. from the named distribution, sets :math:`t = \max(a, b)`,
    :math:`r = \min(a, b)`, then ``r = t`` on ``floor(equal_fraction * B)`` rows picked by a random
    permutation. ``equal_fraction`` may be a float or a schedule ``step -> float``.

    Args:
        name: ``"uniform"`` or ``"logit_normal"``.
        mean: Logit-normal location.
        std: Logit-normal scale.
        equal_fraction: Share of rows with ``r = t`` (plain flow-matching rows). MeanFlow ImageNet: 0.75.
        equal_draw: Times of the ``r = t`` rows: ``"pair"`` keeps ``t = max(a, b)`` (MeanFlow's code);
            ``"single"`` redraws them from the base distribution (alpha-Flow's code).
    """

    name: str = "logit_normal"
    mean: float = -0.4
    std: float = 1.0
    equal_fraction: FractionLike = 0.75
    equal_draw: Literal["pair", "single"] = "pair"
    base: TimeSampler = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", TimeSampler(self.name, self.mean, self.std))

        if self.equal_draw not in ("pair", "single"):
            raise ValueError(f"equal_draw must be 'pair' or 'single', got {self.equal_draw!r}")
        if not callable(self.equal_fraction):
            resolve_fraction(self.equal_fraction, None)

    def num_equal(self, batch_size: int, step: int | None = None) -> int:
        """Number of ``r = t`` rows in a batch of ``batch_size``: ``floor(fraction * B)``."""
        return math.floor(resolve_fraction(self.equal_fraction, step) * batch_size + 1e-9)

    def sample(
        self,
        batch_size: int,
        *,
        step: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> TimePair:
        """Draw a batch of pairs.

        Returns:
            :class:`TimePair` with ``t`` and ``r`` of shape ``(B,)``, ``0 <= r <= t <= 1``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        a = _draw(self.name, self.mean, self.std, 2 * batch_size, generator, device, torch.float64)
        a = a.view(2, batch_size)
        t, r = a.max(dim=0).values, a.min(dim=0).values
        n_eq = self.num_equal(batch_size, step)
        interval = torch.arange(batch_size, device=t.device)
        if n_eq > 0:
            dev = generator.device if generator is not None else device
            perm = torch.randperm(batch_size, generator=generator, device=dev).to(t.device)
            eq = perm[:n_eq]
            interval = perm[n_eq:].sort().values
            r = r.clone()
            if self.equal_draw == "single":
                t = t.clone()
                t[eq] = _draw(self.name, self.mean, self.std, n_eq, generator, device, torch.float64).to(t.device)
            r[eq] = t[eq]
        return TimePair(t=t.to(dtype), r=r.to(dtype), interval_rows=interval)
