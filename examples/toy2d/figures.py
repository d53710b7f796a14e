"""Matplotlib figures of the toy example, each saved as a PNG (the Agg backend; no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from torch import Tensor

__all__ = ["plot_conflict", "plot_samples", "plot_study", "plot_training", "plot_trajectories"]

LIM = 3.0


def _scatter(ax, pts: Tensor | np.ndarray, title: str, color: str = "C0", max_points: int = 8192) -> None:
    pts = np.asarray(pts)[:max_points]  # the sets are i.i.d.: the first points are a fair subsample
    ax.scatter(pts[:, 0], pts[:, 1], s=0.6, alpha=0.35, color=color, linewidths=0, rasterized=True)
    ax.set_xlim(-LIM, LIM)
    ax.set_ylim(-LIM, LIM)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_samples(target: Tensor, samples: Mapping[str, Tensor], path: str | Path, suptitle: str = "") -> Path:
    """Target points beside each labelled sample set (e.g. ``{"1 step (SW2 0.12)": x1, ...}``)."""
    n = 1 + len(samples)
    fig, axes = plt.subplots(1, n, figsize=(2.3 * n, 2.5))
    _scatter(axes[0], target, "target", color="k")
    for ax, (label, pts) in zip(axes[1:], samples.items(), strict=True):
        _scatter(ax, pts, label)
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    return _save(fig, path)


def plot_trajectories(trajectories: Mapping[str, Tensor], target: Tensor, path: str | Path, n_paths: int = 300) -> Path:
    """Sampling paths from noise (grey dots) to samples (blue dots) over the target (light grey), one panel each.

    ``trajectories[label]`` has shape ``(K + 1, N, 2)``: the states of a K-step sampler, noise first.
    """
    n = len(trajectories)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, 3.1), squeeze=False)
    tgt = np.asarray(target)[:8192]
    for ax, (label, traj) in zip(axes[0], trajectories.items(), strict=True):
        tr = np.asarray(traj)[:, :n_paths]
        ax.scatter(tgt[:, 0], tgt[:, 1], s=0.4, color="0.85", linewidths=0, rasterized=True)
        ax.plot(tr[:, :, 0], tr[:, :, 1], color="C1", lw=0.5, alpha=0.5)
        ax.scatter(tr[0, :, 0], tr[0, :, 1], s=2, color="0.4", linewidths=0)
        ax.scatter(tr[-1, :, 0], tr[-1, :, 1], s=2, color="C0", linewidths=0)
        ax.set_xlim(-LIM, LIM)
        ax.set_ylim(-LIM, LIM)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label, fontsize=9)
    return _save(fig, path)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or y.size < window:
        return y
    kernel = np.ones(window) / window
    return np.convolve(np.pad(y, (window - 1, 0), mode="edge"), kernel, mode="valid")


def plot_training(
    steps: Sequence[int],
    losses: Mapping[str, Sequence[float]],
    path: str | Path,
    errors: Mapping[str, Sequence[float]] | None = None,
    alpha: Sequence[float] | None = None,
    title: str = "",
) -> Path:
    """Training curves: the weighted loss(es), optional plain squared errors, and the alpha schedule.

    Each mapping is ``{label: one value per entry of steps}``; NaN entries (a term a regime does not log) are
    skipped. Raw values are drawn thin, a running mean thick; log scale where all values are positive.
    """
    steps_a = np.asarray(steps)
    panels = [("weighted training loss", losses)]
    if errors:
        panels.append(("plain squared error ||u - target||^2", errors))
    fig, axes = plt.subplots(
        1, len(panels) + (alpha is not None), figsize=(4.2 * (len(panels) + 1), 3.0), squeeze=False
    )
    for ax, (ylabel, curves) in zip(axes[0], panels, strict=False):
        for i, (label, values) in enumerate(curves.items()):
            v = np.asarray(values, dtype=float)
            ok = np.isfinite(v)
            if not ok.any():
                continue
            ax.plot(steps_a[ok], v[ok], color=f"C{i}", alpha=0.25, lw=0.6)
            ax.plot(steps_a[ok], _smooth(v[ok], max(1, int(ok.sum()) // 40)), color=f"C{i}", lw=1.4, label=label)
        finite = [np.asarray(v, dtype=float) for v in curves.values()]
        if all(np.all(x[np.isfinite(x)] > 0) for x in finite):
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.legend(fontsize=7)
    axes[0, 0].set_title(title or "training", fontsize=9)
    if alpha is not None:
        ax = axes[0, -1]
        ax.plot(steps_a, np.asarray(alpha, dtype=float), color="C3")
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("step")
        ax.set_ylabel("alpha")
        ax.set_title("alpha schedule (1 = trajectory FM, 0 = MeanFlow)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_conflict(
    steps: Sequence[int], cosines: Mapping[str, Sequence[float]], path: str | Path, window: int = 10, title: str = ""
) -> Path:
    """Gradient cosine between loss terms over training: running mean and 5th-95th percentile band.

    ``cosines[label]`` holds one cosine per entry of ``steps``; the band is taken over a sliding window of
    ``window`` consecutive checks.
    """
    steps_a = np.asarray(steps)
    fig, ax = plt.subplots(figsize=(5.0, 3.0))
    for i, (label, values) in enumerate(cosines.items()):
        v = np.asarray(values, dtype=float)
        w = max(1, min(window, v.size))
        windows = [v[max(0, j - w + 1) : j + 1] for j in range(v.size)]
        mean = np.array([x.mean() for x in windows])
        lo = np.array([np.percentile(x, 5) for x in windows])
        hi = np.array([np.percentile(x, 95) for x in windows])
        ax.fill_between(steps_a, lo, hi, color=f"C{i}", alpha=0.2, linewidth=0)
        ax.plot(
            steps_a,
            mean,
            color=f"C{i}",
            lw=1.4,
            label=f"{label} (mean {v.mean():+.2f}, <0 at {100 * (v < 0).mean():.0f}%)",
        )
    ax.axhline(0.0, color="k", lw=0.6)
    ax.set_ylim(-1, 1)
    ax.set_xlabel("step")
    ax.set_ylabel("cosine of gradients")
    ax.set_title(title or "gradient conflict (band: 5th-95th percentile)", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return _save(fig, path)


def plot_study(
    target: Tensor,
    samples: Mapping[str, Tensor],
    bars: Mapping[str, Sequence[float]],
    baseline: float | None,
    path: str | Path,
    title: str = "",
    baseline_steps: int = 100,
    extra_lines: Mapping[str, float] | None = None,
) -> Path:
    """The study's comparison figure: samples of each method (top; ``samples[label]``) and the 1-step sliced W2
    of each seed per method (bottom; ``bars[label]``, one value per seed) against the FM baseline line and any
    ``extra_lines`` (legend label -> value)."""
    n = 1 + len(samples)
    cols = min(n, 7)  # sample panels wrap onto several rows above the bar chart
    panel_rows = -(-n // cols)
    fig = plt.figure(figsize=(2.3 * cols, 2.9 * (panel_rows + 1)))
    grid = fig.add_gridspec(panel_rows + 1, cols)
    _scatter(fig.add_subplot(grid[0, 0]), target, "target", color="k")
    for i, (label, pts) in enumerate(samples.items(), start=1):
        _scatter(fig.add_subplot(grid[i // cols, i % cols]), pts, label)
    ax = fig.add_subplot(grid[panel_rows, :])
    names = list(bars)
    for i, name in enumerate(names):
        vals = np.asarray(bars[name], dtype=float)
        ax.bar(i, vals.mean(), color=f"C{i + 1}", alpha=0.6)
        ax.scatter(np.full(vals.size, i), vals, color="k", s=12, zorder=3)
    if baseline is not None:
        ax.axhline(baseline, color="k", ls="--", lw=1, label=f"FM {baseline_steps}-step Euler ({baseline:.3f})")
        ax.axhline(1.5 * baseline, color="C3", ls=":", lw=1, label=f"1.5x FM {baseline_steps}-step (target)")
    for j, (name, value) in enumerate((extra_lines or {}).items()):
        ax.axhline(value, color="0.4", ls=("-." if j % 2 == 0 else "--"), lw=1, label=f"{name} ({value:.3f})")
    if baseline is not None or extra_lines:
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(names)), names, fontsize=7, rotation=20, ha="right")
    ax.set_ylabel("sliced W2, 1 step (dots: seeds)")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
