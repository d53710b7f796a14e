r"""MeanFlow: regress the average velocity onto the MeanFlow identity (Geng et al. 2025).

.. math::
    u_{tgt} = \tilde v - (t - r)\,\frac{d}{dt}u_\theta(z_t, r, t), \qquad
    \frac{d}{dt}u_\theta = \partial_z u_\theta\,\tilde v + \partial_t u_\theta,

    L_{MF} = \mathbb{E}\; \mathrm{sg}(w_i)\,\| u_\theta(z_t, r, t) - \mathrm{sg}(u_{tgt}) \|^2,
    \quad w_i = 1 / (\|D_i\|^2 + c)^p.

The JVP runs only on rows with ``r != t`` (with 75% ``r = t`` rows, a quarter of the batch), on the
``target_model`` without gradient (strategy ``"nograd"``), followed by ONE gradient forward of ``model``
on the whole batch. On ``r = t`` rows the target is :math:`\tilde v` (flow matching).

Improved-MeanFlow options (Geng et al., arXiv 2512.02012): ``tangent="model"`` uses the network's own
velocity :math:`v_\theta = u_\theta(z_t, t, t)` as the JVP tangent; ``compound=True`` writes the loss as
:math:`\|u_\theta + (t - r)\,\mathrm{sg}(du/dt) - \tilde v\|^2` (numerically the same regression, logged
as such); ``aux_velocity_weight`` adds :math:`\lambda\,\| u_\theta(z_t, t, t) - \tilde v\|^2` (adaptively
weighted) computed in the same gradient forward.

With ``decompose=True`` the result carries ``decomposition = {"tfm", "fm_border", "tcc"}``:
:math:`L_{TFM} = \mathbb{E}\, w\|u_\theta - \tilde v\|^2`,
:math:`L_{TCc} = \mathbb{E}\, w\,2(t - r)\,u_\theta\cdot\mathrm{sg}(du/dt)` and
:math:`L_{FM'}` (``r = t`` rows only), with :math:`\nabla L_{MF} = \nabla L_{TFM} + \nabla L_{TCc}` exactly; with
``aux_velocity_weight > 0`` the decomposition also holds ``"aux"`` (the weighted auxiliary loss) and
:math:`\nabla L = \nabla(L_{TFM} + L_{TCc} + L_{aux})`.

The first JVP calls are probed (:class:`~meanflow_losses.model_checks.RuntimeChecks`): a ``MeanFlowWarning`` names
a broken du/dt (``t * 1000`` embeddings, cut time paths), in-network label dropout or batch statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from meanflow_losses._dtypes import upcast
from meanflow_losses._validate import check_bool, check_real
from meanflow_losses.conventions import append_dims
from meanflow_losses.guidance import GuidanceAsInput, TrainingGuidance
from meanflow_losses.jvp import JVPStrategy, check_strategy, time_derivative
from meanflow_losses.jvp_attention import JVPAttention, check_attention
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
    rows,
    start_step,
    weigh,
)
from meanflow_losses.passes import batch_stat_layers, call, no_grad_call
from meanflow_losses.times import TimePairSampler
from meanflow_losses.weighting import AdaptiveWeight, check_reduction, reduce_data_dims

__all__ = ["MeanFlowLoss", "decomposition_terms"]


def decomposition_terms(
    u: Tensor, v_tilde: Tensor, dudt: Tensor, t: Tensor, r: Tensor, w: Tensor, reduction: str
) -> dict[str, Tensor]:
    r"""The MeanFlow loss split into trajectory FM and trajectory consistency.

    Args:
        u: Network output with gradient, ``(B, *D)``.
        v_tilde: Guided velocity, ``(B, *D)``.
        dudt: Detached :math:`du/dt` (zero on ``r = t`` rows), ``(B, *D)``.
        t: Start times, ``(B,)``.
        r: End times, ``(B,)``.
        w: Detached per-sample weights, ``(B,)``.
        reduction: ``"sum"`` or ``"mean"`` over data dimensions.

    Returns:
        ``{"tfm": L_TFM, "fm_border": L_FM', "tcc": L_TCc}``, differentiable scalars with
        :math:`\nabla(L_{TFM} + L_{TCc}) = \nabla L_{MF}`.
    """
    u32 = upcast(u)
    sq = reduce_data_dims((u32 - upcast(v_tilde)).square(), reduction)
    gap = append_dims(t - r, u32).to(u32.dtype)
    w = w.to(u32.dtype)
    tcc = reduce_data_dims(2 * gap * u32 * upcast(dudt.detach()), reduction)
    eq = r == t
    n_eq = eq.sum().clamp_min(1)
    return {
        "tfm": (w * sq).mean(),
        "fm_border": (w * sq * eq).sum() / n_eq,
        "tcc": (w * tcc).mean(),
    }


@dataclass
class MeanFlowLoss:
    r"""The MeanFlow objective on any ``model(z, r, t, **model_kwargs)``.

    Args:
        times: ``(t, r)`` pair sampler (``equal_fraction`` = share of ``r = t`` rows).
        weighting: Adaptive weight; MeanFlow uses ``p = 1``.
        reduction: ``"sum"`` (official MeanFlow) or ``"mean"`` over data dimensions.
        guidance: Optional training-time guidance and condition dropout: :class:`TrainingGuidance` (a fixed
            scale baked into the target) or :class:`GuidanceAsInput` (iMF: scale and interval drawn per row and
            given to the network).
        jvp: ``"nograd"`` (default), ``"joint"`` or ``"finite_difference"``.
        jvp_attention: How the network's SDPA calls are differentiated in the JVP: ``"auto"`` (default: the
            ``jvp-flash-attention`` kernel on CUDA when installed, else ``"blockwise"``), ``"blockwise"`` (fused
            forward, blockwise exact tangent, memory ``O(N x block)``), ``"flash"`` or ``"math"``.
        jvp_fp32: Run the JVP in float32 with autocast disabled.
        fd_eps: Finite-difference step (default depends on dtype).
        tangent: ``"conditional"`` (:math:`\tilde v`, MeanFlow) or ``"model"`` (:math:`v_\theta`, iMF; with
            :class:`GuidanceAsInput` the guided velocity :math:`v_c` of the guidance pass).
        compound: Log the iMF compound form :math:`V = u + (t - r)\,\mathrm{sg}(du/dt)` (same regression).
        aux_velocity_weight: Weight of the auxiliary instantaneous-velocity loss (iMF); 0 disables it.
        interval_weight: Optional ``(t, r, step) -> (B,)`` multiplier applied after the adaptive weight on
            ``r != t`` rows (e.g. Kim et al.'s progressive interval weight).
        velocity_weight: Optional ``(t, r, step) -> (B,)`` multiplier on ``r = t`` rows (e.g. Min-SNR).
        decompose: Attach the differentiable ``{"tfm", "fm_border", "tcc"}`` decomposition (and ``"aux"`` when
            ``aux_velocity_weight > 0``).
        runtime_checks: Probe the first JVP calls and warn (``MeanFlowWarning``) when du/dt looks broken.
    """

    times: TimePairSampler = field(default_factory=lambda: TimePairSampler("logit_normal", -0.4, 1.0, 0.75))
    weighting: AdaptiveWeight = field(default_factory=lambda: AdaptiveWeight(p=1.0, c=1e-3))
    reduction: str = "sum"
    guidance: TrainingGuidance | GuidanceAsInput | None = None
    jvp: JVPStrategy = "nograd"
    jvp_attention: JVPAttention = "auto"
    jvp_fp32: bool = True
    fd_eps: float | None = None
    tangent: Literal["conditional", "model"] = "conditional"
    compound: bool = False
    aux_velocity_weight: float = 0.0
    interval_weight: PerRowWeight | None = None
    velocity_weight: PerRowWeight | None = None
    decompose: bool = False
    runtime_checks: bool = True
    _checks: RuntimeChecks = field(default_factory=RuntimeChecks, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_reduction(self.reduction)
        check_strategy(self.jvp)
        check_attention(self.jvp_attention)
        check_times_sampler(self.times, pairs_only=True)
        check_weighting(self.weighting)
        check_guidance(self.guidance)
        check_bool("jvp_fp32", self.jvp_fp32)
        if self.fd_eps is not None:
            check_real("fd_eps", self.fd_eps, lo=0.0, lo_open=True)
        if self.tangent not in ("conditional", "model"):
            raise ValueError(f"tangent must be 'conditional' or 'model', got {self.tangent!r}")
        check_bool("compound", self.compound)
        check_real("aux_velocity_weight", self.aux_velocity_weight, lo=0.0)
        check_row_hook("interval_weight", self.interval_weight)
        check_row_hook("velocity_weight", self.velocity_weight)
        check_bool("decompose", self.decompose)
        check_bool("runtime_checks", self.runtime_checks)
        if self.aux_velocity_weight > 0 and self.jvp == "joint":
            raise ValueError(
                "aux_velocity_weight > 0 needs one batched gradient forward: use jvp='nograd' or "
                "'finite_difference', not 'joint'"
            )

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
        """Compute the MeanFlow loss on a batch.

        Args:
            model: Network called with gradient (may be a DDP wrapper).
            x: Data, shape ``(B, *D)``.
            model_kwargs: Conditioning.
            target_model: Module for every no-grad pass (JVP, guidance); defaults to ``model``.
            t: Optional start times ``(B,)``.
            r: Optional end times ``(B,)``, ``r <= t``.
            noise: Optional noise ``(B, *D)``.
            v_target: Optional velocity ``(B, *D)`` replacing ``e - x`` (teacher or marginal velocity).
            drop_mask: Optional explicit condition-dropout rows, bool ``(B,)``.
            generator: Random generator for every draw.
            step: Training step (scheduled fractions and weights).
            teacher: Optional frozen teacher (:class:`~meanflow_losses.teachers.Teacher` or a network in the protocol):
                its (guided) velocity replaces ``e - x`` in the target and the JVP tangent.

        Returns:
            :class:`LossOutput`; ``terms`` hold ``loss``, ``mse``, ``weight_mean``, ``fm_mse`` (``r = t``
            rows), ``mf_mse`` (``r != t`` rows), ``frac_equal`` and ``dudt_rms``.
        """
        gb = start_step(
            model,
            x,
            self.times,
            self.guidance,
            objective="MeanFlow",
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
            strategy=self.jvp,
            model_tangent=self.tangent == "model",
        )
        b, tm, v_t, kw, neq, idx = gb.b, gb.target_model, gb.v_tilde, gb.model_kwargs, gb.neq, gb.idx
        batch, n_j = b.x.shape[0], idx.numel()
        if self.jvp == "joint" or self.aux_velocity_weight > 0:
            self._refuse_batch_statistics(model)

        cdtype = upcast(v_t).dtype  # du/dt and the target are kept in at least float32
        dudt = torch.zeros(v_t.shape, dtype=cdtype, device=v_t.device)
        u_joint: Tensor | None = None
        if n_j > 0:
            z_j, r_j, t_j = b.z.index_select(0, idx), b.r.index_select(0, idx), b.t.index_select(0, idx)
            kw_j = kw.select(idx)
            if self.tangent == "model" and gb.guidance.tangent is not None:  # GuidanceAsInput computed v_c
                tan = gb.guidance.tangent.index_select(0, idx)
            elif self.tangent == "model":
                tan = no_grad_call(tm, z_j, t_j, t_j, kw_j).to(v_t.dtype)
            else:
                tan = v_t.index_select(0, idx)
            res = time_derivative(
                tm if self.jvp != "joint" else model,
                z_j,
                r_j,
                t_j,
                tan,
                kw_j,
                strategy=self.jvp,
                fp32=self.jvp_fp32,
                fd_eps=self.fd_eps,
                attention=self.jvp_attention,
            )
            dudt = dudt.index_copy(0, idx, res.dudt.to(cdtype))
            if self.jvp == "joint":
                u_joint = res.u
            if self.runtime_checks and self._checks.active:
                self._checks(tm, z_j, r_j, t_j, tan, kw_j, strategy=self.jvp, fd_eps=self.fd_eps, objective="MeanFlow")

        u_aux: Tensor | None = None
        if u_joint is not None:
            eq_idx = rows(~neq)
            u = torch.zeros(b.z.shape, dtype=u_joint.dtype, device=b.z.device).index_copy(0, idx, u_joint)
            if eq_idx.numel() > 0:
                z_e, t_e = b.z.index_select(0, eq_idx), b.t.index_select(0, eq_idx)
                u_e = call(model, z_e, t_e, t_e, kw.select(eq_idx))
                u = u.index_copy(0, eq_idx, u_e.to(u.dtype))
        elif self.aux_velocity_weight > 0:
            zz = torch.cat([b.z, b.z])
            out = call(model, zz, torch.cat([b.r, b.t]), torch.cat([b.t, b.t]), kw.repeat(2))
            u, u_aux = out[:batch], out[batch:]
        else:
            u = call(model, b.z, b.r, b.t, kw)

        gap = append_dims(b.t - b.r, v_t).to(cdtype)
        target = (upcast(v_t) - gap * dudt).detach()
        if self.compound:
            pred = upcast(u) + (gap * dudt).detach()
            sq = reduce_data_dims((pred - upcast(v_t)).square(), self.reduction)
        else:
            sq = reduce_data_dims((upcast(u) - target).square(), self.reduction)
        w = weigh(self.weighting, sq)
        w = apply_row_weights(w, neq, b.t, b.r, step, self.interval_weight, self.velocity_weight)
        per_sample = w * sq
        aux_terms: dict[str, Tensor] = {}
        aux_loss: Tensor | None = None
        if u_aux is not None:
            sq_aux = reduce_data_dims((upcast(u_aux) - upcast(v_t)).square(), self.reduction)
            w_aux = weigh(self.weighting, sq_aux)
            aux_per_sample = self.aux_velocity_weight * w_aux * sq_aux
            per_sample = per_sample + aux_per_sample
            aux_loss = aux_per_sample.mean()
            aux_terms["aux_mse"] = sq_aux.detach().mean()
        check_finite_loss(
            per_sample, "MeanFlow", prediction=u, aux_prediction=u_aux, target=target, dudt=dudt, weights=w
        )
        loss = per_sample.mean()
        terms = base_terms(loss, sq, w, gb, guided=self.guidance is not None)
        terms["dudt_rms"] = dudt.square().mean().sqrt().detach()
        terms.update(aux_terms)
        decomposition = None
        if self.decompose:
            decomposition = decomposition_terms(u, v_t, dudt, b.t, b.r, w, self.reduction)
            if aux_loss is not None:
                decomposition["aux"] = aux_loss
        return LossOutput(
            loss=loss,
            per_sample=per_sample,
            terms=terms,
            t=b.t,
            r=b.r,
            decomposition=decomposition,
            extras={"target": target, "dudt": dudt},
        )

    def _refuse_batch_statistics(self, model: Any) -> None:
        bn = batch_stat_layers(model)
        if bn:
            what = (
                "jvp='joint' splits the gradient forward"
                if self.jvp == "joint"
                else ("aux_velocity_weight > 0 doubles the rows of the gradient forward")
            )
            raise ValueError(
                f"the model normalises with batch statistics ({', '.join(bn[:3])}) and {what}, so its statistics "
                "(and running buffers) would not be those of one forward of the batch. Use jvp='nograd' or "
                "'finite_difference' without aux_velocity_weight, put BatchNorm in eval mode, or use GroupNorm"
            )
