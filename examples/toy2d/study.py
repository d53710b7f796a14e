"""The toy study: FM, MeanFlow, alpha-Flow, Kim et al. and SplitMeanFlow at equal training steps over seeds.

    python -m examples.toy2d.study --quick      # README demo: 1 seed, short runs, 4.5 to 9 minutes on 2 cores
    python -m examples.toy2d.study              # the full study: 3 seeds x 4000 steps, writes docs/

Every method trains the same 4 x 256 MLP for the same number of steps and batch size on the checkerboard; the
flow-matching run is also the baseline, sampled by 100 Euler steps. The tuned recipe of each method runs twice:
with noise and data paired independently (the papers' setting) and paired by minibatch optimal transport (rows
"... (OT)"), whose second baseline is FM trained with the same coupling. The markdown table (sliced W2 and energy
distance at 1, 2 and 4 steps, the ratio of the 1-step distance to the 100-step FM baseline, with the seeds'
spread) and the comparison figure go to ``--out`` (default ``docs/`` for the full study,
``runs/toy2d_quick/`` for ``--quick``). A method whose objective the installed meanflow_losses lacks is
skipped with a printed note.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from examples import cli
from examples.cli import Range
from examples.toy2d import datasets, figures
from examples.toy2d.registry import MethodUnavailable
from examples.toy2d.train import RANGES, TrainConfig, train

__all__ = ["ENTRIES", "Entry", "main", "run_study"]


@dataclass(frozen=True)
class Entry:
    """One row of the study: a label, a method, the options that make its recipe, and whether ``--quick`` runs it."""

    label: str
    method: str
    recipe: str
    options: dict[str, Any] = field(default_factory=dict)
    quick: bool = True


#: Every run uses the trainer's defaults (the tuned recipe: Adam 2e-3 with a cosine decay to 0, no EMA, plain
#: squared error, uniform times) except for the options of its row.
PAPER_MF_WEIGHT: dict[str, Any] = {"equal_fraction": 0.75, "weight_p": 1.0, "weight_c": 1e-3, "reduction": "sum"}

#: Options of the rows that pair noise and data by minibatch optimal transport.
OT: dict[str, Any] = {"coupling": "ot", "ot_block": 256}

#: The rows of the study.
ENTRIES: tuple[Entry, ...] = (
    Entry("FM", "fm", "flow matching; baseline = its 100-step Euler sampler"),
    Entry(
        "MeanFlow (paper weight)",
        "meanflow",
        "75% r = t, adaptive weight p = 1, c = 1e-3 (sum)",
        PAPER_MF_WEIGHT,
        quick=False,
    ),
    Entry("MeanFlow", "meanflow", "50% r = t, plain squared error (p = 0)", {"equal_fraction": 0.5}),
    Entry(
        "alpha-Flow (paper schedule)",
        "alphaflow",
        "sigmoid alpha 1 -> 0 over the whole run, 50% r = t, weight alpha / (||D||^2 + 1e-3)",
        {"alpha_start": 0.0, "alpha_end": 1.0, "equal_fraction": 0.5, "weight_p": 1.0},
        quick=False,
    ),
    Entry(
        "alpha-Flow",
        "alphaflow",
        "sigmoid alpha 1 -> 0 over the first 25% of the run, 50% r = t, p = 0",
        {"alpha_start": 0.0, "alpha_end": 0.25, "equal_fraction": 0.5},
    ),
    Entry(
        "Kim et al.",
        "kim",
        "MeanFlow p = 0, 50% r = t, + Min-SNR (5) on r = t rows + progressive interval weight (k = 1)",
        {"equal_fraction": 0.5},
        quick=False,
    ),
    Entry(
        "SplitMeanFlow",
        "splitmeanflow",
        "lambda ~ U(0, 1), 50% boundary (r = t) rows, p = 0",
        {"equal_fraction": 0.5},
        quick=False,
    ),
    # The same recipes with noise and data paired by minibatch optimal transport (exact assignment in blocks of
    # OT["ot_block"] rows; Tong et al. 2023, Pooladian et al. 2023) instead of independently.
    Entry("FM (OT)", "fm", "flow matching with minibatch OT coupling; baseline of the OT rows", OT),
    Entry("MeanFlow (OT)", "meanflow", "as MeanFlow, minibatch OT coupling", {"equal_fraction": 0.5, **OT}),
    Entry(
        "alpha-Flow (OT)",
        "alphaflow",
        "as alpha-Flow, minibatch OT coupling",
        {"alpha_start": 0.0, "alpha_end": 0.25, "equal_fraction": 0.5, **OT},
        quick=False,
    ),
    Entry("Kim et al. (OT)", "kim", "as Kim et al., minibatch OT coupling", {"equal_fraction": 0.5, **OT}, quick=False),
    Entry(
        "SplitMeanFlow (OT)",
        "splitmeanflow",
        "as SplitMeanFlow, minibatch OT coupling",
        {"equal_fraction": 0.5, **OT},
        quick=False,
    ),
)


def _run_one(cfg: TrainConfig, reuse: bool = False) -> dict[str, Any]:
    """Worker: train one configuration; returns the JSON record plus the 1-step samples (or an error)."""
    try:
        rec = train(cfg, reuse=reuse)
    except MethodUnavailable as err:
        return {"unavailable": str(err)}
    ev = rec.pop("_eval")
    last = str(max(cfg.eval_steps))
    rec["_samples"] = {k: ev["samples"][k].numpy() for k in ("1", last)}
    rec["_target"] = ev["target"].numpy()
    return rec


def _progress(entry: Entry, seed: int, rec: dict[str, Any]) -> None:
    if "unavailable" in rec:
        print(f"note: skipped {entry.label} (seed {seed}): {rec['unavailable']}", flush=True)
        return
    print(
        f"  {entry.label:<14} seed {seed}: SW2 "
        + "  ".join(f"{k}:{v['sw2']:.3f}" for k, v in rec["metrics"].items())
        + f"  ({rec['train_seconds']:.0f} s)",
        flush=True,
    )


def _mean_std(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def run_study(
    entries: tuple[Entry, ...],
    seeds: list[int],
    base: TrainConfig,
    out: Path,
    jobs: int = 1,
    run_dir: Path | None = None,
    quick: bool = False,
    reuse: bool = False,
    command: str = "",
) -> dict[str, Any]:
    """Train every entry for every seed, then write ``toy2d_study.md`` and ``figures/toy2d_study.png`` to ``out``.

    Args:
        entries: Rows of the study (``ENTRIES``).
        seeds: Training seeds.
        base: Options shared by every run (steps, batch, dataset, ...); each entry's options override them.
        out: Folder of the markdown table and figures.
        jobs: Runs trained in parallel (one thread each).
        run_dir: Where each run's ``metrics.json`` is written (``None``: not written).
        quick: Marks the report as the quick demo.
        reuse: Re-evaluate the finished runs found in ``run_dir`` with the same training options instead of
            training them again (see ``train(..., reuse=True)``).
        command: The command line, for the report.

    Returns:
        ``{"rows": {label: {...}}, "skipped": {label: reason}, "baseline": float (plain FM), "baselines":
        {coupling: float}, "seconds": float}``.
    """
    t0 = time.perf_counter()
    jobs_list: list[tuple[Entry, int, TrainConfig]] = []
    for e in entries:
        for s in seeds:
            opts = dict(e.options)
            if e.method == "meanflow" and s == seeds[0] and base.conflict_every:
                opts.setdefault("conflict_every", base.conflict_every)
            else:
                opts.setdefault("conflict_every", 0)
            out_run = str(run_dir / f"{slug(e.label)}_s{s}") if run_dir else None
            cfg = replace(
                base, method=e.method, seed=s, out=out_run, threads=1, figures=bool(out_run) and s == seeds[0], **opts
            )
            jobs_list.append((e, s, cfg))
    print(
        f"toy2d study: {len(entries)} methods x {len(seeds)} seed(s), {base.steps} steps at batch {base.batch} "
        f"on {base.dataset}, {jobs} job(s) in parallel",
        flush=True,
    )
    records: list[dict[str, Any]] = [{} for _ in jobs_list]
    if jobs > 1:
        with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(_run_one, cfg, reuse): i for i, (_, _, cfg) in enumerate(jobs_list)}
            for fut in as_completed(futures):
                i = futures[fut]
                records[i] = fut.result()
                _progress(*jobs_list[i][:2], records[i])
    else:
        for i, (e, s, cfg) in enumerate(jobs_list):
            records[i] = _run_one(cfg, reuse)
            _progress(e, s, records[i])

    rows: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for (e, s, _), rec in zip(jobs_list, records, strict=True):
        if "unavailable" in rec:
            skipped.setdefault(e.label, rec["unavailable"])
            continue
        row = rows.setdefault(e.label, {"entry": e, "seeds": [], "records": []})
        row["seeds"].append(s)
        row["records"].append(rec)

    # FM's many-step distance per (coupling, seed): "independent" is the baseline for every row; each row
    # is also compared with the FM run of its own coupling.
    baseline_by = baseline_by_coupling(rows, str(max(base.eval_steps)))
    baselines = {
        c: statistics.mean(v for (c2, _), v in baseline_by.items() if c2 == c)
        for c in sorted({c for c, _ in baseline_by})
    }  # coupling -> mean over seeds
    baseline = baselines.get("independent")
    for row in rows.values():
        row["sw2"] = {k: [r["metrics"][k]["sw2"] for r in row["records"]] for k in map(str, base.eval_steps)}
        row["energy"] = {k: [r["metrics"][k]["energy"] for r in row["records"]] for k in map(str, base.eval_steps)}
        row["on_cells"] = {
            k: [r["metrics"][k]["on_cells"] for r in row["records"] if "on_cells" in r["metrics"][k]]
            for k in map(str, base.eval_steps)
        }
        row["ratio"] = [
            r["metrics"]["1"]["sw2"] / baseline_by[("independent", s)]
            for s, r in zip(row["seeds"], row["records"], strict=True)
            if ("independent", s) in baseline_by
        ]
        row["ratio_same"] = [
            r["metrics"]["1"]["sw2"] / baseline_by[(r["config"]["coupling"], s)]
            for s, r in zip(row["seeds"], row["records"], strict=True)
            if (r["config"]["coupling"], s) in baseline_by
        ]
        row["coupling"] = row["records"][0]["config"]["coupling"]
        row["seconds"] = statistics.mean(r["train_seconds"] for r in row["records"])
    seconds = time.perf_counter() - t0
    result = {"rows": rows, "skipped": skipped, "baseline": baseline, "baselines": baselines, "seconds": seconds}
    write_report(result, base, seeds, out, quick, command)
    if run_dir is not None:
        export_figures(rows, run_dir, out / "figures")
    return result


#: Per-run figures of the first seed copied next to the table: file name -> methods (None: every method).
EXPORTED: dict[str, set[str] | None] = {
    "samples.png": None,
    "trajectories.png": {"meanflow"},
    "training.png": {"alphaflow"},
    "conflict.png": {"meanflow"},
}


def slug(label: str) -> str:
    """File-name form of a row label: ``"MeanFlow (paper weight)" -> "meanflow_paper_weight"``."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def export_figures(rows: dict[str, Any], run_dir: Path, fig_dir: Path) -> list[Path]:
    """Copy the first seed's per-run figures listed in :data:`EXPORTED` to ``fig_dir/toy2d_<label>_<name>``."""
    copied = []
    for label, row in rows.items():
        method = row["entry"].method
        src_dir = Path(row["records"][0]["config"]["out"] or run_dir)
        for name, methods in EXPORTED.items():
            src = src_dir / name
            if (methods is None or method in methods) and src.exists():
                dst = fig_dir / f"toy2d_{slug(label)}_{name}"
                shutil.copyfile(src, dst)
                copied.append(dst)
    return copied


def _conflict_lines(rows: dict[str, Any]) -> list[str]:
    """One sentence per run that tracked the gradient conflict (the first seed of each MeanFlow row)."""
    lines = []
    for row in rows.values():
        for seed, rec in zip(row["seeds"], row["records"], strict=True):
            conflict = rec.get("conflict", {})
            c, b = conflict.get("TFM vs TCc"), conflict.get("FM' vs TCc")
            if c and b:
                lines.append(
                    f"Gradient conflict during {row['entry'].label} training (seed {seed}, "
                    f"{len(conflict['steps'])} checks on batches of {rec['config']['conflict_batch']}): "
                    f"cos(grad L_TFM, grad L_TCc) mean {c['mean']:+.2f}, 5th-95th percentile "
                    f"[{c['p5']:+.2f}, {c['p95']:+.2f}], negative at {100 * c['frac_negative']:.0f}% of checks; "
                    f"cos(grad L_FM', grad L_TCc) mean {b['mean']:+.2f} (alpha-Flow paper: the first below -0.4 "
                    "for over 95% of MeanFlow training, the second consistently higher)."
                )
    return lines


def write_report(
    result: dict[str, Any], base: TrainConfig, seeds: list[int], out: Path, quick: bool, command: str = ""
) -> Path:
    """Write the markdown table and the comparison figure of a finished study."""
    rows, baseline = result["rows"], result["baseline"]
    out.mkdir(parents=True, exist_ok=True)
    fig_dir = out / "figures"
    ks = [str(k) for k in base.eval_steps]
    lines = [
        f"# Toy 2-D study{' (quick demo)' if quick else ''}: {base.dataset}, {base.steps} steps, batch {base.batch}",
        "",
        f"Seeds {', '.join(map(str, seeds))}; mean ± standard deviation over seeds. Sliced Wasserstein-2 "
        f"(512 projections, {base.eval_points} fresh target points; lower is better) of samples drawn with the "
        "given number of steps; FM is sampled by Euler steps. Ratio: 1-step SW2 over the same seed's FM "
        f"{ks[-1]}-step SW2 (the issue's target: at most 1.5), against plain FM (independent noise-data pairs, "
        "the issue's baseline) and against the FM run with the row's own coupling (for the OT rows: FM (OT)).",
        "",
        f"Shared by every run unless its recipe says otherwise: the {base.depth} x {base.width} MLP with sinusoidal "
        f"embeddings of t and t - r (highest frequency {base.max_freq:g} rad per unit time), Adam lr {base.lr:g} "
        f"({base.lr_schedule} schedule), batch {base.batch}, {base.time_dist} times, "
        f"{'EMA ' + str(base.ema) if base.ema else 'no EMA'}, adaptive weight p = {base.weight_p:g} "
        f"({base.reduction} over data dims).",
        "",
        "| method | recipe | "
        + " | ".join(f"SW2 {k} step{'s' if k != '1' else ''}" for k in ks)
        + f" | 1-step / FM-{ks[-1]} | 1-step / FM-{ks[-1]} same coupling | energy dist. 1 step "
        f"| on dark cells, 1 step / {ks[-1]} | train s/run |",
        "|---|---|" + "---|" * len(ks) + "---|---|---|---|---|",
    ]
    for label, row in rows.items():
        is_fm = row["entry"].method == "fm"
        ratio = _mean_std(row["ratio"]) if not (is_fm and row["coupling"] == "independent") else "—"
        ratio_same = _mean_std(row["ratio_same"]) if not is_fm else "—"
        cells = " / ".join(_mean_std(row["on_cells"][k]) for k in (ks[0], ks[-1]))
        lines.append(
            f"| {label} | {row['entry'].recipe} | "
            + " | ".join(_mean_std(row["sw2"][k]) for k in ks)
            + f" | {ratio} | {ratio_same} | {_mean_std(row['energy']['1'])} | {cells} "
            f"| {row['seconds']:.0f} |"
        )
    refs = {
        seed: rec["reference"]["sw2"]
        for row in rows.values()
        for seed, rec in zip(row["seeds"], row["records"], strict=True)
    }
    lines += [
        "",
        f"Noise floor: two independent target sets differ by SW2 {_mean_std(list(refs.values()))} "
        "(one pair per seed). On dark cells: share of samples "
        "on the checkerboard's dark cells (target 1; a blur that fills the board evenly scores about 0.5).",
    ]
    if baseline is not None:
        lines.append(f"FM baseline ({ks[-1]} Euler steps): SW2 {baseline:.3f}; 1.5x target: {1.5 * baseline:.3f}.")
    others = {f"FM ({c.upper()}) {ks[-1]}-step Euler": v for c, v in result["baselines"].items() if c != "independent"}
    for c, v in result["baselines"].items():
        if c != "independent":
            lines.append(f"FM ({c.upper()}) baseline ({ks[-1]} Euler steps): SW2 {v:.3f}; 1.5x: {1.5 * v:.3f}.")
    for a, b in COMPARISONS:
        comparison = _compare(rows, a, b)
        if comparison:
            lines += ["", comparison]
    for line in _conflict_lines(rows):
        lines += ["", line]
    for label, reason in result["skipped"].items():
        lines += ["", f"Skipped {label}: {reason}"]
    lines += [
        "",
        "![comparison](figures/toy2d_study.png)",
        "",
        "Per-run figures of the first seed (samples of every method; MeanFlow's trajectories and gradient "
        "conflict; alpha-Flow's loss and alpha schedule): `figures/toy2d_<row>_<figure>.png`, for example "
        "[MeanFlow's gradient conflict](figures/toy2d_meanflow_conflict.png).",
        "",
        f"Wall time of the whole study: {result['seconds']:.0f} s on {os.cpu_count()} CPU(s), "
        f"torch {torch.__version__}. Command: "
        f"`{command or 'python -m examples.toy2d.study' + (' --quick' if quick else '')}`.",
    ]
    n_reused = sum(bool(r.get("reevaluated")) for row in rows.values() for r in row["records"])
    if n_reused:
        total = sum(r["train_seconds"] for row in rows.values() for r in row["records"])
        lines.append(
            f"({n_reused} run(s) were trained earlier and only re-evaluated here (`--reuse`); the training "
            f"time of all runs adds up to {total:.0f} s of one core each.)"
        )
    path = out / "toy2d_study.md"
    path.write_text("\n".join(lines) + "\n")
    if rows:
        first = next(iter(rows.values()))["records"][0]
        samples, bars = {}, {}
        for label, row in rows.items():
            k = ks[-1] if row["entry"].method == "fm" else "1"  # FM: its many-step baseline samples
            name = f"{label}\n{k} step{'s' if k != '1' else ''}, SW2 {row['sw2'][k][0]:.3f}"
            samples[name] = torch.from_numpy(row["records"][0]["_samples"][k])
            if row["entry"].method != "fm":
                bars[label] = row["sw2"]["1"]
            elif row["coupling"] != "independent":  # FM with another coupling: its 1-step bar and its baseline
                bars[f"{label}, 1 Euler step"] = row["sw2"]["1"]
        figures.plot_study(
            torch.from_numpy(first["_target"]),
            samples,
            bars,
            baseline,
            fig_dir / "toy2d_study.png",
            title=f"{base.dataset}, {base.steps} steps, seeds {seeds}",
            baseline_steps=int(ks[-1]),
            extra_lines=others,
        )
    summary = {
        label: {
            "sw2": row["sw2"],
            "energy": row["energy"],
            "on_cells": row["on_cells"],
            "ratio": row["ratio"],
            "ratio_same_coupling": row["ratio_same"],
            "seeds": row["seeds"],
            "recipe": row["entry"].recipe,
            "options": row["entry"].options,
        }
        for label, row in rows.items()
    }
    (out / "toy2d_study.json").write_text(
        json.dumps(
            {
                "baseline": baseline,
                "skipped": result["skipped"],
                "rows": summary,
                "steps": base.steps,
                "batch": base.batch,
                "seconds": result["seconds"],
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {path} and {fig_dir / 'toy2d_study.png'}")
    return path


#: Pairs of rows compared seed by seed in the report (alpha-Flow vs MeanFlow, tuned and with the papers' settings).
COMPARISONS: tuple[tuple[str, str], ...] = (
    ("alpha-Flow", "MeanFlow"),
    ("alpha-Flow (OT)", "MeanFlow (OT)"),
    ("alpha-Flow (paper schedule)", "MeanFlow (paper weight)"),
)


def baseline_by_coupling(rows: dict[str, Any], k: str) -> dict[tuple[str, int], float]:
    """FM's ``k``-step SW2 per ``(coupling, seed)``.

    Args:
        rows: The study's rows (label -> ``{"entry", "seeds", "records"}``).
        k: The step count of the baseline, as a string (``"100"``).

    Returns:
        ``{(coupling, seed): sw2}`` over the FM rows.

    Raises:
        ValueError: Two FM rows share a coupling, so the baseline would be ambiguous.
    """
    out: dict[tuple[str, int], float] = {}
    owner: dict[str, str] = {}
    for label, row in rows.items():
        if row["entry"].method != "fm":
            continue
        for s, rec in zip(row["seeds"], row["records"], strict=True):
            coupling = rec["config"]["coupling"]
            if owner.setdefault(coupling, label) != label:
                raise ValueError(
                    f"FM rows {owner[coupling]!r} and {label!r} both use coupling={coupling!r}: "
                    "the baseline of that coupling is ambiguous"
                )
            out[(coupling, s)] = rec["metrics"][k]["sw2"]
    return out


def _compare(rows: dict[str, Any], a: str, b: str) -> str:
    if a not in rows or b not in rows:
        return ""
    ra, rb = rows[a], rows[b]
    diffs = [
        x - y
        for sa, x in zip(ra["seeds"], ra["sw2"]["1"], strict=True)
        for sb, y in zip(rb["seeds"], rb["sw2"]["1"], strict=True)
        if sa == sb
    ]
    if not diffs:
        return ""
    wins = sum(d < 0 for d in diffs)
    if statistics.mean(diffs) >= 0:
        verdict = f"{a} does not beat {b} at equal steps"
    elif wins == len(diffs):
        verdict = f"{a} beats {b} at equal steps on every seed"
    else:
        verdict = f"{a} is better than {b} on average at equal steps, but not on every seed"
    return (
        f"{verdict}: 1-step SW2 difference ({a} − {b}) {_mean_std(diffs)} over {len(diffs)} seed(s), "
        f"{a} lower on {wins} of {len(diffs)}."
    )


def _method_names() -> list[str]:
    """What ``--methods`` accepts: the rows' labels and their method names."""
    return [e.label for e in ENTRIES] + sorted({e.method for e in ENTRIES})


def _parser() -> argparse.ArgumentParser:
    p = cli.make_parser("python -m examples.toy2d.study", __doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="README demo: 1 seed, 5 rows of 1500 steps, 2 runs in parallel")
    p.add_argument(
        "--seeds", type=RANGES["seed"], nargs="+", default=None, help="training seeds (default 0 1 2, quick: 0)"
    )
    p.add_argument(
        "--steps", type=RANGES["steps"], default=None, help="training steps of every run (default 4000, quick 1500)"
    )
    p.add_argument("--batch", type=RANGES["batch"], default=None, help="batch size (default 1024)")
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=_method_names(),
        metavar="METHOD",
        help="rows to run, by label or method name (default: every row; quick: the quick rows): %(choices)s",
    )
    p.add_argument("--dataset", default="checkerboard", choices=sorted(datasets.DATASETS), help="target distribution")
    p.add_argument("--jobs", type=Range(int, 1), default=None, help="parallel runs (default 1, quick: 2)")
    p.add_argument(
        "--out", default=None, help="folder of the table and figures (default docs/, with --quick runs/toy2d_quick/)"
    )
    p.add_argument(
        "--conflict-every",
        type=RANGES["conflict_every"],
        default=None,
        help="gradient-cosine check period on MeanFlow (default 20, quick 25; 0: off)",
    )
    p.add_argument(
        "--eval-points",
        type=RANGES["eval_points"],
        default=None,
        help="points per evaluation set (default 32768, with --quick 8192)",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="re-evaluate finished runs with the same training options instead of training them again",
    )
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point."""
    parser = _parser()
    args = parser.parse_args(argv)
    quick = args.quick
    seeds = args.seeds or ([0] if quick else [0, 1, 2])
    try:
        base = TrainConfig(
            dataset=args.dataset,
            steps=args.steps or (1500 if quick else 4000),
            batch=args.batch or 1024,
            eval_points=args.eval_points or (8192 if quick else 32768),
            energy_points=4096,
            conflict_every=args.conflict_every if args.conflict_every is not None else (25 if quick else 20),
            progress=False,
        )
    except ValueError as err:
        cli.usage_error(parser, err)
    entries = tuple(e for e in ENTRIES if e.quick or not quick)
    if args.methods:
        entries = tuple(e for e in ENTRIES if e.label in args.methods or e.method in args.methods)
        if not entries:
            parser.error(
                f"argument --methods: {args.methods} matches none of "
                f"{[e.label for e in ENTRIES]} / {[e.method for e in ENTRIES]}"
            )
    out = Path(args.out or ("runs/toy2d_quick" if quick else "docs"))
    jobs = args.jobs or (min(2, os.cpu_count() or 1) if quick else 1)
    run_dir = Path("runs/toy2d_study_quick" if quick else "runs/toy2d_study")
    command = " ".join(["python -m examples.toy2d.study", *(sys.argv[1:] if argv is None else argv)])
    result = run_study(
        entries, seeds, base, out, jobs=jobs, run_dir=run_dir, quick=quick, reuse=args.reuse, command=command
    )
    sys.stdout.write((out / "toy2d_study.md").read_text())
    return result


if __name__ == "__main__":
    main()
