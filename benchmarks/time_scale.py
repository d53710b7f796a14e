r"""The ``t * 1000`` frequency question: what diffusers' timestep convention does to MeanFlow's JVP.

diffusers' flow-matching models embed ``timestep = 1000 t`` with sinusoids of angular frequencies up to 1 per
timestep unit, i.e. up to 1000 rad per unit of ``t``. MeanFlow's target contains
:math:`du/dt = \partial_z u\,v + \partial_t u`, whose :math:`\partial_t u` carries that factor. This script builds a
tiny ``UNet2DModel`` (interval routed to its ``class_embed_type="timestep"`` embedding) and a tiny
``DiTTransformer2DModel`` through :func:`meanflow_losses.diffusers.from_diffusers` with ``timestep_scale`` 1000 and 1,
and measures, at initialisation and after flow-matching pretraining on a toy 8 x 8 dataset (the "pretrained model" a
MeanFlow fine-tuning would start from):

* ``dudt/u``: :math:`\|du/dt\| / \|u\|` along :math:`(\dot z, \dot r, \dot t) = (e - x, 0, 1)` (the default JVP);
* ``dtu/u``: :math:`\|\partial_t u\| / \|u\|` (tangent on ``t`` only);
* ``osc``: the relative change of :math:`\partial_t u` between :math:`t \pm 10^{-3}` (``check_model``'s
  ``time_oscillation``; above 0.25 it reports ``high_frequency_time``);
* ``warn``: whether the objectives' runtime probe (:class:`meanflow_losses.model_checks.RuntimeChecks`, 3 calls)
  raises its ``MeanFlowWarning``;
* ``fm``: the flow-matching loss at the end of pretraining (the timestep scale should not matter for it).

Usage:
    python benchmarks/time_scale.py              # 300 FM steps per model and scale (about 2-3 minutes on 2 cores)
    python benchmarks/time_scale.py --tiny       # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from typing import Any

import torch
from torch import nn

import meanflow_losses as mfl
from meanflow_losses.conditioning import Conditioning
from meanflow_losses.diffusers import from_diffusers
from meanflow_losses.model_checks import MeanFlowWarning, RuntimeChecks

SCALES = (1000.0, 1.0)


#: A tiny ``UNet2DModel`` with one attention down and up block (GroupNorm after attention), 3 channels, 8 x 8
#: (also the tests' tiny UNet).
TINY_UNET: dict = dict(
    sample_size=8,
    in_channels=3,
    out_channels=3,
    layers_per_block=1,
    block_out_channels=(8, 16),
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=4,
    attention_head_dim=8,
)


def build(name: str) -> tuple[nn.Module, int]:
    """A tiny diffusers model and its channel count (seeded)."""
    from diffusers import DiTTransformer2DModel, UNet2DModel

    torch.manual_seed(0)
    if name == "unet":
        return UNet2DModel(**TINY_UNET, class_embed_type="timestep"), 3
    net = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=4,
    ).eval()  # eval: its label embedding would drop labels in train mode
    return net, 4


def toy_data(n: int, channels: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Four smooth 8 x 8 prototypes (2 x 2 patterns upsampled) plus 5% noise; labels = prototype index."""
    protos = torch.nn.functional.interpolate(
        torch.randn(4, channels, 2, 2, generator=torch.Generator().manual_seed(123)), size=(8, 8), mode="bilinear"
    )
    y = torch.randint(0, 4, (n,), generator=g)
    return protos[y] + 0.05 * torch.randn(n, channels, 8, 8, generator=g), y


def measure(model: nn.Module, x: torch.Tensor, kw: dict[str, Any], g: torch.Generator) -> dict[str, Any]:
    """JVP ratios, the check_model oscillation and whether the runtime probe warns (model unchanged)."""
    n = x.shape[0]
    e = torch.randn(x.shape, generator=g)
    t = 0.1 + 0.8 * torch.rand(n, generator=g)
    r = t * (0.2 + 0.6 * torch.rand(n, generator=g))
    tt = t.view(-1, 1, 1, 1)
    z, v = (1 - tt) * x + tt * e, e - x
    with torch.no_grad():
        u = model(z, r, t, **kw)
    dudt = mfl.time_derivative(model, z, r, t, v, kw).dudt
    dtu = mfl.time_derivative(model, z, r, t, torch.zeros_like(v), kw).dudt
    report = mfl.check_model(model, x, model_kwargs=kw, generator=torch.Generator().manual_seed(0), rows=4)
    checks = RuntimeChecks(calls=3, rows=4)
    cond = Conditioning.from_kwargs(kw, n)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            checks(model, z, r, t, v, cond, strategy="nograd", fd_eps=None, objective="MeanFlow")
    fired = sorted(checks.warned) if any(issubclass(w.category, MeanFlowWarning) for w in caught) else []
    return {
        "dudt/u": float(dudt.norm() / u.norm()),
        "dtu/u": float(dtu.norm() / u.norm()),
        "osc": report.measurements.get("time_oscillation", float("nan")),
        "check_model": report.codes("error"),
        "warn": fired,
    }


def pretrain(model: nn.Module, channels: int, steps: int, batch: int, g: torch.Generator, labels: bool) -> float:
    """Flow matching on the toy data; returns the mean FM loss of the last 20% of the steps."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    fm = mfl.FlowMatchingLoss()
    tail: list[float] = []
    for step in range(steps):
        x, y = toy_data(batch, channels, g)
        out = fm(model, x, model_kwargs={"class_labels": y} if labels else None, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if step >= steps - max(1, steps // 5):
            tail.append(float(out.loss.detach()))
    return sum(tail) / len(tail)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every model x scale: measure at init, pretrain by flow matching, measure again."""
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    for name in args.models:
        base, channels = build(name)
        for scale in SCALES:
            t0 = time.perf_counter()
            net = copy.deepcopy(base)
            model = from_diffusers(net, timestep_scale=scale)
            g = torch.Generator().manual_seed(1)
            x, y = toy_data(args.eval_batch, channels, torch.Generator().manual_seed(2))
            kw = {"class_labels": y} if name == "dit" else {}
            row: dict[str, Any] = {"init": measure(model, x, kw, torch.Generator().manual_seed(3))}
            row["fm"] = pretrain(model, channels, args.steps, args.batch, g, labels=name == "dit")
            row["trained"] = measure(model, x, kw, torch.Generator().manual_seed(3))
            row["seconds"] = round(time.perf_counter() - t0, 1)
            results[f"{name}@{scale:g}"] = row
            print(f"{name} timestep_scale={scale:g}: {json.dumps(row)}", flush=True)
    return results


def table(results: dict[str, Any], steps: int) -> str:
    """A markdown table of the results."""
    lines = [
        f"| model | timestep_scale | dudt/u init | dudt/u after {steps} FM steps | dtu/u init | dtu/u trained "
        "| osc init / trained | runtime warning init / trained | FM loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, row in results.items():
        name, scale = key.split("@")
        a, b = row["init"], row["trained"]

        def w(m: dict[str, Any]) -> str:
            return ",".join(m["warn"]) or "none"

        lines.append(
            f"| {name} | {scale} | {a['dudt/u']:.3g} | {b['dudt/u']:.3g} | {a['dtu/u']:.3g} | {b['dtu/u']:.3g} | "
            f"{a['osc']:.2f} / {b['osc']:.2f} | {w(a)} / {w(b)} | {row['fm']:.4f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse the arguments, run, print the table; returns the results."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="flow-matching pretraining steps per model and scale")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-batch", type=int, default=32)
    p.add_argument("--models", nargs="+", default=["unet", "dit"], choices=["unet", "dit"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiny", action="store_true", help="smoke run: 4 steps, batches of 8")
    p.add_argument("--json", type=str, default=None, help="write the results to this file")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.batch, args.eval_batch = 4, 8, 8
    results = run(args)
    print(table(results, args.steps))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
