r"""Teachers: a frozen flow model whose velocity replaces :math:`e - x` in every objective.

Pass ``teacher=`` to any objective's call. The teacher is a network in the package protocol (a flow-matching
network through :func:`~meanflow_losses.adapters.from_velocity_net`, in its own time convention), called without
gradient at ``(z_t, t, t)``. Its velocity, optionally with classifier-free guidance of its own,

.. math::
    v_T = u_T(z_t, t, t \mid \varnothing) + s\,\big(u_T(z_t, t, t \mid c) - u_T(z_t, t, t \mid \varnothing)\big)
    \quad (t_{min} \le t \le t_{max}), \qquad v_T = u_T(z_t, t, t \mid c) \text{ elsewhere},

replaces the conditional velocity :math:`e - x` everywhere: in the target and, through training-time guidance
(:class:`~meanflow_losses.guidance.TrainingGuidance`, applied on top), as the JVP tangent. Rows whose condition is
dropped by the student's guidance get the teacher's velocity at the null condition, i.e. its unconditional
velocity. It composes with ``target_model`` (the student's no-grad passes), DDP (the teacher is a separate, frozen
module) and bf16 autocast (the teacher runs in the ambient precision, its velocity is cast to the data's dtype).

``v_target`` differs: it is a tensor computed by the caller (e.g. the marginal velocity of an oracle), with no
guidance of its own and no knowledge of dropped rows.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from meanflow_losses._validate import check_interval, check_real, compiling
from meanflow_losses.adapters import check_protocol
from meanflow_losses.conditioning import Conditioning
from meanflow_losses.conventions import append_dims
from meanflow_losses.passes import modules_of, no_grad_call

__all__ = ["Teacher", "as_teacher", "teacher_velocity"]


@dataclass(frozen=True)
class Teacher:
    """A frozen teacher velocity, optionally guided.

    Args:
        model: ``model(z, r, t, **model_kwargs)``, called with ``r = t`` (wrap a flow-matching network of
            ``(z, t)`` with :func:`~meanflow_losses.adapters.from_velocity_net`).
        guidance_scale: Classifier-free guidance scale :math:`s` of the teacher (1: no guidance).
        interval: ``(t_min, t_max)``: the guidance applies where ``t_min <= t <= t_max``.
        null_condition: ``model_kwargs -> model_kwargs`` giving the teacher's null condition (required when
            ``guidance_scale != 1``), e.g. ``mfl.null_class(1000)``.
    """

    model: Callable[..., Tensor]
    guidance_scale: float = 1.0
    interval: tuple[float, float] = (0.0, 1.0)
    null_condition: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        check_protocol(self.model, "teacher.model")
        check_real("teacher.guidance_scale", self.guidance_scale)
        object.__setattr__(self, "interval", check_interval("teacher.interval", self.interval))
        if self.guidance_scale != 1.0 and self.null_condition is None:
            raise ValueError("teacher.null_condition is required when guidance_scale != 1 (the unconditional branch)")
        if self.null_condition is not None and not callable(self.null_condition):
            raise TypeError(f"teacher.null_condition must be callable, got {type(self.null_condition).__name__}")

    @property
    def guided(self) -> bool:
        """Whether the teacher applies classifier-free guidance of its own."""
        return self.guidance_scale != 1.0


def as_teacher(teacher: Any) -> Teacher | None:
    """``None``, a :class:`Teacher`, or a bare network (wrapped as an unguided teacher)."""
    if teacher is None or isinstance(teacher, Teacher):
        return teacher
    if not callable(teacher):
        raise TypeError(f"teacher must be a Teacher or a network model(z, r, t, **kw), got {type(teacher).__name__}")
    return Teacher(teacher)


_WARNED_TRAIN_MODE: set[int] = set()


def teacher_velocity(teacher: Teacher, z: Tensor, t: Tensor, cond: Conditioning, dtype: torch.dtype) -> Tensor:
    r"""The teacher's (guided) velocity :math:`v_T` at ``(z_t, t)``, no gradient, shape of ``z``.

    Args:
        teacher: The teacher.
        z: ``z_t``, shape ``(B, *D)``.
        t: Times ``(B,)``.
        cond: The conditioning after the student's condition dropout (dropped rows hold the null condition).
        dtype: Output dtype (the data's).

    Returns:
        :math:`v_T`, shape ``(B, *D)``, detached.
    """
    if not compiling():
        for module in modules_of(teacher.model):
            if module.training and id(module) not in _WARNED_TRAIN_MODE:
                _WARNED_TRAIN_MODE.add(id(module))
                from meanflow_losses.model_checks import MeanFlowWarning

                warnings.warn(
                    "the teacher is in train mode (dropout or BatchNorm would make its velocity random or batch-"
                    "dependent): call teacher.eval() (and requires_grad_(False)) once",
                    MeanFlowWarning,
                    stacklevel=4,
                )
    model = teacher.model
    if not teacher.guided:
        return no_grad_call(model, z, t, t, cond, who="teacher").to(dtype).detach()
    assert teacher.null_condition is not None
    null = cond.replace(teacher.null_condition(dict(cond.kwargs)), "teacher.null_condition")
    batch = z.shape[0]
    z2, t2 = torch.cat([z, z]), torch.cat([t, t])
    both = no_grad_call(model, z2, t2, t2, cond.concat(null), who="teacher")
    u_c, u_u = both[:batch].to(dtype), both[batch:].to(dtype)
    lo, hi = teacher.interval
    inside = append_dims((t >= lo) & (t <= hi), u_c)
    guided = u_u + teacher.guidance_scale * (u_c - u_u)
    return torch.where(inside, guided, u_c).detach()
