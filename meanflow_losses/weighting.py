r"""Per-sample weights and the reduction over data dimensions.

The squared error of one sample is reduced over its data dimensions by an explicit ``reduction``:

* ``"sum"``: :math:`\|D_i\|^2 = \sum_j D_{ij}^2` (official MeanFlow code);
* ``"mean"``: :math:`\|D_i\|^2 = \frac{1}{d}\sum_j D_{ij}^2` (official alpha-Flow code).

The constant ``c`` of adaptive weighting means different things under each, which is why the reduction is
always an explicit option and never guessed.

Per-row weights ``(t, r, step) -> (B,)`` for the objectives' ``velocity_weight`` and ``interval_weight`` hooks
(Kim et al.'s accelerated scheme): :class:`MinSNRWeight` and :class:`ProgressiveIntervalWeight`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from meanflow_losses._validate import check_int, check_real
from meanflow_losses.times import TimePairSampler

__all__ = [
    "MIN_SNR_FORMS",
    "REDUCTIONS",
    "AdaptiveWeight",
    "MinSNRWeight",
    "ProgressiveIntervalWeight",
    "Reduction",
    "expected_gap",
    "reduce_data_dims",
    "squared_error",
]

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
    reduction; CIFAR-10 ``p = 0.75``). On low-dimensional data (the 2-D toys) ``p = 1`` is mode-seeking and
    collapses samples onto lines; ``p = 0`` gave 2.7x lower 1-step sliced W2 there (docs/toy2d_study.md).

    Args:
        p: Power, ``p >= 0``.
        c: Positive constant that bounds the weight for tiny errors.
    """

    p: float = 1.0
    c: float = 1e-3

    def __post_init__(self) -> None:
        check_real("p", self.p, lo=0.0)
        check_real("c", self.c, lo=0.0, lo_open=True)

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


# ---------------------------------------------------------------------------------------------------------------------
# Per-row weights ``(t, r, step) -> (B,)`` for the ``velocity_weight`` / ``interval_weight`` hooks of the objectives
# (the accelerated MeanFlow scheme of Kim et al., arXiv 2511.19065).

MIN_SNR_FORMS: tuple[str, ...] = ("v_prediction", "x0_matched")


@dataclass(frozen=True)
class MinSNRWeight:
    r"""Min-SNR-:math:`\gamma` weight for the instantaneous-velocity rows (``r = t``).

    On the linear path :math:`z_t = (1 - t)\,x + t\,e` the signal-to-noise ratio is
    :math:`\mathrm{SNR}(t) = ((1 - t) / t)^2`. Two forms are offered:

    * ``"v_prediction"`` (default): :math:`\min(\mathrm{SNR}, \gamma) / (\mathrm{SNR} + 1)
      = \min((1 - t)^2, \gamma t^2) / ((1 - t)^2 + t^2)`, Hang et al.'s weight for v-prediction as it is
      commonly carried over to flow matching.
    * ``"x0_matched"``: :math:`\min(\mathrm{SNR}, \gamma)\,t^2 = \min((1 - t)^2, \gamma t^2)`, the x0-space
      Min-SNR weight expressed exactly for the linear path's velocity loss
      (:math:`\|\hat x_0 - x_0\|^2 = t^2 \|\hat v - v\|^2`).

    Both are 0 at ``t = 0`` and ``t = 1`` and never produce inf/NaN. Use it as
    ``MeanFlowLoss(velocity_weight=MinSNRWeight(5.0))``: the objective multiplies the adaptive weight by it
    on ``r = t`` rows only.

    Args:
        gamma: Clamp :math:`\gamma > 0` of the SNR (Hang et al. use 5).
        form: ``"v_prediction"`` or ``"x0_matched"``.
    """

    gamma: float = 5.0
    form: str = "v_prediction"

    def __post_init__(self) -> None:
        check_real("gamma", self.gamma, lo=0.0, lo_open=True)
        if self.form not in MIN_SNR_FORMS:
            raise ValueError(f"form must be one of {MIN_SNR_FORMS}, got {self.form!r}")

    def __call__(self, t: Tensor, r: Tensor, step: int | None = None) -> Tensor:
        """Weights from the start times ``t``, shape ``(B,)``; ``r`` and ``step`` are unused."""
        t = t.detach()
        signal, noise = (1 - t).square(), t.square()
        w = torch.minimum(signal, self.gamma * noise)
        if self.form == "v_prediction":
            w = w / (signal + noise)
        return w


def expected_gap(times: TimePairSampler) -> float:
    r"""Expected interval length :math:`\mathbb{E}[t - r]` over the sampler's ``r != t`` rows.

    The pairs are two i.i.d. draws sorted, so :math:`\mathbb{E}[t - r] = \mathbb{E}|a - b|
    = 2 \int_0^1 F(x)\,(1 - F(x))\,dx` with ``F`` the CDF of one draw: exactly ``1/3`` for ``"uniform"``,
    and a quadrature in logit space for ``"logit_normal"`` (0.2334 for ``mean=-0.4, std=1.0``).

    Args:
        times: The ``(t, r)`` pair sampler of the objective.

    Returns:
        :math:`\mathbb{E}[t - r]` as a float.
    """
    if not isinstance(times, TimePairSampler):
        raise TypeError(f"times must be a TimePairSampler, got {type(times).__name__}")
    if getattr(times, "r_times", None) is not None:
        return _expected_gap_two(times)
    if times.name == "uniform":
        return 1.0 / 3.0
    m, s = float(times.mean), float(times.std)
    y = torch.linspace(m - 16.0 * s, m + 16.0 * s, 400_001, dtype=torch.float64)
    cdf = torch.special.ndtr((y - m) / s)
    sig = torch.sigmoid(y)
    return float(torch.trapezoid(2.0 * cdf * (1.0 - cdf) * sig * (1.0 - sig), y))


def _cdf_on_grid(name: str, mean: float, std: float, x: Tensor) -> Tensor:
    """CDF of one time draw (``"uniform"`` or ``"logit_normal"``) at the points ``x`` of ``(0, 1)``."""
    if name == "uniform":
        return x
    return torch.special.ndtr((torch.logit(x) - mean) / std)


def _expected_gap_two(times: TimePairSampler) -> float:
    r""":math:`\mathbb{E}[t - r]` over ``r != t`` rows when ``a`` and ``b`` have different CDFs ``F`` and ``G``.

    ``order="sort"``: :math:`\mathbb{E}|a - b| = \int_0^1 F(1 - G) + G(1 - F)\,dx`; ``order="min"`` (``t = a``,
    ``r = min(a, b)``, interval rows where ``b < a``):
    :math:`\mathbb{E}[a - b \mid b < a] = \int_0^1 G(1 - F)\,dx \,/\, P(b < a)`, with
    :math:`P(b < a) = \int_0^1 G\,dF = 1 - \int_0^1 F\,dG`, by quadrature on a fine grid of ``(0, 1)``.
    """
    rt = times.r_times
    assert rt is not None  # the caller's branch: two different draws
    x = torch.linspace(0.0, 1.0, 2_000_001, dtype=torch.float64)[1:-1]
    f = _cdf_on_grid(times.name, float(times.mean), float(times.std), x)
    g = _cdf_on_grid(rt.name, float(rt.mean), float(rt.std), x)
    if times.order == "sort":
        return float(torch.trapezoid(f * (1 - g) + g * (1 - f), x))
    # P(b < a) = integral of P(a > x) dG(x) = integral of (1 - F) dG
    p_less = float(torch.trapezoid(1 - f, g))
    return float(torch.trapezoid(g * (1 - f), x)) / p_less


@dataclass(frozen=True)
class ProgressiveIntervalWeight:
    r"""Kim et al.'s progressive interval weight for the ``r != t`` rows.

    .. math::
        \beta(\Delta t, s) = 1 - s + \lambda\,s\,(1 - \Delta t), \qquad
        \Delta t = t - r, \qquad s = 1 - \min(i / T, 1)^k,

    with ``i`` the training step and ``T = total_steps``. At the start short intervals dominate; from step
    ``T`` on the weight is uniform (1). :math:`\lambda = 1 / \mathbb{E}[1 - \Delta t]` over the sampler's
    ``r != t`` pairs makes the mean weight 1 at step 0 (about 1.304 for two sorted logit-normal(-0.4, 1)
    draws). The objectives apply it AFTER the adaptive normalization, on ``r != t`` rows only:
    ``MeanFlowLoss(interval_weight=ProgressiveIntervalWeight(total_steps))``.

    Args:
        total_steps: ``T > 0``, the step at which the weight becomes uniform.
        k: Exponent of the progress, ``k > 0`` (paper: 1).
        lam: :math:`\lambda`; ``None`` computes it from ``times``.
        times: The objective's ``(t, r)`` sampler (used only to compute :math:`\lambda`).
    """

    total_steps: int
    k: float = 1.0
    lam: float | None = None
    times: TimePairSampler = field(default_factory=TimePairSampler)
    lam_resolved: float = field(init=False)

    def __post_init__(self) -> None:
        check_int("total_steps", self.total_steps, lo=1)
        check_real("k", self.k, lo=0.0, lo_open=True)
        if self.lam is None:
            lam = 1.0 / (1.0 - expected_gap(self.times))
        else:
            lam = check_real("lam", self.lam, lo=0.0)
        object.__setattr__(self, "lam_resolved", lam)

    def progress(self, step: int) -> float:
        """The schedule value ``s`` at ``step``: 1 at step 0, 0 from ``total_steps`` on."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return 1.0 - min(step / self.total_steps, 1.0) ** self.k

    def __call__(self, t: Tensor, r: Tensor, step: int | None) -> Tensor:
        r"""Weights :math:`\beta(t - r, s)`, shape ``(B,)``.

        Raises:
            ValueError: if ``step`` is ``None`` (pass ``step=`` to the loss).
        """
        if step is None:
            raise ValueError(
                "ProgressiveIntervalWeight needs the training step: call the loss with step=<current step>"
            )
        s = self.progress(int(step))
        gap = (t - r).detach()
        return (1.0 - s) + self.lam_resolved * s * (1.0 - gap)
