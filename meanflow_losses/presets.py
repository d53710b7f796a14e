r"""Published training settings as ready objectives: alpha-Flow's ImageNet recipes and accelerated MeanFlow.

alpha-Flow (Zhang et al., arXiv 2510.20771; official configs of snap-research/alphaflow), all with
logit-normal(-0.4, 1.0) times (the ``r = t`` rows drawn on their own, ``equal_draw="single"``),
:math:`w = \alpha/(\|D\|^2 + 10^{-3})` with the MEAN reduction, :math:`\eta = 5\cdot 10^{-3}`, the sigmoid
curriculum with :math:`\gamma = 25` and targets clipped to +-4:

============  ============  ===================  ===========  =========================================
preset        total steps   sigmoid window       r = t share  guidance (omega, kappa, interval, drop)
============  ============  ===================  ===========  =========================================
``B/2``       400K          0 -> 400K            50%          none
``B/2-cfg``   1.2M          0 -> 1.2M            25%          1.0, 0.5, [0, 1], 0.1 inside the interval
``XL/2-cfg``  1.2M          600K -> 1M           50%          0.2, 0.92, [0, 0.75], 0.1 inside the interval
============  ============  ===================  ===========  =========================================

The rest of the recipe is not part of a loss and is recorded on :class:`AlphaFlowPreset` for reference:
Adam lr 1e-4, betas (0.9, 0.95), gradient clipping 16, EMA half-life 6931 steps (:mod:`meanflow_losses.ema`),
batch 256, bf16 autocast. XL/2+ continues XL/2 for 75K steps at batch 1024.

The alpha-Flow presets draw and guide as the official code does: ``int(B * f)`` flow-matching rows
(``equal_count="truncate"``) and the strict guidance interval ``t_min < t < t_max`` (``interval_test="strict"``).

Accelerated MeanFlow (Kim et al., arXiv 2511.19065): :func:`accelerated_meanflow` adds Min-SNR weighting on
``r = t`` rows and the progressive interval weight on ``r != t`` rows to :class:`MeanFlowLoss`.

Named recipes (:data:`RECIPES`, :func:`recipe`, ``mfl.make_objective(name, recipe=...)``) set the times,
the adaptive weighting and the reduction of any objective for a regime:

* ``"imagenet"``: the papers' ImageNet defaults: logit-normal(-0.4, 1.0) times; MeanFlow and SplitMeanFlow 75%
  ``r = t``, :math:`w = 1/(\|D\|^2 + 10^{-3})` (``p = 1``), SUM over data dimensions; alpha-Flow 50% ``r = t``
  with single draws, the same weight with the MEAN reduction, targets clipped to +-4; flow matching plain squared
  error (MEAN).
* ``"small_data"``: what the 2-D toy study found (docs/toy2d_study.md): uniform times, 50% ``r = t``, no adaptive
  weighting (``p = 0``, plain squared error), MEAN reduction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, cast

from meanflow_losses.guidance import TrainingGuidance
from meanflow_losses.objectives.alphaflow import AlphaFlowLoss
from meanflow_losses.objectives.flow_matching import FlowMatchingLoss
from meanflow_losses.objectives.meanflow import MeanFlowLoss
from meanflow_losses.objectives.splitting import ShortcutLoss
from meanflow_losses.schedules import Sigmoid
from meanflow_losses.times import TimePairSampler, TimeSampler
from meanflow_losses.weighting import AdaptiveWeight, MinSNRWeight, ProgressiveIntervalWeight

__all__ = [
    "ALPHAFLOW_PRESETS",
    "RECIPES",
    "AlphaFlowPreset",
    "Recipe",
    "accelerated_meanflow",
    "alphaflow_preset",
    "recipe",
    "recipe_options",
]

NullCondition = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class AlphaFlowPreset:
    """One published alpha-Flow training setting.

    Attributes:
        name: Preset name.
        total_steps: Training steps.
        alpha_start: First step of the sigmoid transition (``k_s``).
        alpha_end: Last step of the sigmoid transition (``k_e``).
        equal_fraction: Share of ``r = t`` rows.
        omega: Guidance weight of the conditional velocity (1 and ``kappa = 0`` without guidance).
        kappa: Guidance weight of the network's conditional velocity.
        interval: Guidance interval ``(t_min, t_max)``.
        drop_prob: Label dropout probability (applied inside the guidance interval only).
        gamma: Sigmoid steepness.
        eta: alpha thresholds.
        c: Adaptive-weight constant.
        reduction: Reduction over data dimensions.
        target_clip: Elementwise clip of the consistency targets.
        lr: Adam learning rate (reference only).
        betas: Adam betas (reference only).
        grad_clip: Gradient-norm clip (reference only).
        ema_half_life: EMA half-life in steps (reference only).
        batch_size: Global batch size (reference only).
    """

    name: str
    total_steps: int
    alpha_start: int
    alpha_end: int
    equal_fraction: float
    omega: float = 1.0
    kappa: float = 0.0
    interval: tuple[float, float] = (0.0, 1.0)
    drop_prob: float = 0.0
    gamma: float = 25.0
    eta: float = 5e-3
    c: float = 1e-3
    reduction: str = "mean"
    target_clip: float | None = 4.0
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 16.0
    ema_half_life: float = 6931.0
    batch_size: int = 256

    @property
    def guided(self) -> bool:
        """Whether the preset trains with guidance or label dropout."""
        return self.drop_prob > 0 or self.kappa != 0 or self.omega != 1

    def schedule(self) -> Sigmoid:
        """The alpha curriculum: ``Sigmoid(alpha_start, alpha_end, gamma)`` from 1 to 0."""
        return Sigmoid(self.alpha_start, self.alpha_end, gamma=self.gamma)

    def build(self, *, null_condition: NullCondition | None = None, **overrides: Any) -> AlphaFlowLoss:
        """The configured :class:`AlphaFlowLoss`.

        Args:
            null_condition: ``model_kwargs -> model_kwargs`` giving the null condition; required by the
                guided presets (e.g. ``lambda kw: {**kw, "y": torch.full_like(kw["y"], 1000)}``).
            **overrides: Fields of :class:`AlphaFlowLoss` to replace (e.g. ``jvp="finite_difference"``).
        """
        guidance = None
        if self.guided:
            if null_condition is None:
                raise ValueError(
                    f"preset {self.name!r} trains with guidance and label dropout: pass null_condition= "
                    "(model_kwargs -> model_kwargs with the null class)"
                )
            guidance = TrainingGuidance(
                omega=self.omega,
                kappa=self.kappa,
                interval=self.interval,
                drop_prob=self.drop_prob,
                null_condition=null_condition,
                drop_only_in_interval=True,
                guide_dropped_rows=True,  # official alpha-Flow code guides dropped rows in the interval too
                interval_test="strict",  # official alpha-Flow code: t_min < t < t_max
            )
        loss = AlphaFlowLoss(
            alpha=self.schedule(),
            eta=self.eta,
            # official alpha-Flow code: int(B * f) r = t rows, each with its own single logit-normal draw
            times=TimePairSampler(
                "logit_normal", -0.4, 1.0, self.equal_fraction, equal_draw="single", equal_count="truncate"
            ),
            weighting=AdaptiveWeight(p=1.0, c=self.c),
            reduction=self.reduction,
            target_clip=self.target_clip,
            guidance=guidance,
        )
        return replace(loss, **overrides) if overrides else loss


ALPHAFLOW_PRESETS: dict[str, AlphaFlowPreset] = {
    "B/2": AlphaFlowPreset("B/2", total_steps=400_000, alpha_start=0, alpha_end=400_000, equal_fraction=0.5),
    "B/2-cfg": AlphaFlowPreset(
        "B/2-cfg",
        total_steps=1_200_000,
        alpha_start=0,
        alpha_end=1_200_000,
        equal_fraction=0.25,
        omega=1.0,
        kappa=0.5,
        interval=(0.0, 1.0),
        drop_prob=0.1,
    ),
    "XL/2-cfg": AlphaFlowPreset(
        "XL/2-cfg",
        total_steps=1_200_000,
        alpha_start=600_000,
        alpha_end=1_000_000,
        equal_fraction=0.5,
        omega=0.2,
        kappa=0.92,
        interval=(0.0, 0.75),
        drop_prob=0.1,
    ),
}


def alphaflow_preset(name: str, *, null_condition: NullCondition | None = None, **overrides: Any) -> AlphaFlowLoss:
    """Build the :class:`AlphaFlowLoss` of a published setting (see :data:`ALPHAFLOW_PRESETS`).

    Args:
        name: ``"B/2"``, ``"B/2-cfg"`` or ``"XL/2-cfg"``.
        null_condition: Required by the guided presets.
        **overrides: Fields of :class:`AlphaFlowLoss` to replace.
    """
    if name not in ALPHAFLOW_PRESETS:
        raise ValueError(f"name must be one of {sorted(ALPHAFLOW_PRESETS)}, got {name!r}")
    return ALPHAFLOW_PRESETS[name].build(null_condition=null_condition, **overrides)


def accelerated_meanflow(
    total_steps: int,
    *,
    times: TimePairSampler | None = None,
    gamma: float = 5.0,
    k: float = 1.0,
    min_snr_form: str = "v_prediction",
    min_snr: bool = True,
    **meanflow_options: Any,
) -> MeanFlowLoss:
    r"""MeanFlow with Kim et al.'s accelerated scheme: Min-SNR on ``r = t`` rows, :math:`\beta` on ``r != t``.

    Args:
        total_steps: ``T`` of the progressive interval weight (the weight is uniform from step ``T`` on).
        times: The ``(t, r)`` sampler (default: MeanFlow's logit-normal(-0.4, 1.0), 75% ``r = t``);
            :math:`\lambda` is computed from it.
        gamma: Min-SNR clamp.
        k: Exponent of the progress in :math:`\beta`.
        min_snr_form: ``"v_prediction"`` or ``"x0_matched"`` (see :class:`MinSNRWeight`).
        min_snr: Weight the ``r = t`` rows by Min-SNR (the paper's B/4 scheme). ``False`` with a sampler that has a
            :class:`~meanflow_losses.times.DifficultyCurriculum` is the paper's L/2 and XL/2 scheme (a
            difficulty-based time sampler instead of Min-SNR; its parameters were not published in what we read).
        **meanflow_options: Other :class:`MeanFlowLoss` fields (weighting, reduction, guidance, jvp, ...).

    Returns:
        A :class:`MeanFlowLoss`; call it with ``step=`` at every step.
    """
    times = times if times is not None else TimePairSampler("logit_normal", -0.4, 1.0, 0.75)
    return MeanFlowLoss(
        times=times,
        velocity_weight=MinSNRWeight(gamma=gamma, form=min_snr_form) if min_snr else None,
        interval_weight=ProgressiveIntervalWeight(total_steps, k=k, times=times),
        **meanflow_options,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Named recipes: the times, weighting and reduction of a regime, for any objective.


@dataclass(frozen=True)
class Recipe:
    """The times, adaptive weighting and reduction of one training regime.

    Attributes:
        name: Recipe name.
        description: One line on where the recipe comes from.
        time_dist: ``"uniform"`` or ``"logit_normal"``.
        time_mean: Logit-normal location.
        time_std: Logit-normal scale.
        equal_fraction: Share of ``r = t`` rows of pair objectives (MeanFlow, SplitMeanFlow).
        weight_p: Power ``p`` of :class:`AdaptiveWeight` (0: plain squared error).
        weight_c: Constant ``c`` of :class:`AdaptiveWeight`.
        reduction: Reduction over data dimensions of pair objectives, ``"sum"`` or ``"mean"``.
        alphaflow_equal_fraction: Share of ``r = t`` rows of alpha-Flow.
        alphaflow_equal_draw: Times of alpha-Flow's ``r = t`` rows (``"pair"`` or ``"single"``).
        alphaflow_reduction: Reduction of alpha-Flow.
        alphaflow_target_clip: Target clip of alpha-Flow (``None``: off).
        fm_weight_p: Power ``p`` of flow matching's weighting.
    """

    name: str
    description: str
    time_dist: Literal["uniform", "logit_normal"]
    time_mean: float
    time_std: float
    equal_fraction: float
    weight_p: float
    weight_c: float
    reduction: Literal["sum", "mean"]
    alphaflow_equal_fraction: float
    alphaflow_equal_draw: Literal["pair", "single"]
    alphaflow_reduction: Literal["sum", "mean"]
    alphaflow_target_clip: float | None
    fm_weight_p: float

    def times(
        self, equal_fraction: float | None = None, equal_draw: Literal["pair", "single"] = "pair"
    ) -> TimePairSampler:
        """The recipe's ``(t, r)`` sampler (``equal_fraction`` defaults to the recipe's)."""
        f = self.equal_fraction if equal_fraction is None else equal_fraction
        return TimePairSampler(self.time_dist, self.time_mean, self.time_std, f, equal_draw=equal_draw)

    def options(self, objective: str | type) -> dict[str, Any]:
        """The options this recipe sets on an objective (a name of the registry or an objective class).

        Returns:
            Keyword arguments for the objective: ``times``, ``weighting``, ``reduction`` and, for alpha-Flow,
            ``target_clip``. The Shortcut model keeps its dyadic times (only ``weighting`` and ``reduction``).
        """
        from meanflow_losses.registry import objective_class

        cls = objective_class(objective) if isinstance(objective, str) else objective
        if issubclass(cls, ShortcutLoss):
            return {"weighting": AdaptiveWeight(p=self.fm_weight_p, c=self.weight_c), "reduction": "mean"}
        if issubclass(cls, FlowMatchingLoss):
            return {
                "times": TimeSampler(self.time_dist, self.time_mean, self.time_std),
                "weighting": AdaptiveWeight(p=self.fm_weight_p, c=self.weight_c),
                "reduction": "mean",
            }
        weighting = AdaptiveWeight(p=self.weight_p, c=self.weight_c)
        if issubclass(cls, AlphaFlowLoss):
            return {
                "times": self.times(self.alphaflow_equal_fraction, self.alphaflow_equal_draw),
                "weighting": weighting,
                "reduction": self.alphaflow_reduction,
                "target_clip": self.alphaflow_target_clip,
            }
        opts: dict[str, Any] = {"times": self.times(), "weighting": weighting, "reduction": self.reduction}
        names = {f.name for f in fields(cast(Any, cls)) if f.init}  # objectives are dataclasses (else TypeError)
        return {k: v for k, v in opts.items() if k in names}

    def flat_options(self, objective: str | type = "meanflow") -> dict[str, Any]:
        """The recipe as plain values, for a config file or a command line (the example trainers' ``--recipe``).

        Returns:
            ``time_dist``, ``time_mean``, ``time_std``, ``weight_p``, ``weight_c``, ``reduction`` and, for pair
            objectives, ``equal_fraction`` and ``equal_draw``.
        """
        from meanflow_losses.registry import objective_class

        cls = objective_class(objective) if isinstance(objective, str) else objective
        flat: dict[str, Any] = {
            "time_dist": self.time_dist,
            "time_mean": self.time_mean,
            "time_std": self.time_std,
            "weight_c": self.weight_c,
        }
        if issubclass(cls, (FlowMatchingLoss, ShortcutLoss)):
            return {**flat, "weight_p": self.fm_weight_p, "reduction": "mean"}
        if issubclass(cls, AlphaFlowLoss):
            return {
                **flat,
                "weight_p": self.weight_p,
                "reduction": self.alphaflow_reduction,
                "equal_fraction": self.alphaflow_equal_fraction,
                "equal_draw": self.alphaflow_equal_draw,
            }
        return {
            **flat,
            "weight_p": self.weight_p,
            "reduction": self.reduction,
            "equal_fraction": self.equal_fraction,
            "equal_draw": "pair",
        }


RECIPES: dict[str, Recipe] = {
    "imagenet": Recipe(
        "imagenet",
        "the papers' ImageNet-256 defaults (MeanFlow arXiv 2505.13447; alpha-Flow arXiv 2510.20771)",
        time_dist="logit_normal",
        time_mean=-0.4,
        time_std=1.0,
        equal_fraction=0.75,
        weight_p=1.0,
        weight_c=1e-3,
        reduction="sum",
        alphaflow_equal_fraction=0.5,
        alphaflow_equal_draw="single",
        alphaflow_reduction="mean",
        alphaflow_target_clip=4.0,
        fm_weight_p=0.0,
    ),
    "small_data": Recipe(
        "small_data",
        "the 2-D toy study's recipe (docs/toy2d_study.md): uniform times, 50% r = t, p = 0, MEAN reduction",
        time_dist="uniform",
        time_mean=-0.4,
        time_std=1.0,
        equal_fraction=0.5,
        weight_p=0.0,
        weight_c=1e-3,
        reduction="mean",
        alphaflow_equal_fraction=0.5,
        alphaflow_equal_draw="pair",
        alphaflow_reduction="mean",
        alphaflow_target_clip=None,
        fm_weight_p=0.0,
    ),
}


def recipe_options(name: str, objective: str | type = "meanflow") -> dict[str, Any]:
    """The options recipe ``name`` sets on ``objective`` (see :meth:`Recipe.options`).

    Raises:
        ValueError: ``name`` is not a key of :data:`RECIPES` (the message lists them).
    """
    if not isinstance(name, str) or name not in RECIPES:
        raise ValueError(f"recipe must be one of {sorted(RECIPES)}, got {name!r}")
    return RECIPES[name].options(objective)


def recipe(name: str, objective: str = "meanflow", **options: Any) -> Any:
    """Build ``objective`` with recipe ``name``; ``options`` override the recipe's and add others.

    ``mfl.presets.recipe("small_data", "meanflow", jvp="finite_difference")`` equals
    ``mfl.make_objective("meanflow", recipe="small_data", jvp="finite_difference")``.

    Args:
        name: A key of :data:`RECIPES`.
        objective: A name of the registry (``"meanflow"``, ``"alphaflow"``, ...).
        **options: Other fields of the objective (``alpha=`` is required by alpha-Flow).
    """
    from meanflow_losses.registry import make_objective

    return make_objective(objective, recipe=name, **options)
