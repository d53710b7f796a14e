"""Class-conditional one-step generation of the scikit-learn 8 x 8 digits with MeanFlow and training-time guidance.

    python -m examples.digits.train                    # about 10 minutes on 2 CPU cores
    python -m examples.digits.train --steps 200 --fm-steps 200 --classifier-steps 200   # a quick look

Stages: (1) a small CNN classifier is trained on the training split of the real digits; (2) a small DiT is
trained with ``MeanFlowLoss`` and training-time guidance (omega, kappa; labels dropped with probability 0.1);
(3) the same DiT is trained for the same number of steps with ``FlowMatchingLoss`` (same guidance), the many-step
baseline; (4) evaluation: the classifier's accuracy on generated digits of each class (1 and 2 MeanFlow steps,
50 Euler steps of the FM model) and the Frechet distance in the classifier's 128-d feature space against the
held-out real digits, next to the same distance for the real training digits. Writes ``metrics.json``,
``checkpoint.pt`` and ``samples.png`` (one row per class) to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

import meanflow_losses as mfl
from examples import cli
from examples.cli import ConfigError, Range
from examples.digits.classifier import accuracy, frechet_distance, train_classifier
from examples.digits.data import NUM_CLASSES, load_digits
from examples.digits.model import DiT
from examples.toy2d.train import NullLabel, as_sampler

__all__ = ["HELP", "RANGES", "DigitsConfig", "config_from_argv", "main", "run"]

#: Valid values of every numeric option of :class:`DigitsConfig` (the command line's argparse types).
RANGES: dict[str, Range] = {
    "steps": Range(int, 1),
    "fm_steps": Range(int, 0),
    "batch": Range(int, 1),
    "lr": Range(float, 0, lo_open=True),
    "warmup": Range(int, 0),
    "ema": Range(float, 0, 1, hi_open=True),
    "seed": Range(int, 0, 2**32 - 1),
    "omega": Range(float),
    "kappa": Range(float, hi=1, hi_open=True),
    "drop_prob": Range(float, 0, 1, hi_open=True),
    "equal_fraction": Range(float, 0, 1),
    "weight_p": Range(float, 0),
    "width": Range(int, 1),
    "depth": Range(int, 1),
    "heads": Range(int, 1),
    "max_freq": Range(float, 1),  # the time embedders' lowest angular frequency is 1
    "classifier_steps": Range(int, 1),
    "per_class": Range(int, 1),
    "fm_sample_steps": Range(int, 1),
    "threads": Range(int, 1),
}

#: Allowed values of the enumerated options.
CHOICES: dict[str, tuple[str, ...]] = {"time_dist": tuple(mfl.times.TIME_DISTRIBUTIONS)}

#: Help text of every option (``--help`` appends the default).
HELP: dict[str, str] = {
    "steps": "MeanFlow training steps of the DiT",
    "fm_steps": "training steps of the flow-matching baseline (default: the same as --steps; 0 skips it)",
    "batch": "batch size of both generators",
    "lr": "Adam learning rate of both generators (peak, after warm-up; then cosine decay)",
    "warmup": "linear warm-up steps",
    "ema": "EMA decay of the sampled generators",
    "seed": "seed of the classifier, the generators and the generated digits",
    "omega": "training-time guidance: weight of the conditional velocity (scale omega / (1 - kappa))",
    "kappa": "training-time guidance: weight of the network's conditional velocity",
    "drop_prob": "label dropout probability (classifier-free training)",
    "equal_fraction": "MeanFlow: share of r = t rows",
    "weight_p": "MeanFlow: power p of the adaptive weight 1 / (||D||^2 + 1e-3)^p (0: plain squared error; paper: 1)",
    "time_dist": "time distribution of both objectives",
    "width": "token width of the DiT (a multiple of --heads)",
    "depth": "DiT blocks",
    "heads": "attention heads of the DiT",
    "max_freq": "highest angular frequency of the time embedders",
    "classifier_steps": "training steps of the digit classifier that judges the samples",
    "per_class": "generated digits per class for the metrics",
    "fm_sample_steps": "Euler steps of the flow-matching baseline's sampler",
    "threads": "torch CPU threads",
    "out": "output folder (metrics.json, checkpoint.pt, samples.png)",
    "progress": "show the progress bars",
}


@dataclass
class DigitsConfig:
    """Options of the digits example.

    Raises:
        ConfigError: An option is out of its range (:data:`RANGES`) or choices, or ``width`` is not a multiple
            of ``heads``.
    """

    steps: int = 3000  # MeanFlow training steps
    fm_steps: int | None = None  # FM baseline steps (default: same as steps; 0 skips the baseline)
    batch: int = 128
    lr: float = 1e-3
    warmup: int = 100
    ema: float = 0.999
    seed: int = 0
    omega: float = 1.0  # training-time guidance: effective scale omega / (1 - kappa)
    kappa: float = 0.5
    drop_prob: float = 0.1
    equal_fraction: float = 0.75
    weight_p: float = 0.0  # MeanFlow's adaptive weight 1 / (||D||^2 + 1e-3)^p, sum over the 64 pixels (paper: 1)
    time_dist: str = "logit_normal"
    width: int = 64
    depth: int = 4
    heads: int = 4
    max_freq: float = 8.0
    classifier_steps: int = 800
    per_class: int = 144  # generated digits per class for the metrics (144 x 10 ~ the training split)
    fm_sample_steps: int = 50
    threads: int = 1
    out: str = "runs/digits"
    progress: bool = True

    def __post_init__(self) -> None:
        cli.check_choices(self, CHOICES)
        cli.check_ranges(self, RANGES)
        if self.width % self.heads:
            raise ConfigError(
                f"width must be a multiple of heads, got width={self.width}, heads={self.heads}", ("width", "heads")
            )

    def unused(self, names: Iterable[str]) -> dict[str, str]:
        """Those of the options ``names`` that have no effect with the other options, each with the reason."""
        skipped = self.fm_steps == 0
        return {
            name: "has no effect with --fm-steps 0 (no flow-matching baseline)"
            for name in names
            if skipped and name == "fm_sample_steps"
        }


def _train_generator(
    cfg: DigitsConfig,
    objective: Any,
    steps: int,
    x: torch.Tensor,
    y: torch.Tensor,
    desc: str,
    *,
    init: dict[str, torch.Tensor] | None = None,
    teacher: torch.nn.Module | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.nn.Module, list[float]]:
    """Adam (warm-up, cosine decay) + EMA on random minibatches; returns the EMA model and the loss curve.

    Args:
        cfg: The options (architecture, optimizer, seed).
        objective: The loss.
        steps: Training steps.
        x: Training images ``(N, 1, 8, 8)``.
        y: Their labels ``(N,)``.
        desc: Progress-bar label.
        init: A state dict of the same DiT to start from (e.g. a flow-matching DiT), else a fresh initialisation.
        teacher: A frozen network passed to the objective as ``teacher=``.
        noise: Noise rows ``(N, 1, 8, 8)`` paired with ``x`` row by row (e.g. reflow pairs), drawn with them.
    """
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = DiT(width=cfg.width, depth=cfg.depth, heads=cfg.heads, num_classes=NUM_CLASSES, max_freq=cfg.max_freq)
    if init is not None:
        model.load_state_dict(init)
    extra: dict[str, Any] = {} if teacher is None else {"teacher": teacher}
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))

    def lr_at(k: int) -> float:
        if k < cfg.warmup:
            return (k + 1) / cfg.warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (k - cfg.warmup) / max(1, steps - cfg.warmup))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema))
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not cfg.progress, mininterval=0.5, leave=False, file=sys.stderr)
    for step in bar:
        idx = torch.randint(0, x.shape[0], (cfg.batch,), generator=g)
        if noise is not None:
            extra["noise"] = noise[idx]
        out = objective(model, x[idx], model_kwargs={"y": y[idx]}, generator=g, step=step, **extra)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        sched.step()
        ema.update_parameters(model)
        if step % 10 == 0 or step == steps - 1:
            losses.append(float(out.loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    return ema.module.eval(), losses


@torch.no_grad()
def generate(
    model: torch.nn.Module, per_class: int, steps: int, seed: int, velocity_only: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` digits of every class with ``steps`` sampling steps; returns images in ``[-1, 1]`` and labels."""
    g = torch.Generator().manual_seed(10_007 + seed)
    y = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    noise = torch.randn(y.shape[0], 1, 8, 8, generator=g)
    x = mfl.sample(as_sampler(model, velocity_only), noise, steps=steps, model_kwargs={"y": y})
    return x.clamp(-1, 1), y


def draw_digits(ax: Any, x: torch.Tensor, title: str, per_row: int = 10, fontsize: float = 9) -> None:
    """Draw ``x`` (``(10 * k, 1, 8, 8)`` in ``[-1, 1]``, ordered by class) on ``ax``: one row of digits per class."""
    k = x.shape[0] // NUM_CLASSES
    imgs = torch.nn.functional.pad(x.view(NUM_CLASSES, k, 8, 8)[:, :per_row], (1, 1, 1, 1), value=-1.0)
    grid = imgs.permute(0, 2, 1, 3).reshape(NUM_CLASSES * 10, imgs.shape[1] * 10)
    ax.imshow(grid.numpy(), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=fontsize)
    ax.set_xticks([])
    ax.set_yticks([])


def save_grid(sets: dict[str, torch.Tensor], path: Path, per_row: int = 10) -> None:
    """One panel per labelled set (``(10 * k, 1, 8, 8)`` ordered by class): a 10 x ``per_row`` grid of digits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sets), figsize=(3.4 * len(sets), 3.7), squeeze=False)
    for ax, (label, x) in zip(axes[0], sets.items(), strict=True):
        draw_digits(ax, x, label, per_row)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def run(cfg: DigitsConfig) -> dict[str, Any]:
    """All four stages; returns the JSON record (also written to ``cfg.out/metrics.json``)."""
    torch.set_num_threads(cfg.threads)
    t_start = time.perf_counter()
    data = load_digits(seed=0)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    clf = train_classifier(data.x_train, data.y_train, steps=cfg.classifier_steps, seed=cfg.seed)
    clf_acc, _ = accuracy(clf, data.x_test, data.y_test)
    ref_feats = clf.features(data.x_test)
    print(f"classifier: held-out accuracy {clf_acc:.3f} ({data.x_test.shape[0]} real held-out digits)")

    guidance = mfl.TrainingGuidance(
        omega=cfg.omega, kappa=cfg.kappa, drop_prob=cfg.drop_prob, null_condition=NullLabel(NUM_CLASSES)
    )
    mf = mfl.MeanFlowLoss(
        times=mfl.TimePairSampler(cfg.time_dist, equal_fraction=cfg.equal_fraction),
        weighting=mfl.AdaptiveWeight(p=cfg.weight_p, c=1e-3),
        reduction="sum",
        guidance=guidance,
    )
    t0 = time.perf_counter()
    mf_model, mf_losses = _train_generator(cfg, mf, cfg.steps, data.x_train, data.y_train, "MeanFlow DiT")
    mf_seconds = time.perf_counter() - t0

    evals: dict[str, tuple[torch.Tensor, torch.Tensor]] = {
        "MeanFlow 1 step": generate(mf_model, cfg.per_class, 1, cfg.seed),
        "MeanFlow 2 steps": generate(mf_model, cfg.per_class, 2, cfg.seed),
    }
    fm_steps = cfg.steps if cfg.fm_steps is None else cfg.fm_steps
    fm_seconds = 0.0
    fm_model = None
    if fm_steps > 0:
        fm = mfl.FlowMatchingLoss(
            times=mfl.TimeSampler(cfg.time_dist),
            weighting=mfl.AdaptiveWeight(p=0.0),
            reduction="mean",
            guidance=guidance,
        )
        t0 = time.perf_counter()
        fm_model, _ = _train_generator(cfg, fm, fm_steps, data.x_train, data.y_train, "FM DiT")
        fm_seconds = time.perf_counter() - t0
        evals[f"FM {cfg.fm_sample_steps} Euler steps"] = generate(
            fm_model, cfg.per_class, cfg.fm_sample_steps, cfg.seed, velocity_only=True
        )

    results: dict[str, Any] = {
        "real training digits": {
            "frechet": frechet_distance(clf.features(data.x_train), ref_feats),
            "accuracy": accuracy(clf, data.x_train, data.y_train)[0],
            "n": data.x_train.shape[0],
        },
    }
    for label, (x, y) in evals.items():
        acc, per_class = accuracy(clf, x, y)
        results[label] = {
            "accuracy": acc,
            "per_class_accuracy": per_class,
            "min_class_accuracy": min(per_class),
            "frechet": frechet_distance(clf.features(x), ref_feats),
            "n": x.shape[0],
        }
    record = {
        "config": asdict(cfg),
        "classifier_heldout_accuracy": clf_acc,
        "results": results,
        "train_seconds": {"meanflow": mf_seconds, "fm": fm_seconds},
        "loss_curve": mf_losses,
        "total_seconds": time.perf_counter() - t_start,
        "versions": {"torch": torch.__version__, "meanflow_losses": getattr(mfl, "__version__", "?")},
    }
    (out / "metrics.json").write_text(json.dumps(record, indent=1) + "\n")
    torch.save(
        {
            "meanflow": mf_model.state_dict(),
            "fm": None if fm_model is None else fm_model.state_dict(),
            "classifier": clf.state_dict(),
            "config": asdict(cfg),
        },
        out / "checkpoint.pt",
    )
    save_grid({"real (held-out)": _real_grid(data), **{k: v[0] for k, v in evals.items()}}, out / "samples.png")

    print(
        f"Frechet distance in classifier features vs {ref_feats.shape[0]} held-out real digits; accuracy of the "
        f"classifier on generated digits of each class (guidance omega={cfg.omega}, kappa={cfg.kappa}):"
    )
    for label, r in results.items():
        extra = f"  min class {r['min_class_accuracy']:.3f}" if "min_class_accuracy" in r else ""
        print(f"  {label:<26} FD {r['frechet']:8.2f}   accuracy {r['accuracy']:.3f}{extra}")
    print(
        f"MeanFlow training {mf_seconds:.0f} s, FM training {fm_seconds:.0f} s; wrote {out}/metrics.json, "
        f"{out}/samples.png"
    )
    return record


def _real_grid(data: Any, per_row: int = 10) -> torch.Tensor:
    rows = [data.x_test[data.y_test == c][:per_row] for c in range(NUM_CLASSES)]
    return torch.cat(rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m examples.digits.train", description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter
    )
    cli.add_config_options(p, DigitsConfig, HELP, RANGES, CHOICES)
    p.add_argument(
        "--recipe",
        choices=sorted(mfl.presets.RECIPES),
        help="start from a named recipe's time distribution, r = t share and weight power "
        "(mfl.presets.RECIPES; the reduction stays the SUM over the 64 pixels); options given "
        "explicitly override it",
    )
    return p


def config_from_argv(argv: list[str] | None = None) -> DigitsConfig:
    """The options of a command line; every error of them is an argparse usage error (exit status 2) naming the
    option: a value out of range or choices, an option given that has no effect, or a conflict between options."""
    parser = _parser()
    given = cli.parse_explicit(parser, argv)
    recipe = given.pop("recipe", None)
    fields = {f.name for f in dataclasses.fields(DigitsConfig)}
    from_recipe = (
        {}
        if recipe is None
        else {
            k: v
            for k, v in mfl.presets.RECIPES[recipe].flat_options("meanflow").items()
            if k in fields and k not in ("weight_c", "reduction")
        }
    )
    try:
        cfg = DigitsConfig(**{**from_recipe, **given})
        cli.check_unused(cfg, given)
    except ValueError as err:
        cli.usage_error(parser, err)
    return cfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point."""
    return run(config_from_argv(argv))


if __name__ == "__main__":
    main()
