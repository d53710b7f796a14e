"""What every objective shares: the typed result and the preparation of one batch.

Every random draw (``t``, ``r``, ``noise``) can be passed in explicitly; whatever is omitted is drawn with
the optional ``torch.Generator``. Everything is validated here, once, with errors that name the argument.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor

from meanflow_losses._dtypes import compute_dtype
from meanflow_losses._validate import (
    _values_on,
    check_batch,
    check_model_kwargs,
    check_r_le_t,
    check_same_shape,
    check_times,
)
from meanflow_losses.adapters import check_protocol, ignores_r
from meanflow_losses.conditioning import Conditioning
from meanflow_losses.conventions import conditional_velocity, interpolate
from meanflow_losses.guidance import GuidanceAsInput, GuidanceResult, TrainingGuidance, apply_guidance
from meanflow_losses.teachers import as_teacher
from meanflow_losses.times import TimePairSampler, TimeSampler

__all__ = [
    "COMMON_CALL_ARGS",
    "Batch",
    "GuidedBatch",
    "LossOutput",
    "NonFiniteError",
    "Objective",
    "PerRowWeight",
    "base_terms",
    "prepare_batch",
    "start_step",
]


class NonFiniteError(ValueError):
    """A loss came out NaN or inf; the message names the part that was non-finite (network output, target, ...)."""


#: A per-row weight strategy: ``(t, r, step) -> (B,)`` multiplier (for example Min-SNR or the progressive
#: interval weight of Kim et al.).
PerRowWeight = Callable[[Tensor, Tensor, "int | None"], Tensor]


#: Keyword arguments every objective's ``__call__`` accepts, so a trainer can call any of them alike.
COMMON_CALL_ARGS: tuple[str, ...] = (
    "model_kwargs",
    "target_model",
    "t",
    "r",
    "noise",
    "v_target",
    "drop_mask",
    "generator",
    "step",
    "teacher",
)


class Objective(Protocol):
    """The call signature shared by every objective (extra draws such as ``lam`` may follow)."""

    def __call__(
        self,
        model: Any,
        x: Tensor,
        *,
        model_kwargs: dict[str, Any] | None = None,
        target_model: Any = None,
        t: Tensor | None = None,
        r: Tensor | None = None,
        noise: Tensor | None = None,
        v_target: Tensor | None = None,
        drop_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        step: int | None = None,
        teacher: Any = None,
    ) -> LossOutput:
        """Compute the loss on a batch ``x`` of shape ``(B, *D)``."""
        ...


@dataclass
class LossOutput:
    """Typed result of every objective.

    Attributes:
        loss: Scalar, differentiable: the batch mean of ``per_sample``.
        per_sample: Weighted per-sample losses, shape ``(B,)``, differentiable.
        terms: Named detached scalars for logging (0-dim tensors; no host sync is forced).
        t: The start times used, shape ``(B,)``.
        r: The end times used, shape ``(B,)``.
        decomposition: Optional named differentiable scalars (gradient-conflict analysis).
    """

    loss: Tensor
    per_sample: Tensor
    terms: dict[str, Tensor]
    t: Tensor
    r: Tensor
    decomposition: dict[str, Tensor] | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Batch:
    """A validated batch on the linear path.

    Attributes:
        x: Data, ``(B, *D)``.
        noise: Noise, ``(B, *D)``.
        t: Start times, ``(B,)``.
        r: End times, ``(B,)``, ``r <= t``.
        z: ``z_t = (1 - t) x + t e``, ``(B, *D)``.
        v: Target velocity ``e - x`` or the given ``v_target``, ``(B, *D)``.
        model_kwargs: Conditioning, per-row entries decided once against ``B``.
        interval_rows: The rows drawn with ``r < t`` when the sampler fixed them (``(n,)``, ascending), else
            ``None`` (the rows are then found with ``r != t``).
    """

    x: Tensor
    noise: Tensor
    t: Tensor
    r: Tensor
    z: Tensor
    v: Tensor
    model_kwargs: Conditioning
    interval_rows: Tensor | None = None


def prepare_batch(
    model: Any,
    x: Tensor,
    times: TimeSampler | TimePairSampler,
    *,
    model_kwargs: Any = None,
    t: Tensor | None = None,
    r: Tensor | None = None,
    noise: Tensor | None = None,
    v_target: Tensor | None = None,
    generator: torch.Generator | None = None,
    step: int | None = None,
    pairs: bool = True,
    require_r: bool = False,
    interval_rows: Tensor | None = None,
) -> Batch:
    """Validate inputs, draw what was not given, and build ``z_t`` and ``v``.

    Args:
        model: The network (checked against the protocol).
        x: Data, ``(B, *D)``, finite floating point.
        times: Sampler for missing times. A :class:`TimeSampler` draws ``t`` only (``r = t``).
        model_kwargs: Conditioning dict or ``None``.
        t: Optional start times ``(B,)`` in ``[0, 1]``.
        r: Optional end times ``(B,)`` in ``[0, t]``. When ``t`` is given without ``r``: an error if
            ``require_r`` (an objective of ``(t, r)`` pairs would silently never run its interval rows), else
            ``r = t``.
        noise: Optional noise ``(B, *D)``.
        v_target: Optional target velocity ``(B, *D)`` replacing ``e - x``.
        generator: Random generator for all draws.
        step: Training step, for scheduled fractions.
        pairs: Whether the objective uses ``(t, r)`` pairs.
        require_r: Refuse ``t`` without ``r`` (objectives with interval rows).
        interval_rows: The ``r < t`` rows of ``(t, r)`` drawn by a sampler (see :class:`TimePair`).
    """
    check_protocol(model)
    x = check_batch("x", x)
    kw = check_model_kwargs(model_kwargs)
    batch = x.shape[0]
    if t is None and r is not None:
        raise ValueError("r was given without t: pass t as well (r <= t)")
    # times are drawn in at least float32: bf16 times would merge nearby r and t and distort t - r
    tdtype = compute_dtype(x.dtype)
    if t is None:
        if isinstance(times, TimePairSampler) and pairs:
            pair = times.sample(batch, step=step, generator=generator, device=x.device, dtype=tdtype)
            t, r, interval_rows = pair.t, pair.r, pair.interval_rows
        else:
            base = times.base if isinstance(times, TimePairSampler) else times
            t = base.sample(batch, generator=generator, device=x.device, dtype=tdtype)
            r = t
    else:
        t = check_times("t", t, batch).to(device=x.device)
        if r is None:
            if require_r:
                raise ValueError(
                    "t was given without r: this objective trains on (t, r) pairs, and r = t on every row would "
                    "silently make it flow matching. Pass r as well (r = t on the rows that should be flow matching)"
                )
            r = t
    r = check_times("r", r, batch).to(device=x.device)
    check_r_le_t(r, t)
    if noise is None:
        dev = generator.device if generator is not None else x.device
        noise = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)
    else:
        noise = check_same_shape("noise", noise, "x", x)
    z = interpolate(x, noise, t)
    if v_target is None:
        v = conditional_velocity(x, noise)
    else:
        v = check_same_shape("v_target", v_target, "x", x).detach()
    cond = Conditioning.from_kwargs(kw, batch)
    return Batch(x=x, noise=noise, t=t, r=r, z=z, v=v, model_kwargs=cond, interval_rows=interval_rows)


@dataclass
class GuidedBatch:
    """What every objective's step starts from: the validated batch after training-time guidance.

    Attributes:
        b: The validated :class:`Batch`.
        target_model: Module of the no-grad passes (``model`` unless one was given).
        v_tilde: Guided target velocity ``(B, *D)`` (``b.v`` without guidance).
        model_kwargs: Conditioning after condition dropout (per-row entries decided against ``B``).
        guidance: The :class:`~meanflow_losses.guidance.GuidanceResult` (masks for logging).
        neq: The interval rows, bool ``(B,)``: those the sampler drew with ``r < t``, or ``r != t``.
        idx: Their indices, ``(n,)``: the sampler's (no host sync, a static shape under ``torch.compile``) or
            computed on first use with ``nonzero`` (a device sync), so flow matching never pays for it.
    """

    b: Batch
    target_model: Any
    v_tilde: Tensor
    model_kwargs: Conditioning
    guidance: GuidanceResult
    neq: Tensor
    _idx: Tensor | None = field(default=None, repr=False)

    @property
    def idx(self) -> Tensor:
        """Indices of the interval rows, ``(n,)``, ascending (computed once, without a lock: compile traces it)."""
        if self._idx is None:
            self._idx = self.b.interval_rows if self.b.interval_rows is not None else rows(self.neq)
        return self._idx


def start_step(
    model: Any,
    x: Tensor,
    times: TimeSampler | TimePairSampler,
    guidance: TrainingGuidance | GuidanceAsInput | None,
    *,
    objective: str,
    model_kwargs: Any = None,
    target_model: Any = None,
    t: Tensor | None = None,
    r: Tensor | None = None,
    noise: Tensor | None = None,
    v_target: Tensor | None = None,
    drop_mask: Tensor | None = None,
    generator: torch.Generator | None = None,
    step: int | None = None,
    needs_r: bool = True,
    interval_rows: Tensor | None = None,
    checks: Any = None,
    strategy: str | None = None,
    teacher: Any = None,
    model_tangent: bool = False,
) -> GuidedBatch:
    """The shared start of a training step: validate, draw, guide, split the rows.

    :func:`prepare_batch`, then :func:`~meanflow_losses.guidance.apply_guidance`, then the split into ``r = t``
    and ``r != t`` rows.

    Args:
        model: Network called with gradient.
        x: Data ``(B, *D)``.
        times: Sampler for missing times.
        guidance: Training-time guidance or ``None``.
        objective: Name used in error messages (e.g. ``"MeanFlow"``).
        model_kwargs: Conditioning dict or ``None``.
        target_model: Module of the no-grad passes; defaults to ``model``.
        t: Optional start times ``(B,)``.
        r: Optional end times ``(B,)``.
        noise: Optional noise ``(B, *D)``.
        v_target: Optional velocity ``(B, *D)`` replacing ``e - x``.
        drop_mask: Optional explicit condition-dropout rows, bool ``(B,)``.
        generator: Random generator for every draw.
        step: Training step.
        needs_r: The objective trains on ``(t, r)`` pairs: ``t`` without ``r`` is an error, and a network that
            ignores ``r`` is refused when the batch has ``r != t`` rows (:func:`check_uses_r`).
        interval_rows: The ``r < t`` rows of explicitly passed ``(t, r)`` drawn by a sampler.
        teacher: Optional :class:`~meanflow_losses.teachers.Teacher` (or a bare network): its velocity replaces
            ``e - x`` (see :mod:`meanflow_losses.teachers`).
        checks: The objective's :class:`~meanflow_losses.model_checks.RuntimeChecks` (``None``: off).
        strategy: The objective's JVP strategy (``None`` without JVP), for the first-call checks.
        model_tangent: The objective's JVP tangent on the interval rows is the network's own velocity: with
            :class:`~meanflow_losses.guidance.GuidanceAsInput` the guidance computes it (``GuidanceResult.tangent``).
    """
    b = prepare_batch(
        model,
        x,
        times,
        model_kwargs=model_kwargs,
        t=t,
        r=r,
        noise=noise,
        v_target=v_target,
        generator=generator,
        step=step,
        require_r=needs_r,
        interval_rows=interval_rows,
    )
    tm = model if target_model is None else target_model
    if target_model is not None:
        check_protocol(target_model, "target_model")
    if checks is not None:
        checks.setup(tm, b.x, sub_batches=needs_r or guidance is not None, strategy=strategy, objective=objective)
    teacher = as_teacher(teacher)
    if teacher is not None and v_target is not None:
        raise ValueError("pass teacher= or v_target=, not both: each replaces the target velocity e - x")
    if b.interval_rows is not None:  # the sampler's rows are THE interval rows (a float32 tie r = t keeps its role)
        neq = torch.zeros(b.t.shape, dtype=torch.bool, device=b.t.device).index_fill(0, b.interval_rows, True)
    else:
        neq = b.r != b.t
    g = apply_guidance(
        guidance,
        tm,
        b.z,
        b.t,
        b.v,
        b.model_kwargs,
        drop_mask=drop_mask,
        generator=generator,
        teacher=teacher,
        fm_rows=~neq,
        tangent_rows=neq if model_tangent else None,
    )
    gb = GuidedBatch(b=b, target_model=tm, v_tilde=g.v_tilde, model_kwargs=g.model_kwargs, guidance=g, neq=neq)
    if needs_r:
        check_uses_r(model, tm, gb, objective)
    return gb


def base_terms(
    loss: Tensor,
    sq: Tensor,
    w: Tensor,
    gb: GuidedBatch,
    guided: bool,
    split_rows: bool = True,
    interval_key: str = "mf_mse",
) -> dict[str, Tensor]:
    """The logging terms every objective reports (detached 0-dim tensors).

    Args:
        loss: The scalar loss.
        sq: Unweighted per-sample squared errors ``(B,)``.
        w: Per-sample weights ``(B,)``.
        gb: The step's :class:`GuidedBatch`.
        guided: Whether the objective has guidance (adds ``drop_frac`` and ``guided_frac``).
        split_rows: Add ``fm_mse`` (``r = t`` rows), the ``r != t`` rows' error under ``interval_key`` and
            ``frac_equal``.
        interval_key: Name of the ``r != t`` rows' error (``"mf_mse"``; ``"split_mse"`` for interval splitting).

    Returns:
        ``loss``, ``mse``, ``weight_mean`` and the optional terms above.
    """
    terms: dict[str, Tensor] = {"loss": loss.detach(), "mse": sq.detach().mean(), "weight_mean": w.detach().mean()}
    if split_rows:
        terms["fm_mse"] = masked_mean(sq, ~gb.neq)
        terms[interval_key] = masked_mean(sq, gb.neq)
        terms["frac_equal"] = (~gb.neq).float().mean()
    if guided:
        terms["drop_frac"] = gb.guidance.drop_mask.float().mean()
        terms["guided_frac"] = gb.guidance.guided_mask.float().mean()
    return terms


def rows(mask: Tensor) -> Tensor:
    """Indices of the true entries of a ``(B,)`` mask, shape ``(n,)``."""
    return mask.nonzero().squeeze(1)


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values[mask]`` (0 when the mask is empty), detached."""
    values = values.detach()
    n = mask.sum()
    return torch.where(n > 0, (values * mask).sum() / n.clamp_min(1), values.new_zeros(()))


def check_uses_r(model: Any, target_model: Any, gb: GuidedBatch, objective: str) -> None:
    """Refuse a network that ignores ``r`` when the batch has rows with ``r != t``.

    Args:
        model: The network called with gradient.
        target_model: The network of the no-grad passes.
        gb: The step's batch (its interval rows are counted only for such a network).
        objective: Name used in the message (e.g. ``"MeanFlow"``).
    """
    if (ignores_r(model) or ignores_r(target_model)) and gb.idx.numel() > 0:
        raise ValueError(
            "model ignores r (a flow-matching network wrapped by from_velocity_net) but the batch has "
            f"rows with r != t: {objective} needs a network of (z, r, t); use from_interval_net or r = t"
        )


def check_row_weights(name: str, w: Any, batch: int) -> Tensor:
    """Check a per-row weight: a floating tensor of shape ``(B,)``, ``>= 0`` (under value checks).

    Args:
        name: The hook's name in messages (``"interval_weight"``, ``"weighting"``, ...).
        w: What the hook returned.
        batch: ``B``.
    """
    if not isinstance(w, Tensor) or not w.is_floating_point():
        got = f"dtype {w.dtype}" if isinstance(w, Tensor) else type(w).__name__
        raise TypeError(f"{name} must return a floating-point tensor of shape ({batch},), got {got}")
    if tuple(w.shape) != (batch,):
        raise ValueError(
            f"{name} must return one weight per row, shape ({batch},), got {tuple(w.shape)} (a (B, 1) weight would "
            "broadcast the per-sample losses to (B, B))"
        )
    if _values_on() and bool((w < 0).any()):
        raise ValueError(f"{name} returned negative weights; weights must be >= 0")
    return w  # NaN / inf weights are caught by check_finite_loss, which names the part that caused them


def weigh(weighting: Any, sq: Tensor) -> Tensor:
    """The per-sample weights ``weighting(sq)``, checked (``(B,)``, ``>= 0``) and detached."""
    return check_row_weights("weighting", weighting(sq), sq.shape[0]).detach()


def apply_row_weights(
    w: Tensor,
    neq: Tensor,
    t: Tensor,
    r: Tensor,
    step: int | None,
    interval_weight: PerRowWeight | None,
    velocity_weight: PerRowWeight | None,
) -> Tensor:
    """Multiply per-sample weights by the optional per-row hooks.

    Args:
        w: Weights after the adaptive normalization, shape ``(B,)``.
        neq: Rows with ``r != t``, bool ``(B,)``.
        t: Start times ``(B,)``.
        r: End times ``(B,)``.
        step: Training step passed to the hooks.
        interval_weight: ``(t, r, step) -> (B,)`` applied on ``r != t`` rows.
        velocity_weight: ``(t, r, step) -> (B,)`` applied on ``r = t`` rows.

    Returns:
        Detached weights, shape ``(B,)``.

    Raises:
        ValueError: a hook returned another shape than ``(B,)`` or negative / non-finite weights.
    """
    batch = w.shape[0]
    if interval_weight is not None:
        wi = check_row_weights("interval_weight", interval_weight(t, r, step), batch)
        w = torch.where(neq, w * wi.to(w), w)
    if velocity_weight is not None:
        wv = check_row_weights("velocity_weight", velocity_weight(t, r, step), batch)
        w = torch.where(neq, w, w * wv.to(w))
    return w.detach()


def check_weighting(weighting: Any) -> None:
    """Check at construction that ``weighting`` is a weighting strategy (``sq (B,) -> weights (B,)``)."""
    from meanflow_losses.weighting import AdaptiveWeight

    if isinstance(weighting, AdaptiveWeight):
        return
    if isinstance(weighting, (int, float, str, bool)) or not callable(weighting):
        raise TypeError(
            "weighting must be an AdaptiveWeight (e.g. mfl.AdaptiveWeight(p=1.0, c=1e-3)) or a callable "
            f"sq (B,) -> weights (B,), got {type(weighting).__name__} {weighting!r}"
        )


def check_row_hook(name: str, hook: Any) -> None:
    """Check at construction that a per-row weight hook is ``None`` or callable ``(t, r, step) -> (B,)``."""
    if hook is not None and not callable(hook):
        raise TypeError(f"{name} must be None or a callable (t, r, step) -> (B,), got {type(hook).__name__}")


def check_guidance(guidance: Any) -> None:
    """Check at construction that ``guidance`` is ``None``, a ``TrainingGuidance`` or a ``GuidanceAsInput``."""
    if guidance is not None and not isinstance(guidance, (TrainingGuidance, GuidanceAsInput)):
        got = type(guidance).__name__
        raise TypeError(f"guidance must be None, a TrainingGuidance or a GuidanceAsInput, got {got}")


def check_times_sampler(times: Any, *, pairs_only: bool) -> None:
    """Check at construction that ``times`` is a (pair) sampler."""
    allowed = (TimePairSampler,) if pairs_only else (TimeSampler, TimePairSampler)
    if not isinstance(times, allowed):
        names = " or ".join(c.__name__ for c in allowed)
        raise TypeError(f"times must be a {names}, got {type(times).__name__}")


def check_finite_loss(per_sample: Tensor, objective: str, **parts: Tensor | None) -> None:
    """Raise :class:`NonFiniteError` naming the non-finite part when ``per_sample`` holds NaN or inf.

    One host sync per call (skipped under ``mfl.value_checks(False)``); the parts are inspected only on failure.

    Args:
        per_sample: Per-sample losses ``(B,)``.
        objective: Name used in the message.
        **parts: The tensors the loss was built from, e.g. ``prediction=u, target=target, dudt=dudt``.
    """
    if not _values_on() or bool(torch.isfinite(per_sample).all()):
        return
    bad = [name for name, val in parts.items() if val is not None and not bool(torch.isfinite(val).all())]
    rows_bad = (~torch.isfinite(per_sample)).nonzero().squeeze(1)[:8].tolist()
    where = ", ".join(bad) if bad else "the per-sample weights"
    hint = ""
    if "prediction" in bad:
        hint = " The network's output is not finite: check its weights and inputs (a NaN or inf parameter?)."
    elif bad == ["weights"]:
        hint = " A weighting or a per-row weight hook (interval_weight, velocity_weight) returned NaN or inf."
    elif bad:
        hint = (
            " The target is not finite although the prediction is: du/dt or a no-grad pass overflowed (a half "
            "precision model without autocast? keep jvp_fp32=True) or the teacher/target_model returned NaN."
        )
    raise NonFiniteError(f"{objective}: the loss is non-finite on rows {rows_bad}; non-finite: {where}.{hint}")
