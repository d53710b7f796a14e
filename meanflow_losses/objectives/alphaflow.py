r"""alpha-Flow: one family from trajectory flow matching to MeanFlow (Zhang et al., arXiv 2510.20771).

For :math:`\alpha \in (0, 1]`, with :math:`s = \alpha r + (1 - \alpha) t` and the guided velocity
:math:`\tilde v`,

.. math::
    z_s = z_t - (t - s)\,\tilde v, \qquad
    u_{tgt} = \alpha\,\tilde v + (1 - \alpha)\,u_{\theta^-}(z_s, r, s), \qquad
    L_\alpha = \mathbb{E}\;\mathrm{sg}(w_i)\,\| u_\theta(z_t, r, t) - \mathrm{sg}(u_{tgt}) \|^2,

where :math:`\theta^-` is the ONLINE network without gradient (the ``target_model``; the paper's ablation:
an EMA teacher is much worse) and, on ``r != t`` rows, :math:`w_i = \alpha / (\|D_i\|^2 + c)` (official
code; ``alpha_scale`` selects :math:`\alpha^{-1}` as printed in the paper's :math:`L_\alpha`, or 1). Rows
with ``r = t`` are flow matching with weight :math:`1 / (\|D_i\|^2 + c)`.

Special cases: :math:`\alpha = 1` is trajectory flow matching (target :math:`\tilde v`, one forward pass);
:math:`\alpha = 1/2` with :math:`\tilde v` replaced by :math:`u_{\theta^-}(z_t, s, t)` is twice the Shortcut
loss; :math:`\nabla L_{MF} = \lim_{\alpha \to 0} \nabla(\alpha^{-1}\|u_\theta - \mathrm{sg}(u_{tgt})\|^2)`.

Thresholds :math:`\eta`: :math:`\alpha < \eta` runs the MeanFlow JVP loss (delegated to
:class:`~meanflow_losses.objectives.meanflow.MeanFlowLoss` with the same options, weight 1 on every row),
:math:`\alpha > 1 - \eta` runs trajectory flow matching with a single forward. ``eta=0`` disables the snap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from meanflow_losses._dtypes import upcast
from meanflow_losses._validate import check_bool, check_real
from meanflow_losses.conventions import append_dims
from meanflow_losses.guidance import GuidanceAsInput, TrainingGuidance
from meanflow_losses.jvp import JVPStrategy, check_strategy
from meanflow_losses.jvp_attention import JVPAttention
from meanflow_losses.model_checks import RuntimeChecks
from meanflow_losses.objectives.base import (
    LossOutput,
    PerRowWeight,
    apply_row_weights,
    base_terms,
    check_finite_loss,
    check_guidance,
    check_row_hook,
    check_times_sampler,
    check_weighting,
    start_step,
    weigh,
)
from meanflow_losses.objectives.meanflow import MeanFlowLoss, decomposition_terms
from meanflow_losses.passes import call, no_grad_call
from meanflow_losses.times import TimePairSampler
from meanflow_losses.weighting import AdaptiveWeight, check_reduction, reduce_data_dims

__all__ = ["ALPHA_SCALES", "REGIMES", "AlphaFlowLoss", "resolve_alpha"]

#: The regimes of :class:`AlphaFlowLoss`; ``terms["regime"]`` holds the index into this tuple.
REGIMES: tuple[str, ...] = ("meanflow", "consistency", "trajectory_fm")
#: Per-row factor on ``r != t`` rows: ``alpha`` (official code), ``inverse`` (paper's alpha^-1), ``one``.
ALPHA_SCALES: tuple[str, ...] = ("alpha", "inverse", "one")

AlphaLike = float | Callable[[int], float]


def resolve_alpha(alpha: AlphaLike, step: int | None, eta: float) -> tuple[float, float]:
    """Evaluate a constant or scheduled alpha at ``step`` and apply the thresholds.

    Args:
        alpha: A number in ``[0, 1]`` or a schedule ``step -> alpha``.
        step: Training step (required when ``alpha`` is a schedule).
        eta: Threshold: values below ``eta`` become 0, values above ``1 - eta`` become 1; 0 disables.

    Returns:
        ``(raw, effective)`` alpha.
    """
    if callable(alpha):
        if step is None:
            raise ValueError("alpha is a schedule (step -> alpha): call the loss with step=<current training step>")
        value = alpha(int(step))
        where = f" (the schedule's value at step {step})"
    else:
        value, where = alpha, ""
    try:
        raw = check_real("alpha", value, lo=0.0, hi=1.0)
    except (TypeError, ValueError) as err:
        raise type(err)(f"{err}{where}") from None
    eff = raw
    if eta > 0:
        if raw < eta:
            eff = 0.0
        elif raw > 1.0 - eta:
            eff = 1.0
    return raw, eff


@dataclass
class AlphaFlowLoss:
    r"""The alpha-Flow objective on any ``model(z, r, t, **model_kwargs)``.

    Args:
        alpha: A number in ``[0, 1]`` or a schedule ``step -> alpha`` such as
            ``schedules.Sigmoid(start, end, gamma=25.0)`` (then every call needs ``step=``).
        eta: Threshold :math:`\eta \in [0, 1/2)` (paper: 5e-3). ``alpha < eta`` runs the MeanFlow loss,
            ``alpha > 1 - eta`` trajectory flow matching; ``0`` disables the snap.
        times: ``(t, r)`` pair sampler; its ``equal_fraction`` (share of ``r = t`` rows) may be scheduled.
        weighting: Adaptive weight :math:`1 / (\|D\|^2 + c)^p` (paper: ``p = 1, c = 1e-3``).
        reduction: ``"mean"`` (official alpha-Flow code) or ``"sum"`` over data dimensions.
        target_clip: Clip the ``r != t`` targets elementwise to ``[-clip, clip]`` (official code: 4) in the
            consistency and trajectory-FM regimes; ``None`` disables it. Not applied in the MeanFlow regime.
        guidance: Optional training-time guidance and condition dropout (shared with MeanFlowLoss).
        alpha_scale: Factor on ``r != t`` rows: ``"alpha"`` (official code), ``"inverse"`` (the paper's
            :math:`\alpha^{-1} L`) or ``"one"``.
        jvp: JVP strategy of the MeanFlow regime (``"nograd"``, ``"joint"``, ``"finite_difference"``).
        jvp_attention: How SDPA calls are differentiated in that JVP (see :class:`MeanFlowLoss`).
        jvp_fp32: Run the JVP in float32 (MeanFlow regime).
        fd_eps: Finite-difference step (MeanFlow regime).
        tangent: JVP tangent of the MeanFlow regime, ``"conditional"`` or ``"model"`` (iMF).
        interval_weight: Optional ``(t, r, step) -> (B,)`` multiplier on ``r != t`` rows after the adaptive
            weight (e.g. :class:`~meanflow_losses.weighting.ProgressiveIntervalWeight`), in every regime.
        velocity_weight: Optional ``(t, r, step) -> (B,)`` multiplier on ``r = t`` rows (e.g. Min-SNR).
        decompose: Attach ``decomposition = {"tfm", "fm_border", "tcc"}``. In the consistency and
            trajectory-FM regimes ``tcc`` is :math:`\mathbb{E}\,w\,2\,u_\theta\cdot\mathrm{sg}(\tilde v - u_{tgt})`,
            so :math:`\nabla L = \nabla L_{TFM} + \nabla L_{TCc}` in every regime.
        runtime_checks: Probe the first calls of the MeanFlow regime and warn when du/dt looks broken.
    """

    alpha: AlphaLike
    eta: float = 5e-3
    times: TimePairSampler = field(default_factory=lambda: TimePairSampler("logit_normal", -0.4, 1.0, 0.5))
    weighting: AdaptiveWeight = field(default_factory=lambda: AdaptiveWeight(p=1.0, c=1e-3))
    reduction: str = "mean"
    target_clip: float | None = None
    guidance: TrainingGuidance | GuidanceAsInput | None = None
    alpha_scale: Literal["alpha", "inverse", "one"] = "alpha"
    jvp: JVPStrategy = "nograd"
    jvp_attention: JVPAttention = "auto"
    jvp_fp32: bool = True
    fd_eps: float | None = None
    tangent: Literal["conditional", "model"] = "conditional"
    interval_weight: PerRowWeight | None = None
    velocity_weight: PerRowWeight | None = None
    decompose: bool = False
    runtime_checks: bool = True
    _checks: RuntimeChecks = field(default_factory=RuntimeChecks, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_reduction(self.reduction)
        check_strategy(self.jvp)
        check_times_sampler(self.times, pairs_only=True)
        check_weighting(self.weighting)
        check_guidance(self.guidance)
        if not callable(self.alpha):
            resolve_alpha(self.alpha, None, 0.0)
        check_real("eta", self.eta, lo=0.0, hi=0.5, hi_open=True)
        if self.target_clip is not None:
            check_real("target_clip", self.target_clip, lo=0.0, lo_open=True)
        check_bool("jvp_fp32", self.jvp_fp32)
        check_bool("decompose", self.decompose)
        check_bool("runtime_checks", self.runtime_checks)
        check_row_hook("interval_weight", self.interval_weight)
        check_row_hook("velocity_weight", self.velocity_weight)
        if self.alpha_scale not in ALPHA_SCALES:
            raise ValueError(f"alpha_scale must be one of {ALPHA_SCALES}, got {self.alpha_scale!r}")
        self.meanflow_loss()  # validates the options shared with the MeanFlow regime

    def meanflow_loss(self) -> MeanFlowLoss:
        """The :class:`MeanFlowLoss` that runs the ``alpha = 0`` regime, built from the current options.

        It shares this objective's runtime checks, so they count JVP calls across steps.
        """
        loss = MeanFlowLoss(
            times=self.times,
            weighting=self.weighting,
            reduction=self.reduction,
            guidance=self.guidance,
            jvp=self.jvp,
            jvp_attention=self.jvp_attention,
            jvp_fp32=self.jvp_fp32,
            fd_eps=self.fd_eps,
            tangent=self.tangent,
            interval_weight=self.interval_weight,
            velocity_weight=self.velocity_weight,
            decompose=self.decompose,
            runtime_checks=self.runtime_checks,
        )
        loss._checks = self._checks
        return loss

    def alpha_at(self, step: int | None) -> float:
        """The effective alpha (after the ``eta`` thresholds) at ``step``."""
        return resolve_alpha(self.alpha, step, self.eta)[1]

    def regime_at(self, step: int | None) -> str:
        """The regime (one of :data:`REGIMES`) that a call at ``step`` runs."""
        return _regime(self.alpha_at(step))

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
        r"""Compute the alpha-Flow loss on a batch.

        Args:
            model: Network called with gradient once (may be a DDP wrapper).
            x: Data, shape ``(B, *D)``.
            model_kwargs: Conditioning.
            target_model: Module for every no-grad pass (the :math:`u_{\theta^-}(z_s, r, s)` target, JVP,
                guidance); defaults to ``model``. Pass ``ddp_model.module`` under DDP.
            t: Optional start times ``(B,)``.
            r: Optional end times ``(B,)``, ``r <= t``.
            noise: Optional noise ``(B, *D)``.
            v_target: Optional velocity ``(B, *D)`` replacing ``e - x``.
            drop_mask: Optional explicit condition-dropout rows, bool ``(B,)``.
            generator: Random generator for every draw.
            step: Training step; required when ``alpha`` is a schedule.
            teacher: Optional frozen teacher (:class:`~meanflow_losses.teachers.Teacher` or a network in the protocol):
                its (guided) velocity replaces ``e - x`` in the target and the JVP tangent.

        Returns:
            :class:`LossOutput`; ``terms`` hold ``loss``, ``mse``, ``weight_mean``, ``fm_mse``, ``mf_mse``
            (``r != t`` rows), ``frac_equal``, ``alpha`` (effective), ``alpha_raw`` and ``regime`` (index into
            :data:`REGIMES`); ``extras`` hold ``target``, ``regime`` (name) and ``alpha``.
        """
        raw, alpha = resolve_alpha(self.alpha, step, self.eta)
        regime = _regime(alpha)
        if regime == "meanflow":
            out = self.meanflow_loss()(
                model,
                x,
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
            )
        else:
            out = self._consistency(
                model, x, alpha, model_kwargs, target_model, t, r, noise, v_target, drop_mask, generator, step, teacher
            )
        ref = out.loss.detach()
        out.terms["alpha"] = ref.new_tensor(alpha)
        out.terms["alpha_raw"] = ref.new_tensor(raw)
        out.terms["regime"] = ref.new_tensor(float(REGIMES.index(regime)))
        out.extras["regime"] = regime
        out.extras["alpha"] = alpha
        return out

    def _consistency(
        self,
        model: Any,
        x: Tensor,
        alpha: float,
        model_kwargs: dict[str, Any] | None,
        target_model: Any,
        t: Tensor | None,
        r: Tensor | None,
        noise: Tensor | None,
        v_target: Tensor | None,
        drop_mask: Tensor | None,
        generator: torch.Generator | None,
        step: int | None,
        teacher: Any,
    ) -> LossOutput:
        gb = start_step(
            model,
            x,
            self.times,
            self.guidance,
            objective="alpha-Flow",
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
            checks=self._checks if self.runtime_checks else None,
        )
        b, tm, v_t, kw, neq, idx = gb.b, gb.target_model, gb.v_tilde, gb.model_kwargs, gb.neq, gb.idx
        n_j = idx.numel()

        target = v_t.detach()
        if n_j > 0:
            v_j = v_t.index_select(0, idx)
            tgt_j = v_j
            if alpha < 1.0:
                z_j, r_j, t_j = b.z.index_select(0, idx), b.r.index_select(0, idx), b.t.index_select(0, idx)
                step_j = alpha * (t_j - r_j)  # t - s
                s_j = t_j - step_j
                z_s = z_j - append_dims(step_j, z_j).to(z_j.dtype) * v_j
                u_next = no_grad_call(tm, z_s, r_j, s_j, kw.select(idx))
                tgt_j = alpha * v_j + (1.0 - alpha) * u_next.to(v_j.dtype)
            if self.target_clip is not None:
                tgt_j = tgt_j.clamp(-self.target_clip, self.target_clip)
            target = target.index_copy(0, idx, tgt_j.detach())

        u = call(model, b.z, b.r, b.t, kw)
        sq = reduce_data_dims((upcast(u) - upcast(target)).square(), self.reduction)
        w = weigh(self.weighting, sq)
        scale = {"alpha": alpha, "inverse": 1.0 / alpha, "one": 1.0}[self.alpha_scale]
        if scale != 1.0:
            w = torch.where(neq, w * scale, w)
        w = apply_row_weights(w, neq, b.t, b.r, step, self.interval_weight, self.velocity_weight)
        per_sample = w * sq
        check_finite_loss(per_sample, "alpha-Flow", prediction=u, target=target, weights=w)
        loss = per_sample.mean()
        terms = base_terms(loss, sq, w, gb, guided=self.guidance is not None)
        decomposition = None
        if self.decompose:
            # ||u - T||^2 = ||u - v~||^2 + 2 u.(v~ - T) + const: the MeanFlow split with (t - r) du/dt := v~ - T.
            gap = append_dims(torch.where(neq, b.t - b.r, torch.ones_like(b.t)), v_t).to(v_t.dtype)
            equiv_dudt = (v_t - target) / gap
            decomposition = decomposition_terms(u, v_t, equiv_dudt, b.t, b.r, w, self.reduction)
        return LossOutput(
            loss=loss,
            per_sample=per_sample,
            terms=terms,
            t=b.t,
            r=b.r,
            decomposition=decomposition,
            extras={"target": target},
        )


def _regime(alpha: float) -> str:
    if alpha == 0.0:
        return "meanflow"
    if alpha == 1.0:
        return "trajectory_fm"
    return "consistency"
