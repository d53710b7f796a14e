r"""Flow matching and trajectory flow matching.

.. math::
    L_{FM} = \mathbb{E}\, w_i\, \| u_\theta(z_t, t, t) - \tilde v \|^2, \qquad
    L_{TFM} = \mathbb{E}\, w_i\, \| u_\theta(z_t, r, t) - \tilde v \|^2.

With a single-time sampler (or ``r`` omitted) this is plain flow matching (``r = t``); with a
:class:`~meanflow_losses.times.TimePairSampler` or an explicit ``r`` it is trajectory flow matching, the
``alpha = 1`` end of the alpha-Flow family.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from meanflow_losses._dtypes import upcast
from meanflow_losses.guidance import GuidanceAsInput, TrainingGuidance
from meanflow_losses.model_checks import RuntimeChecks
from meanflow_losses.objectives.base import (
    LossOutput,
    base_terms,
    check_finite_loss,
    check_guidance,
    check_times_sampler,
    check_weighting,
    start_step,
    weigh,
)
from meanflow_losses.passes import call
from meanflow_losses.times import TimePairSampler, TimeSampler
from meanflow_losses.weighting import AdaptiveWeight, check_reduction, reduce_data_dims

__all__ = ["FlowMatchingLoss"]


@dataclass
class FlowMatchingLoss:
    """Flow-matching objective on any ``model(z, r, t, **model_kwargs)``.

    Args:
        times: Time sampler; a :class:`TimePairSampler` makes it trajectory flow matching.
        weighting: Adaptive weight; ``AdaptiveWeight(p=0.0)`` is plain squared error.
        reduction: ``"sum"`` or ``"mean"`` over data dimensions.
        guidance: Optional training-time guidance and condition dropout.
        runtime_checks: Warn at the first call about setups that change the objective (batch statistics in the
            guidance passes).
    """

    times: TimeSampler | TimePairSampler = field(default_factory=lambda: TimeSampler("logit_normal", -0.4, 1.0))
    weighting: AdaptiveWeight = field(default_factory=lambda: AdaptiveWeight(p=0.0))
    reduction: str = "mean"
    guidance: TrainingGuidance | GuidanceAsInput | None = None
    runtime_checks: bool = True
    _checks: RuntimeChecks = field(default_factory=RuntimeChecks, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_reduction(self.reduction)
        check_times_sampler(self.times, pairs_only=False)
        check_weighting(self.weighting)
        check_guidance(self.guidance)

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
        """Compute the loss on a batch.

        Args:
            model: Network called once with gradient, ``model(z, r, t, **model_kwargs)``.
            x: Data, shape ``(B, *D)``.
            model_kwargs: Conditioning (e.g. ``{"y": labels}``).
            target_model: Module for no-grad passes (guidance); defaults to ``model``. Pass
                ``ddp_model.module`` when ``model`` is a DDP wrapper.
            t: Optional times ``(B,)``.
            r: Optional end times ``(B,)`` (trajectory flow matching).
            noise: Optional noise ``(B, *D)``.
            v_target: Optional velocity ``(B, *D)`` replacing ``e - x``.
            drop_mask: Optional explicit condition-dropout rows, bool ``(B,)``.
            generator: Random generator for every draw.
            step: Training step (for scheduled samplers).
            teacher: Optional frozen teacher (:class:`~meanflow_losses.teachers.Teacher` or a network in the protocol):
                its (guided) velocity replaces ``e - x`` in the target and the JVP tangent.

        Returns:
            :class:`LossOutput` with terms ``loss``, ``mse``, ``weight_mean``.
        """
        gb = start_step(
            model,
            x,
            self.times,
            self.guidance,
            objective="flow matching",
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
            needs_r=False,
            checks=self._checks if self.runtime_checks else None,
        )
        b = gb.b
        u = call(model, b.z, b.r, b.t, gb.model_kwargs)
        sq = reduce_data_dims((upcast(u) - upcast(gb.v_tilde)).square(), self.reduction)
        w = weigh(self.weighting, sq)
        per_sample = w * sq
        check_finite_loss(per_sample, "flow matching", prediction=u, target=gb.v_tilde, weights=w)
        loss = per_sample.mean()
        terms = base_terms(loss, sq, w, gb, guided=self.guidance is not None, split_rows=False)
        return LossOutput(loss=loss, per_sample=per_sample, terms=terms, t=b.t, r=b.r)
