r"""Time distributions and the ``(t, r)`` pair sampler.

A time sampler is a small frozen dataclass selected by name:

* ``"uniform"``: :math:`t \sim U(0, 1)`.
* ``"logit_normal"``: :math:`t = \sigma(m + s\,n)`, :math:`n \sim N(0, 1)`; MeanFlow and alpha-Flow use
  ``m = -0.4, s = 1.0`` on ImageNet.

:class:`TimePairSampler` draws two independent times, sorts them into ``t = max`` and ``r = min``, then sets
``r = t`` on a fixed number of rows, ``floor(equal_fraction * B)``, chosen by a random permutation (the
official MeanFlow code also fixes the count per batch rather than flipping a coin per row). An optional
:class:`DifficultyCurriculum` restricts the times to the noisiest clusters first (Kim et al.'s "difficulty-based"
sampler). Those ``r = t`` rows
keep ``t = max(a, b)`` (``equal_draw="pair"``, the official MeanFlow code), whose density is skewed towards the
noise end (``2t`` for uniform draws), or take a fresh single draw (``equal_draw="single"``, the official
alpha-Flow code), so that the flow-matching rows see the base distribution itself.

Options reproduce each official code's draws (the defaults are the package's rule above):

=============================  ==========================================================================
official code                  options
=============================  ==========================================================================
MeanFlow JAX                   ``equal_count="truncate", equal_rows="first"`` (``int(B * f)`` rows, first)
py-meanflow ``v0``             ``equal_count="coin"``, ``r_times=TimeSampler(...)`` (``P_mean_r, P_std_r``)
py-meanflow ``v1`` (default)   ``equal_count="coin", order="min"``, ``r_times=TimeSampler(...)``
alpha-Flow                     ``equal_count="truncate", equal_rows="first", equal_draw="single"``
=============================  ==========================================================================

py-meanflow's ``ratio`` is the probability of ``r != t``: ``equal_fraction = 1 - ratio``.

**Static row counts and torch.compile.** With a fixed count (``equal_count="floor"`` or ``"truncate"``) and
``order="sort"`` the sampler hands the objectives their ``r < t`` rows (:attr:`TimePair.interval_rows`), a
static shape under ``torch.compile``. A coin per row (``equal_count="coin"``) and ``order="min"`` (where every
pair with ``b >= a`` also ends with ``r = t``) make the number of ``r != t`` rows data-dependent: the sampler
returns ``interval_rows=None`` and the objectives find the rows with ``r != t`` (one host sync, eager). Drawn
inside a compiled region such a sampler raises a ``ValueError``: draw ``(t, r)`` outside the compiled function
and pass ``t=`` and ``r=`` (the row selection is then a graph break, one compilation per distinct count), or use
a fixed count inside compiled code.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from meanflow_losses._validate import check_real, compiling

__all__ = [
    "CURRICULUM_ROWS",
    "EQUAL_COUNTS",
    "EQUAL_ROWS",
    "PAIR_ORDERS",
    "TIME_DISTRIBUTIONS",
    "DifficultyCurriculum",
    "TimePair",
    "TimePairSampler",
    "TimeSampler",
    "resolve_fraction",
]

TIME_DISTRIBUTIONS = ("uniform", "logit_normal")
#: Rules for the number of ``r = t`` rows (see :class:`TimePairSampler`).
EQUAL_COUNTS = ("floor", "truncate", "coin")
#: Placements of a fixed number of ``r = t`` rows.
EQUAL_ROWS = ("random", "first")
#: How two draws become ``(t, r)``.
PAIR_ORDERS = ("sort", "min")
#: Which rows a :class:`DifficultyCurriculum` restricts.
CURRICULUM_ROWS = ("all", "equal")

EqualCount = Literal["floor", "truncate", "coin"]
EqualRows = Literal["random", "first"]
PairOrder = Literal["sort", "min"]

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


def _draw_truncated(
    name: str,
    mean: float,
    std: float,
    lo: float,
    n: int,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> Tensor:
    """``n`` float64 draws of the named distribution conditioned on ``t >= lo`` (inverse CDF of a uniform)."""
    dev = generator.device if generator is not None else device
    q = torch.rand(n, generator=generator, device=dev, dtype=torch.float64)
    if name == "uniform":
        t = lo + (1.0 - lo) * q
    else:
        z_lo = (math.log(lo / (1.0 - lo)) - mean) / std if lo > 0 else -math.inf
        p_lo = 0.5 * math.erfc(-z_lo / math.sqrt(2.0)) if lo > 0 else 0.0
        u = (p_lo + (1.0 - p_lo) * q).clamp(max=1.0 - 1e-16)
        t = torch.sigmoid(mean + std * torch.special.ndtri(u))
    return t.to(device=device if device is not None else dev)


@dataclass(frozen=True)
class DifficultyCurriculum:
    r"""Easy-to-hard time curriculum (DTD, Kim, Go et al., arXiv 2403.10348), for :class:`TimePairSampler`.

    ``[0, 1]`` is cut into ``clusters`` equal intervals; the noisiest ones are the easiest denoising tasks. At
    training step ``k`` the stage is :math:`n = \lfloor k / \text{stage\_steps} \rfloor` and times are drawn from the
    sampler's distribution conditioned on

    .. math::
        t \ge 1 - (n + 1) / N \qquad (N = \text{clusters}),

    so stage 0 sees the noisiest cluster only, each stage adds the next cleaner one, and from stage ``N - 1`` on the
    sampler is the plain one (the same draws as without a curriculum). Kim et al. (arXiv 2511.19065) use this
    sampler at DiT-L/2 and XL/2 to form the instantaneous velocity faster; neither their number of clusters nor their
    pacing could be read here, and DTD itself advances a stage when the loss stops improving for a patience window,
    which a fixed ``stage_steps`` replaces (it keeps every rank of a DDP run on the same stage and compiles to
    ``clusters`` graphs at most). Composes with any weighting (e.g. the progressive interval weight, whose
    ``lambda`` stays that of the sampler without the curriculum).

    Args:
        clusters: Number of equal time intervals ``N`` (>= 2).
        stage_steps: Training steps per stage (>= 1); the curriculum ends after ``(N - 1) * stage_steps`` steps.
        rows: ``"all"`` (default): both draws of every pair are conditioned, so ``r`` too lies in the stage's
            range; ``"equal"``: only the ``r = t`` (flow-matching) rows follow the curriculum.
    """

    clusters: int = 20
    stage_steps: int = 10_000
    rows: Literal["all", "equal"] = "all"

    def __post_init__(self) -> None:
        if isinstance(self.clusters, bool) or not isinstance(self.clusters, int) or self.clusters < 2:
            raise ValueError(f"curriculum.clusters must be an integer >= 2, got {self.clusters!r}")
        if isinstance(self.stage_steps, bool) or not isinstance(self.stage_steps, int) or self.stage_steps < 1:
            raise ValueError(f"curriculum.stage_steps must be an integer >= 1, got {self.stage_steps!r}")
        if self.rows not in CURRICULUM_ROWS:
            raise ValueError(f"curriculum.rows must be one of {CURRICULUM_ROWS}, got {self.rows!r}")

    def stage(self, step: int) -> int:
        """The stage ``n`` at ``step`` (``clusters - 1`` and beyond: the curriculum is over)."""
        return min(int(step) // self.stage_steps, self.clusters - 1)

    def lower_bound(self, step: int) -> float:
        """The smallest allowed time at ``step``: ``1 - (n + 1) / N``, 0 once the curriculum is over."""
        n = self.stage(step)
        return 0.0 if n >= self.clusters - 1 else 1.0 - (n + 1) / self.clusters


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
    r"""``(t, r)`` pairs, ``r <= t``, with a share of rows where ``r = t``.

    By default: draws :math:`a, b` i.i.d. from the named distribution, sets :math:`t = \max(a, b)`,
    :math:`r = \min(a, b)`, then ``r = t`` on ``floor(equal_fraction * B)`` rows picked by a random
    permutation. ``equal_fraction`` may be a float or a schedule ``step -> float``. The other options reproduce
    the official codes' draws (module docstring).

    Args:
        name: ``"uniform"`` or ``"logit_normal"``: the distribution of ``a`` (the ``t`` draw).
        mean: Logit-normal location.
        std: Logit-normal scale.
        equal_fraction: Share of rows with ``r = t`` (plain flow-matching rows). MeanFlow ImageNet: 0.75.
        equal_draw: Times of the ``r = t`` rows: ``"pair"`` keeps the pair's ``t`` (MeanFlow's code);
            ``"single"`` redraws them from the base distribution (alpha-Flow's code).
        equal_count: Rule for the ``r = t`` rows: ``"floor"`` (default) a fixed ``floor(f * B + 1e-9)``;
            ``"truncate"`` a fixed ``int(B * f)`` (the official MeanFlow JAX and alpha-Flow codes; the two differ
            when ``f * B`` falls just below an integer in floating point, e.g. 28 against 29 rows for
            ``0.29 x 100``); ``"coin"`` an independent coin per row with probability ``f`` (py-meanflow: the
            count varies from batch to batch, and the objectives find the rows with ``r != t``).
        equal_rows: Placement of a fixed number of ``r = t`` rows: ``"random"`` (default, a random permutation)
            or ``"first"`` (the first rows of the batch, as the official MeanFlow JAX and alpha-Flow codes; with
            ``TrainingGuidance(drop_rows="first")`` only flow-matching rows then lose their condition). Not
            with ``equal_count="coin"``.
        order: How the two draws become a pair: ``"sort"`` (default) ``t = max(a, b), r = min(a, b)``;
            ``"min"`` ``t = a, r = min(a, b)`` without sorting (py-meanflow's ``v1`` sampler): ``t`` keeps the
            ``a`` distribution, and every pair with ``b >= a`` has ``r = t``, so the share of ``r = t`` rows
            exceeds ``equal_fraction``.
        r_times: Distribution of ``b`` (the ``r`` draw), e.g. py-meanflow's ``P_mean_r, P_std_r``;
            ``None`` (default) draws ``b`` like ``a``.
        curriculum: Optional :class:`DifficultyCurriculum` (easy-to-hard times; needs ``step``).
    """

    name: str = "logit_normal"
    mean: float = -0.4
    std: float = 1.0
    equal_fraction: FractionLike = 0.75
    equal_draw: Literal["pair", "single"] = "pair"
    equal_count: EqualCount = "floor"
    equal_rows: EqualRows = "random"
    order: PairOrder = "sort"
    r_times: TimeSampler | None = None
    curriculum: DifficultyCurriculum | None = None
    base: TimeSampler = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", TimeSampler(self.name, self.mean, self.std))

        if self.equal_draw not in ("pair", "single"):
            raise ValueError(f"equal_draw must be 'pair' or 'single', got {self.equal_draw!r}")
        if self.equal_count not in EQUAL_COUNTS:
            raise ValueError(f"equal_count must be one of {EQUAL_COUNTS}, got {self.equal_count!r}")
        if self.equal_rows not in EQUAL_ROWS:
            raise ValueError(f"equal_rows must be one of {EQUAL_ROWS}, got {self.equal_rows!r}")
        if self.order not in PAIR_ORDERS:
            raise ValueError(f"order must be one of {PAIR_ORDERS}, got {self.order!r}")
        if self.equal_count == "coin" and self.equal_rows != "random":
            raise ValueError(
                "equal_rows='first' needs a fixed number of r = t rows: use equal_count='floor' or 'truncate' "
                "(equal_count='coin' flips a coin on every row)"
            )
        if self.r_times is not None and not isinstance(self.r_times, TimeSampler):
            raise TypeError(
                f"r_times must be None or a TimeSampler (e.g. mfl.TimeSampler('logit_normal', -4.0, 1.6)), "
                f"got {type(self.r_times).__name__}"
            )
        if not callable(self.equal_fraction):
            resolve_fraction(self.equal_fraction, None)
        if self.curriculum is not None and not isinstance(self.curriculum, DifficultyCurriculum):
            raise TypeError(f"curriculum must be None or a DifficultyCurriculum, got {type(self.curriculum).__name__}")

    @property
    def static_rows(self) -> bool:
        """Whether the number of ``r < t`` rows is fixed per batch size (``interval_rows`` is then returned)."""
        return self.equal_count != "coin" and self.order == "sort"

    def num_equal(self, batch_size: int, step: int | None = None) -> int:
        """Number of ``r = t`` rows in a batch of ``batch_size`` under a fixed count.

        ``floor(f * B + 1e-9)`` (``equal_count="floor"``) or ``int(B * f)`` (``"truncate"``).

        Raises:
            ValueError: ``equal_count="coin"`` (the count is drawn with the batch).
        """
        f = resolve_fraction(self.equal_fraction, step)
        if self.equal_count == "coin":
            raise ValueError("equal_count='coin' draws the number of r = t rows per batch: it has no fixed count")
        if self.equal_count == "truncate":
            return int(batch_size * f)
        return math.floor(f * batch_size + 1e-9)

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
            :class:`TimePair` with ``t`` and ``r`` of shape ``(B,)``, ``0 <= r <= t <= 1``; its ``interval_rows``
            are ``None`` when the count of ``r != t`` rows is data-dependent (:attr:`static_rows` false).

        Raises:
            ValueError: a data-dependent count (``equal_count="coin"`` or ``order="min"``) drawn inside
                ``torch.compile``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not self.static_rows and compiling():
            raise ValueError(
                f"TimePairSampler(equal_count={self.equal_count!r}, order={self.order!r}) gives a data-dependent "
                "number of r != t rows, which torch.compile cannot trace with static shapes: draw (t, r) outside "
                "the compiled function and pass t= and r= to the loss, or use equal_count='truncate' (or 'floor') "
                "with order='sort' inside compiled code"
            )
        lo = 0.0
        if self.curriculum is not None:
            if step is None:
                raise ValueError(
                    "a TimePairSampler with a curriculum needs the training step: call the loss with step="
                )
            lo = self.curriculum.lower_bound(step)
        if lo > 0 and self.curriculum is not None and self.curriculum.rows == "all":
            rt = self.r_times or self.base
            a = _draw_truncated(self.name, self.mean, self.std, lo, batch_size, generator, device)
            b = _draw_truncated(rt.name, rt.mean, rt.std, lo, batch_size, generator, device)
        elif self.r_times is None:
            a = _draw(self.name, self.mean, self.std, 2 * batch_size, generator, device, torch.float64)
            a, b = a.view(2, batch_size).unbind(0)
        else:
            a = _draw(self.name, self.mean, self.std, batch_size, generator, device, torch.float64)
            rt = self.r_times
            b = _draw(rt.name, rt.mean, rt.std, batch_size, generator, device, torch.float64)
        if self.order == "sort":
            t, r = torch.maximum(a, b), torch.minimum(a, b)
        else:
            t, r = a, torch.minimum(a, b)
        # a curriculum on the r = t rows only: they take a fresh draw inside the stage (the pairs keep the full range)
        fresh_equal = lo > 0 and self.curriculum is not None and self.curriculum.rows == "equal"
        if fresh_equal and (self.equal_count == "coin" or self.equal_draw == "single"):
            raise ValueError(
                "DifficultyCurriculum(rows='equal') needs a fixed count of r = t rows that keep their pair's t: "
                "use equal_count='floor' or 'truncate' with equal_draw='pair', or rows='all'"
            )
        if self.equal_count == "coin":
            return self._coin_rows(t, r, step, generator, device, dtype, lo)
        n_eq = self.num_equal(batch_size, step)
        interval = torch.arange(batch_size, device=t.device)
        if n_eq > 0:
            if self.equal_rows == "first":
                eq = torch.arange(n_eq, device=t.device)
                interval = torch.arange(n_eq, batch_size, device=t.device)
            else:
                dev = generator.device if generator is not None else device
                perm = torch.randperm(batch_size, generator=generator, device=dev).to(t.device)
                eq = perm[:n_eq]
                interval = perm[n_eq:].sort().values
            r = r.clone()
            if self.equal_draw == "single" or fresh_equal:
                t = t.clone()
                t[eq] = self._single(n_eq, lo, generator, device).to(t.device)
            r[eq] = t[eq]
        rows = interval if self.static_rows else None
        return TimePair(t=t.to(dtype), r=r.to(dtype), interval_rows=rows)

    def _coin_rows(
        self,
        t: Tensor,
        r: Tensor,
        step: int | None,
        generator: torch.Generator | None,
        device: torch.device | str | None,
        dtype: torch.dtype,
        lo: float = 0.0,
    ) -> TimePair:
        """``r = t`` on the rows whose coin (probability ``equal_fraction``) comes up; no static rows."""
        batch_size = t.shape[0]
        f = resolve_fraction(self.equal_fraction, step)
        dev = generator.device if generator is not None else device
        coin = (torch.rand(batch_size, generator=generator, device=dev, dtype=torch.float64) < f).to(t.device)
        if self.equal_draw == "single":
            fresh = self._single(batch_size, lo, generator, device)
            t = torch.where(coin, fresh.to(t.device), t)
        r = torch.where(coin, t, r)
        return TimePair(t=t.to(dtype), r=r.to(dtype), interval_rows=None)

    def _single(
        self, n: int, lo: float, generator: torch.Generator | None, device: torch.device | str | None
    ) -> Tensor:
        """``n`` fresh float64 draws of the base distribution (conditioned on ``t >= lo`` during a curriculum)."""
        if lo > 0:
            return _draw_truncated(self.name, self.mean, self.std, lo, n, generator, device)
        return _draw(self.name, self.mean, self.std, n, generator, device, torch.float64)
