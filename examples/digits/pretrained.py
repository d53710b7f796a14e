"""From a pretrained flow-matching DiT to a one-step digit generator: fine-tune, distil or reflow?

    python -m examples.digits.pretrained --jobs 2     # 3 seeds, FM 1000 steps + 1000 per path (~25 min, 2 cores)
    python -m examples.digits.pretrained --quick      # 1 seed, 30 + 30 steps: a smoke run (numbers meaningless)

Per seed: the classifier of the digits example, then a flow-matching (FM) DiT pretrained for ``--pretrain`` steps
with the example's training-time guidance (so its conditional velocity is the guided one, scale 2). Then MeanFlow
for ``--steps`` more steps along three paths, against MeanFlow from scratch for ``--pretrain + --steps`` steps:

* **fine-tune**: MeanFlow started from the FM DiT's weights (the DiT already embeds ``t - r``; FM only trained it
  at 0), with the example's guidance;
* **distil**: started from the FM DiT and with it as a frozen ``teacher=``: its (already guided) velocity replaces
  ``e - x``; the student's guidance only drops labels (omega 1, kappa 0), so dropped rows learn the teacher's
  unconditional velocity;
* **reflow**: started from the FM DiT, trained on reflow pairs (``mfl.couplings.reflow_pairs``: for every training
  label a noise row and its 50-step teacher ODE endpoint), without guidance (the pairs are guided samples).

Reported per run (1 and 2 steps; the FM DiT by 50 Euler steps): the classifier's accuracy on 144 generated digits
per class and the Frechet distance of their classifier features to the held-out real digits. The table goes to
``--out`` as ``digits_pretrained.md``, with the per-seed figures in ``digits_pretrained.json`` and a figure
(one-step FD per path and seed; the first seed's digits of every run) in ``figures/digits_pretrained.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

import meanflow_losses as mfl
from examples.cli import HelpFormatter, Range
from examples.digits.classifier import accuracy, frechet_distance, train_classifier
from examples.digits.data import NUM_CLASSES, load_digits
from examples.digits.train import DigitsConfig, NullLabel, _train_generator, draw_digits, generate

__all__ = ["PATHS", "main", "run_seed", "save_figure", "write_report"]

FM_LABEL = "FM (pretrained, Euler)"
PATHS = ("MeanFlow from scratch", "MeanFlow fine-tune", "MeanFlow distil", "MeanFlow reflow")


def _guidance(cfg: DigitsConfig, omega: float, kappa: float, drop_prob: float) -> mfl.TrainingGuidance | None:
    if drop_prob == 0.0 and kappa == 0.0 and omega == 1.0:
        return None
    return mfl.TrainingGuidance(omega=omega, kappa=kappa, drop_prob=drop_prob, null_condition=NullLabel(NUM_CLASSES))


def _meanflow(cfg: DigitsConfig, guidance: mfl.TrainingGuidance | None) -> mfl.MeanFlowLoss:
    return mfl.MeanFlowLoss(
        times=mfl.TimePairSampler(cfg.time_dist, equal_fraction=cfg.equal_fraction),
        weighting=mfl.AdaptiveWeight(p=cfg.weight_p, c=1e-3),
        reduction="sum",
        guidance=guidance,
    )


GRID_PER_CLASS = 8  # digits per class kept from each run's samples for the figure


def _evaluate(
    model: torch.nn.Module, clf: Any, ref: torch.Tensor, cfg: DigitsConfig, steps: int, velocity_only: bool = False
) -> tuple[dict[str, float], torch.Tensor]:
    """Metrics of ``per_class`` digits per class sampled in ``steps`` steps, and the first digits of each class."""
    x, y = generate(model, cfg.per_class, steps, cfg.seed, velocity_only=velocity_only)
    acc, per_class = accuracy(clf, x, y)
    k = min(GRID_PER_CLASS, cfg.per_class)
    grid = x.view(NUM_CLASSES, cfg.per_class, *x.shape[1:])[:, :k].reshape(NUM_CLASSES * k, *x.shape[1:])
    metrics = {"accuracy": acc, "min_class_accuracy": min(per_class), "frechet": frechet_distance(clf.features(x), ref)}
    return metrics, grid.clone()


def run_seed(cfg: DigitsConfig, pretrain: int, steps: int) -> dict[str, Any]:
    """Every run of one seed (``cfg.seed``).

    Returns:
        ``{label: {"1": metrics, "2": metrics, "grid": (10 * k, 1, 8, 8) one-step digits, "seconds": s, "steps": n}}``
        (the FM row has ``"many"``, its ``sample_steps``-step metrics, instead of ``"1"`` and ``"2"``).
    """
    torch.set_num_threads(cfg.threads)
    data = load_digits(seed=0)
    clf = train_classifier(data.x_train, data.y_train, steps=cfg.classifier_steps, seed=cfg.seed)
    ref = clf.features(data.x_test)
    x, y = data.x_train, data.y_train
    guided = _guidance(cfg, cfg.omega, cfg.kappa, cfg.drop_prob)
    out: dict[str, Any] = {}

    t0 = time.perf_counter()
    fm_loss = mfl.FlowMatchingLoss(
        times=mfl.TimeSampler(cfg.time_dist), weighting=mfl.AdaptiveWeight(p=0.0), reduction="mean", guidance=guided
    )
    fm, _ = _train_generator(cfg, fm_loss, pretrain, x, y, "FM DiT")
    fm_metrics, fm_grid = _evaluate(fm, clf, ref, cfg, cfg.fm_sample_steps, True)
    out[FM_LABEL] = {
        "many": fm_metrics,
        "grid": fm_grid,
        "sample_steps": cfg.fm_sample_steps,
        "seconds": time.perf_counter() - t0,
        "steps": pretrain,
    }
    init = {k: v.clone() for k, v in fm.state_dict().items()}
    teacher = fm.eval().requires_grad_(False)

    def record(label: str, model: torch.nn.Module, t_start: float, n: int) -> None:
        one, grid = _evaluate(model, clf, ref, cfg, 1)
        two, _ = _evaluate(model, clf, ref, cfg, 2)
        out[label] = {"1": one, "2": two, "grid": grid, "seconds": time.perf_counter() - t_start, "steps": n}

    t0 = time.perf_counter()
    model, _ = _train_generator(cfg, _meanflow(cfg, guided), pretrain + steps, x, y, "MeanFlow from scratch")
    record("MeanFlow from scratch", model, t0, pretrain + steps)
    t0 = time.perf_counter()
    model, _ = _train_generator(cfg, _meanflow(cfg, guided), steps, x, y, "MeanFlow fine-tune", init=init)
    record("MeanFlow fine-tune", model, t0, steps)
    t0 = time.perf_counter()
    drop_only = _guidance(cfg, 1.0, 0.0, cfg.drop_prob)
    model, _ = _train_generator(
        cfg, _meanflow(cfg, drop_only), steps, x, y, "MeanFlow distil", init=init, teacher=teacher
    )
    record("MeanFlow distil", model, t0, steps)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(20_011 + cfg.seed)
    noise = torch.randn(x.shape, generator=g)
    x_reflow = mfl.couplings.reflow_pairs(teacher, noise, steps=cfg.fm_sample_steps, model_kwargs={"y": y})
    model, _ = _train_generator(
        cfg, _meanflow(cfg, None), steps, x_reflow, y, "MeanFlow reflow", init=init, noise=noise
    )
    record("MeanFlow reflow", model, t0, steps)
    return out


def _fmt(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def write_report(
    per_seed: list[dict[str, Any]],
    seeds: list[int],
    pretrain: int,
    steps: int,
    out: Path,
    command: str,
    per_class: int = 144,
) -> Path:
    """The markdown table of every run over seeds; returns its path."""
    lines = [
        f"# From pretrained FM to one step: digits (FM {pretrain} steps, then {steps} per path)",
        "",
        f"Command: `{command}`. Seeds {', '.join(map(str, seeds))}; mean ± standard deviation over seeds. "
        f"Accuracy: the example's classifier on {per_class} generated digits per class; FD: Frechet distance "
        "of their classifier features to the 360 held-out real digits (lower is better). MeanFlow from "
        f"scratch trains {pretrain + steps} steps, each path {steps} after {pretrain} FM steps (equal total "
        "steps).",
        "",
        "| run | steps | accuracy 1 step | FD 1 step | accuracy 2 steps | FD 2 steps | s/run |",
        "|---|---|---|---|---|---|---|",
    ]
    fm = FM_LABEL
    rows = [fm, *PATHS]
    for label in rows:
        recs = [s[label] for s in per_seed]
        secs = statistics.mean(r["seconds"] for r in recs)
        if label == fm:
            acc, fd = _fmt([r["many"]["accuracy"] for r in recs]), _fmt([r["many"]["frechet"] for r in recs], 1)
            n = recs[0]["sample_steps"]
            lines.append(
                f"| {label} | {recs[0]['steps']} | {acc} ({n} steps) | {fd} ({n} steps) | — | — | {secs:.0f} |"
            )
            continue
        cells = [
            _fmt([r[k][m] for r in recs], 3 if m == "accuracy" else 1)
            for k in ("1", "2")
            for m in ("accuracy", "frechet")
        ]
        lines.append(f"| {label} | {recs[0]['steps']} | " + " | ".join(cells) + f" | {secs:.0f} |")
    lines.append("")
    scratch = [s["MeanFlow from scratch"]["1"]["frechet"] for s in per_seed]
    for label in PATHS[1:]:
        fds = [s[label]["1"]["frechet"] for s in per_seed]
        better = sum(a < b for a, b in zip(fds, scratch, strict=True))
        verdict = "pays off" if better == len(fds) else "does not pay off" if better == 0 else "is mixed"
        lines.append(
            f"- {label[len('MeanFlow ') :]} {verdict} at equal total steps: 1-step FD "
            f"{statistics.mean(fds):.1f} against {statistics.mean(scratch):.1f} from scratch, lower on "
            f"{better} of {len(fds)} seed(s)."
        )
    lines += [
        "",
        "![paths](figures/digits_pretrained.png)",
        "",
        "Per-seed figures: `digits_pretrained.json` beside this page.",
        "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "command": command,
        "seeds": seeds,
        "pretrain": pretrain,
        "steps": steps,
        "runs": [{label: {k: v for k, v in rec.items() if k != "grid"} for label, rec in s.items()} for s in per_seed],
    }
    (out / "digits_pretrained.json").write_text(json.dumps(record, indent=1) + "\n")
    save_figure(per_seed, seeds, out / "figures" / "digits_pretrained.png")
    md = out / "digits_pretrained.md"
    md.write_text("\n".join(lines))
    return md


def save_figure(per_seed: list[dict[str, Any]], seeds: list[int], path: Path) -> None:
    """One-step FD of every path per seed (left), then the first seed's digits of every run (one panel per run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [FM_LABEL, *PATHS]
    fig, axes = plt.subplots(
        1,
        1 + len(runs),
        figsize=(2.6 * (1 + len(runs)) + 1.5, 3.4),
        gridspec_kw={"width_ratios": [1.6] + [1] * len(runs)},
    )
    ax = axes[0]
    for i, label in enumerate(PATHS):
        fds = [s[label]["1"]["frechet"] for s in per_seed]
        ax.bar(i, statistics.mean(fds), color="#cfd8e3", edgecolor="#4a5a70")
        ax.scatter([i] * len(fds), fds, color="#1f3b5c", s=14, zorder=3)
    fm_fd = statistics.mean(s[FM_LABEL]["many"]["frechet"] for s in per_seed)
    n_fm = per_seed[0][FM_LABEL]["sample_steps"]
    ax.axhline(fm_fd, color="#b04030", lw=1, ls="--", label=f"FM teacher, {n_fm} steps")
    ax.set_xticks(range(len(PATHS)), [p[len("MeanFlow ") :] for p in PATHS], fontsize=8)
    ax.set_ylabel("one-step FD (lower is better)", fontsize=8)
    ax.set_title(f"seeds {', '.join(map(str, seeds))}", fontsize=9)
    ax.legend(fontsize=7)
    for ax, label in zip(axes[1:], runs, strict=True):
        steps = f"{n_fm} steps" if label == FM_LABEL else "1 step"
        title = f"{label.replace('MeanFlow ', 'MF ')}\n({steps}, seed {seeds[0]})"
        draw_digits(ax, per_seed[0][label]["grid"], title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m examples.digits.pretrained", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="1 seed, 30 + 30 steps, small evaluation: a smoke run")
    p.add_argument(
        "--seeds", type=Range(int, 0), nargs="+", default=None, help="training seeds (default 0 1 2, quick: 0)"
    )
    p.add_argument(
        "--pretrain", type=Range(int, 1), default=None, help="FM pretraining steps (default 1000, quick: 30)"
    )
    p.add_argument(
        "--steps", type=Range(int, 1), default=None, help="MeanFlow steps per path (default 1000, quick: 30)"
    )
    p.add_argument("--jobs", type=Range(int, 1), default=2, help="seeds trained in parallel")
    p.add_argument(
        "--ema",
        type=Range(float, 0, 1, hi_open=True),
        default=0.99,
        help="EMA decay of the evaluated networks (lower than the example's 0.999, which keeps 37%% of the "
        "initialisation after 1000 steps)",
    )
    p.add_argument("--out", default=None, help="folder of the table (default docs/, quick: runs/digits_pretrained)")
    return p


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Command-line entry point."""
    args = _parser().parse_args(argv)
    quick = args.quick
    seeds = args.seeds or ([0] if quick else [0, 1, 2])
    pretrain, steps = args.pretrain or (30 if quick else 1000), args.steps or (30 if quick else 1000)
    base = DigitsConfig(
        progress=False,
        ema=args.ema,
        **({"classifier_steps": 30, "per_class": 16, "fm_sample_steps": 4, "warmup": 5} if quick else {}),
    )
    cfgs = [replace(base, seed=s) for s in seeds]
    if args.jobs > 1 and len(cfgs) > 1:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            per_seed = list(pool.map(run_seed, cfgs, [pretrain] * len(cfgs), [steps] * len(cfgs)))
    else:
        per_seed = [run_seed(c, pretrain, steps) for c in cfgs]
    out = Path(args.out or ("runs/digits_pretrained" if quick else "docs"))
    command = " ".join(["python -m examples.digits.pretrained", *(sys.argv[1:] if argv is None else argv)])
    md = write_report(per_seed, seeds, pretrain, steps, out, command, base.per_class)
    sys.stdout.write(md.read_text())
    return per_seed


if __name__ == "__main__":
    main()
