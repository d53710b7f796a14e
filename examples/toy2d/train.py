"""Train any objective of meanflow_losses on a 2-D toy distribution, evaluate it, save a record and figures.

    python -m examples.toy2d.train --method meanflow --dataset checkerboard --steps 4000
    python -m examples.toy2d.train --method alphaflow --alpha-end 0.25 --equal-fraction 0.5
    python -m examples.toy2d.train --method meanflow --dataset mixture --omega 1.0 --kappa 0.5

Writes ``<out>/checkpoint.pt`` (model, EMA and config), ``<out>/metrics.json`` (config, metrics, training
history) and PNG figures. Metrics are measured against fresh target samples: sliced Wasserstein-2 (512
projections) and energy distance of 1-, 2-, 4- and 100-step samples. ``python -m examples.toy2d.train --help``
lists every option.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

import meanflow_losses as mfl
from examples.toy2d import datasets, figures
from examples.toy2d.metrics import energy_distance, sliced_w2
from examples.toy2d.nets import ACTIVATIONS, ARCHS, VelocityMLP
from examples.toy2d.registry import METHODS, MethodUnavailable, build_objective, get_method, need

__all__ = ["TrainConfig", "evaluate", "main", "ot_pair", "train"]

EVAL_SEED = 1_000_003  # the evaluation draws (targets, noise) are the same for every run of a seed


@dataclass
class TrainConfig:
    """Every option of a toy run; the defaults are the recipe tuned on the checkerboard (README.md)."""

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
    progress: bool = True

    def __post_init__(self) -> None:
        spec = get_method(self.method)
        if self.dataset not in datasets.DATASETS:
            raise ValueError(f"dataset={self.dataset!r} is not one of {sorted(datasets.DATASETS)}")
        for name in ("steps", "batch", "eval_points", "log_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr_schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"lr_schedule must be constant, cosine or linear, got {self.lr_schedule!r}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be a decay in [0, 1), got {self.ema}")
        if self.tangent not in ("conditional", "model"):
            raise ValueError(f"tangent must be 'conditional' or 'model', got {self.tangent!r}")
        if self.tangent != "conditional" and not spec.jvp:
            jvp_methods = tuple(name for name, m in METHODS.items() if m.jvp)
            raise ValueError(
                f"tangent={self.tangent!r} needs a JVP objective {jvp_methods}, got method={self.method!r}"
            )
        if self.coupling not in ("independent", "ot"):
            raise ValueError(f"coupling must be 'independent' or 'ot', got {self.coupling!r}")
        if self.ot_block < 1:
            raise ValueError(f"ot_block must be >= 1, got {self.ot_block}")
        if self.act not in ACTIVATIONS:
            raise ValueError(f"act must be one of {sorted(ACTIVATIONS)}, got {self.act!r}")
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {list(ARCHS)}, got {self.arch!r}")
        if self.equal_draw not in ("pair", "single"):
            raise ValueError(f"equal_draw must be 'pair' or 'single', got {self.equal_draw!r}")
        if self.equal_draw != "pair" and spec.equal_fraction is None:
            raise ValueError(
                f"equal_draw={self.equal_draw!r} needs a method with r = t rows, got method={self.method!r}"
            )
        if self.aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {self.aux_weight}")
        if self.aux_weight > 0 and not spec.aux:
            aux_methods = " or ".join(repr(name) for name, m in METHODS.items() if m.aux)
            raise ValueError(f"aux_weight > 0 needs method {aux_methods}, got method={self.method!r}")
        if not 0.0 <= self.alpha_start <= self.alpha_end:
            raise ValueError(f"need 0 <= alpha_start <= alpha_end, got {self.alpha_start}, {self.alpha_end}")
        self.guidance_interval = tuple(self.guidance_interval)  # type: ignore[assignment]
        self.eval_steps = tuple(int(s) for s in self.eval_steps)

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
        return mfl.TrainingGuidance(omega=self.omega, kappa=self.kappa, interval=self.guidance_interval,
                                    drop_prob=self.drop_prob, null_condition=NullLabel(self.num_classes))

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
    return VelocityMLP(dim=2, hidden=cfg.width, depth=cfg.depth, emb_dim=cfg.emb_dim, max_freq=cfg.max_freq,
                       num_classes=cfg.num_classes, act=cfg.act, arch=cfg.arch)


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
def evaluate(model: torch.nn.Module, cfg: TrainConfig, velocity_only: bool,
             trajectories: bool = False) -> dict[str, Any]:
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
    out["reference"] = {"sw2": sliced_w2(other, target, generator=gp),
                        "energy": energy_distance(other, target, cfg.energy_points)}
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
        eq = cfg.resolved("equal_fraction")
        self.loss = mfl.MeanFlowLoss(
            times=mfl.TimePairSampler(cfg.time_dist, mean=cfg.time_mean, std=cfg.time_std,
                                      equal_fraction=0.75 if eq is None else eq),
            weighting=mfl.AdaptiveWeight(p=1.0, c=cfg.weight_c), reduction="sum", jvp=cfg.jvp, decompose=True)
        self.g = torch.Generator().manual_seed(cfg.seed + 7_777)

    def __call__(self, model: torch.nn.Module, step: int) -> None:
        if not self.tracker.due(step):
            return
        x, y = datasets.sample(self.cfg.dataset, self.cfg.conflict_batch, self.g)
        noise = coupled_noise(self.cfg, x, y, self.g)  # measure the loss that is trained: the same pairing
        out = self.loss(model, x, model_kwargs=_conditioning(self.cfg, y), generator=self.g, step=step, noise=noise)
        self.tracker.measure(model, out.decomposition, step=step)

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
    from scipy.optimize import linear_sum_assignment

    if noise.shape != x.shape:
        raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    if labels is not None and labels.shape != x.shape[:1]:
        raise ValueError(f"labels must have shape {tuple(x.shape[:1])}, got {tuple(labels.shape)}")
    flat_x, flat_n = x.detach().flatten(1).double().cpu(), noise.detach().flatten(1).double().cpu()
    groups = [torch.arange(x.shape[0])] if labels is None else [
        (labels.cpu() == c).nonzero().flatten() for c in labels.cpu().unique()]
    order = torch.arange(x.shape[0])
    for rows_of_group in groups:
        for i in range(0, rows_of_group.numel(), block):
            idx = rows_of_group[i:i + block]
            rows, cols = linear_sum_assignment(torch.cdist(flat_x[idx], flat_n[idx]).square().numpy())
            order[idx[torch.as_tensor(rows)]] = idx[torch.as_tensor(cols)]
    return noise[order.to(noise.device)]


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
    if cfg.coupling == "independent":
        return None
    return ot_pair(x, torch.randn(x.shape, generator=g), cfg.ot_block, y if cfg.num_classes else None)


def train(cfg: TrainConfig, reuse: bool = False) -> dict[str, Any]:
    """Train, evaluate and (when ``cfg.out`` is set) save checkpoint, ``metrics.json`` and figures.

    Args:
        cfg: The options.
        reuse: If ``cfg.out`` already holds a finished run with the same training options (the evaluation options
            may differ), load its checkpoint and only evaluate again.

    Returns:
        The JSON record: ``config``, ``metrics`` (per sampling step count: ``sw2``, ``energy``; of the EMA model
        when ``cfg.ema > 0``, ``metrics_online`` then holds the raw model's), ``reference`` (two target sets),
        ``history`` (``step``, ``loss``, ``mse``, ``fm_mse``, ``alpha``, ``lr``), ``conflict`` (when tracked),
        ``train_seconds``. The sample tensors are under the non-JSON key ``"_eval"``.
    """
    torch.set_num_threads(cfg.threads)
    spec = get_method(cfg.method)
    objective = build_objective(cfg)  # MethodUnavailable propagates to the caller
    if reuse and (found := load_finished(cfg)) is not None:
        return _finish(cfg, *found)
    torch.manual_seed(cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    model = build_model(cfg)
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
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"{cfg.method}/{cfg.dataset} seed {cfg.seed}", disable=not cfg.progress,
               mininterval=0.5, leave=False, file=sys.stderr)
    for step in bar:
        x, y = datasets.sample(cfg.dataset, cfg.batch, g)
        noise = coupled_noise(cfg, x, y, g)
        out = objective(model, x, model_kwargs=_conditioning(cfg, y), generator=g, step=step, noise=noise)
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
    bar.close()
    train_seconds = time.perf_counter() - t0
    record: dict[str, Any] = {
        "config": cfg.to_dict(),
        "method": cfg.method,
        "summary": spec.summary,
        "history": hist,
        "train_seconds": train_seconds,
        "notes": notes,
        "versions": {"torch": torch.__version__, "meanflow_losses": getattr(mfl, "__version__", "?")},
    }
    if probe is not None:
        record["conflict"] = probe.summary()
    return _finish(cfg, model, None if ema is None else ema.module, record)


#: Options that change only the evaluation and the files, not the trained model (ignored by ``reuse``).
EVAL_ONLY = ("eval_points", "eval_steps", "energy_points", "threads", "out", "figures", "checkpoint", "progress")


def load_finished(cfg: TrainConfig) -> tuple[torch.nn.Module, torch.nn.Module | None, dict[str, Any]] | None:
    """The model, EMA model and record of a finished run in ``cfg.out`` trained with the same options, or None."""
    if not cfg.out:
        return None
    out = Path(cfg.out)
    if not ((out / "metrics.json").exists() and (out / "checkpoint.pt").exists()):
        return None
    record = json.loads((out / "metrics.json").read_text())
    mine = json.loads(json.dumps(cfg.to_dict()))
    # an option added after a run was saved counts as having its default value there
    defaults = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(TrainConfig)
                                      if f.default is not dataclasses.MISSING}))
    saved = {**defaults, **record["config"]}
    if any(saved.get(k) != v for k, v in mine.items() if k not in (*EVAL_ONLY, "resolved")):
        return None
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    ema_model = None
    if state["ema"] is not None:
        ema_model = build_model(cfg)
        ema_model.load_state_dict(state["ema"])
    record["config"] = cfg.to_dict()
    record["reevaluated"] = True
    return model, ema_model, record


def _finish(cfg: TrainConfig, model: torch.nn.Module, ema_model: torch.nn.Module | None,
            record: dict[str, Any]) -> dict[str, Any]:
    """Evaluate (the EMA model when there is one), complete the record and save the run."""
    velocity_only = get_method(cfg.method).velocity_only
    ev = evaluate(ema_model if ema_model is not None else model, cfg, velocity_only, trajectories=cfg.figures)
    record["metrics"] = ev["metrics"]
    record["reference"] = ev["reference"]
    if ema_model is not None:
        record["metrics_online"] = evaluate(model, cfg, velocity_only)["metrics"]
    if cfg.out:
        save_run(cfg, record, ev, model, ema_model)
    record["_eval"] = ev
    return record



def save_run(cfg: TrainConfig, record: dict[str, Any], ev: dict[str, Any], model: torch.nn.Module,
             ema_model: torch.nn.Module | None) -> None:
    """Write ``checkpoint.pt``, ``metrics.json`` and the figures of one run into ``cfg.out``."""
    out = Path(cfg.out)  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    if cfg.checkpoint:
        torch.save({"model": model.state_dict(), "ema": None if ema_model is None else ema_model.state_dict(),
                    "config": cfg.to_dict()}, out / "checkpoint.pt")
    (out / "metrics.json").write_text(json.dumps(record, indent=1, default=float) + "\n")
    if not cfg.figures:
        return
    unit = "Euler step" if get_method(cfg.method).velocity_only else "step"

    def name(k: str) -> str:
        return f"{k} {unit}{'s' if k != '1' else ''}"

    samples = {f"{name(k)}, SW2 {m['sw2']:.3f}": ev["samples"][k] for k, m in ev["metrics"].items()}
    figures.plot_samples(ev["target"], samples, out / "samples.png", suptitle=f"{cfg.method} on {cfg.dataset}")
    figures.plot_trajectories({name(k): tr for k, tr in ev["trajectories"].items()}, ev["target"],
                              out / "trajectories.png")
    h = record["history"]
    has_alpha = any(not math.isnan(a) for a in h["alpha"])
    figures.plot_training(h["step"], {"loss": h["loss"]}, out / "training.png",
                          errors={"all rows": h["mse"], "r = t rows": h["fm_mse"]},
                          alpha=h["alpha"] if has_alpha else None, title=f"{cfg.method} on {cfg.dataset}")
    if "conflict" in record and record["conflict"]["steps"]:
        c = record["conflict"]
        figures.plot_conflict(c["steps"], c["cosines"], out / "conflict.png",
                              title=f"{cfg.method}: gradient cosines of the MeanFlow loss terms")


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
    "coupling": "noise-data pairing: independent, or ot (minibatch optimal transport; needs scipy)",
    "ot_block": "rows per optimal-transport assignment (coupling ot)",
    "act": "activation of the network: silu, gelu or relu",
    "arch": "network: plain MLP or residual (pre-norm blocks that each see the time embeddings)",
    "eval_points": "generated and target points of the evaluation",
    "eval_steps": "sampling step counts to evaluate (FM: Euler steps)",
    "energy_points": "points used by the energy distance",
    "conflict_every": "measure the gradient cosines of L_TFM, L_FM' and L_TCc every N steps (0: off)",
    "conflict_batch": "batch of each gradient-cosine measurement",
    "log_every": "history period in steps",
    "threads": "torch CPU threads",
    "out": "output folder (default runs/toy2d/<method>_<dataset>_s<seed>)",
    "figures": "write PNG figures",
    "checkpoint": "write checkpoint.pt",
    "progress": "show the progress bar",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m examples.toy2d.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = str(f.type)
        help_ = HELP.get(f.name, "")
        if f.name == "method":
            p.add_argument(flag, default=default, choices=sorted(METHODS), help=help_)
        elif f.name == "dataset":
            p.add_argument(flag, default=default, choices=sorted(datasets.DATASETS), help=help_)
        elif kind.startswith("bool"):
            p.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=help_)
        elif kind.startswith("tuple[float"):
            p.add_argument(flag, default=default, type=float, nargs=2, metavar=("LO", "HI"), help=help_)
        elif kind.startswith("tuple[int"):
            p.add_argument(flag, default=default, type=int, nargs="+", help=help_)
        else:
            base = kind.split("|")[0].strip()
            p.add_argument(flag, default=default, type={"int": int, "float": float, "str": str}[base], help=help_)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the record."""
    args = _parser().parse_args(argv)
    cfg = TrainConfig(**vars(args))
    if cfg.out is None:
        cfg.out = f"runs/toy2d/{cfg.method}_{cfg.dataset}_s{cfg.seed}"
    try:
        record = train(cfg)
    except MethodUnavailable as err:
        raise SystemExit(f"error: {err}") from None
    ref = record["reference"]["sw2"]
    print(f"{cfg.method} on {cfg.dataset}, {cfg.steps} steps, {record['train_seconds']:.0f} s "
          f"(two target sets differ by SW2 {ref:.3f})")
    for k, m in record["metrics"].items():
        cells = f"   on dark cells {m['on_cells']:.3f}" if "on_cells" in m else ""
        print(f"  {k:>4} step(s): sliced W2 {m['sw2']:.4f}   energy distance {m['energy']:.5f}{cells}")
    print(f"wrote {cfg.out}/metrics.json and figures")
    return record


if __name__ == "__main__":
    main()
