"""Cost of one forward-mode call against the same call on plain tensors, with PyTorch's rules and with the routes.

    python benchmarks/tangent_rules.py            # the operators of meanflow_losses.tangent_rules (~1 min, CPU)
    python benchmarks/tangent_rules.py --tiny     # seconds: the CI smoke run (numbers meaningless)

Each row times ``op(dual)`` under ``torch.no_grad`` in a dual level, once with PyTorch's own forward-AD rule and
once inside :func:`meanflow_losses.forward_ad.forward_ad_context` (the explicit rules), interleaved with the plain
call ``op(x)``; the figures are medians over rounds of (call / plain call of the same round). Shapes are those of
the benchmark DiT's activations (64 x 64 x 192) and of a U-Net's (8 x 128 x 16 x 16).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from meanflow_losses.forward_ad import forward_ad_context


def cases(tiny: bool) -> dict[str, tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]:
    """Name -> (input, op): the calls whose PyTorch rule takes the zero-tensor path, and two that do not."""
    g = torch.Generator().manual_seed(0)
    tok = (2, 4, 8) if tiny else (64, 64, 192)
    img = (2, 8, 4, 4) if tiny else (8, 128, 16, 16)
    x, y = torch.randn(tok, generator=g), torch.randn(tok, generator=g)
    w = torch.randn(tok[-1], generator=g)
    c = torch.randn(tok[0], 1, tok[-1], generator=g)
    im = torch.randn(img, generator=g)
    wc = torch.randn(img[1], generator=g)
    rm, rv = torch.randn(img[1], generator=g), torch.rand(img[1], generator=g) + 0.5
    lin = torch.randn(tok[-1], tok[-1], generator=g)
    return {
        "x + pos (parameter)": (x, lambda a: a + w),
        "x - y": (x, lambda a: a - y),
        "x * c (broadcast)": (x, lambda a: a * c),
        "x * 2.0": (x, lambda a: a * 2.0),
        "y / x": (x, lambda a: y / a),
        "linear": (x, lambda a: F.linear(a, lin)),
        "silu": (x, F.silu),
        "gelu tanh": (x, lambda a: F.gelu(a, approximate="tanh")),
        "layer_norm": (x, lambda a: F.layer_norm(a, (tok[-1],))),
        "layer_norm affine": (x, lambda a: F.layer_norm(a, (tok[-1],), w, w)),
        "rms_norm weight": (x, lambda a: F.rms_norm(a, (tok[-1],), w)),
        "group_norm affine": (im, lambda a: F.group_norm(a, 8, wc, wc)),
        "batch_norm eval": (im, lambda a: F.batch_norm(a, rm, rv, wc, wc, False)),
        "x * y (two duals)": (x, lambda a: a * (a + 1.0)),
    }


def measure(x: torch.Tensor, op: Callable[[torch.Tensor], torch.Tensor], rounds: int, per: int) -> dict[str, float]:
    """Median per-round ratios (PyTorch's rule / plain, routed / plain) and the plain call's time in ms.

    Each timed block enters its contexts (``no_grad``, the dual level, the routes) once and runs ``per`` calls.
    """
    dx = torch.randn_like(x)

    def plain() -> None:
        with torch.no_grad():
            for _ in range(per):
                op(x)

    def pytorch() -> None:
        with torch.no_grad(), fwAD.dual_level():
            d = fwAD.make_dual(x, dx)
            for _ in range(per):
                op(d)

    def routed() -> None:
        with torch.no_grad(), fwAD.dual_level(), forward_ad_context("math"):
            d = fwAD.make_dual(x, dx)
            for _ in range(per):
                op(d)

    fns = {"plain": plain, "pytorch": pytorch, "routed": routed}
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) / per)
    out = {k: statistics.median(a / b for a, b in zip(times[k], times["plain"], strict=True)) for k in fns}
    return {"pytorch": out["pytorch"], "routed": out["routed"], "plain_ms": statistics.median(times["plain"]) * 1e3}


def run(rounds: int, per: int, tiny: bool) -> dict[str, dict[str, float]]:
    """Every call of :func:`cases`."""
    return {name: measure(x, op, rounds, per) for name, (x, op) in cases(tiny).items()}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (the median of per-round ratios)")
    p.add_argument("--per-round", type=int, default=10, help="calls per variant per round")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, one round: a smoke run for CI")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    a = p.parse_args(argv)
    rounds, per = (1, 1) if a.tiny else (a.rounds, a.per_round)
    res = run(rounds, per, a.tiny)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}: one call x the plain call")
    print(f"{'call':24s} {'plain ms':>9s} {'pytorch':>8s} {'routed':>8s}")
    for name, r in res.items():
        print(f"{name:24s} {r['plain_ms']:9.3f} {r['pytorch']:8.1f} {r['routed']:8.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
