r"""Half-life EMA with warm-up, as averaging functions for PyTorch's own ``AveragedModel``.

The package has no EMA class: use :class:`torch.optim.swa_utils.AveragedModel` with one of these functions.
A half-life of :math:`h` updates means the decay :math:`\beta = 2^{-1/h}` (alpha-Flow: ``h = 6931`` steps,
:math:`\beta \approx 0.9999`). With ``warmup_ratio = \rho`` the half-life grows with the number of updates
``n``: :math:`h_n = \min(h, \rho\,n)`, so early averages forget the random initialization quickly
(the ramp-up of Karras et al.'s EDM training code).

Example::

    from torch.optim.swa_utils import AveragedModel
    ema = AveragedModel(model, multi_avg_fn=mfl.ema.ema_multi_avg_fn(6931, warmup_ratio=0.05), use_buffers=True)
    ...
    ema.update_parameters(model)          # after each optimizer step
    loss_fn(model, x, target_model=...)   # an EMA teacher is ema.module (Shortcut models)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from meanflow_losses._validate import check_real

__all__ = ["ema_avg_fn", "ema_decay", "ema_multi_avg_fn"]


def _check(half_life_steps: float, warmup_ratio: float | None) -> None:
    check_real("half_life_steps", half_life_steps, lo=0.0, lo_open=True)
    if warmup_ratio is not None:
        check_real("warmup_ratio", warmup_ratio, lo=0.0, lo_open=True)


def ema_decay(half_life_steps: float, num_updates: int, warmup_ratio: float | None = None) -> float:
    r"""Decay :math:`\beta_n = 2^{-1/h_n}` of the ``num_updates``-th averaging step.

    Args:
        half_life_steps: Half-life :math:`h` in updates (optimizer steps).
        num_updates: Number ``n`` of models averaged so far (``AveragedModel.n_averaged``), ``n >= 0``.
        warmup_ratio: :math:`\rho`; the half-life is :math:`\min(h, \rho\,n)`. ``None``: no warm-up.

    Returns:
        :math:`\beta_n` in ``[0, 1)``; 0 (copy the model) when the warmed-up half-life is 0.
    """
    _check(half_life_steps, warmup_ratio)
    if num_updates < 0:
        raise ValueError(f"num_updates must be >= 0, got {num_updates}")
    h = half_life_steps if warmup_ratio is None else min(half_life_steps, warmup_ratio * num_updates)
    return 0.0 if h <= 0 else 0.5 ** (1.0 / h)


def _device_weight(half_life_steps: float, warmup_ratio: float, num_averaged: Tensor) -> Tensor:
    """``1 - beta_n`` as a 0-dim float64 tensor on ``num_averaged``'s device."""
    h = torch.clamp(num_averaged.to(torch.float64) * warmup_ratio, max=half_life_steps)
    beta = torch.where(h > 0, torch.pow(0.5, 1.0 / h.clamp_min(1e-300)), torch.zeros_like(h))
    return (1.0 - beta).reshape(())


def _averaged(p: Tensor) -> bool:
    """Whether a tensor is averaged (floating and complex ones) or copied from the model.

    Integer and bool tensors (BatchNorm's ``num_batches_tracked``, index tables) are copied: an average of
    integers truncates towards the old value (at a decay of 0.9999 a counter lags the model's by 10^4 updates).
    """
    return p.is_floating_point() or p.is_complex()


def ema_avg_fn(
    half_life_steps: float, *, warmup_ratio: float | None = None
) -> Callable[[Tensor, Tensor, Tensor | int], Tensor]:
    r"""``avg_fn`` for ``AveragedModel``: :math:`\bar\theta \leftarrow \beta_n \bar\theta + (1 - \beta_n)\theta`.

    Integer and bool tensors are copied from the model (an average of integers truncates).

    Args:
        half_life_steps: Half-life :math:`h` in updates.
        warmup_ratio: Optional ramp-up :math:`\rho` (half-life :math:`\min(h, \rho\,n)`).

    Returns:
        ``avg_fn(averaged_param, model_param, num_averaged) -> new averaged_param``.
    """
    _check(half_life_steps, warmup_ratio)

    def avg_fn(averaged_param: Tensor, model_param: Tensor, num_averaged: Tensor | int) -> Tensor:
        if not _averaged(averaged_param):
            return model_param.detach().clone()  # a counter or an index table: copied (see _averaged)
        beta = ema_decay(half_life_steps, int(num_averaged), warmup_ratio)
        return averaged_param + (1.0 - beta) * (model_param - averaged_param)

    return avg_fn


def ema_multi_avg_fn(
    half_life_steps: float, *, warmup_ratio: float | None = None
) -> Callable[[list[Tensor], list[Tensor], Tensor | int], None]:
    r"""``multi_avg_fn`` for ``AveragedModel`` (in place, with ``torch._foreach_lerp_`` on float tensors).

    Same update as :func:`ema_avg_fn`, applied to a whole group of parameters at once; integer and bool tensors
    (with ``use_buffers=True``: BatchNorm's ``num_batches_tracked``) are copied from the model, not averaged.

    Args:
        half_life_steps: Half-life :math:`h` in updates.
        warmup_ratio: Optional ramp-up :math:`\rho`.

    Returns:
        ``multi_avg_fn(averaged_params, model_params, num_averaged) -> None``.
    """
    _check(half_life_steps, warmup_ratio)

    @torch.no_grad()
    def multi_avg_fn(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor | int) -> None:
        kept = {i for i, p in enumerate(averaged) if not _averaged(p)}
        for i in kept:
            averaged[i].copy_(current[i])  # a counter or an index table: copied (see _averaged)
        if kept:
            averaged = [p for i, p in enumerate(averaged) if i not in kept]
            current = [p for i, p in enumerate(current) if i not in kept]
        if not averaged:
            return
        if isinstance(num_averaged, Tensor) and warmup_ratio is not None:
            # decay computed on the tensor's device: no host sync per update (AveragedModel keeps n on device)
            weight_t = _device_weight(half_life_steps, warmup_ratio, num_averaged)
            if all(p.is_floating_point() for p in averaged):
                diffs = torch._foreach_sub(current, averaged)
                torch._foreach_mul_(diffs, weight_t.to(averaged[0].dtype))
                torch._foreach_add_(averaged, diffs)
                return
            weight = float(weight_t)
        else:
            n = 0 if warmup_ratio is None else int(num_averaged)  # the decay does not depend on n without warm-up
            weight = 1.0 - ema_decay(half_life_steps, n, warmup_ratio)
        torch._foreach_lerp_(averaged, current, weight)

    return multi_avg_fn
