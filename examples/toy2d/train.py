"""Train any objective of meanflow_losses on a 2-D toy distribution, evaluate it, save a record and figures.

    python -m examples.toy2d.train --method meanflow --dataset checkerboard --steps 4000
    python -m examples.toy2d.train --method alphaflow --alpha-end 0.25 --equal-fraction 0.5
    python -m examples.toy2d.train --method meanflow --dataset mixture --omega 1.0 --kappa 0.5
    python -m examples.toy2d.train --method meanflow --steps 4000 --resume     # continue an interrupted run

Writes ``<out>/checkpoint.pt`` (model, EMA, config and the training state: optimizer, scheduler, step, random
generators, history; also every ``--checkpoint-every`` steps, for ``--resume``), ``<out>/metrics.json`` (config,
metrics, training history) and PNG figures. Metrics are measured against fresh target samples: sliced
Wasserstein-2 (512 projections) and energy distance of 1-, 2-, 4- and 100-step samples.
``python -m examples.toy2d.train --help`` lists every option with its range; a value out of range, or an option
that has no effect with the others (``--jvp`` with ``--method fm``), is a usage error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

import meanflow_losses as mfl
from examples import cli
from examples.cli import ConfigError, Range
from examples.toy2d import datasets, figures
from examples.toy2d.metrics import energy_distance, sliced_w2
from examples.toy2d.nets import ACTIVATIONS, ARCHS, VelocityMLP
from examples.toy2d.registry import METHODS, MethodSpec, MethodUnavailable, build_objective, get_method, need
from meanflow_losses.couplings import minibatch_ot

__all__ = ["RANGES", "ResumeError", "TrainConfig", "config_from_argv", "evaluate", "main", "ot_pair", "train"]

EVAL_SEED = 1_000_003  # the evaluation draws (targets, noise) are the same for every run of a seed

LR_SCHEDULES = ("constant", "cosine", "linear")
EQUAL_DRAWS = ("pair", "single")
TANGENTS = ("conditional", "model")
COUPLINGS = ("independent", "ot", "reflow")

#: Valid values of every numeric option of :class:`TrainConfig`: the command line's argparse types (a value out
#: of range is a usage error naming the option), also checked when a config is built in Python.
RANGES: dict[str, Range] = {
    "steps": Range(int, 1),
    "batch": Range(int, 1),
    "seed": Range(int, 0, 2**32 - 1),
    "lr": Range(float, 0, lo_open=True),
    "lr_final": Range(float, 0, 1),
    "warmup": Range(int, 0),
    "beta2": Range(float, 0, 1, hi_open=True),
    "grad_clip": Range(float, 0),
    "ema": Range(float, 0, 1, hi_open=True),
    "time_mean": Range(float),
    "time_std": Range(float, 0, lo_open=True),
    "equal_fraction": Range(float, 0, 1),
    "weight_p": Range(float, 0),
    "weight_c": Range(float, 0, lo_open=True),
    "aux_weight": Range(float, 0),
    "ot_block": Range(int, 1),
    "reflow_pool": Range(int, 1),
    "reflow_steps": Range(int, 1),
    "alpha_start": Range(float, 0, 1),
    "alpha_end": Range(float, 0, 1),
    "alpha_gamma": Range(float, 0, lo_open=True),
    "eta": Range(float, 0, 0.5, hi_open=True),
    "kim_k": Range(float, 0, lo_open=True),
    "min_snr_gamma": Range(float, 0, lo_open=True),
    "omega": Range(float),
    "kappa": Range(float, hi=1, hi_open=True),
    "drop_prob": Range(float, 0, 1, hi_open=True),
    "guidance_interval": Range(float, 0, 1),
    "width": Range(int, 1),
    "depth": Range(int, 1),
    "emb_dim": Range(int, 2, multiple_of=2),
    "max_freq": Range(float, 1),  # the embeddings' lowest angular frequency is 1
    "eval_points": Range(int, 2),  # the energy distance's within-set terms need two points
    "eval_steps": Range(int, 1),
    "energy_points": Range(int, 2),
    "conflict_every": Range(int, 0),
    "conflict_batch": Range(int, 1),
    "log_every": Range(int, 1),
    "threads": Range(int, 1),
    "checkpoint_every": Range(int, 0),
}


def choices() -> dict[str, tuple[str, ...]]:
    """Allowed values of every enumerated option of :class:`TrainConfig` (the methods registered now)."""
    return {
        "method": tuple(sorted(METHODS)),
        "dataset": tuple(sorted(datasets.DATASETS)),
        "lr_schedule": LR_SCHEDULES,
        "time_dist": tuple(mfl.times.TIME_DISTRIBUTIONS),
        "equal_draw": EQUAL_DRAWS,
        "reduction": tuple(mfl.weighting.REDUCTIONS),
        "jvp": tuple(mfl.JVP_STRATEGIES),
        "tangent": TANGENTS,
        "coupling": COUPLINGS,
        "act": tuple(sorted(ACTIVATIONS)),
        "arch": tuple(ARCHS),
    }


def _methods(test: Callable[[MethodSpec], bool]) -> str:
    """``--method a, b or c``: the registered methods that pass ``test``."""
    names = sorted(name for name, spec in METHODS.items() if test(spec))
    if len(names) < 2:
        return f"--method {names[0] if names else '(none)'}"
    return f"--method {', '.join(names[:-1])} or {names[-1]}"


#: Options whose value a config built in Python may not set away from the default where it has no effect (the
#: command line refuses every option of :meth:`TrainConfig.unused` that it is given).
STRICT = ("tangent", "aux_weight", "equal_draw")


@dataclass
class TrainConfig:
    """Every option of a toy run; the defaults are the recipe tuned on the checkerboard (README.md).

    Raises:
        ValueError: ``method`` is unknown.
        ConfigError: An option is out of its range (:data:`RANGES`), not one of its choices, or in conflict with
            another (``alpha_start > alpha_end``, ``tangent="model"`` for a method without JVP, ...).
    """

    method: str = "meanflow"
    dataset: str = "checkerboard"
    steps: int = 4000
    batch: int = 1024
    seed: int = 0
    # optimisation (defaults: the tuned toy recipe, see README.md)
    lr: float = 2e-3
    lr_schedule: str = "cosine"  # constant | cosine | linear (decay to lr_final * lr after warm-up)
    lr_final: float = 0.0
    warmup: int = 0
    beta2: float = 0.999
    grad_clip: float = 0.0  # 0 disables
    ema: float = 0.0  # EMA decay of an evaluated copy (torch.optim.swa_utils.AveragedModel); 0 disables
    # times and weighting
    time_dist: str = "uniform"  # uniform | logit_normal
    time_mean: float = -0.4
    time_std: float = 1.0
    equal_fraction: float | None = None  # share of r = t rows (None: the method's default)
    equal_draw: str = "pair"  # times of the r = t rows: pair (t = max of two draws, MeanFlow) | single (alpha-Flow)
    weight_p: float = 0.0  # adaptive weight 1 / (||D||^2 + c)^p; 0 = plain squared error (papers: 1)
    weight_c: float = 1e-3
    reduction: str = "mean"  # sum | mean over data dims
    jvp: str = "nograd"
    tangent: str = "conditional"  # JVP tangent: conditional (e - x, MeanFlow) | model (u(z, t, t), iMF)
    aux_weight: float = 0.0  # iMF auxiliary instantaneous-velocity loss weight (0: off)
    coupling: str = "independent"  # independent | ot (minibatch optimal transport pairing of noise and data)
    ot_block: int = 256  # OT pairing within blocks of this many rows
    reflow_from: str | None = None  # checkpoint.pt of the teacher whose ODE endpoints make the pairs (coupling reflow)
    reflow_pool: int = 32768  # reflow pairs computed once at the start; batches are drawn from them
    reflow_steps: int = 100  # Euler steps of the teacher's ODE per pair
    # starting from a pretrained network
    init_from: str | None = None  # checkpoint.pt whose network (its EMA when saved) initialises the model
    teacher: str | None = None  # checkpoint.pt of a frozen teacher: its velocity replaces e - x (distillation)
    # alpha-Flow: sigmoid curriculum from alpha = 1 at alpha_start * steps to 0 at alpha_end * steps
    alpha_start: float = 0.0
    alpha_end: float = 1.0
    alpha_gamma: float = 25.0
    eta: float = 5e-3
    # Kim et al.: exponent of the progressive interval weight, Min-SNR clamp on r = t rows
    kim_k: float = 1.0
    min_snr_gamma: float = 5.0
    # conditioning and guidance (conditional: default on for the class mixture)
    conditional: bool | None = None
    omega: float = 1.0
    kappa: float = 0.0
    drop_prob: float = 0.1
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    # network
    width: int = 256
    depth: int = 4
    emb_dim: int = 32
    max_freq: float = 8.0
    act: str = "silu"  # silu | gelu | relu
    arch: str = "plain"  # plain MLP | residual (pre-norm blocks, conditioning in every block)
    # evaluation and logging
    eval_points: int = 8192
    eval_steps: tuple[int, ...] = (1, 2, 4, 100)
    energy_points: int = 4096
    conflict_every: int = 0  # gradient cosine L_TFM vs L_TCc every N steps (0: off)
    conflict_batch: int = 128
    log_every: int = 10
    threads: int = 1
    out: str | None = None
    figures: bool = True
    checkpoint: bool = True
    checkpoint_every: int = 500  # also write checkpoint.pt every N steps, for resuming (0: only at the end)
    progress: bool = True

    def __post_init__(self) -> None:
        get_method(self.method)
        self.guidance_interval = tuple(self.guidance_interval)  # type: ignore[assignment]
        self.eval_steps = tuple(self.eval_steps)
        cli.check_choices(self, choices())
        cli.check_ranges(self, RANGES)
        self.eval_steps = tuple(int(s) for s in self.eval_steps)
        if len(self.guidance_interval) != 2 or self.guidance_interval[0] > self.guidance_interval[1]:
            raise ConfigError(
                f"guidance_interval must be (lo, hi) with lo <= hi, got {self.guidance_interval}",
                ("guidance_interval",),
            )
        if self.alpha_start > self.alpha_end:
            raise ConfigError(
                f"need alpha_start <= alpha_end, got {self.alpha_start}, {self.alpha_end}", ("alpha_start", "alpha_end")
            )
        if self.coupling == "reflow" and not self.reflow_from:
            raise ConfigError(
                "coupling reflow needs reflow_from, the checkpoint.pt of the teacher whose ODE makes the pairs",
                ("coupling", "reflow_from"),
            )
        for name in ("init_from", "teacher", "reflow_from"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{name}={path!r} is not a file (expected a checkpoint.pt of a toy run)", (name,))
        if len(set(self.eval_steps)) != len(self.eval_steps):
            raise ConfigError(f"eval_steps must not repeat a step count, got {self.eval_steps}", ("eval_steps",))
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, why in self.unused(n for n in STRICT if getattr(self, n) != defaults[n]).items():
            raise ConfigError(f"{name}={getattr(self, name)!r} {why}", (name,))

    def unused(self, names: Iterable[str]) -> dict[str, str]:
        """Those of the options ``names`` that have no effect with the other options, each with the reason.

        The command line refuses such an option when it is given explicitly (it would be silently ignored).

        Args:
            names: Field names.

        Returns:
            ``{name: "has no effect with ...: it needs ..."}`` for the options that have no effect.
        """
        spec = get_method(self.method)
        method = f"--method {self.method}"
        probe = self.conflict_every > 0
        jvp = _methods(lambda m: m.jvp)
        pairs = _methods(lambda m: m.equal_fraction is not None)
        conditional = (
            f"--dataset {self.dataset}{' --no-conditional' if self.conditional is False else ''}",
            "a class-conditional run (--conditional; the default for --dataset mixture)",
        )
        rules: dict[str, tuple[bool, str, str]] = {  # name: (has an effect, the options that make it moot, needs)
            "jvp": (spec.jvp or probe, method, f"{jvp} (a JVP objective) or --conflict-every > 0"),
            "tangent": (spec.jvp, method, f"{jvp} (a JVP objective)"),
            "aux_weight": (spec.aux, method, _methods(lambda m: m.aux)),
            "equal_fraction": (
                spec.equal_fraction is not None or probe,
                method,
                f"{pairs} (r = t rows) or --conflict-every > 0",
            ),
            "equal_draw": (spec.equal_fraction is not None, method, f"{pairs} (r = t rows)"),
            **{
                name: (self.is_conditional, *conditional)
                for name in ("omega", "kappa", "drop_prob", "guidance_interval")
            },
            "ot_block": (self.coupling == "ot", f"--coupling {self.coupling}", "--coupling ot"),
            **{
                name: (self.coupling == "reflow", f"--coupling {self.coupling}", "--coupling reflow")
                for name in ("reflow_from", "reflow_pool", "reflow_steps")
            },
            "conflict_batch": (probe, "--conflict-every 0", "--conflict-every > 0"),
            "time_mean": (
                self.time_dist == "logit_normal",
                f"--time-dist {self.time_dist}",
                "--time-dist logit_normal",
            ),
            "time_std": (self.time_dist == "logit_normal", f"--time-dist {self.time_dist}", "--time-dist logit_normal"),
            "lr_final": (self.lr_schedule != "constant", "--lr-schedule constant", "--lr-schedule cosine or linear"),
            "weight_c": (
                self.weight_p > 0 or probe,
                f"--weight-p {self.weight_p:g}",
                "--weight-p > 0 or --conflict-every > 0",
            ),
            "checkpoint_every": (self.checkpoint, "--no-checkpoint", "--checkpoint"),
        }
        for other in METHODS.values():  # options only some methods read (registry: MethodSpec.options)
            for name in other.options:
                rules[name] = (name in spec.options, method, _methods(lambda m, n=name: n in m.options))
        out = {}
        for name in names:
            applies, moot, needs = rules.get(name, (True, "", ""))
            if not applies:
                out[name] = f"has no effect with {moot}: it needs {needs}"
        return out

    def resolved(self, name: str) -> Any:
        """The option ``name``, or the method's default (``registry.METHODS``) where it is ``None``."""
        value = getattr(self, name)
        return getattr(get_method(self.method), name) if value is None else value

    @property
    def is_conditional(self) -> bool:
        """Whether the network takes a class label (default: only for the class mixture)."""
        return self.dataset == "mixture" if self.conditional is None else self.conditional

    @property
    def num_classes(self) -> int:
        """Label count of a conditional network, 0 for an unconditional one."""
        return datasets.NUM_CLASSES[self.dataset] if self.is_conditional else 0

    def guidance(self) -> mfl.TrainingGuidance | None:
        """Training-time guidance and label dropout for conditional runs; ``None`` otherwise."""
        if not self.is_conditional:
            return None
        return mfl.TrainingGuidance(
            omega=self.omega,
            kappa=self.kappa,
            interval=self.guidance_interval,
            drop_prob=self.drop_prob,
            null_condition=NullLabel(self.num_classes),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready options (resolved method defaults included)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["resolved"] = {"equal_fraction": self.resolved("equal_fraction")}
        return d


@dataclass(frozen=True)
class NullLabel:
    """Guidance's null condition: every label replaced by the extra class index ``num_classes``."""

    num_classes: int

    def __call__(self, kw: dict[str, Any]) -> dict[str, Any]:
        return {**kw, "y": torch.full_like(kw["y"], self.num_classes)}


def build_model(cfg: TrainConfig) -> VelocityMLP:
    """The toy network for ``cfg`` (seeded by the caller)."""
    return VelocityMLP(
        dim=2,
        hidden=cfg.width,
        depth=cfg.depth,
        emb_dim=cfg.emb_dim,
        max_freq=cfg.max_freq,
        num_classes=cfg.num_classes,
        act=cfg.act,
        arch=cfg.arch,
    )


def as_sampler(model: torch.nn.Module, velocity_only: bool) -> Any:
    """The model as the package's samplers see it: a flow-matching network is wrapped by
    ``mfl.adapters.from_velocity_net`` so that every step is an Euler step on ``u(z, t, t)``."""
    if not velocity_only:
        return model
    return mfl.adapters.from_velocity_net(lambda z, t, **kw: model(z, t, t, **kw))


def _lr_lambda(cfg: TrainConfig):
    def fn(step: int) -> float:
        if cfg.warmup and step < cfg.warmup:
            return (step + 1) / cfg.warmup
        if cfg.lr_schedule == "constant":
            return 1.0
        frac = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.lr_schedule == "cosine" else 1.0 - frac
        return cfg.lr_final + (1.0 - cfg.lr_final) * shape

    return fn


def _conditioning(cfg: TrainConfig, y: torch.Tensor) -> dict[str, Any] | None:
    return {"y": y} if cfg.is_conditional else None


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, cfg: TrainConfig, velocity_only: bool, trajectories: bool = False
) -> dict[str, Any]:
    """Sliced W2 and energy distance of ``k``-step samples (``k`` in ``cfg.eval_steps``) vs fresh targets.

    On the checkerboard, ``on_cells`` is also the share of samples on the dark cells (1 for the target).

    Returns:
        ``{"metrics": {k: {"sw2", "energy"[, "on_cells"]}}, "reference": {...}, "samples": {k: (N, 2)},
        "target": (N, 2), "trajectories": {k: (k + 1, N, 2)}}``. ``reference`` holds the distances between two
        independent target sets (the noise floor of the metric at this sample size).
    """
    g = torch.Generator().manual_seed(EVAL_SEED + cfg.seed)
    target, y = datasets.sample(cfg.dataset, cfg.eval_points, g)
    other, _ = datasets.sample(cfg.dataset, cfg.eval_points, g)
    noise = torch.randn(cfg.eval_points, 2, generator=g)
    was_training = model.training
    model.eval()
    sampler = as_sampler(model, velocity_only)
    kw = _conditioning(cfg, y)
    out: dict[str, Any] = {"metrics": {}, "samples": {}, "trajectories": {}, "target": target}
    for k in cfg.eval_steps:
        x, traj = mfl.sample(sampler, noise, steps=k, model_kwargs=kw, return_trajectory=True)
        gp = torch.Generator().manual_seed(EVAL_SEED)
        finite = bool(torch.isfinite(x).all())
        out["metrics"][str(k)] = {
            "sw2": sliced_w2(x, target, generator=gp) if finite else float("inf"),
            "energy": energy_distance(x, target, cfg.energy_points) if finite else float("inf"),
        }
        if cfg.dataset == "checkerboard":
            out["metrics"][str(k)]["on_cells"] = datasets.checkerboard_precision(x)
        out["samples"][str(k)] = x
        if trajectories:
            out["trajectories"][str(k)] = torch.stack(traj)
    gp = torch.Generator().manual_seed(EVAL_SEED)
    out["reference"] = {
        "sw2": sliced_w2(other, target, generator=gp),
        "energy": energy_distance(other, target, cfg.energy_points),
    }
    model.train(was_training)
    return out


class ConflictProbe:
    """Gradient cosines between the MeanFlow loss terms L_TFM, L_FM' and L_TCc on fresh batches, every N steps.

    Uses ``MeanFlowLoss(decompose=True)`` with the run's times and coupling and
    ``meanflow_losses.diagnostics.ConflictTracker``; draws from its own generator, so turning it on does not change
    the training run.
    """

    PAIRS: ClassVar[dict[str, tuple[str, str]]] = {"TFM vs TCc": ("tfm", "tcc"), "FM' vs TCc": ("fm_border", "tcc")}

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.tracker = need("diagnostics.ConflictTracker", "conflict tracking")(every=cfg.conflict_every)
        self.measured: list[tuple[int, Any]] = []  # (step, GradientCosines), replayed into the tracker on resume
        eq = cfg.resolved("equal_fraction")
        self.loss = mfl.MeanFlowLoss(
            times=mfl.TimePairSampler(
                cfg.time_dist, mean=cfg.time_mean, std=cfg.time_std, equal_fraction=0.75 if eq is None else eq
            ),
            weighting=mfl.AdaptiveWeight(p=1.0, c=cfg.weight_c),
            reduction="sum",
            jvp=cfg.jvp,
            decompose=True,
        )
        self.g = torch.Generator().manual_seed(cfg.seed + 7_777)

    def __call__(self, model: torch.nn.Module, step: int) -> None:
        if not self.tracker.due(step):
            return
        x, y = datasets.sample(self.cfg.dataset, self.cfg.conflict_batch, self.g)
        noise = coupled_noise(self.cfg, x, y, self.g)  # measure the loss that is trained: the same pairing
        out = self.loss(model, x, model_kwargs=_conditioning(self.cfg, y), generator=self.g, step=step, noise=noise)
        self.measured.append((step, self.tracker.measure(model, out.decomposition, step=step)))

    def state_dict(self) -> dict[str, Any]:
        """The probe's generator state and measurements so far (for a checkpoint)."""
        return {
            "generator": self.g.get_state(),
            "measured": [
                [
                    step,
                    [[a, b, float(c)] for (a, b), c in res.cosines.items()],
                    {name: float(v) for name, v in res.norms.items()},
                ]
                for step, res in self.measured
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the measurements are recorded into a fresh tracker again."""
        cosines = need("diagnostics.GradientCosines", "conflict tracking")
        self.g.set_state(state["generator"])
        self.tracker.reset()
        self.measured = []
        for step, pairs, norms in state["measured"]:
            res = cosines(cosines={(a, b): c for a, b, c in pairs}, norms=dict(norms))
            self.tracker.record(res, step=step)
            self.measured.append((step, res))

    def summary(self) -> dict[str, Any]:
        """JSON-ready: the measured steps, the cosines of each pair, and their mean / 5th / 95th percentiles."""
        stats = self.tracker.summary()
        out: dict[str, Any] = {"steps": list(self.tracker.steps), "cosines": {}}
        for label, (a, b) in self.PAIRS.items():
            out["cosines"][label] = self.tracker.history(a, b)[1].tolist()
            st = stats.get((a, b), stats.get((b, a)))
            out[label] = {"mean": st.mean, "p5": st.p5, "p95": st.p95, "frac_negative": st.frac_negative}
        return out


def _scalar(v: Any) -> float:
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


def _term(out: Any, name: str) -> float:
    return _scalar(out.terms[name]) if name in out.terms else float("nan")


def ot_pair(x: torch.Tensor, noise: torch.Tensor, block: int, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Reorder ``noise`` so that, within each block of ``block`` rows, row ``i`` of noise is the exact optimal
    transport (squared Euclidean) partner of row ``i`` of ``x`` (minibatch OT coupling: Tong et al. 2023,
    Pooladian et al. 2023).

    A thin wrapper of the package's :func:`meanflow_losses.couplings.minibatch_ot` (blocks of consecutive rows of
    each class, no generator; scipy's ``linear_sum_assignment`` when scipy is installed, else the package's own
    exact solver), kept as the trainer's one call site so that tests can spy on it.

    The noise rows are only permuted, so every row's noise is still a standard normal draw. With ``labels`` the
    pairing stays within each class (blocks of one class's rows), so that the noise given to a class is still
    standard normal too: pairing across classes would hand each class the part of the Gaussian nearest to its
    data, a noise distribution that sampling never sees.

    Args:
        x: Data ``(B, *D)``.
        noise: Noise ``(B, *D)``, same shape as ``x``.
        block: Rows per assignment problem (>= 1).
        labels: Optional class labels ``(B,)``.

    Returns:
        The reordered noise ``(B, *D)``, on ``noise``'s device.

    Raises:
        ValueError: ``noise`` or ``labels`` does not match ``x``, or ``block < 1``.
    """
    return minibatch_ot(x, noise, labels=labels, block=block)


def load_network(path: str, cfg: TrainConfig | None = None) -> torch.nn.Module:
    """The network of a toy run's ``checkpoint.pt`` (its EMA when saved), built from the run's own options.

    Args:
        path: The checkpoint.
        cfg: When given, the network must have ``cfg``'s architecture (for initialising ``cfg``'s model).

    Raises:
        ConfigError: ``cfg``'s architecture differs from the checkpoint's.
    """
    saved = torch.load(path, map_location="cpu", weights_only=True)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    arch = ("width", "depth", "emb_dim", "max_freq", "act", "arch", "conditional", "dataset")
    own = TrainConfig(**{k: v for k, v in saved["config"].items() if k in names and k in arch})
    if cfg is not None:
        differ = {
            k: (getattr(own, k), getattr(cfg, k))
            for k in arch
            if k not in ("dataset", "conditional") and getattr(own, k) != getattr(cfg, k)
        } | ({"num_classes": (own.num_classes, cfg.num_classes)} if own.num_classes != cfg.num_classes else {})
        if differ:
            raise ConfigError(
                f"{path} holds another architecture: "
                + "; ".join(f"{k} {a!r} there, {b!r} here" for k, (a, b) in differ.items()),
                ("init_from",),
            )
    net = build_model(own)
    net.load_state_dict(saved["ema"] if saved.get("ema") is not None else saved["model"])
    return net


def load_teacher(path: str, cfg: TrainConfig) -> torch.nn.Module:
    """A frozen teacher (eval mode, no gradient) from a toy run's checkpoint, conditioned like ``cfg``'s model."""
    net = load_network(path)
    if net.num_classes != cfg.num_classes:
        raise ConfigError(
            f"{path} holds a network with {net.num_classes} classes, this run has {cfg.num_classes}", ("teacher",)
        )
    return net.eval().requires_grad_(False)


class ReflowPool:
    """``cfg.reflow_pool`` noise rows and the data endpoints of the teacher's ODE (Re-MeanFlow-style pairs),
    computed once by :func:`meanflow_losses.couplings.reflow_pairs`; batches are drawn from them with the
    training generator. Deterministic in ``cfg.seed`` (a resumed run rebuilds the same pool)."""

    def __init__(self, cfg: TrainConfig) -> None:
        teacher = load_teacher(cfg.reflow_from, cfg)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(cfg.seed + 7919)
        self.noise = torch.randn(cfg.reflow_pool, 2, generator=g)
        self.y = datasets.sample(cfg.dataset, cfg.reflow_pool, g)[1]
        kw = _conditioning(cfg, self.y)
        self.x = mfl.couplings.reflow_pairs(
            teacher, self.noise, steps=cfg.reflow_steps, model_kwargs=kw, chunk_size=8192
        )

    def batch(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, y, noise)`` of ``n`` pairs drawn with replacement."""
        idx = torch.randint(self.noise.shape[0], (n,), generator=g)
        return self.x[idx], self.y[idx], self.noise[idx]


def coupled_noise(cfg: TrainConfig, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> torch.Tensor | None:
    """The noise of a batch under ``cfg.coupling``: ``None`` for independent pairs (the objective draws its own),
    else a standard normal draw from ``g`` reordered by :func:`ot_pair` (within classes for conditional data).

    Args:
        cfg: The options (``coupling``, ``ot_block``, whether the data are conditional).
        x: Data ``(B, 2)``.
        y: Labels ``(B,)``.
        g: Generator of the draw.

    Returns:
        Noise ``(B, 2)`` or ``None``.
    """
    if cfg.coupling in ("independent", "reflow"):  # reflow pairs come from ReflowPool.batch
        return None
    return ot_pair(x, torch.randn(x.shape, generator=g), cfg.ot_block, y if cfg.num_classes else None)


def train(cfg: TrainConfig, reuse: bool = False, resume: bool = False) -> dict[str, Any]:
    """Train, evaluate and (when ``cfg.out`` is set) save checkpoint, ``metrics.json`` and figures.

    Args:
        cfg: The options.
        reuse: If ``cfg.out`` already holds a finished run with the same training options (the evaluation options
            may differ), load its checkpoint and only evaluate again.
        resume: Continue the run from ``cfg.out/checkpoint.pt`` (written every ``cfg.checkpoint_every`` steps and
            at the end): model, optimizer, scheduler, EMA, step, random generators and history are restored, so
            the result equals that of the uninterrupted run. A finished run is only evaluated again.

    Returns:
        The JSON record: ``config``, ``metrics`` (per sampling step count: ``sw2``, ``energy``; of the EMA model
        when ``cfg.ema > 0``, ``metrics_online`` then holds the raw model's), ``reference`` (two target sets),
        ``history`` (``step``, ``loss``, ``mse``, ``fm_mse``, ``alpha``, ``lr``), ``conflict`` (when tracked),
        ``train_seconds``, ``resumed_at`` (the steps a resumed run continued from). The sample tensors are under
        the non-JSON key ``"_eval"``.

    Raises:
        MethodUnavailable: The installed meanflow_losses lacks the method's objective.
        ResumeError: ``resume`` without a checkpoint to continue, or one trained with other options.
    """
    torch.set_num_threads(cfg.threads)
    spec = get_method(cfg.method)
    objective = build_objective(cfg)  # MethodUnavailable propagates to the caller
    if reuse and (found := load_finished(cfg)) is not None:
        return _finish(cfg, *found)
    saved = load_resumable(cfg) if resume else None
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = build_model(cfg)
    if cfg.init_from:
        model.load_state_dict(load_network(cfg.init_from, cfg).state_dict())
    teacher = load_teacher(cfg.teacher, cfg) if cfg.teacher else None
    pool = ReflowPool(cfg) if cfg.coupling == "reflow" else None
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema)) if cfg.ema > 0 else None
    probe = None
    notes: list[str] = []
    if cfg.conflict_every > 0:
        try:
            probe = ConflictProbe(cfg)
        except MethodUnavailable as err:
            notes.append(f"gradient-conflict tracking skipped: {err}")
            print(f"note: {notes[-1]}", file=sys.stderr)
    hist: dict[str, list[float]] = {"step": [], "loss": [], "mse": [], "fm_mse": [], "alpha": [], "lr": []}
    start, seconds_before, resumed_at = 0, 0.0, []
    if saved is not None:
        start, seconds_before, resumed_at = _restore(saved, model, opt, sched, ema, g, probe, hist)
        resumed_at.append(start)
    t0 = time.perf_counter()

    def state(step: int) -> dict[str, Any]:
        return {
            "step": step,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "ema_n_averaged": None if ema is None else int(ema.n_averaged),
            "generator": g.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": hist,
            "resumed_at": resumed_at,
            "seconds": seconds_before + time.perf_counter() - t0,
            "probe": None if probe is None else probe.state_dict(),
        }

    periodic = cfg.checkpoint_every if cfg.out and cfg.checkpoint else 0  # steps between checkpoints (0: none)
    bar = tqdm(
        range(start, cfg.steps),
        desc=f"{cfg.method}/{cfg.dataset} seed {cfg.seed}",
        initial=start,
        total=cfg.steps,
        disable=not cfg.progress,
        mininterval=0.5,
        leave=False,
        file=sys.stderr,
    )
    for step in bar:
        if pool is not None:
            x, y, noise = pool.batch(cfg.batch, g)
        else:
            x, y = datasets.sample(cfg.dataset, cfg.batch, g)
            noise = coupled_noise(cfg, x, y, g)
        extra = {} if teacher is None else {"teacher": teacher}
        out = objective(model, x, model_kwargs=_conditioning(cfg, y), generator=g, step=step, noise=noise, **extra)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update_parameters(model)
        if probe is not None:
            probe(model, step)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            loss = _scalar(out.loss)
            if not math.isfinite(loss):
                raise FloatingPointError(f"{cfg.method}: loss is {loss} at step {step}")
            alpha = _term(out, "alpha")
            hist["step"].append(step)
            hist["loss"].append(loss)
            hist["mse"].append(_term(out, "mse"))
            hist["fm_mse"].append(_term(out, "fm_mse"))
            hist["alpha"].append(alpha)
            hist["lr"].append(opt.param_groups[0]["lr"])
            bar.set_postfix(loss=f"{loss:.4f}", **({} if math.isnan(alpha) else {"alpha": f"{alpha:.3f}"}))
        done = step + 1
        if periodic and done % periodic == 0 and done < cfg.steps:
            write_checkpoint(cfg, model, None if ema is None else ema.module, state(done))
    bar.close()
    final = state(cfg.steps)
    record: dict[str, Any] = {
        "config": cfg.to_dict(),
        "method": cfg.method,
        "summary": spec.summary,
        "history": hist,
        "train_seconds": final["seconds"],
        "notes": notes,
        "versions": {"torch": torch.__version__, "meanflow_losses": getattr(mfl, "__version__", "?")},
    }
    if resumed_at:
        record["resumed_at"] = resumed_at
    if probe is not None:
        record["conflict"] = probe.summary()
    return _finish(cfg, model, None if ema is None else ema.module, record, final)


def _restore(
    saved: dict[str, Any],
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    ema: AveragedModel | None,
    g: torch.Generator,
    probe: ConflictProbe | None,
    hist: dict[str, list[float]],
) -> tuple[int, float, list[int]]:
    """Load a checkpoint's training state into the freshly built objects; returns ``(step, seconds, resumed_at)``."""
    state = saved["train"]
    model.load_state_dict(saved["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if ema is not None:
        ema.module.load_state_dict(saved["ema"])
        ema.n_averaged.fill_(state["ema_n_averaged"])
    g.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if probe is not None and state["probe"] is not None:
        probe.load_state_dict(state["probe"])
    for key, values in state["history"].items():
        hist[key] = list(values)
    return int(state["step"]), float(state["seconds"]), list(state["resumed_at"])


class ResumeError(ConfigError):
    """A run cannot be resumed: no checkpoint, no training state in it, or trained with other options."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ("resume",))


#: Options that change only the evaluation and the files, not the trained model (ignored by ``reuse`` and
#: ``resume``).
EVAL_ONLY = (
    "eval_points",
    "eval_steps",
    "energy_points",
    "threads",
    "out",
    "figures",
    "checkpoint",
    "checkpoint_every",
    "progress",
)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=float))


def config_differences(saved: dict[str, Any], cfg: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """The training options (all but :data:`EVAL_ONLY`) in which ``cfg`` differs from a saved config.

    Args:
        saved: A saved ``TrainConfig.to_dict()``; an option added after it was saved counts as its default.
        cfg: The options now.

    Returns:
        ``{name: (saved value, value now)}``, in JSON form (tuples as lists).
    """
    defaults = _jsonable(
        {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    )
    before = {**defaults, **_jsonable(saved)}
    return {
        k: (before.get(k), v)
        for k, v in _jsonable(cfg.to_dict()).items()
        if k not in (*EVAL_ONLY, "resolved") and before.get(k) != v
    }


def load_finished(
    cfg: TrainConfig,
) -> tuple[torch.nn.Module, torch.nn.Module | None, dict[str, Any], dict[str, Any] | None] | None:
    """The model, EMA model, record and training state of a finished run in ``cfg.out`` trained with the same
    options, or None."""
    if not cfg.out:
        return None
    out = Path(cfg.out)
    if not ((out / "metrics.json").exists() and (out / "checkpoint.pt").exists()):
        return None
    record = json.loads((out / "metrics.json").read_text())
    if config_differences(record["config"], cfg):
        return None
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    if (state.get("train") or {}).get("step", cfg.steps) != cfg.steps:  # a later run into out was interrupted
        return None
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    ema_model = None
    if state["ema"] is not None:
        ema_model = build_model(cfg)
        ema_model.load_state_dict(state["ema"])
    record["config"] = cfg.to_dict()
    record["reevaluated"] = True
    return model, ema_model, record, state.get("train")


def _read_checkpoint(out: str | None) -> tuple[Path, dict[str, Any]]:
    """The path and contents of ``out/checkpoint.pt`` to resume from (ResumeError if there is none)."""
    if not out:
        raise ResumeError("resuming needs the output folder (out) that holds the run's checkpoint.pt")
    path = Path(out) / "checkpoint.pt"
    if not path.exists():
        raise ResumeError(f"no checkpoint to resume: {path} does not exist")
    saved = torch.load(path, weights_only=True)
    if "train" not in saved:
        raise ResumeError(
            f"{path} holds no training state (it was written before resuming was supported); train the run again"
        )
    return path, saved


def load_resumable(cfg: TrainConfig) -> dict[str, Any]:
    """The checkpoint in ``cfg.out`` to continue ``cfg``'s run from.

    Raises:
        ResumeError: There is no checkpoint with a training state, or it was trained with other options than
            ``cfg`` (any but :data:`EVAL_ONLY`): continuing it would not give the run ``cfg`` asks for.
    """
    path, saved = _read_checkpoint(cfg.out)
    diff = config_differences(saved["config"], cfg)
    if diff:
        listed = "; ".join(f"{cli.flag(k)} {before!r} there, {now!r} here" for k, (before, now) in diff.items())
        raise ResumeError(
            f"{path} was trained with other options ({listed}): leave them out to continue the "
            "saved run, or give another --out to start a new one"
        )
    return saved


def saved_options(out: str | None) -> dict[str, Any]:
    """The options of the run whose checkpoint is in ``out`` (those that still exist), for resuming it."""
    _, saved = _read_checkpoint(out)
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in saved["config"].items() if k in names}


def _finish(
    cfg: TrainConfig,
    model: torch.nn.Module,
    ema_model: torch.nn.Module | None,
    record: dict[str, Any],
    train_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate (the EMA model when there is one), complete the record and save the run."""
    velocity_only = get_method(cfg.method).velocity_only
    ev = evaluate(ema_model if ema_model is not None else model, cfg, velocity_only, trajectories=cfg.figures)
    record["metrics"] = ev["metrics"]
    record["reference"] = ev["reference"]
    if ema_model is not None:
        record["metrics_online"] = evaluate(model, cfg, velocity_only)["metrics"]
    if cfg.out:
        save_run(cfg, record, ev, model, ema_model, train_state)
    record["_eval"] = ev
    return record


def write_checkpoint(
    cfg: TrainConfig, model: torch.nn.Module, ema_model: torch.nn.Module | None, train_state: dict[str, Any] | None
) -> Path:
    """Write ``cfg.out/checkpoint.pt`` (model, EMA model, config, training state), replacing it atomically."""
    out = Path(cfg.out)  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "checkpoint.pt"
    tmp = out / "checkpoint.pt.tmp"
    torch.save(
        {
            "model": model.state_dict(),
            "ema": None if ema_model is None else ema_model.state_dict(),
            "config": cfg.to_dict(),
            "train": train_state,
        },
        tmp,
    )
    tmp.replace(path)
    return path


def save_run(
    cfg: TrainConfig,
    record: dict[str, Any],
    ev: dict[str, Any],
    model: torch.nn.Module,
    ema_model: torch.nn.Module | None,
    train_state: dict[str, Any] | None = None,
) -> None:
    """Write ``checkpoint.pt`` (with ``train_state``, for resuming), ``metrics.json`` and the figures of one run
    into ``cfg.out``."""
    out = Path(cfg.out)  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    if cfg.checkpoint:
        write_checkpoint(cfg, model, ema_model, train_state)
    (out / "metrics.json").write_text(json.dumps(record, indent=1, default=float) + "\n")
    if not cfg.figures:
        return
    unit = "Euler step" if get_method(cfg.method).velocity_only else "step"

    def name(k: str) -> str:
        return f"{k} {unit}{'s' if k != '1' else ''}"

    samples = {f"{name(k)}, SW2 {m['sw2']:.3f}": ev["samples"][k] for k, m in ev["metrics"].items()}
    figures.plot_samples(ev["target"], samples, out / "samples.png", suptitle=f"{cfg.method} on {cfg.dataset}")
    figures.plot_trajectories(
        {name(k): tr for k, tr in ev["trajectories"].items()}, ev["target"], out / "trajectories.png"
    )
    h = record["history"]
    has_alpha = any(not math.isnan(a) for a in h["alpha"])
    figures.plot_training(
        h["step"],
        {"loss": h["loss"]},
        out / "training.png",
        errors={"all rows": h["mse"], "r = t rows": h["fm_mse"]},
        alpha=h["alpha"] if has_alpha else None,
        title=f"{cfg.method} on {cfg.dataset}",
    )
    if "conflict" in record and record["conflict"]["steps"]:
        c = record["conflict"]
        figures.plot_conflict(
            c["steps"],
            c["cosines"],
            out / "conflict.png",
            title=f"{cfg.method}: gradient cosines of the MeanFlow loss terms",
        )


HELP: dict[str, str] = {
    "method": "objective (registry.METHODS)",
    "dataset": "target distribution",
    "steps": "training steps",
    "batch": "batch size",
    "seed": "seed of the initialization and of every training draw",
    "lr": "Adam learning rate (peak, after warm-up)",
    "lr_schedule": "constant, cosine or linear decay after warm-up",
    "lr_final": "final learning rate as a fraction of lr (cosine and linear)",
    "warmup": "linear warm-up steps",
    "beta2": "Adam beta2",
    "grad_clip": "gradient-norm clip (0: off)",
    "ema": "EMA decay of the evaluated model (torch AveragedModel); 0: evaluate the raw model",
    "time_dist": "uniform or logit_normal times",
    "time_mean": "logit-normal mean",
    "time_std": "logit-normal std",
    "equal_fraction": "share of r = t rows (default: the method's, 0.5)",
    "equal_draw": "times of the r = t rows: pair (t = max of the two draws, MeanFlow's code) or single (a fresh "
    "draw, alpha-Flow's code)",
    "weight_p": "adaptive weight power p of 1 / (||D||^2 + c)^p; 0 = plain squared error (MeanFlow paper: 1)",
    "weight_c": "adaptive weight constant c",
    "reduction": "sum or mean of the squared error over data dims",
    "jvp": "JVP strategy: nograd, joint or finite_difference",
    "tangent": "JVP tangent: conditional (e - x, MeanFlow) or model (the network's u(z, t, t), improved MeanFlow)",
    "aux_weight": "improved MeanFlow: weight of the auxiliary loss ||u(z, t, t) - v||^2 on every row (0: off)",
    "alpha_start": "alpha-Flow: sigmoid window start, as a fraction of steps (alpha = 1 before)",
    "alpha_end": "alpha-Flow: sigmoid window end, as a fraction of steps (alpha = 0 after)",
    "alpha_gamma": "alpha-Flow: sigmoid steepness",
    "eta": "alpha-Flow: alpha < eta runs MeanFlow, alpha > 1 - eta trajectory FM",
    "kim_k": "Kim et al.: exponent of the progressive interval weight",
    "min_snr_gamma": "Kim et al.: Min-SNR clamp on r = t rows",
    "conditional": "class-conditional network (default: only for the mixture)",
    "omega": "guidance: weight of the conditional velocity e - x",
    "kappa": "guidance: weight of the network's conditional velocity (scale omega / (1 - kappa))",
    "drop_prob": "guidance: label dropout probability",
    "guidance_interval": "guidance: t interval where guidance applies",
    "width": "hidden width of the MLP",
    "depth": "hidden layers of the MLP",
    "emb_dim": "width of each sinusoidal time embedding",
    "max_freq": "highest angular frequency of the time embeddings (keep it low for JVP objectives)",
    "coupling": "noise-data pairing: independent, or ot (exact minibatch optimal transport; scipy when installed)",
    "ot_block": "rows per optimal-transport assignment (coupling ot)",
    "reflow_from": "coupling reflow: checkpoint.pt of the teacher whose ODE endpoints pair with the noise",
    "reflow_pool": "coupling reflow: number of (teacher endpoint, noise) pairs computed at the start",
    "reflow_steps": "coupling reflow: Euler steps of the teacher's ODE",
    "init_from": "checkpoint.pt of a toy run (e.g. flow matching) whose network, its EMA when saved, initialises "
    "the model (same --width/--depth/--emb-dim/--arch/--act)",
    "teacher": "checkpoint.pt of a toy run used as a frozen teacher: its velocity at (z_t, t) replaces e - x in "
    "the target and the JVP tangent (distillation)",
    "act": "activation of the network: silu, gelu or relu",
    "arch": "network: plain MLP or residual (pre-norm blocks that each see the time embeddings)",
    "eval_points": "generated and target points of the evaluation",
    "eval_steps": "sampling step counts to evaluate (FM: Euler steps)",
    "energy_points": "points used by the energy distance",
    "conflict_every": "measure the gradient cosines of L_TFM, L_FM' and L_TCc every N steps (0: off)",
    "conflict_batch": "batch of each gradient-cosine measurement",
    "log_every": "history period in steps",
    "threads": "torch CPU threads",
    "out": "output folder (default: runs/toy2d/<method>_<dataset>_s<seed>)",
    "figures": "write PNG figures",
    "checkpoint": "write checkpoint.pt (model, EMA, config and the training state that --resume continues from)",
    "checkpoint_every": "also write checkpoint.pt every N training steps, so that --resume can continue an "
    "interrupted run (0: only at the end)",
    "progress": "show the progress bar",
}


#: The sections of ``--help``: every option of :class:`TrainConfig`, grouped by what it concerns.
GROUPS: dict[str, tuple[str, ...]] = {
    "run": ("method", "dataset", "steps", "batch", "seed"),
    "optimisation": ("lr", "lr_schedule", "lr_final", "warmup", "beta2", "grad_clip", "ema"),
    "times, weighting and reduction (every objective)": (
        "time_dist",
        "time_mean",
        "time_std",
        "equal_fraction",
        "equal_draw",
        "weight_p",
        "weight_c",
        "reduction",
    ),
    "JVP objectives (MeanFlow family)": ("jvp", "tangent", "aux_weight"),
    "alpha-Flow (--method alphaflow)": ("alpha_start", "alpha_end", "alpha_gamma", "eta"),
    "Kim et al. (--method kim)": ("kim_k", "min_snr_gamma"),
    "noise-data coupling": ("coupling", "ot_block", "reflow_from", "reflow_pool", "reflow_steps"),
    "starting from a pretrained network": ("init_from", "teacher"),
    "conditioning and guidance (class-conditional runs)": (
        "conditional",
        "omega",
        "kappa",
        "drop_prob",
        "guidance_interval",
    ),
    "network": ("width", "depth", "emb_dim", "max_freq", "act", "arch"),
    "evaluation and diagnostics": ("eval_points", "eval_steps", "energy_points", "conflict_every", "conflict_batch"),
    "output, checkpoints and resuming": (
        "out",
        "figures",
        "checkpoint",
        "checkpoint_every",
        "log_every",
        "progress",
        "threads",
    ),
}


def _parser() -> argparse.ArgumentParser:
    p = cli.make_parser(
        "python -m examples.toy2d.train",
        __doc__.split("\n\n")[0],
        usage="%(prog)s [-h] [--method NAME] [--dataset NAME] [--steps N] [options]",
    )
    groups = cli.add_config_options(
        p, TrainConfig, HELP, RANGES, choices(), metavars={"guidance_interval": ("LO", "HI")}, groups=GROUPS
    )
    groups["output, checkpoints and resuming"].add_argument(
        "--resume",
        action="store_true",
        help="continue the run whose checkpoint.pt is in --out (written every --checkpoint-every steps "
        "and at the end) exactly where it stopped; options not given are the checkpoint's, a "
        "training option that differs from it is refused",
    )
    groups["times, weighting and reduction (every objective)"].add_argument(
        "--recipe",
        choices=sorted(mfl.presets.RECIPES),
        help="start from a named recipe's times, weighting and reduction (mfl.presets.RECIPES: imagenet = "
        "the papers' defaults, small_data = this study's); options given explicitly override it",
    )
    return p


def default_out(method: str, dataset: str, seed: int) -> str:
    """The output folder of a command-line run without ``--out``."""
    return f"runs/toy2d/{method}_{dataset}_s{seed}"


def config_from_argv(argv: list[str] | None = None) -> tuple[TrainConfig, bool]:
    """The options of a command line, and whether it asks to resume the run.

    Every error of the options is an argparse usage error (exit status 2) naming the option: a value out of its
    range or choices, an option given that has no effect with the others (:meth:`TrainConfig.unused`), a
    conflict between options, an option the objective itself refuses, and for ``--resume`` a missing checkpoint
    or one trained with other options.

    Args:
        argv: The arguments (``None``: ``sys.argv[1:]``).

    Returns:
        ``(config, resume)``.
    """
    parser = _parser()
    given = cli.parse_explicit(parser, argv)
    resume = given.pop("resume", False)
    recipe = given.pop("recipe", None)
    try:
        method = given.get("method", TrainConfig.method)
        from_recipe = (
            {}
            if recipe is None
            else mfl.presets.RECIPES[recipe].flat_options(
                {"fm": "flow_matching", "alphaflow": "alphaflow"}.get(method, "meanflow")
            )
        )
        options = {
            "out": default_out(method, given.get("dataset", TrainConfig.dataset), given.get("seed", TrainConfig.seed)),
            **from_recipe,
            **given,
        }
        if resume:
            options = {**saved_options(options["out"]), **options}
        cfg = TrainConfig(**options)
        cli.check_unused(cfg, given)
        build_objective(cfg)  # the objective's own checks of its options
        if resume:
            load_resumable(cfg)
    except MethodUnavailable as err:
        raise SystemExit(f"error: {err}") from None
    except ValueError as err:
        cli.usage_error(parser, err)
    return cfg, resume


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the record."""
    cfg, resume = config_from_argv(argv)
    record = train(cfg, resume=resume)
    ref = record["reference"]["sw2"]
    resumed = f", resumed at step {record['resumed_at'][-1]}" if resume else ""
    print(
        f"{cfg.method} on {cfg.dataset}, {cfg.steps} steps{resumed}, {record['train_seconds']:.0f} s "
        f"(two target sets differ by SW2 {ref:.3f})"
    )
    for k, m in record["metrics"].items():
        cells = f"   on dark cells {m['on_cells']:.3f}" if "on_cells" in m else ""
        print(f"  {k:>4} step(s): sliced W2 {m['sw2']:.4f}   energy distance {m['energy']:.5f}{cells}")
    print(f"wrote {cfg.out}/metrics.json and figures")
    return record


if __name__ == "__main__":
    main()
