"""Objectives of meanflow_losses selectable by name, so that one trainer runs any of them.

Each method is a builder ``TrainConfig -> objective``; an objective is called as
``objective(model, x, model_kwargs=..., generator=..., step=k)`` and returns the package's ``LossOutput``.
A method whose objective is not in the installed ``meanflow_losses`` raises :class:`MethodUnavailable` with a
message naming what is missing; the study prints it and skips the method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import meanflow_losses as mfl

if TYPE_CHECKING:
    from examples.toy2d.train import TrainConfig

__all__ = ["METHODS", "MethodSpec", "MethodUnavailable", "build_objective", "get_method"]


class MethodUnavailable(RuntimeError):
    """The installed meanflow_losses lacks what a method needs."""


def need(path: str, method: str) -> Any:
    """Resolve ``mfl.<path>`` (dotted) or raise :class:`MethodUnavailable` naming it."""
    obj: Any = mfl
    for part in path.split("."):
        if not hasattr(obj, part):
            raise MethodUnavailable(
                f"method {method!r} needs meanflow_losses.{path}, which the installed meanflow_losses "
                f"{getattr(mfl, '__version__', '?')} does not provide yet"
            )
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class MethodSpec:
    """A named objective.

    Attributes:
        name: Registry key (the trainer's ``--method``).
        summary: One line for ``--help`` and the study table.
        build: ``TrainConfig -> objective``.
        equal_fraction: Default share of ``r = t`` rows (``None``: the method draws ``t`` only).
        velocity_only: The network is a flow-matching velocity field: sample it as ``u(z, t, t)`` (Euler).
        jvp: The objective takes the JVP options (``tangent``).
        aux: The objective takes the auxiliary velocity loss (``aux_weight``).
        options: Further ``TrainConfig`` fields that only this method reads (the trainer's command line refuses
            them for the other methods).
    """

    name: str
    summary: str
    build: Callable[[TrainConfig], Any]
    equal_fraction: float | None
    velocity_only: bool = False
    jvp: bool = False
    aux: bool = False
    options: tuple[str, ...] = ()


def _pairs(cfg: TrainConfig) -> mfl.TimePairSampler:
    return mfl.TimePairSampler(
        cfg.time_dist,
        mean=cfg.time_mean,
        std=cfg.time_std,
        equal_fraction=cfg.resolved("equal_fraction"),
        equal_draw=cfg.equal_draw,
    )


def _weight(cfg: TrainConfig) -> mfl.AdaptiveWeight:
    return mfl.AdaptiveWeight(p=cfg.weight_p, c=cfg.weight_c)


def _fm(cfg: TrainConfig) -> Any:
    return mfl.FlowMatchingLoss(
        times=mfl.TimeSampler(cfg.time_dist, mean=cfg.time_mean, std=cfg.time_std),
        weighting=_weight(cfg),
        reduction=cfg.reduction,
        guidance=cfg.guidance(),
    )


def _jvp_options(cfg: TrainConfig) -> dict[str, Any]:
    opts: dict[str, Any] = {"jvp": cfg.jvp}
    if cfg.tangent != "conditional":
        opts["tangent"] = cfg.tangent
    if cfg.aux_weight:
        opts["aux_velocity_weight"] = cfg.aux_weight
    return opts


def _meanflow(cfg: TrainConfig) -> Any:
    return mfl.MeanFlowLoss(
        times=_pairs(cfg), weighting=_weight(cfg), reduction=cfg.reduction, guidance=cfg.guidance(), **_jvp_options(cfg)
    )


def _alpha_schedule(cfg: TrainConfig, method: str) -> Any:
    sigmoid = need("schedules.Sigmoid", method)
    start, end = round(cfg.alpha_start * cfg.steps), round(cfg.alpha_end * cfg.steps)
    return sigmoid(start=start, end=max(end, start + 1), gamma=cfg.alpha_gamma)


def _alphaflow(cfg: TrainConfig) -> Any:
    cls = need("AlphaFlowLoss", "alphaflow")
    return cls(
        alpha=_alpha_schedule(cfg, "alphaflow"),
        eta=cfg.eta,
        times=_pairs(cfg),
        weighting=_weight(cfg),
        reduction=cfg.reduction,
        guidance=cfg.guidance(),
        **_jvp_options(cfg),
    )


def _kim(cfg: TrainConfig) -> Any:
    preset = need("presets.accelerated_meanflow", "kim")
    return preset(
        cfg.steps,
        times=_pairs(cfg),
        gamma=cfg.min_snr_gamma,
        k=cfg.kim_k,
        weighting=_weight(cfg),
        reduction=cfg.reduction,
        guidance=cfg.guidance(),
        **_jvp_options(cfg),
    )


def _split(cfg: TrainConfig) -> Any:
    cls = need("SplitMeanFlowLoss", "splitmeanflow")
    return cls(times=_pairs(cfg), weighting=_weight(cfg), reduction=cfg.reduction, guidance=cfg.guidance())


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("fm", "flow matching (sampled by Euler steps on u(z, t, t))", _fm, None, velocity_only=True),
        MethodSpec("meanflow", "MeanFlow (Geng et al.), JVP target", _meanflow, 0.5, jvp=True, aux=True),
        MethodSpec(
            "alphaflow",
            "alpha-Flow (Zhang et al.), sigmoid curriculum alpha 1 -> 0",
            _alphaflow,
            0.5,
            jvp=True,
            options=("alpha_start", "alpha_end", "alpha_gamma", "eta"),
        ),
        MethodSpec(
            "kim",
            "MeanFlow + Min-SNR on r = t rows + progressive interval weight (Kim et al.)",
            _kim,
            0.5,
            jvp=True,
            aux=True,
            options=("kim_k", "min_snr_gamma"),
        ),
        MethodSpec("splitmeanflow", "SplitMeanFlow: interval-splitting consistency, no JVP", _split, 0.5),
    )
}


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` called ``name``; ``ValueError`` listing the known names otherwise."""
    if name not in METHODS:
        raise ValueError(f"method={name!r} is not one of {sorted(METHODS)}")
    return METHODS[name]


def build_objective(cfg: TrainConfig) -> Any:
    """Build the objective of ``cfg.method`` (raises :class:`MethodUnavailable` when the core lacks it)."""
    return get_method(cfg.method).build(cfg)
