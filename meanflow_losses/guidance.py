r"""Training-time guidance: classifier-free guidance baked into the regression target.

With condition ``c`` and the null condition :math:`\varnothing`,

.. math::
    \tilde v = \omega\,v + \kappa\,u_\theta(z_t, t, t \mid c)
        + (1 - \omega - \kappa)\,u_\theta(z_t, t, t \mid \varnothing),

both network terms without gradient (through the ``target_model``). The effective guidance scale is
:math:`\omega' = \omega / (1 - \kappa)`; sampling then uses scale 1. :math:`\tilde v = v` on rows whose
condition was dropped and on rows with ``t`` outside ``interval``. :math:`\tilde v` replaces ``v``
everywhere: in the target and as the JVP tangent.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from meanflow_losses._validate import check_bool, check_int, check_interval, check_real, compiling
from meanflow_losses.conditioning import Conditioning
from meanflow_losses.passes import no_grad_call
from meanflow_losses.teachers import Teacher, teacher_velocity

__all__ = [
    "DROP_ROWS",
    "INTERVAL_TESTS",
    "GuidanceResult",
    "NullClass",
    "TrainingGuidance",
    "apply_guidance",
    "draw_drop_mask",
    "null_class",
]

NullCondition = Callable[[dict[str, Any]], dict[str, Any]]

#: Which rows lose their condition (see :class:`TrainingGuidance`).
DROP_ROWS = ("per_row", "first")
#: How ``t`` is tested against the guidance interval.
INTERVAL_TESTS = ("inclusive", "strict")


@dataclass(frozen=True)
class NullClass:
    """Picklable null condition for class labels: replaces ``model_kwargs[key]`` by ``num_classes``.

    Args:
        num_classes: Number of real classes; the null class index is ``num_classes``.
        key: Name of the label entry in ``model_kwargs``.
    """

    num_classes: int
    key: str = "y"

    def __call__(self, model_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Return a copy of ``model_kwargs`` whose labels are all the null class."""
        if self.key not in model_kwargs:
            raise KeyError(f"null_class: model_kwargs has no {self.key!r} entry (keys: {sorted(model_kwargs)})")
        return {**model_kwargs, self.key: torch.full_like(model_kwargs[self.key], self.num_classes)}


def null_class(num_classes: int, key: str = "y") -> NullClass:
    """Null condition for class-conditional models: ``{**kw, key: full_like(kw[key], num_classes)}``."""
    num_classes = check_int("num_classes", num_classes, lo=1)
    if not isinstance(key, str):
        raise TypeError(f"key must be a string (the label entry of model_kwargs), got {type(key).__name__}")
    return NullClass(num_classes, key)


@dataclass(frozen=True)
class TrainingGuidance:
    r"""Options of training-time guidance and condition dropout.

    Args:
        omega: Weight of the conditional velocity ``v`` (or ``v_target``).
        kappa: Weight of the network's conditional velocity.
        interval: ``(t_min, t_max)``; guidance applies only where ``t_min <= t <= t_max`` (``interval_test``).
        drop_prob: Probability of replacing a row's condition by the null condition (classifier-free
            training). Dropped rows get :math:`\tilde v = v`.
        null_condition: ``model_kwargs -> model_kwargs`` giving the null condition for the whole batch, for
            example ``lambda kw: {**kw, "y": torch.full_like(kw["y"], num_classes)}``.
        drop_only_in_interval: If true, conditions are dropped only on rows inside ``interval``
            (official alpha-Flow code); otherwise on any row (official MeanFlow code).
        guide_dropped_rows: If false (MeanFlow), :math:`\tilde v = v` on dropped rows. If true (official
            alpha-Flow code), dropped rows inside the interval are guided too, with their (null) condition in
            the conditional term: :math:`\tilde v = \omega v + (1 - \omega)\,u_\theta(z_t, t, t \mid \varnothing)`.
            The two agree when ``omega = 1``.
        drop_rows: Which rows lose their condition. ``"per_row"`` (default): each row independently with
            ``drop_prob``. ``"first"`` (the official MeanFlow JAX code): the number of dropped rows is drawn the
            same way (a count of per-row coins, Binomial(B, ``drop_prob``)), and the dropped rows are the FIRST
            ones of the batch. With ``TimePairSampler(equal_count="truncate", equal_rows="first")``, whose
            ``r = t`` rows come first, only flow-matching rows then lose their condition (while the count does not
            exceed them). With ``drop_only_in_interval`` the first rows are further restricted to the interval.
            Mind the sampler's row order: the dyadic sampler of Shortcut / SplitMeanFlow puts its consistency rows
            first, and class-sorted batches would lose whole classes.
        interval_test: ``"inclusive"`` (default; the official MeanFlow JAX code): ``t_min <= t <= t_max``;
            ``"strict"`` (the official alpha-Flow code): ``t_min < t < t_max``. The test decides both the guided
            rows and, with ``drop_only_in_interval``, the rows that may be dropped.
    """

    omega: float = 1.0
    kappa: float = 0.0
    interval: tuple[float, float] = (0.0, 1.0)
    drop_prob: float = 0.1
    null_condition: NullCondition | None = None
    drop_only_in_interval: bool = False
    guide_dropped_rows: bool = False
    drop_rows: Literal["per_row", "first"] = "per_row"
    interval_test: Literal["inclusive", "strict"] = "inclusive"

    def __post_init__(self) -> None:
        check_real("guidance.omega", self.omega)
        check_real("guidance.kappa", self.kappa, hi=1.0, hi_open=True)
        object.__setattr__(self, "interval", check_interval("guidance.interval", self.interval))
        check_real("guidance.drop_prob", self.drop_prob, lo=0.0, hi=1.0, hi_open=True)
        check_bool("guidance.drop_only_in_interval", self.drop_only_in_interval)
        check_bool("guidance.guide_dropped_rows", self.guide_dropped_rows)
        if self.drop_rows not in DROP_ROWS:
            raise ValueError(f"guidance.drop_rows must be one of {DROP_ROWS}, got {self.drop_rows!r}")
        if self.interval_test not in INTERVAL_TESTS:
            raise ValueError(f"guidance.interval_test must be one of {INTERVAL_TESTS}, got {self.interval_test!r}")
        if self.null_condition is not None and not callable(self.null_condition):
            raise TypeError(
                "guidance.null_condition must be a function model_kwargs -> model_kwargs (e.g. mfl.null_class(1000)), "
                f"got {type(self.null_condition).__name__}"
            )
        if self.null_condition is None and (self.drop_prob > 0 or self.uncond_weight != 0):
            raise ValueError(
                "guidance.null_condition is required when drop_prob > 0 or omega + kappa != 1 "
                "(it maps model_kwargs to the null condition, e.g. the class index num_classes)"
            )

    @property
    def uncond_weight(self) -> float:
        r"""Weight :math:`1 - \omega - \kappa` of the unconditional network velocity."""
        return 1.0 - self.omega - self.kappa

    @property
    def effective_scale(self) -> float:
        r"""Effective classifier-free guidance scale :math:`\omega / (1 - \kappa)`."""
        return self.omega / (1.0 - self.kappa)

    def in_interval(self, t: Tensor) -> Tensor:
        """Boolean mask of rows whose ``t`` lies in ``interval`` (closed or open, ``interval_test``), ``(B,)``."""
        lo, hi = self.interval
        if self.interval_test == "strict":
            return (t > lo) & (t < hi)
        return (t >= lo) & (t <= hi)


@dataclass
class GuidanceResult:
    """What guidance hands to an objective.

    Attributes:
        v_tilde: Guided velocity, shape ``(B, *D)``, no gradient.
        model_kwargs: Conditioning (decided against the batch) with dropped rows set to the null condition.
        drop_mask: Rows whose condition was dropped, shape ``(B,)``.
        guided_mask: Rows that received the guided mix (in the interval; not dropped unless
            ``guide_dropped_rows``), ``(B,)``.
    """

    v_tilde: Tensor
    model_kwargs: Conditioning
    drop_mask: Tensor
    guided_mask: Tensor


def draw_drop_mask(
    guidance: TrainingGuidance | None,
    t: Tensor,
    batch: int,
    *,
    drop_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The rows whose condition is dropped: the given ``drop_mask`` (checked) or a draw with ``drop_prob``.

    The draw follows ``guidance.drop_rows``: independent rows (``"per_row"``) or the first ``n`` rows with ``n``
    the number of per-row coins that came up (``"first"``, the official MeanFlow JAX rule; no host sync).

    Args:
        guidance: Options, or ``None`` (no row is dropped; an explicit mask must then drop nothing).
        t: Times ``(B,)`` (``drop_only_in_interval`` drops only inside the interval).
        batch: ``B``.
        drop_mask: Optional explicit rows, bool ``(B,)``.
        generator: Random generator of the draw.

    Returns:
        Bool ``(B,)``.
    """
    if drop_mask is not None:
        if not isinstance(drop_mask, Tensor) or drop_mask.dtype != torch.bool or tuple(drop_mask.shape) != (batch,):
            got = f"{drop_mask.dtype} {tuple(drop_mask.shape)}" if isinstance(drop_mask, Tensor) else type(drop_mask)
            raise ValueError(f"drop_mask must be a bool tensor of shape ({batch},), got {got}")
        drop_mask = drop_mask.to(t.device)
        if (guidance is None or guidance.null_condition is None) and not compiling() and bool(drop_mask.any()):
            why = "guidance is None" if guidance is None else "guidance has no null_condition"
            raise ValueError(f"drop_mask drops rows but {why}: there is no null condition to drop them to")
        return drop_mask
    if guidance is None:
        return torch.zeros(batch, dtype=torch.bool, device=t.device)
    dev = generator.device if generator is not None else t.device
    drop = (torch.rand(batch, generator=generator, device=dev) < guidance.drop_prob).to(t.device)
    if guidance.drop_rows == "first":
        drop = torch.arange(batch, device=t.device) < drop.sum()
    return drop & guidance.in_interval(t) if guidance.drop_only_in_interval else drop


def apply_guidance(
    guidance: TrainingGuidance | None,
    target_model: Callable[..., Tensor],
    z_t: Tensor,
    t: Tensor,
    v: Tensor,
    model_kwargs: Conditioning | dict[str, Any],
    *,
    drop_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    teacher: Teacher | None = None,
) -> GuidanceResult:
    r"""Drop conditions and compute the guided velocity :math:`\tilde v`.

    Args:
        guidance: Options, or ``None`` for no guidance and no dropout.
        target_model: Network used without gradient, ``model(z, r, t, **kw)``.
        z_t: Noisy inputs, shape ``(B, *D)``.
        t: Times, shape ``(B,)``.
        v: Conditional velocity (or ``v_target``), shape ``(B, *D)``.
        model_kwargs: Conditioning (a dict is decided against the batch size here).
        drop_mask: Optional explicit dropout rows, bool ``(B,)``; drawn with ``generator`` when omitted.
        generator: Random generator for the dropout draw.
        teacher: Optional :class:`~meanflow_losses.teachers.Teacher`: its velocity at the post-dropout conditioning
            replaces ``v`` (dropped rows get its velocity at the null condition) before the guided mix.

    Returns:
        :class:`GuidanceResult`.
    """
    batch = z_t.shape[0]
    cond = model_kwargs if isinstance(model_kwargs, Conditioning) else Conditioning.from_kwargs(model_kwargs, batch)
    drop_mask = draw_drop_mask(guidance, t, batch, drop_mask=drop_mask, generator=generator)
    if guidance is None:
        if teacher is not None:
            v = teacher_velocity(teacher, z_t, t, cond, v.dtype)
        return GuidanceResult(v.detach(), cond, drop_mask, drop_mask)

    in_iv = guidance.in_interval(t)
    kwargs = cond
    null: Conditioning | None = None
    if guidance.null_condition is not None:
        null = cond.replace(guidance.null_condition(dict(cond.kwargs)), "guidance.null_condition")
        if compiling() or bool(drop_mask.any()):
            kwargs = cond.where(drop_mask, null)
    if teacher is not None:
        v = teacher_velocity(teacher, z_t, t, kwargs, v.dtype)

    guided = in_iv if guidance.guide_dropped_rows else in_iv & ~drop_mask
    v_tilde = v.detach()
    w_c, w_u = guidance.kappa, guidance.uncond_weight
    if (w_c != 0 or w_u != 0 or guidance.omega != 1) and (compiling() or bool(guided.any())):
        # eager: the guided rows only; traced by torch.compile: every row (a static shape), unguided ones kept below
        idx = torch.arange(batch, device=z_t.device) if compiling() else guided.nonzero().squeeze(1)
        n = idx.numel()
        z_g, t_g = z_t.detach().index_select(0, idx), t.index_select(0, idx)
        # the conditional term uses each row's own condition (the null one on dropped rows when they are guided)
        cond_g = kwargs.select(idx)
        u_c = u_u = None
        if w_c != 0 and w_u != 0:
            assert null is not None
            z2, t2 = torch.cat([z_g, z_g]), torch.cat([t_g, t_g])
            out = no_grad_call(target_model, z2, t2, t2, cond_g.concat(null.select(idx)))
            u_c, u_u = out[:n], out[n:]
        elif w_c != 0:
            u_c = no_grad_call(target_model, z_g, t_g, t_g, cond_g)
        elif w_u != 0:
            assert null is not None
            u_u = no_grad_call(target_model, z_g, t_g, t_g, null.select(idx))
        new = guidance.omega * v.detach().index_select(0, idx)
        if u_c is not None:
            new = new + w_c * u_c.to(v.dtype)
        if u_u is not None:
            new = new + w_u * u_u.to(v.dtype)
        if compiling():
            new = torch.where(guided.reshape(-1, *([1] * (new.ndim - 1))), new, v.detach())
        v_tilde = v_tilde.index_copy(0, idx, new)
    return GuidanceResult(v_tilde, kwargs, drop_mask, guided)
