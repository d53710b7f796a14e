"""Gradient conflict of MeanFlow's two halves during training on the 2-D checkerboard (alpha-Flow's finding).

Trains MeanFlow from scratch on the checkerboard with a small MLP (low-frequency embeddings of t and t - r),
measures every ``--every`` steps the cosine similarities between the parameter gradients of L_TFM, L_FM'
and L_TCc (``MeanFlowLoss(decompose=True)`` + ``meanflow_losses.diagnostics``), prints their mean and
5th/95th percentiles and saves the cosine-over-training figure.

Usage:
    python benchmarks/conflict_figure.py                       # 2000 steps, figure in docs/figures/
    python benchmarks/conflict_figure.py --steps 1000 --out /tmp/conflict.png
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import meanflow_losses as mfl

PAIRS = [("tfm", "tcc"), ("fm_border", "tcc"), ("tfm", "fm_border")]
LABELS = {
    ("tfm", "tcc"): r"cos($\nabla L_{TFM}$, $\nabla L_{TCc}$)",
    ("fm_border", "tcc"): r"cos($\nabla L_{FM'}$, $\nabla L_{TCc}$)",
    ("tfm", "fm_border"): r"cos($\nabla L_{TFM}$, $\nabla L_{FM'}$)",
}


def checkerboard(n: int, g: torch.Generator) -> torch.Tensor:
    """2-D checkerboard on [-2, 2]^2 (8 of 16 unit squares)."""
    x1 = torch.rand(n, generator=g) * 4 - 2
    x2 = torch.rand(n, generator=g) - 2 * torch.randint(0, 2, (n,), generator=g).float() + torch.floor(x1) % 2
    return torch.stack([x1, x2], dim=1)


def features(t: torch.Tensor, dim: int = 16, max_freq: float = 8.0) -> torch.Tensor:
    """Sinusoidal features of t with frequencies 1 .. max_freq rad per unit time (low frequency on purpose)."""
    freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), dim // 2, dtype=t.dtype))
    ang = t[:, None] * freqs
    return torch.cat([ang.sin(), ang.cos()], dim=1)


class ToyMLP(nn.Module):
    """u(z, r, t) on 2-D data: an MLP on (z, emb(t), emb(t - r))."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(2 + 32, width), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 2))

    def forward(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, features(t), features(t - r)], dim=1))


def run(args: argparse.Namespace) -> mfl.diagnostics.ConflictTracker:
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = ToyMLP(args.width, args.depth)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    mf = mfl.MeanFlowLoss(
        times=mfl.TimePairSampler("uniform", equal_fraction=args.equal_fraction),
        weighting=mfl.AdaptiveWeight(p=1.0, c=1e-3),
        reduction="sum",
    )
    tracker = mfl.diagnostics.ConflictTracker(every=args.every)
    start = time.perf_counter()
    for step in range(args.steps):
        mf.decompose = tracker.due(step)  # build the decomposition only when it is measured
        out = mf(model, checkerboard(args.batch, g), generator=g, step=step)
        tracker.maybe_measure(step, model, out.decomposition)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s")
    return tracker


def window_stats(tracker: mfl.diagnostics.ConflictTracker, pair: tuple[str, str], upto: int) -> dict[str, float]:
    steps, values = tracker.history(*pair)
    sel = values[(steps < upto) & np.isfinite(values)]
    return {
        "mean": float(sel.mean()),
        "p5": float(np.percentile(sel, 5)),
        "p95": float(np.percentile(sel, 95)),
        "frac_negative": float((sel < 0).mean()),
        "count": int(sel.size),
    }


def plot(tracker: mfl.diagnostics.ConflictTracker, path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=130)
    for pair, color in zip(PAIRS, ("tab:red", "tab:blue", "tab:gray"), strict=True):
        steps, values = tracker.history(*pair)
        ax.plot(steps, values, ".", color=color, alpha=0.25, markersize=3)
        k = min(window, len(values))
        smooth = np.convolve(values, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, "-", color=color, lw=1.8, label=LABELS[pair])
    ax.axhline(0.0, color="black", lw=0.8)
    ax.axhline(-0.4, color="tab:red", lw=0.8, ls="--", label="-0.4 (alpha-Flow, ImageNet)")
    ax.set_xlabel("training step")
    ax.set_ylabel("gradient cosine")
    ax.set_ylim(-1.05, 1.05)
    ax.set_title("MeanFlow on the 2-D checkerboard: gradient conflict of TFM and TCc")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=7, frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"figure: {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--equal-fraction", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs/figures/conflict_cosine.png")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    tracker = run(args)
    results = {}
    for pair in PAIRS:
        name = f"cos({pair[0]},{pair[1]})"
        results[name] = {
            "first_1000": window_stats(tracker, pair, 1000),
            "all": window_stats(tracker, pair, args.steps),
        }
        for window, s in results[name].items():
            print(
                f"{name:24s} {window:10s} mean {s['mean']:+.3f}  p5 {s['p5']:+.3f}  p95 {s['p95']:+.3f}  "
                f"negative {100 * s['frac_negative']:.0f}% of {s['count']}"
            )
    print(json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "results": results}))
    plot(tracker, args.out, window=10)


if __name__ == "__main__":
    main()
