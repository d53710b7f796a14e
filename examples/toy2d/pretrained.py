"""From a pretrained flow-matching model to a one-step generator, on the toy: which path pays off?

    python -m examples.toy2d.pretrained             # 3 seeds, FM 2000 steps + 2000 steps per path (~15 min, 2 cores)
    python -m examples.toy2d.pretrained --quick     # 1 seed, 400 + 400 steps: a smoke run (numbers meaningless)

Per seed, a flow-matching (FM) network is pretrained for ``--pretrain`` steps; then, for ``--steps`` more steps each,
MeanFlow is trained from it along three paths (the package's tools for each in brackets):

* **fine-tune**: MeanFlow initialised from the FM network (the toy network already embeds ``t - r``, which FM
  training only ever saw at 0, so ``u(z, t, t)`` is the FM velocity at step 0);
* **distil**: the same, with the FM network as a frozen teacher (``teacher=``) whose velocity replaces ``e - x`` in
  the target and as the JVP tangent;
* **reflow**: the same, trained on reflow pairs (``mfl.couplings.reflow_pairs``: a pool of noise rows and the
  teacher's 100-step ODE endpoints) instead of data drawn with independent noise;

against MeanFlow **from scratch** for ``--pretrain + --steps`` steps (equal total steps). Every run uses the toy's
small-data recipe (uniform times, 50% ``r = t``, plain squared error, Adam 2e-3 with a cosine decay). The table
(sliced W2 at 1, 2 and 100 steps, mean and spread over seeds) goes to ``--out`` as ``toy2d_pretrained.md`` with the
figure ``figures/toy2d_pretrained.png``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from examples import cli
from examples.cli import Range
from examples.toy2d import datasets
from examples.toy2d.train import RANGES, TrainConfig, train

__all__ = ["PATHS", "main", "run_pretrained_study"]

#: The paths from the pretrained FM network, each as the options of its MeanFlow run (``{fm}``: the FM checkpoint).
PATHS: dict[str, dict[str, Any]] = {
    "fine-tune": {"init_from": "{fm}"},
    "distil": {"init_from": "{fm}", "teacher": "{fm}"},
    "reflow": {"init_from": "{fm}", "coupling": "reflow", "reflow_from": "{fm}"},
}

#: The MeanFlow recipe of every MeanFlow run (the toy study's tuned small-data recipe).
RECIPE: dict[str, Any] = {"method": "meanflow", "equal_fraction": 0.5}


def _train(cfg: TrainConfig, reuse: bool = False) -> dict[str, Any]:
    rec = train(cfg, reuse=reuse)
    rec.pop("_eval", None)
    return rec


def _run_all(cfgs: list[TrainConfig], jobs: int, reuse: bool) -> list[dict[str, Any]]:
    if jobs <= 1:
        return [_train(c, reuse) for c in cfgs]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        return list(pool.map(_train, cfgs, [reuse] * len(cfgs)))


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def run_pretrained_study(
    seeds: list[int],
    pretrain: int,
    steps: int,
    base: TrainConfig,
    run_dir: Path,
    out: Path,
    jobs: int = 1,
    command: str = "",
    reuse: bool = False,
) -> dict[str, Any]:
    """Pretrain FM per seed, run every path and the from-scratch baseline, write the table and the figure.

    Args:
        seeds: Training seeds.
        pretrain: FM pretraining steps.
        steps: Steps of each path after pretraining (the from-scratch run gets ``pretrain + steps``).
        base: Options shared by every run (batch, dataset, evaluation).
        run_dir: Folder of the runs (checkpoints and ``metrics.json``).
        out: Folder of ``toy2d_pretrained.md`` and ``figures/toy2d_pretrained.png``.
        jobs: Runs trained in parallel (one thread each).
        command: The command line, for the report.
        reuse: Re-evaluate the finished runs found in ``run_dir`` (same options) instead of training them again.

    Returns:
        ``{"rows": {label: {"sw2": {steps: [per seed]}, "seconds": [...]}}, "seconds": float}``.
    """
    t0 = time.perf_counter()
    common = {"threads": 1, "progress": False, "conflict_every": 0}
    fm_cfgs = [
        replace(base, method="fm", steps=pretrain, seed=s, out=str(run_dir / f"fm_s{s}"), figures=False, **common)
        for s in seeds
    ]
    print(f"toy2d pretrained study: FM pretraining {pretrain} steps, {len(seeds)} seed(s)", flush=True)
    fm_recs = _run_all(fm_cfgs, jobs, reuse)
    cfgs: list[tuple[str, int, TrainConfig]] = []
    for s, fm in zip(seeds, fm_cfgs, strict=True):
        ckpt = str(Path(fm.out) / "checkpoint.pt")  # type: ignore[arg-type]
        cfgs.append(
            (
                "MeanFlow from scratch",
                s,
                replace(
                    base,
                    **RECIPE,
                    steps=pretrain + steps,
                    seed=s,
                    out=str(run_dir / f"scratch_s{s}"),
                    figures=False,
                    **common,
                ),
            )
        )
        for label, opts in PATHS.items():
            resolved = {k: (v.format(fm=ckpt) if isinstance(v, str) else v) for k, v in opts.items()}
            cfgs.append(
                (
                    f"MeanFlow {label}",
                    s,
                    replace(
                        base,
                        **RECIPE,
                        **resolved,
                        steps=steps,
                        seed=s,
                        out=str(run_dir / f"{label}_s{s}"),
                        figures=False,
                        **common,
                    ),
                )
            )
    print(f"  {len(cfgs)} MeanFlow runs ({steps} steps from FM, {pretrain + steps} from scratch)", flush=True)
    recs = _run_all([c for _, _, c in cfgs], jobs, reuse)
    rows: dict[str, dict[str, Any]] = {}
    keys = [str(k) for k in base.eval_steps]
    rows["FM (pretrained, Euler)"] = {
        "sw2": {k: [r["metrics"][k]["sw2"] for r in fm_recs] for k in keys},
        "seconds": [r["train_seconds"] for r in fm_recs],
        "steps": pretrain,
    }
    for (label, _, cfg), rec in zip(cfgs, recs, strict=True):
        row = rows.setdefault(label, {"sw2": {k: [] for k in keys}, "seconds": [], "steps": cfg.steps})
        for k in keys:
            row["sw2"][k].append(rec["metrics"][k]["sw2"])
        row["seconds"].append(rec["train_seconds"])
    result = {"rows": rows, "seconds": time.perf_counter() - t0, "seeds": seeds, "pretrain": pretrain, "steps": steps}
    write_report(result, base, out, command)
    return result


def write_report(result: dict[str, Any], base: TrainConfig, out: Path, command: str) -> Path:
    """Write the markdown table and the bar figure; returns the markdown path."""
    rows, seeds = result["rows"], result["seeds"]
    keys = [str(k) for k in base.eval_steps]
    out.mkdir(parents=True, exist_ok=True)
    scratch = rows["MeanFlow from scratch"]["sw2"]["1"]
    lines = [
        f"# From pretrained FM to one step: toy 2-D ({base.dataset}, batch {base.batch})",
        "",
        f"Command: `{command}`. Seeds {', '.join(map(str, seeds))}; mean ± standard deviation over seeds. Sliced "
        "Wasserstein-2 (lower is better) of samples drawn with the given number of steps (FM: Euler steps). "
        f"FM pretraining: {result['pretrain']} steps; each path then trains MeanFlow for {result['steps']} "
        f"steps; MeanFlow from scratch trains {result['pretrain'] + result['steps']} steps (equal total "
        "steps). MeanFlow recipe: uniform times, 50% r = t, plain squared error, Adam 2e-3, cosine decay.",
        "",
        "| run | training steps | "
        + " | ".join(f"SW2 {k} step{'s' if k != '1' else ''}" for k in keys)
        + " | 1-step / from scratch | s/run |",
        "|---|---|" + "---|" * len(keys) + "---|---|",
    ]
    for label, row in rows.items():
        ratio = "—" if label.startswith("FM") else _fmt([a / b for a, b in zip(row["sw2"]["1"], scratch, strict=True)])
        lines.append(
            f"| {label} | {row['steps']} | "
            + " | ".join(_fmt(row["sw2"][k]) for k in keys)
            + f" | {ratio} | {statistics.mean(row['seconds']):.0f} |"
        )
    lines += ["", "The reflow run's time includes building its pool of teacher ODE pairs.", ""]
    for label in rows:
        if label.startswith("FM") or label == "MeanFlow from scratch":
            continue
        ratios = [a / b for a, b in zip(rows[label]["sw2"]["1"], scratch, strict=True)]
        better = sum(r < 1 for r in ratios)
        verdict = "pays off" if better == len(ratios) else "does not pay off" if better == 0 else "is mixed"
        lines.append(
            f"- {label[len('MeanFlow ') :]} {verdict} at equal total steps: 1-step SW2 "
            f"{statistics.mean(ratios):.2f}x from scratch's, lower on {better} of {len(ratios)} seed(s)."
        )
    fm_last = rows["FM (pretrained, Euler)"]["sw2"][keys[-1]]
    lines += [
        "",
        f"The teacher's own quality bounds what its pairs and velocities can teach: the pretrained FM "
        f"network at {keys[-1]} Euler steps reaches SW2 {_fmt(fm_last)}.",
        "",
        "![paths](figures/toy2d_pretrained.png)",
        "",
    ]
    md = out / "toy2d_pretrained.md"
    md.write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # figures are optional
        return md
    fig, ax = plt.subplots(figsize=(7, 3.2))
    labels = [k for k in rows if not k.startswith("FM")]
    for j, k in enumerate(["1", "2"]):
        if k not in keys:
            continue
        means = [statistics.mean(rows[lb]["sw2"][k]) for lb in labels]
        errs = [statistics.stdev(rows[lb]["sw2"][k]) if len(seeds) > 1 else 0.0 for lb in labels]
        ax.bar([i + 0.38 * j for i in range(len(labels))], means, 0.36, yerr=errs, label=f"{k} step(s)")
    fm100 = statistics.mean(rows["FM (pretrained, Euler)"]["sw2"][keys[-1]])
    ax.axhline(fm100, color="k", ls="--", lw=1, label=f"FM pretrained, {keys[-1]} Euler steps")
    ax.set_xticks([i + 0.19 for i in range(len(labels))], [lb.replace("MeanFlow ", "") for lb in labels])
    ax.set_ylabel("sliced W2")
    ax.legend(fontsize=8)
    fig.tight_layout()
    (out / "figures").mkdir(exist_ok=True)
    fig.savefig(out / "figures" / "toy2d_pretrained.png", dpi=120)
    plt.close(fig)
    return md


def _parser() -> argparse.ArgumentParser:
    p = cli.make_parser("python -m examples.toy2d.pretrained", __doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 400 + 400 steps, small evaluation: a smoke run")
    p.add_argument(
        "--seeds", type=RANGES["seed"], nargs="+", default=None, help="training seeds (default 0 1 2, quick: 0)"
    )
    p.add_argument(
        "--pretrain", type=RANGES["steps"], default=None, help="FM pretraining steps (default 2000, quick: 400)"
    )
    p.add_argument(
        "--steps",
        type=RANGES["steps"],
        default=None,
        help="MeanFlow steps of each path after pretraining (default 2000, quick: 400)",
    )
    p.add_argument("--batch", type=RANGES["batch"], default=None, help="batch size (default 1024, quick: 256)")
    p.add_argument(
        "--dataset",
        default="checkerboard",
        choices=sorted(datasets.DATASETS),
        help="target distribution",
    )
    p.add_argument("--jobs", type=Range(int, 1), default=2, help="parallel runs")
    p.add_argument(
        "--out",
        default=None,
        help="folder of the table and figure (default docs/, quick: runs/toy2d_pretrained_quick)",
    )
    p.add_argument("--run-dir", default=None, help="folder of the runs (default runs/toy2d_pretrained[_quick])")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="re-evaluate finished runs with the same options instead of training them again",
    )
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point."""
    args = _parser().parse_args(argv)
    quick = args.quick
    seeds = args.seeds or ([0] if quick else [0, 1, 2])
    base = TrainConfig(
        dataset=args.dataset,
        batch=args.batch or (256 if quick else 1024),
        eval_points=2048 if quick else 32768,
        energy_points=512 if quick else 4096,
        eval_steps=(1, 2, 100),
        reflow_pool=4096 if quick else 32768,
    )
    out = Path(args.out or ("runs/toy2d_pretrained_quick" if quick else "docs"))
    run_dir = Path(args.run_dir or ("runs/toy2d_pretrained_quick" if quick else "runs/toy2d_pretrained"))
    command = " ".join(["python -m examples.toy2d.pretrained", *(sys.argv[1:] if argv is None else argv)])
    pretrain, steps = args.pretrain or (400 if quick else 2000), args.steps or (400 if quick else 2000)
    result = run_pretrained_study(
        seeds, pretrain, steps, base, run_dir, out, jobs=args.jobs, command=command, reuse=args.reuse
    )
    sys.stdout.write((out / "toy2d_pretrained.md").read_text())
    return result


if __name__ == "__main__":
    main()
