"""Hello world: train a one-step MeanFlow on the 2-D checkerboard in under a minute on a CPU, and look at it.

    python -m examples.toy2d.hello                   # about 40 s on a CPU -> runs/hello/meanflow.png
    python -m examples.toy2d.hello --steps 4000 --batch 1024   # the study's length: sharper cells (~3 min)

The toy example's own pieces, nothing else: its checkerboard (``datasets.py``), its 4 x 256 MLP with
low-frequency time embeddings (``nets.py``), its trainer (``train.train``) with the ``small_data`` recipe
(``mfl.presets.RECIPES``: uniform times, 50% ``r = t`` rows, plain squared error, mean reduction; the recipe the
toy study found best) and noise paired with the data by minibatch optimal transport (the study's best coupling),
at a short schedule. Prints the sliced Wasserstein-2 distance of 1- and 2-step samples to fresh checkerboard
points, next to an untrained network's and to the metric's noise floor, and draws the data beside the 1- and
2-step samples. For the full comparison with flow matching and alpha-Flow run ``python -m examples.toy2d.study
--quick``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

import meanflow_losses as mfl
from examples import cli
from examples.toy2d import figures
from examples.toy2d.metrics import sliced_w2
from examples.toy2d.train import EVAL_SEED, RANGES, TrainConfig, build_model, train

__all__ = ["config", "main", "untrained_sw2"]


def config(steps: int = 800, batch: int = 256, seed: int = 0, coupling: str = "ot", threads: int = 1) -> TrainConfig:
    """The hello-world run: MeanFlow with the ``small_data`` recipe on the checkerboard, evaluated at 1 and 2 steps.

    Args:
        steps: Training steps.
        batch: Batch size.
        seed: Seed of the network's initialisation and of every training draw.
        coupling: ``"ot"`` (minibatch optimal transport pairs) or ``"independent"``.
        threads: Torch CPU threads.
    """
    return TrainConfig(
        method="meanflow",
        dataset="checkerboard",
        steps=steps,
        batch=batch,
        seed=seed,
        coupling=coupling,
        **mfl.presets.RECIPES["small_data"].flat_options("meanflow"),
        eval_steps=(1, 2),
        eval_points=8192,
        energy_points=512,
        threads=threads,
        out=None,  # the trainer writes nothing; this script draws its own figure
        figures=False,
        checkpoint=False,
        progress=True,
    )


@torch.no_grad()
def untrained_sw2(cfg: TrainConfig, target: torch.Tensor) -> float:
    """The 1-step sliced W2 to ``target`` of the network ``cfg`` trains, at its initialisation (the yardstick of
    the printed distance: what training has to beat)."""
    torch.manual_seed(cfg.seed)  # the trained network's initialisation, before any training
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(EVAL_SEED + cfg.seed + 1))
    x = mfl.sample(build_model(cfg).eval(), noise, steps=1)
    return sliced_w2(x, target, generator=torch.Generator().manual_seed(EVAL_SEED))


def _parser() -> argparse.ArgumentParser:
    p = cli.make_parser("python -m examples.toy2d.hello", __doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/hello", help="folder of the figure meanflow.png")
    p.add_argument("--steps", type=RANGES["steps"], default=800, help="training steps")
    p.add_argument("--batch", type=RANGES["batch"], default=256, help="batch size (one optimal-transport block)")
    p.add_argument("--seed", type=RANGES["seed"], default=0, help="seed of the initialisation and of every draw")
    p.add_argument(
        "--coupling",
        default="ot",
        choices=["ot", "independent"],
        help="noise-data pairs: ot (minibatch optimal transport, the study's best) or independent (the papers')",
    )
    p.add_argument(
        "--threads", type=RANGES["threads"], default=1, help="torch CPU threads (more pay off only for large batches)"
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show the progress bar")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point.

    Returns:
        ``{"sw2": {"1": ..., "2": ...}, "untrained_sw2": ..., "floor_sw2": ..., "seconds": ..., "figure": Path}``.
    """
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    cfg = config(args.steps, args.batch, args.seed, args.coupling, args.threads)
    cfg.progress = args.progress
    record = train(cfg)
    ev = record.pop("_eval")
    untrained = untrained_sw2(cfg, ev["target"])
    sw2 = {k: m["sw2"] for k, m in record["metrics"].items()}
    floor = record["reference"]["sw2"]
    samples = {f"{k} step{'s' if k != '1' else ''}, SW2 {v:.3f}": ev["samples"][k] for k, v in sw2.items()}
    path = figures.plot_samples(
        ev["target"],
        samples,
        Path(args.out) / "meanflow.png",
        suptitle=f"MeanFlow, {cfg.steps} steps of batch {cfg.batch} ({cfg.coupling} pairs)",
    )
    seconds = time.perf_counter() - t0
    print(
        f"MeanFlow on the checkerboard: {cfg.steps} steps of batch {cfg.batch}, {record['train_seconds']:.0f} s of "
        f"training ({seconds:.0f} s with the evaluation)\n"
        f"  one-step sliced W2 {sw2['1']:.3f}   two-step {sw2['2']:.3f}   untrained network {untrained:.3f}   "
        f"two target sets differ by {floor:.3f}\n"
        f"wrote {path}"
    )
    return {"sw2": sw2, "untrained_sw2": untrained, "floor_sw2": floor, "seconds": seconds, "figure": path}


if __name__ == "__main__":
    main()
