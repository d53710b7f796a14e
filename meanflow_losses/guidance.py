r"""Training-time guidance: classifier-free guidance baked into the regression target.

With condition ``c`` and the null condition :math:`\varnothing`,

.. math::
    \tilde v = \omega\,v + \kappa\,u_\theta(z_t, t, t \mid c)
        + (1 - \omega - \kappa)\,u_\theta(z_t, t, t \mid \varnothing),

both network terms without gradient (through the ``target_model``). The effective guidance scale is
:math:`\omega' = \omega / (1 - \kappa)`; sampling then uses scale 1. :math:`\tilde v = v` on rows whose
condition was dropped and on rows with ``t`` outside ``interval``. :math:`\tilde v` replaces ``v``
everywhere: in the target and as the JVP tangent.

:class:`GuidanceAsInput` is improved MeanFlow's alternative (Geng et al., arXiv 2512.02012): the scale and the
interval are drawn per row, handed to the network in ``model_kwargs`` and chosen again at sampling time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from meanflow_losses._validate import check_bool, check_int, check_interval, check_real, compiling
from meanflow_losses.conditioning import Conditioning
from meanflow_losses.conventions import append_dims
from meanflow_losses.passes import no_grad_call
from meanflow_losses.teachers import Teacher, teacher_velocity

__all__ = [
    "DROP_ROWS",
    "INTERVAL_TESTS",
    "GuidanceAsInput",
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


def _interval_mask(t: Tensor, lo: Tensor | float, hi: Tensor | float, test: str = "inclusive") -> Tensor:
    """Rows whose ``t`` lies in the guidance interval, bool ``(B,)``.

    ``lo <= t <= hi`` (``"inclusive"``) or ``lo < t < hi`` (``"strict"``); ``lo`` and ``hi`` are numbers or
    per-row tensors ``(B,)``.
    """
    if test == "strict":
        return (t > lo) & (t < hi)
    return (t >= lo) & (t <= hi)


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
        return _interval_mask(t, *self.interval, self.interval_test)


@dataclass(frozen=True)
class GuidanceAsInput:
    r"""Improved MeanFlow's guidance as network input (Geng et al., arXiv 2512.02012; official iMF code).

    Every row draws a guidance scale and a guidance interval, which travel to the network in ``model_kwargs``
    (entries ``scale_key`` and ``interval_keys``, float tensors ``(B,)``), so one network learns every scale and
    the scale is chosen at sampling time (:meth:`inputs`). Per row:

    .. math::
        \omega \sim p(\omega) \propto \omega^{-\beta} \text{ on } [1, 1 + s_{max}]
        \quad (\beta = 1: \log\omega \text{ uniform}), \qquad
        t_{min} \sim U(\text{t\_min\_range}), \; t_{max} \sim U(\text{t\_max\_range}),

    with :math:`(t_{min}, t_{max}) = (0, 1)` on flow-matching rows (``r = t``). The effective scale is
    :math:`\omega_e = \omega` where ``t`` lies in :math:`[t_{min}, t_{max}]` and 1 elsewhere, and

    .. math::
        v_c = u_\theta(z_t, t, t \mid c, \omega_e, 0, 1), \quad
        v_u = u_\theta(z_t, t, t \mid \varnothing, 1, 0, 1), \quad
        \tilde v = v + (1 - 1/\omega_e)\,(v_c - v_u),

    both network terms without gradient (the velocity queries always see the interval ``(0, 1)``, as in the
    official code). Rows whose condition is dropped get :math:`\tilde v = v`; they keep their drawn scale and
    interval entries. Its fixed point is classifier-free guidance of scale :math:`\omega_e`:
    :math:`v_c = \omega_e\,v(c) + (1 - \omega_e)\,v(\varnothing)`. With ``MeanFlowLoss(tangent="model")`` the JVP
    tangent is :math:`v_c` (the network's guided velocity at the row's real condition, as in the official code);
    with ``tangent="conditional"`` it is :math:`\tilde v`.

    Draws can be passed in: entries already present in ``model_kwargs`` under ``scale_key`` or ``interval_keys``
    are used as given (float tensors ``(B,)``) instead of being drawn.

    Args:
        scale_max: :math:`s_{max}`; scales are drawn in :math:`[1, 1 + s_{max}]` (official: 7).
        scale_beta: :math:`\beta` of the power-law density (official: 1, log-uniform).
        t_min_range: Range of :math:`t_{min}` (official: ``(0, 0.5)``).
        t_max_range: Range of :math:`t_{max}` (official: ``(0.5, 1)``).
        drop_prob: Probability of dropping a row's condition (official: 0.1).
        null_condition: ``model_kwargs -> model_kwargs`` giving the null condition (required).
        drop_rows: ``"first"`` (default; official iMF code: the first ``n`` rows, ``n`` a count of per-row coins)
            or ``"per_row"`` (see :class:`TrainingGuidance`).
        interval_test: ``"inclusive"`` (default; official) or ``"strict"`` test of ``t`` against the interval.
        scale_key: Name of the scale entry of ``model_kwargs``.
        interval_keys: Names of the ``t_min`` and ``t_max`` entries of ``model_kwargs``.
    """

    scale_max: float = 7.0
    scale_beta: float = 1.0
    t_min_range: tuple[float, float] = (0.0, 0.5)
    t_max_range: tuple[float, float] = (0.5, 1.0)
    drop_prob: float = 0.1
    null_condition: NullCondition | None = None
    drop_rows: Literal["per_row", "first"] = "first"
    interval_test: Literal["inclusive", "strict"] = "inclusive"
    scale_key: str = "omega"
    interval_keys: tuple[str, str] = ("t_min", "t_max")

    #: Conditions may be dropped on any row (the :class:`TrainingGuidance` option, fixed here).
    drop_only_in_interval = False

    def __post_init__(self) -> None:
        check_real("guidance.scale_max", self.scale_max, lo=0.0, lo_open=True)
        check_real("guidance.scale_beta", self.scale_beta)
        object.__setattr__(self, "t_min_range", check_interval("guidance.t_min_range", self.t_min_range))
        object.__setattr__(self, "t_max_range", check_interval("guidance.t_max_range", self.t_max_range))
        check_real("guidance.drop_prob", self.drop_prob, lo=0.0, hi=1.0, hi_open=True)
        if self.drop_rows not in DROP_ROWS:
            raise ValueError(f"guidance.drop_rows must be one of {DROP_ROWS}, got {self.drop_rows!r}")
        if self.interval_test not in INTERVAL_TESTS:
            raise ValueError(f"guidance.interval_test must be one of {INTERVAL_TESTS}, got {self.interval_test!r}")
        if self.null_condition is None or not callable(self.null_condition):
            raise TypeError(
                "guidance.null_condition must be a function model_kwargs -> model_kwargs (e.g. mfl.null_class(1000)):"
                " guidance as input needs the unconditional velocity"
            )
        keys = (self.scale_key, *self.interval_keys)
        if len(self.interval_keys) != 2 or not all(isinstance(k, str) and k for k in keys) or len(set(keys)) != 3:
            raise ValueError(
                "guidance.scale_key and guidance.interval_keys must be three distinct non-empty names, got "
                f"{self.scale_key!r} and {self.interval_keys!r}"
            )

    def in_interval(self, t: Tensor, lo: Tensor | float = 0.0, hi: Tensor | float = 1.0) -> Tensor:
        """Rows whose ``t`` lies in ``[lo, hi]`` (closed or open, ``interval_test``), bool ``(B,)``."""
        return _interval_mask(t, lo, hi, self.interval_test)

    def draw_scale(self, batch: int, *, device: Any = None, generator: torch.Generator | None = None) -> Tensor:
        r"""Scales :math:`\omega \in [1, 1 + s_{max}]` with density :math:`\propto \omega^{-\beta}`, float32 ``(B,)``.

        Inverse CDF of a uniform draw ``q``: :math:`\omega = (1 + s_{max})^q` for :math:`\beta = 1`, else
        :math:`\omega = (1 + q\,((1 + s_{max})^{1 - \beta} - 1))^{1 / (1 - \beta)}`.
        """
        dev = generator.device if generator is not None else device
        q = torch.rand(batch, generator=generator, device=dev, dtype=torch.float64)
        top = torch.tensor(1.0 + self.scale_max, dtype=torch.float64, device=q.device)
        if self.scale_beta == 1.0:
            omega = torch.exp(q * torch.log(top))
        else:
            a = 1.0 - self.scale_beta
            omega = (1.0 + q * (top**a - 1.0)) ** (1.0 / a)
        return omega.to(device=device, dtype=torch.float32)

    def draw_interval(
        self, fm_rows: Tensor, *, device: Any = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Intervals ``(t_min, t_max)``, float32 ``(B,)`` each; ``(0, 1)`` on the flow-matching rows ``fm_rows``."""
        batch = fm_rows.shape[0]
        dev = generator.device if generator is not None else device
        (a0, a1), (b0, b1) = self.t_min_range, self.t_max_range
        lo = a0 + (a1 - a0) * torch.rand(batch, generator=generator, device=dev)
        hi = b0 + (b1 - b0) * torch.rand(batch, generator=generator, device=dev)
        fm = fm_rows.to(lo.device)
        lo, hi = torch.where(fm, 0.0, lo), torch.where(fm, 1.0, hi)
        return lo.to(device), hi.to(device)

    def inputs(
        self,
        batch: int,
        scale: float | Tensor,
        interval: tuple[float, float] = (0.0, 1.0),
        *,
        device: Any = None,
    ) -> dict[str, Tensor]:
        """The ``model_kwargs`` entries for sampling at one scale and interval (float32 ``(B,)`` each).

        Example: ``mfl.sample(model, noise, steps=1, model_kwargs={"y": y, **g.inputs(B, 7.5, (0.4, 0.65))})``
        (the official iMF-B/2 sampling setting; scale 8 with the released checkpoint).
        """
        scale_t = torch.as_tensor(scale, dtype=torch.float32, device=device).expand(batch).clone()
        lo, hi = check_interval("interval", interval)
        return {
            self.scale_key: scale_t,
            self.interval_keys[0]: torch.full((batch,), lo, dtype=torch.float32, device=device),
            self.interval_keys[1]: torch.full((batch,), hi, dtype=torch.float32, device=device),
        }


@dataclass
class GuidanceResult:
    r"""What guidance hands to an objective.

    Attributes:
        v_tilde: Guided velocity, shape ``(B, *D)``, no gradient.
        model_kwargs: Conditioning (decided against the batch) with dropped rows set to the null condition.
        drop_mask: Rows whose condition was dropped, shape ``(B,)``.
        guided_mask: Rows that received the guided mix (in the interval; not dropped unless
            ``guide_dropped_rows``), ``(B,)``.
        tangent: With :class:`GuidanceAsInput` and a requested tangent: the network's guided velocity
            :math:`v_c` on the requested rows (:math:`\tilde v` on the others), ``(B, *D)``, no gradient; else
            ``None``.
    """

    v_tilde: Tensor
    model_kwargs: Conditioning
    drop_mask: Tensor
    guided_mask: Tensor
    tangent: Tensor | None = None


def draw_drop_mask(
    guidance: TrainingGuidance | GuidanceAsInput | None,
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
    guidance: TrainingGuidance | GuidanceAsInput | None,
    target_model: Callable[..., Tensor],
    z_t: Tensor,
    t: Tensor,
    v: Tensor,
    model_kwargs: Conditioning | dict[str, Any],
    *,
    drop_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    teacher: Teacher | None = None,
    fm_rows: Tensor | None = None,
    tangent_rows: Tensor | None = None,
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
        fm_rows: The flow-matching rows ``r = t``, bool ``(B,)`` (:class:`GuidanceAsInput` gives them the
            interval ``(0, 1)``; all rows when omitted).
        tangent_rows: Rows whose JVP tangent is the network's guided velocity, bool ``(B,)``
            (:class:`GuidanceAsInput` only; ``MeanFlowLoss(tangent="model")``).

    Returns:
        :class:`GuidanceResult`.
    """
    batch = z_t.shape[0]
    cond = model_kwargs if isinstance(model_kwargs, Conditioning) else Conditioning.from_kwargs(model_kwargs, batch)
    drop_mask = draw_drop_mask(guidance, t, batch, drop_mask=drop_mask, generator=generator)
    if isinstance(guidance, GuidanceAsInput):
        if teacher is not None:
            raise ValueError(
                "teacher= with GuidanceAsInput is not supported: the teacher brings its own guidance; use "
                "TrainingGuidance (or guidance=None) with a guided mfl.Teacher"
            )
        if fm_rows is None:
            fm_rows = torch.ones(batch, dtype=torch.bool, device=t.device)
        return _guidance_as_input(guidance, target_model, z_t, t, v, cond, drop_mask, fm_rows, tangent_rows, generator)
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


def _row_input(cond: Conditioning, key: str, batch: int) -> Tensor | None:
    """A passed-in per-row draw ``model_kwargs[key]`` (checked), or ``None`` when absent."""
    if key not in cond.kwargs:
        return None
    value = cond[key]
    if not isinstance(value, Tensor) or tuple(value.shape) != (batch,) or not value.is_floating_point():
        got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"model_kwargs[{key!r}] (a guidance input) must be a float tensor of shape ({batch},), got {got}"
        )
    return value


def _guidance_as_input(
    guidance: GuidanceAsInput,
    target_model: Callable[..., Tensor],
    z_t: Tensor,
    t: Tensor,
    v: Tensor,
    cond: Conditioning,
    drop_mask: Tensor,
    fm_rows: Tensor,
    tangent_rows: Tensor | None,
    generator: torch.Generator | None,
) -> GuidanceResult:
    """:func:`apply_guidance` for :class:`GuidanceAsInput` (formula in its docstring)."""
    batch = z_t.shape[0]
    s_key, lo_key, hi_key = guidance.scale_key, *guidance.interval_keys
    omega = _row_input(cond, s_key, batch)
    lo, hi = _row_input(cond, lo_key, batch), _row_input(cond, hi_key, batch)
    if omega is None:
        omega = guidance.draw_scale(batch, device=t.device, generator=generator)
    if lo is None or hi is None:
        d_lo, d_hi = guidance.draw_interval(fm_rows, device=t.device, generator=generator)
        lo, hi = (d_lo if lo is None else lo), (d_hi if hi is None else hi)
    omega, lo, hi = omega.to(t.device), lo.to(t.device), hi.to(t.device)
    per_row = cond.per_row | {(s_key,), (lo_key,), (hi_key,)}
    full = Conditioning({**cond.kwargs, s_key: omega, lo_key: lo, hi_key: hi}, batch, per_row)
    null_condition = guidance.null_condition
    assert null_condition is not None  # checked at construction
    null_full = full.replace(null_condition(dict(full.kwargs)), "guidance.null_condition")
    kwargs = full.where(drop_mask, null_full) if (compiling() or bool(drop_mask.any())) else full

    w_eff = torch.where(guidance.in_interval(t, lo, hi), omega, torch.ones_like(omega))
    guided = (w_eff != 1) & ~drop_mask
    ask = guided if tangent_rows is None else guided | tangent_rows.to(guided.device)
    v_tilde = v.detach()
    tangent = v_tilde if tangent_rows is not None else None
    if compiling() or bool(ask.any()):
        # one no-grad forward: v_c on the asked rows, then v_u on the guided rows (eager: those rows only)
        ia = torch.arange(batch, device=t.device) if compiling() else ask.nonzero().squeeze(1)
        ig = torch.arange(batch, device=t.device) if compiling() else guided.nonzero().squeeze(1)
        zeros, ones = torch.zeros_like(omega), torch.ones_like(omega)
        query = Conditioning({**full.kwargs, s_key: w_eff, lo_key: zeros, hi_key: ones}, batch, per_row)
        null_query = Conditioning({**null_full.kwargs, s_key: ones, lo_key: zeros, hi_key: ones}, batch, per_row)
        z = z_t.detach()
        za, ta, zg, tg = z.index_select(0, ia), t.index_select(0, ia), z.index_select(0, ig), t.index_select(0, ig)
        out = no_grad_call(
            target_model,
            torch.cat([za, zg]),
            torch.cat([ta, tg]),
            torch.cat([ta, tg]),
            query.select(ia).concat(null_query.select(ig)),
        ).to(v.dtype)
        n_a = ia.numel()
        v_c = torch.zeros_like(v_tilde).index_copy(0, ia, out[:n_a])  # rows outside ``ia`` are overwritten below
        v_u = out[n_a:]
        gain = append_dims(1.0 - 1.0 / w_eff.index_select(0, ig), v_u).to(v.dtype)
        new = v_tilde.index_select(0, ig) + gain * (v_c.index_select(0, ig) - v_u)
        if compiling():
            new = torch.where(append_dims(guided, new), new, v_tilde)
        v_tilde = v_tilde.index_copy(0, ig, new)
        if tangent_rows is not None:
            tangent = torch.where(append_dims(ask, v_c), v_c, v_tilde)
    return GuidanceResult(v_tilde, kwargs, drop_mask, guided, tangent)
