"""Objective settings whose values are pinned in ``official_settings.json`` (float64, fixed draws).

The objectives reproduce the official alpha-Flow, py-meanflow and MeanFlow JAX codes on identical draws; these
golden values were recorded from the package when that agreement was established, so that a change to the engine
(row handling, conditioning, guards) provably leaves every official setting's loss and gradient unchanged.
Regenerate only for a deliberate change of the mathematics: ``python -m tests.golden.cases --write``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import meanflow_losses as mfl
from tests.nets import MLP

F64 = torch.float64
PATH = Path(__file__).with_name("official_settings.json")
NUM_CLASSES = 5


def draws(batch: int = 32, dim: int = 3, seed: int = 0, equal: float = 0.25) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g, dtype=F64)
    e = torch.randn(batch, dim, generator=g, dtype=F64)
    t = torch.rand(batch, generator=g, dtype=F64) * 0.8 + 0.1
    r = t * torch.rand(batch, generator=g, dtype=F64) * 0.9
    n_eq = int(equal * batch)
    r[:n_eq] = t[:n_eq]
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g)
    drop = torch.rand(batch, generator=g) < 0.2
    lam = torch.rand(batch, generator=g, dtype=F64)
    return {"x": x, "noise": e, "t": t, "r": r, "y": y, "drop_mask": drop, "lam": lam}


def model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP(dim=3, width=16, n_classes=NUM_CLASSES).double()


def _guidance(**kw: Any) -> mfl.TrainingGuidance:
    return mfl.TrainingGuidance(null_condition=mfl.null_class(NUM_CLASSES), **kw)


# name -> (objective factory, step, uses labels/guidance drop mask, uses lam)
CASES: dict[str, tuple[Callable[[], Any], int | None, bool, bool]] = {
    "fm": (lambda: mfl.FlowMatchingLoss(), None, False, False),
    "fm_guided": (lambda: mfl.FlowMatchingLoss(guidance=_guidance(omega=0.6, kappa=0.2)), None, True, False),
    "meanflow_default": (lambda: mfl.MeanFlowLoss(), None, False, False),
    "meanflow_joint": (lambda: mfl.MeanFlowLoss(jvp="joint"), None, False, False),
    "meanflow_official_imagenet": (
        lambda: mfl.MeanFlowLoss(
            weighting=mfl.AdaptiveWeight(p=1.0, c=0.01), reduction="sum", guidance=_guidance(omega=1.0, kappa=0.5)
        ),
        None,
        True,
        False,
    ),
    "meanflow_guided_interval": (
        lambda: mfl.MeanFlowLoss(guidance=_guidance(omega=0.5, kappa=0.3, interval=(0.2, 0.7))),
        None,
        True,
        False,
    ),
    "meanflow_imf": (
        lambda: mfl.MeanFlowLoss(tangent="model", compound=True, aux_velocity_weight=0.5),
        None,
        False,
        False,
    ),
    "meanflow_decompose": (lambda: mfl.MeanFlowLoss(decompose=True), None, False, False),
    "kim_accelerated": (lambda: mfl.presets.accelerated_meanflow(1000), 250, False, False),
    "alphaflow_b2_consistency": (lambda: mfl.presets.alphaflow_preset("B/2"), 200_000, False, False),
    "alphaflow_b2_meanflow": (lambda: mfl.presets.alphaflow_preset("B/2"), 400_000, False, False),
    "alphaflow_b2cfg": (
        lambda: mfl.presets.alphaflow_preset("B/2-cfg", null_condition=mfl.null_class(NUM_CLASSES)),
        600_000,
        True,
        False,
    ),
    "alphaflow_xl2cfg_tfm": (
        lambda: mfl.presets.alphaflow_preset("XL/2-cfg", null_condition=mfl.null_class(NUM_CLASSES)),
        100_000,
        True,
        False,
    ),
    "alphaflow_xl2cfg_consistency": (
        lambda: mfl.presets.alphaflow_preset("XL/2-cfg", null_condition=mfl.null_class(NUM_CLASSES)),
        800_000,
        True,
        False,
    ),
    "alphaflow_inverse_scale": (lambda: mfl.AlphaFlowLoss(alpha=0.3, alpha_scale="inverse"), None, False, False),
    "splitmeanflow": (lambda: mfl.SplitMeanFlowLoss(), None, False, True),
    "shortcut": (lambda: mfl.ShortcutLoss(lam=0.5), None, False, False),
}


def grad_summary(flat: torch.Tensor) -> list[float]:
    """The gradient's norm, its first 16 entries and 8 fixed random projections (detects any change)."""
    proj = torch.randn(8, flat.numel(), generator=torch.Generator().manual_seed(123), dtype=F64)
    return [flat.norm().item(), *flat[:16].tolist(), *(proj @ flat).tolist()]


def evaluate(name: str) -> dict[str, Any]:
    factory, step, guided, uses_lam = CASES[name]
    d = draws()
    net = model()
    kwargs: dict[str, Any] = {"t": d["t"], "r": d["r"], "noise": d["noise"], "model_kwargs": {"y": d["y"]}}
    if guided:
        kwargs["drop_mask"] = d["drop_mask"]
    if uses_lam:
        kwargs["lam"] = d["lam"]
    if step is not None:
        kwargs["step"] = step
    out = factory()(net, d["x"], **kwargs)
    grads = torch.autograd.grad(out.loss, list(net.parameters()))
    flat = torch.cat([g.reshape(-1) for g in grads])
    rec = {"loss": out.loss.item(), "per_sample": out.per_sample.tolist(), "grad": grad_summary(flat)}
    if out.decomposition is not None:
        rec["decomposition"] = {k: v.item() for k, v in out.decomposition.items()}
    return rec


def main(argv: list[str]) -> None:
    if "--write" not in argv:
        raise SystemExit("usage: python -m tests.golden.cases --write")
    PATH.write_text(json.dumps({name: evaluate(name) for name in CASES}, indent=None) + "\n")
    print(f"wrote {PATH}")


if __name__ == "__main__":
    main(sys.argv[1:])
