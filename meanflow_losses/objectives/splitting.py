r"""Interval-splitting consistency: SplitMeanFlow and Shortcut models, without any JVP.

The average velocity is additive over a split :math:`r \le s \le t`:

.. math::
    (t - r)\,u(z_t, r, t) = (s - r)\,u(z_s, r, s) + (t - s)\,u(z_t, s, t).

With :math:`s = (1 - \lambda)\,t + \lambda\,r` the regression target on ``r != t`` rows is (both network
terms from the ``target_model`` without gradient)

.. math::
    u_2 = u_{\theta^-}(z_t, s, t), \quad z_s = z_t - (t - s)\,u_2, \quad u_1 = u_{\theta^-}(z_s, r, s),
    \quad u_{tgt} = \lambda\,u_2 + (1 - \lambda)\,u_1,

and ``r = t`` rows are the flow-matching boundary condition :math:`u_\theta(z_t, t, t) = \tilde v`.

* :class:`SplitMeanFlowLoss` (arXiv 2507.16884): :math:`\lambda \sim U(0, 1)` per row.
* :class:`ShortcutLoss` (Frans et al., arXiv 2410.12557), converted to this package's convention (``t = 0`` is
  data): :math:`\lambda = 1/2` on a dyadic grid (:class:`DyadicPairSampler`: full step
  :math:`2d \in \{1, 1/2, \dots, 1/64\}`, ``t`` on multiples of :math:`2d`, ``r = t - 2d``), 1/8 of the batch
  with consistency targets, the rest flow matching, targets clipped to +-4, plain squared error; the
  official recipe uses an EMA teacher, passed as ``target_model`` (e.g. ``AveragedModel(model).module``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from meanflow_losses._dtypes import compute_dtype, upcast
from meanflow_losses._validate import _values_on, check_batch, check_int, check_real
from meanflow_losses.conventions import append_dims
from meanflow_losses.guidance import GuidanceAsInput, TrainingGuidance
from meanflow_losses.model_checks import RuntimeChecks
from meanflow_losses.objectives.base import (
    LossOutput,
    PerRowWeight,
    apply_row_weights,
    base_terms,
    check_finite_loss,
    check_guidance,
    check_row_hook,
    check_weighting,
    masked_mean,
    start_step,
    weigh,
)
from meanflow_losses.passes import call, no_grad_call
from meanflow_losses.times import TimePair, TimePairSampler, TimeSampler
from meanflow_losses.weighting import AdaptiveWeight, check_reduction, reduce_data_dims

__all__ = ["DyadicPairSampler", "ShortcutLoss", "SplitMeanFlowLoss"]


@dataclass(frozen=True)
class DyadicPairSampler:
    r"""Shortcut models' ``(t, r)`` pairs: dyadic steps on consistency rows, ``r = t`` elsewhere.

    The first ``floor(consistency_fraction * B)`` rows draw a level :math:`k \sim U\{0, \dots, L - 1\}`, the
    full step :math:`2d = 2^{-k}`, ``t`` uniformly on :math:`\{2d, 4d, \dots, 1\}` and ``r = t - 2d``; the other
    rows draw ``t`` from ``fm_times`` and set ``r = t``.

    Args:
        levels: Number ``L`` of step sizes (Shortcut: 7, i.e. :math:`2d \in \{1, \dots, 1/64\}`).
        consistency_fraction: Share of rows with consistency targets (Shortcut: 1/8).
        fm_times: Time distribution of the flow-matching rows.
    """

    levels: int = 7
    consistency_fraction: float = 0.125
    fm_times: TimeSampler = field(default_factory=lambda: TimeSampler("uniform"))

    def __post_init__(self) -> None:
        if check_int("levels", self.levels, lo=1) > 30:
            raise ValueError(f"levels must be an integer in [1, 30], got {self.levels!r}")
        check_real("consistency_fraction", self.consistency_fraction, lo=0.0, hi=1.0)
        if not isinstance(self.fm_times, TimeSampler):
            raise TypeError(f"fm_times must be a TimeSampler, got {type(self.fm_times).__name__}")

    def num_consistency(self, batch_size: int) -> int:
        """Number of consistency rows in a batch: ``floor(consistency_fraction * B)``."""
        return math.floor(self.consistency_fraction * batch_size + 1e-9)

    def sample(
        self,
        batch_size: int,
        *,
        step: int | None = None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> TimePair:
        """Draw a batch of pairs; consistency rows first.

        Returns:
            :class:`TimePair` with ``t`` and ``r`` of shape ``(B,)``.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n_c = self.num_consistency(batch_size)
        dev = generator.device if generator is not None else device
        level = torch.randint(0, self.levels, (n_c,), generator=generator, device=dev)
        n_pos = torch.pow(2.0, level.to(torch.float64))
        gap = 1.0 / n_pos
        pos = torch.floor(torch.rand(n_c, generator=generator, device=dev, dtype=torch.float64) * n_pos) + 1.0
        t_c = (pos.clamp(max=n_pos) * gap).clamp(max=1.0)
        r_c = (t_c - gap).clamp(min=0.0)
        t_f = (
            self.fm_times.sample(batch_size - n_c, generator=generator, device=dev, dtype=torch.float64)
            if (batch_size > n_c)
            else t_c.new_zeros(0)
        )
        t = torch.cat([t_c, t_f]).to(device=device if device is not None else dev, dtype=dtype)
        r = torch.cat([r_c, t_f]).to(device=device if device is not None else dev, dtype=dtype)
        return TimePair(t=t, r=r, interval_rows=torch.arange(n_c, device=t.device))


@dataclass
class SplitMeanFlowLoss:
    r"""Interval-splitting consistency on any ``model(z, r, t, **model_kwargs)`` (no JVP).

    Defaults mirror :class:`~meanflow_losses.objectives.meanflow.MeanFlowLoss`, so that switching objectives
    changes only the target.

    Args:
        times: ``(t, r)`` sampler: a :class:`TimePairSampler` (its ``equal_fraction`` is the share of
            boundary flow-matching rows) or a :class:`DyadicPairSampler`.
        lam: Split :math:`\lambda \in (0, 1)` for every row, or ``None`` for :math:`\lambda \sim U(0, 1)` per row.
        weighting: Adaptive weight.
        reduction: ``"sum"`` or ``"mean"`` over data dimensions.
        guidance: Optional training-time guidance and condition dropout (affects the boundary rows' target
            :math:`\tilde v`; dropped conditions are used in every pass).
        target_clip: Clip the splitting targets elementwise to ``[-clip, clip]``; ``None`` disables it.
        interval_weight: Optional ``(t, r, step) -> (B,)`` multiplier on ``r != t`` rows.
        velocity_weight: Optional ``(t, r, step) -> (B,)`` multiplier on ``r = t`` rows.
        runtime_checks: Warn at the first call about setups that change the objective (batch statistics in the
            splitting passes).
    """

    times: TimePairSampler | DyadicPairSampler = field(
        default_factory=lambda: TimePairSampler("logit_normal", -0.4, 1.0, 0.75)
    )
    lam: float | None = None
    weighting: AdaptiveWeight = field(default_factory=lambda: AdaptiveWeight(p=1.0, c=1e-3))
    reduction: str = "sum"
    guidance: TrainingGuidance | GuidanceAsInput | None = None
    target_clip: float | None = None
    interval_weight: PerRowWeight | None = None
    velocity_weight: PerRowWeight | None = None
    runtime_checks: bool = True
    _checks: RuntimeChecks = field(default_factory=RuntimeChecks, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_reduction(self.reduction)
        if not isinstance(self.times, (TimePairSampler, DyadicPairSampler)):
            raise TypeError(f"times must be a TimePairSampler or DyadicPairSampler, got {type(self.times).__name__}")
        if self.lam is not None:
            check_real("lam", self.lam, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        if self.target_clip is not None:
            check_real("target_clip", self.target_clip, lo=0.0, lo_open=True)
        check_weighting(self.weighting)
        check_guidance(self.guidance)
        check_row_hook("interval_weight", self.interval_weight)
        check_row_hook("velocity_weight", self.velocity_weight)

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
        lam: float | Tensor | None = None,
        drop_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
        step: int | None = None,
        teacher: Any = None,
    ) -> LossOutput:
        r"""Compute the splitting loss on a batch.

        Args:
            model: Network called with gradient once (may be a DDP wrapper).
            x: Data, shape ``(B, *D)``.
            model_kwargs: Conditioning.
            target_model: Module for the no-grad passes (an EMA copy for Shortcut models); defaults to ``model``.
            t: Optional start times ``(B,)``.
            r: Optional end times ``(B,)``; rows with ``r < t`` get splitting targets (for Shortcut models
                the half step is ``d = (t - r) / 2``).
            noise: Optional noise ``(B, *D)``.
            v_target: Optional velocity ``(B, *D)`` replacing ``e - x`` on the boundary rows.
            lam: Optional split: a number or a tensor ``(B,)`` in ``[0, 1]`` (entries on ``r = t`` rows are
                ignored); overrides the configured ``lam`` and the uniform draw.
            drop_mask: Optional explicit condition-dropout rows, bool ``(B,)``.
            generator: Random generator for every draw.
            step: Training step (scheduled fractions and weights).
            teacher: Optional frozen teacher (:class:`~meanflow_losses.teachers.Teacher` or a network in the protocol):
                its (guided) velocity replaces ``e - x`` in the target and the JVP tangent.

        Returns:
            :class:`LossOutput`; ``terms`` hold ``loss``, ``mse``, ``weight_mean``, ``fm_mse``, ``split_mse``,
            ``frac_equal`` and ``lam_mean``; ``extras`` hold ``target`` and ``lam`` (``(B,)``, 0 on ``r = t`` rows).
        """
        rows_drawn = None
        if t is None and r is None and isinstance(self.times, DyadicPairSampler):
            x = check_batch("x", x)
            pair = self.times.sample(
                x.shape[0],
                step=step,
                generator=generator,
                device=x.device,
                dtype=compute_dtype(x.dtype),
            )
            t, r, rows_drawn = pair.t, pair.r, pair.interval_rows
        gb = start_step(
            model,
            x,
            self.times if isinstance(self.times, TimePairSampler) else self.times.fm_times,
            self.guidance,
            objective="interval splitting",
            model_kwargs=model_kwargs,
            target_model=target_model,
            t=t,
            r=r,
            noise=noise,
            v_target=v_target,
            drop_mask=drop_mask,
            generator=generator,
            step=step,
            teacher=teacher,
            interval_rows=rows_drawn,
            checks=self._checks if self.runtime_checks else None,
        )
        b, tm, v_t, kw, neq, idx = gb.b, gb.target_model, gb.v_tilde, gb.model_kwargs, gb.neq, gb.idx
        batch, n_j = b.x.shape[0], idx.numel()
        lam_all = self._lam(lam, batch, n_j, idx, generator, b.t)

        target = v_t.detach()
        if n_j > 0:
            z_j, r_j, t_j = b.z.index_select(0, idx), b.r.index_select(0, idx), b.t.index_select(0, idx)
            kw_j = kw.select(idx)
            lam_j = lam_all.index_select(0, idx)
            first = lam_j * (t_j - r_j)  # t - s
            s_j = t_j - first
            u2 = no_grad_call(tm, z_j, s_j, t_j, kw_j).to(v_t.dtype)
            z_s = z_j.detach() - append_dims(first, z_j).to(z_j.dtype) * u2.to(z_j.dtype)
            u1 = no_grad_call(tm, z_s, r_j, s_j, kw_j).to(v_t.dtype)
            lam_d = append_dims(lam_j, u2).to(v_t.dtype)
            tgt_j = lam_d * u2 + (1 - lam_d) * u1
            if self.target_clip is not None:
                tgt_j = tgt_j.clamp(-self.target_clip, self.target_clip)
            target = target.index_copy(0, idx, tgt_j.detach())

        u = call(model, b.z, b.r, b.t, kw)
        sq = reduce_data_dims((upcast(u) - upcast(target)).square(), self.reduction)
        w = weigh(self.weighting, sq)
        w = apply_row_weights(w, neq, b.t, b.r, step, self.interval_weight, self.velocity_weight)
        per_sample = w * sq
        check_finite_loss(per_sample, "interval splitting", prediction=u, target=target, weights=w)
        loss = per_sample.mean()
        terms = base_terms(loss, sq, w, gb, guided=self.guidance is not None, interval_key="split_mse")
        terms["lam_mean"] = masked_mean(lam_all, neq)
        return LossOutput(
            loss=loss,
            per_sample=per_sample,
            terms=terms,
            t=b.t,
            r=b.r,
            extras={"target": target, "lam": lam_all},
        )

    def _lam(
        self,
        lam: float | Tensor | None,
        batch: int,
        n_j: int,
        idx: Tensor,
        generator: torch.Generator | None,
        t: Tensor,
    ) -> Tensor:
        """Per-row split ``(B,)`` in the dtype of ``t``, zero on ``r = t`` rows."""
        out = torch.zeros_like(t)
        if lam is None and self.lam is not None:
            lam = float(self.lam)
        if isinstance(lam, Tensor):
            if tuple(lam.shape) != (batch,) or not lam.is_floating_point():
                raise ValueError(
                    f"lam must be a number or a floating tensor of shape ({batch},), got {tuple(lam.shape)}"
                )
            lam = lam.detach().to(device=t.device, dtype=t.dtype)
            lam_j = lam.index_select(0, idx)
        elif lam is not None:
            lam_j = torch.full((n_j,), float(lam), dtype=t.dtype, device=t.device)
        else:
            dev = generator.device if generator is not None else t.device
            lam_j = torch.rand(n_j, generator=generator, device=dev, dtype=torch.float64).to(t.device, t.dtype)
        if n_j > 0 and _values_on() and not bool((torch.isfinite(lam_j) & (lam_j >= 0) & (lam_j <= 1)).all()):
            raise ValueError("lam must lie in [0, 1] on every row with r != t")
        return out.index_copy(0, idx, lam_j)


@dataclass
class ShortcutLoss(SplitMeanFlowLoss):
    r"""Shortcut models (Frans et al.) as a splitting preset: :math:`\lambda = 1/2` on a dyadic grid.

    Same call as :class:`SplitMeanFlowLoss`. Defaults from the official code: :class:`DyadicPairSampler`
    (7 levels, 1/8 consistency rows, uniform ``t`` on the flow-matching rows), plain squared error with the
    MEAN over data dimensions, targets clipped to +-4. Pass the EMA teacher as ``target_model``. The
    official code conditions its flow-matching rows on the smallest step 1/128; in this package's protocol
    the instantaneous velocity is ``r = t``.
    """

    times: TimePairSampler | DyadicPairSampler = field(default_factory=DyadicPairSampler)
    lam: float | None = 0.5
    weighting: AdaptiveWeight = field(default_factory=lambda: AdaptiveWeight(p=0.0))
    reduction: str = "mean"
    target_clip: float | None = 4.0
