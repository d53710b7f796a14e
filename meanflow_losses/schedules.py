r"""Schedules: small frozen objects mapping the training step to a number, ``schedule(step) -> float``.

They drive alpha-Flow's ``alpha`` and any scheduled ``equal_fraction`` (the share of ``r = t`` rows) of a
:class:`~meanflow_losses.times.TimePairSampler`; any other callable ``step -> float`` works the same way.

The alpha-Flow curriculum (Zhang et al., arXiv 2510.20771) is :class:`Sigmoid` from 1 to 0:

.. math::
    \alpha(k) = 1 - \sigma\!\left(\gamma\,\frac{k - (k_s + k_e)/2}{k_e - k_s}\right)
    \quad (k_s \le k \le k_e), \qquad \alpha = 1 \text{ before } k_s, \quad \alpha = 0 \text{ after } k_e,

with :math:`\gamma = 25`. The thresholds :math:`\eta` that snap alpha to exactly 0 or 1 belong to the
objective (:class:`~meanflow_losses.objectives.alphaflow.AlphaFlowLoss`), not to the schedule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meanflow_losses._validate import check_real

__all__ = ["Constant", "Linear", "Sigmoid", "Step"]


def _check_finite(name: str, value: float) -> None:
    check_real(name, value)


def _check_step(step: int) -> int:
    if isinstance(step, bool) or not isinstance(step, int):
        try:
            step = int(step)
        except (TypeError, ValueError):
            raise TypeError(f"step must be an integer training step, got {type(step).__name__}") from None
    return step


def _check_window(start: int, end: int) -> None:
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an integer step, got {value!r}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if end <= start:
        raise ValueError(f"end must be > start, got start={start}, end={end}")


@dataclass(frozen=True)
class Constant:
    """The same value at every step.

    Args:
        value: The value.
    """

    value: float

    def __post_init__(self) -> None:
        _check_finite("value", self.value)

    def __call__(self, step: int) -> float:
        """Return ``value``."""
        _check_step(step)
        return float(self.value)


@dataclass(frozen=True)
class Step:
    """A single jump: ``before`` for ``step < at``, ``after`` from ``at`` on.

    Args:
        at: The step at which the value changes.
        before: Value before ``at``.
        after: Value from ``at`` on.
    """

    at: int
    before: float = 1.0
    after: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.at, bool) or not isinstance(self.at, int) or self.at < 0:
            raise ValueError(f"at must be a non-negative integer step, got {self.at!r}")
        _check_finite("before", self.before)
        _check_finite("after", self.after)

    def __call__(self, step: int) -> float:
        """Return ``before`` if ``step < at`` else ``after``."""
        return float(self.before if _check_step(step) < self.at else self.after)


@dataclass(frozen=True)
class Linear:
    """Linear ramp from ``initial`` (up to ``start``) to ``final`` (from ``end`` on).

    Args:
        start: First step of the ramp.
        end: Last step of the ramp, ``end > start``.
        initial: Value up to ``start``.
        final: Value from ``end`` on.
    """

    start: int
    end: int
    initial: float = 1.0
    final: float = 0.0

    def __post_init__(self) -> None:
        _check_window(self.start, self.end)
        _check_finite("initial", self.initial)
        _check_finite("final", self.final)

    def __call__(self, step: int) -> float:
        """Value at ``step``."""
        k = _check_step(step)
        if k <= self.start:
            return float(self.initial)
        if k >= self.end:
            return float(self.final)
        return float(self.initial + (self.final - self.initial) * (k - self.start) / (self.end - self.start))


@dataclass(frozen=True)
class Sigmoid:
    r"""The alpha-Flow sigmoid curriculum from ``initial`` to ``final`` over ``[start, end]``.

    .. math::
        f(k) = a_0 + (a_1 - a_0)\,\sigma\!\left(\gamma\,\frac{k - (k_s + k_e)/2}{k_e - k_s}\right)
        \quad\text{for } k_s \le k \le k_e,

    :math:`f = a_0` before :math:`k_s` and :math:`f = a_1` after :math:`k_e`. With the defaults
    ``initial=1, final=0`` this is alpha-Flow's :math:`\alpha(k)`; the value at the midpoint is the mean of
    the two ends, and at :math:`k_s` / :math:`k_e` the curve is within :math:`\sigma(-\gamma/2)`
    (3.7e-6 for :math:`\gamma = 25`) of them.

    Args:
        start: :math:`k_s`, first step of the transition.
        end: :math:`k_e > k_s`, last step of the transition.
        gamma: Steepness :math:`\gamma > 0` (paper: 25).
        initial: :math:`a_0`, value before ``start`` (alpha-Flow: 1).
        final: :math:`a_1`, value after ``end`` (alpha-Flow: 0).
    """

    start: int
    end: int
    gamma: float = 25.0
    initial: float = 1.0
    final: float = 0.0

    def __post_init__(self) -> None:
        _check_window(self.start, self.end)
        check_real("gamma", self.gamma, lo=0.0, lo_open=True)
        _check_finite("initial", self.initial)
        _check_finite("final", self.final)

    def __call__(self, step: int) -> float:
        """Value at ``step``."""
        k = _check_step(step)
        if k < self.start:
            return float(self.initial)
        if k > self.end:
            return float(self.final)
        mid = 0.5 * (self.start + self.end)
        x = self.gamma * (k - mid) / (self.end - self.start)
        sig = 1.0 / (1.0 + math.exp(-x))
        return float(self.initial + (self.final - self.initial) * sig)
