"""Train a DiT on ImageNet-256 latents with any objective of meanflow_losses (FM, MeanFlow, alpha-Flow, ...).

From the repository root (exact per-config commands are in README.md):

    # 8 GPUs, one node
    torchrun --nproc_per_node 8 -m examples.imagenet_dit.train --config meanflow_b2 --data /data/latents/in256 \
        --run-dir runs/mf_b2 --resume
    # preempted? the same command continues from the newest checkpoint (--resume starts fresh when there is none)
    # CPU (Gloo), e.g. a smoke test with a tiny model
    torchrun --nproc_per_node 2 -m examples.imagenet_dit.train --config meanflow_b2 --data ... --set model.depth=2 ...

One step, as the package's DDP-safe pattern prescribes:
  1. every no-grad pass of the objective (the JVP du/dt, the guidance velocities, alpha-Flow's teacher) runs on the
     UNWRAPPED module (``target_model=ddp.module``): torch.func.jvp cannot go through the DDP wrapper;
  2. ONE gradient forward goes through the DDP wrapper, so the backward all-reduces the gradients;
  3. bf16 autocast around the objective; the objective runs its JVP in float32 (``jvp_fp32 = true``).
Then: global-norm gradient clipping, Adam (betas 0.9, 0.95) with linear warm-up, EMA of the weights
(``torch.optim.swa_utils.AveragedModel``).

Non-finite steps: when the loss (on any rank) or the global gradient norm is NaN or inf, the update is skipped
(weights, optimizer state and EMA unchanged; the step counter and the lr schedule advance to the next batch), the
step is logged (``"event": "skipped_step"``) and counted (``skipped_steps`` in every log record and checkpoint);
``train.max_nonfinite_steps`` consecutive skipped steps stop the run with :class:`NonFiniteError`. All ranks decide
together (one all-reduce of the flags), so they stay in lockstep. A checkpoint is never written from weights that
hold a non-finite value: the run stops instead, and the newest (finite) checkpoint stays.

Failures on one rank: every step starts with one all-reduce of "stop requested" and "this rank could not read its
batch" (a corrupt latent row, an I/O error), and a checkpoint ends with one of "rank 0 could not write it"; on a
failure every rank raises (the others name the failing rank and its error) and exits instead of waiting in the next
collective. Other errors on a single rank reach the others through the backend (Gloo: "connection closed by peer"
at once; NCCL: its timeout) and torchrun, which stops the remaining workers when one exits with an error.

Determinism: the global batch of step k is fixed by (seed, k) (latent_data.EpochBatches) and every random draw of
step k on rank i (flip, posterior sample, times, noise, label dropout) comes from a generator seeded by
(seed, k, i). A run resumed from a checkpoint therefore reproduces the uninterrupted run exactly.

Checkpoints (``<run-dir>/checkpoints/step_XXXXXXX.pt``) hold the model, the EMA, the optimizer, the scheduler, the
RNG states of every rank, the step and the config. They are written to a temporary file, fsynced and renamed, with
a SHA-256 in ``step_XXXXXXX.pt.sha256`` that every load verifies, and ``latest`` is switched only afterwards: a run
killed while saving leaves the previous checkpoint usable, and a corrupt file or pointer falls back to the previous
intact checkpoint (dit_runtime). SIGTERM / SIGUSR1 (what schedulers send before preemption) make every rank stop at
the same step after saving.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

import meanflow_losses as mfl
from examples import cli
from examples.imagenet_dit.dit import DiT, DiTConfig, flow_matching_init_, guidance_kwargs, make_dit_config
from examples.imagenet_dit.dit_config import (
    Config,
    ConfigError,
    build_objective,
    list_configs,
    load_config,
    null_class_condition,
)
from examples.imagenet_dit.dit_runtime import (
    CKPT_FORMAT,
    DistInfo,
    any_rank,
    barrier,
    checkpoint_dir,
    find_latest_checkpoint,
    latents_to_uint8,
    load_checkpoint_file,
    raise_failures,
    raise_if_any_failed,
    read_latest_pointer,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    save_image_grid,
    set_rng_state,
    setup_distributed,
    step_seed,
)
from examples.imagenet_dit.latent_data import EpochBatches, LatentShards


class NonFiniteError(RuntimeError):
    """The run keeps producing non-finite losses or gradients, or its weights hold a non-finite value."""


# ------------------------------------------------------------------------------------------------------ model
def dit_config_for(cfg: Config, latent_shape: tuple[int, int, int], num_classes: int) -> DiTConfig:
    m = cfg.model
    overrides = {k: getattr(m, k) for k in ("depth", "hidden_size", "num_heads", "patch_size") if getattr(m, k)}
    try:
        return make_dit_config(
            m.name,
            input_size=latent_shape[1],
            in_channels=latent_shape[0],
            num_classes=num_classes,
            time_scale=m.time_scale,
            decoupled_last_blocks=m.decoupled_last_blocks,
            guidance_inputs=m.guidance_inputs,
            **overrides,
        )
    except ValueError as err:
        raise ConfigError(f"[model]: {err}") from err


def describe(c: DiTConfig | dict) -> str:
    d = c.as_dict() if isinstance(c, DiTConfig) else c
    return (
        f"depth {d['depth']}, hidden {d['hidden_size']}, heads {d['num_heads']}, patch {d['patch_size']}, "
        f"latent {d['in_channels']}x{d['input_size']}x{d['input_size']}, {d['num_classes']} classes"
    )


#: DiTConfig fields that change how the weights are used, not their shapes: a flow-matching checkpoint may start a
#: fine-tuning whose DiT differs in them.
CONDITIONING_ONLY = ("decoupled_last_blocks",)


def check_checkpoint_model(
    ckpt: dict, expected: DiTConfig, path: str | os.PathLike, *, ignore: tuple[str, ...] = ()
) -> None:
    """Refuse a checkpoint of another model size (before load_state_dict fails with a wall of shapes).

    Args:
        ckpt: The checkpoint dict.
        expected: The DiT the config builds.
        path: For the message.
        ignore: DiTConfig fields allowed to differ (e.g. :data:`CONDITIONING_ONLY` for ``init_from_fm``).
    """
    stored = ckpt.get("model_config")
    if stored is None:
        raise ConfigError(f"{path} holds no model_config: it is not a checkpoint written by this train.py")
    want = expected.as_dict()
    diff = [k for k in want if k in stored and stored[k] != want[k] and k not in ignore]
    if diff:
        name = ckpt.get("config", {}).get("model", {}).get("name", "?")
        raise ConfigError(
            f"checkpoint {str(path)!r} is a {name} ({describe(stored)}) but the config builds "
            f"({describe(want)}); differing: {', '.join(diff)}. Use the config the checkpoint was trained with, "
            "or another --run-dir"
        )


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key (old -> new)`` for every setting that differs, ignoring bookkeeping (paths, cadences, [paper])."""
    ignore = {
        "name",
        "paper",
        "data.latents",
        "train.log_every",
        "train.ckpt_every",
        "train.grid_every",
        "train.keep_checkpoints",
        "train.max_nonfinite_steps",
        "train.tensorboard",
        "train.grid_images",
    }
    out = []
    for key in sorted(set(old) | set(new)):
        full = f"{prefix}{key}"
        if full in ignore:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, f"{full}.")
        elif (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            out.append(f"{full} ({a!r} -> {b!r})")
    return out


# ---------------------------------------------------------------------------------------------- the training
def _no_buffer_sync() -> dict[str, bool]:
    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _local(t: Tensor) -> Tensor:
    """This rank's part of a tensor (the local shard of an FSDP2 DTensor)."""
    return t.to_local() if hasattr(t, "to_local") else t


@dataclass
class StepReport:
    """What :meth:`Trainer.optimizer_step` did; every field is identical on every rank."""

    grad_norm: Tensor  # () global gradient norm before clipping
    skipped: bool  # no update: the loss on some rank or the gradient norm was non-finite
    nonfinite_loss: bool
    nonfinite_grad_norm: bool


class Trainer:
    """Everything a step needs: the wrapped model, its target module, EMA, optimizer, scheduler, objective."""

    def __init__(self, cfg: Config, info: DistInfo, dit_cfg: DiTConfig) -> None:
        self.cfg, self.info = cfg, info
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        net = DiT(dit_cfg, grad_checkpointing=cfg.model.grad_checkpointing)
        model = mfl.adapters.from_interval_net(net).to(info.device)
        self.dit_cfg = dit_cfg
        self.objective = build_objective(cfg.objective, dit_cfg.num_classes)
        self._call_kwargs = self._objective_kwargs(self.objective)
        ema_fn = mfl.ema.ema_multi_avg_fn(cfg.ema.half_life(), warmup_ratio=cfg.ema.warmup_ratio or None)
        self.ema = AveragedModel(model, multi_avg_fn=ema_fn, use_buffers=False)
        self.ema.requires_grad_(False)
        self.fsdp = cfg.train.distributed == "fsdp2" and info.distributed
        if self.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(info.device.type, (info.world_size,))
            for m in (self.ema.module, model):  # same sharding for the EMA, so the update is local
                for block in m.net.blocks:
                    fully_shard(block, mesh=mesh)
                fully_shard(m, mesh=mesh)
            self.model, self.target = model, model  # FSDP2 shards in place: no wrapper
        elif info.distributed:
            ddp = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[info.device.index] if info.device.type == "cuda" else None,
                **_no_buffer_sync(),  # the only buffers are constant embeddings
            )
            self.model, self.target = ddp, ddp.module
        else:
            self.model, self.target = model, model
        self.module = model  # the adapter (sharded in place under FSDP2)
        o = cfg.optim
        fused = info.device.type == "cuda" and not self.fsdp
        self.optimizer = torch.optim.Adam(
            self.module.parameters(),
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            weight_decay=o.weight_decay,
            **({"fused": True} if fused else {}),
        )
        warm = o.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: min(1.0, (s + 1) / warm) if warm > 0 else 1.0
        )
        self.teacher: mfl.Teacher | None = None  # frozen distillation teacher (set_teacher), not in checkpoints
        self.step = 0
        self.skipped_steps = 0  # steps whose update was skipped (non-finite), over the whole run
        self.consecutive_skips = 0  # ... in a row, up to the current step
        self.latents_info: dict[str, Any] = {}  # VAE and scaling factor of the data, for sample.py

    @staticmethod
    def _objective_kwargs(objective: Any) -> set[str]:
        try:
            return set(inspect.signature(objective.__call__).parameters)
        except (TypeError, ValueError):
            return set()

    @property
    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.info.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.bf16)

    def loss_and_backward(self, x: Tensor, y: Tensor, generator: torch.Generator, **draws: Any) -> Any:
        """The DDP-safe step: no-grad passes on ``self.target``, ONE gradient forward through ``self.model``.

        The objective's value checks (one host sync each) are off: the batch was validated when it was read, and a
        non-finite loss is handled by :meth:`optimizer_step` (skipped on every rank alike) instead of raising on one.
        """
        kwargs: dict[str, Any] = {"model_kwargs": {"y": y}, **draws}
        for name, value in (("target_model", self.target), ("generator", generator), ("step", self.step)):
            if name in self._call_kwargs:
                kwargs[name] = value
        if self.teacher is not None:
            kwargs["teacher"] = self.teacher
        with self.autocast, mfl.value_checks(False):
            out = self.objective(self.model, x, **kwargs)
        out.loss.backward()
        return out

    def optimizer_step(self, loss: Tensor | None = None) -> StepReport:
        """Clip, step, schedule, EMA -- or skip the update when ``loss`` or the global gradient norm is non-finite.

        A skipped step leaves the weights, the optimizer state and the EMA as they were; the step counter and the
        lr schedule still advance (the next step takes the next batch). The decision is all-reduced, so every rank
        skips the same steps.

        Args:
            loss: this rank's loss of the step (any shape); None checks the gradients only.

        Returns:
            The global gradient norm before clipping and whether (and why) the update was skipped.
        """
        clip = self.cfg.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), clip if clip > 0 else math.inf)
        if hasattr(norm, "full_tensor"):  # DTensor under FSDP2
            norm = norm.full_tensor()
        bad_loss = False if loss is None else ~torch.isfinite(loss.detach()).all()
        bad_loss, bad_norm = any_rank(self.info, bad_loss, ~torch.isfinite(norm))
        skipped = bad_loss or bad_norm
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if not skipped:
            self.ema.update_parameters(self.module)
        self.step += 1
        self.skipped_steps += int(skipped)
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        return StepReport(norm.detach(), skipped, bad_loss, bad_norm)

    def nonfinite_weights(self) -> list[str]:
        """Names of the model and EMA parameters holding a NaN or inf on this rank (its shards under FSDP2)."""
        named = [
            (f"{prefix}.{n}", _local(p.detach()))
            for prefix, m in (("model", self.module), ("ema", self.ema.module))
            for n, p in m.named_parameters()
        ]
        finite = torch.stack([torch.isfinite(t).all() for _, t in named]).tolist()  # one host sync
        return [name for (name, _), ok in zip(named, finite, strict=True) if not ok]

    # -- fine-tuning and distillation ------------------------------------------------------------------------
    def init_from_fm(self, path: str | os.PathLike, weights: str = "ema") -> Path:
        """Start from a flow-matching checkpoint of this train.py: u(z, t, t) is the FM network exactly.

        The FM weights (its EMA network by default) go into the model and the EMA, with ``Emb_h`` folded by
        :func:`~examples.imagenet_dit.dit.flow_matching_init_` (constant ``Emb_h(0)``, zero last-layer weight), so
        the network equals the FM network at ``r = t`` (and, without decoupled blocks, for every ``r``). The
        optimizer and the step counter stay fresh. Every rank calls it (FSDP2 scatters the full tensors).

        Args:
            path: A run directory (its newest intact checkpoint) or a checkpoint file.
            weights: ``"ema"`` or ``"model"``: which network of the FM checkpoint.

        Returns:
            The checkpoint file used.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        src = resolve_checkpoint(path)
        ckpt = load_checkpoint_file(src)
        check_checkpoint_model(ckpt, self.dit_cfg, src, ignore=CONDITIONING_ONLY)
        net = DiT(self.dit_cfg)  # a plain CPU copy: the fold needs full tensors, whatever the sharding
        net.load_state_dict(ckpt[weights])
        state = flow_matching_init_(net).state_dict()
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.module, state, options=opts)
        set_model_state_dict(self.ema.module, state, options=opts)
        self.ema.n_averaged.zero_()  # the EMA restarts from these weights
        return src

    def set_teacher(
        self,
        path: str | os.PathLike,
        weights: str = "ema",
        guidance_scale: float = 1.0,
        interval: tuple[float, float] = (0.0, 1.0),
    ) -> mfl.Teacher:
        """Load a frozen teacher from a checkpoint of this train.py (any DiT size of the same latents and classes).

        The teacher is a full copy on every rank, in eval mode, without gradients and outside DDP / FSDP2; the
        objective calls it without gradient at ``(z_t, t, t)``, with classifier-free guidance of its own when
        ``guidance_scale != 1`` (the null class as the unconditional branch).

        Raises:
            ConfigError: The objective takes no ``teacher=``, or the teacher's latents or classes differ.
        """
        if "teacher" not in self._call_kwargs:
            raise ConfigError(
                f"train.teacher_checkpoint is set but {type(self.objective).__name__} takes no teacher= at call time"
            )
        src = resolve_checkpoint(path)
        ckpt = load_checkpoint_file(src)
        stored = ckpt.get("model_config")
        if stored is None:
            raise ConfigError(f"{src} holds no model_config: it is not a checkpoint written by this train.py")
        fields = set(DiTConfig.__dataclass_fields__)
        teacher_cfg = DiTConfig(**{k: v for k, v in stored.items() if k in fields})
        for key in ("input_size", "in_channels", "num_classes"):
            have, want = getattr(teacher_cfg, key), getattr(self.dit_cfg, key)
            if have != want:
                raise ConfigError(f"teacher {str(src)!r} has {key} = {have}, but the data needs {want}")
        net = DiT(teacher_cfg)
        net.load_state_dict(ckpt[weights])
        net.requires_grad_(False).eval().to(self.info.device)
        null = null_class_condition(teacher_cfg.num_classes) if guidance_scale != 1.0 else None
        self.teacher = mfl.Teacher(
            mfl.adapters.from_interval_net(net),
            guidance_scale=float(guidance_scale),
            interval=(float(interval[0]), float(interval[1])),
            null_condition=null,
        )
        return self.teacher

    # -- state ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Full (unsharded) state on rank 0; every rank must call it (FSDP2 gathers)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.module, options=opts)
        ema_sd = get_model_state_dict(self.ema.module, options=opts)
        optim_sd = get_optimizer_state_dict(self.module, self.optimizer, options=opts)
        rngs = [rng_state()]
        if self.info.distributed:
            rngs = [None] * self.info.world_size
            dist.all_gather_object(rngs, rng_state())
        return {
            "format": CKPT_FORMAT,
            "step": self.step,
            "model": model_sd,  # the adapter's names are the bare DiT's
            "ema": ema_sd,
            "ema_n_averaged": self.ema.n_averaged.detach().cpu(),
            "optimizer": optim_sd,
            "scheduler": self.scheduler.state_dict(),
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "rng": rngs,
            "world_size": self.info.world_size,
            "model_config": self.dit_cfg.as_dict(),
            "latents": self.latents_info,
            "config": self.cfg.to_dict(),
            "torch_version": str(torch.__version__),
            "meanflow_losses_version": getattr(mfl, "__version__", "?"),
        }

    def load_state_dict(self, ckpt: dict, *, weights_only: bool = False) -> None:
        """Restore from a checkpoint dict (every rank holds it). ``weights_only``: model and EMA only."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.module, ckpt["model"], options=opts)
        set_model_state_dict(self.ema.module, ckpt["ema"], options=opts)
        self.ema.n_averaged.copy_(ckpt["ema_n_averaged"].to(self.ema.n_averaged.device))
        if weights_only:
            return
        set_optimizer_state_dict(self.module, self.optimizer, ckpt["optimizer"], options=opts)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.step = int(ckpt["step"])
        self.skipped_steps = int(ckpt.get("skipped_steps", 0))  # absent in checkpoints of older train.py
        self.consecutive_skips = int(ckpt.get("consecutive_skips", 0))
        rngs = ckpt.get("rng") or []
        if ckpt.get("world_size") == self.info.world_size and len(rngs) > self.info.rank:
            set_rng_state(rngs[self.info.rank])


# ----------------------------------------------------------------------------------------------- sample grids
@torch.no_grad()
def sample_grid(
    model: Callable[..., Tensor],
    dit_cfg: DiTConfig,
    n: int,
    seed: int,
    device: torch.device,
    two_step_method: str,
    two_step_mid: float,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
) -> dict[str, Tensor]:
    """1- and 2-step samples (latents) from fixed noise and labels (guidance-input DiTs: at the given scale)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = (n, dit_cfg.in_channels, dit_cfg.input_size, dit_cfg.input_size)
    noise = torch.randn(shape, generator=g).to(device)
    y = (torch.arange(n) % dit_cfg.num_classes).to(device)
    renoise = [torch.randn(shape, generator=g).to(device)]
    kw = {"y": y, **guidance_kwargs(dit_cfg, n, guidance_scale, guidance_interval, device)}
    out = {"1step": mfl.sample(model, noise, steps=1, model_kwargs=kw)}
    out[f"2step_{two_step_method}"] = mfl.sample(
        model,
        noise,
        grid=[1.0, two_step_mid, 0.0],
        method=two_step_method,
        model_kwargs=kw,
        renoise=renoise if two_step_method == "consistency" else None,
    )
    return out


# ------------------------------------------------------------------------------------------------------- main
def _parser() -> argparse.ArgumentParser:
    p = cli.make_parser(
        "python -m examples.imagenet_dit.train", "Train a DiT with a meanflow_losses objective (torchrun DDP/FSDP2)."
    )
    p.add_argument(
        "--config", required=True, help=f"a name in configs/ ({', '.join(list_configs())}) or a path to a .toml"
    )
    p.add_argument("--data", default=None, help="latent directory from prepare_latents.py (overrides data.latents)")
    p.add_argument("--run-dir", required=True, help="checkpoints, logs and sample grids go here")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --run-dir")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.lr=2e-4 (repeatable)",
    )
    p.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="save and exit once this step is reached (the schedule still spans train.steps)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument(
        "--init-from-fm",
        default=None,
        metavar="PATH",
        help="start a fine-tuning from a flow-matching run or checkpoint (sets train.init_from_fm)",
    )
    p.add_argument(
        "--teacher",
        default=None,
        metavar="PATH",
        help="distil from a frozen flow-matching run or checkpoint (sets train.teacher_checkpoint)",
    )
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line's options (``--help`` lists every config of configs/)."""
    return _parser().parse_args(argv)


class _StopFlag:
    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: Any) -> None:
        self.requested = True


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.init_from_fm:
        overrides.append(f"train.init_from_fm={json.dumps(str(args.init_from_fm))}")
    if args.teacher:
        overrides.append(f"train.teacher_checkpoint={json.dumps(str(args.teacher))}")
    cfg = load_config(args.config, overrides)
    if args.data:
        cfg.data.latents = args.data
    if not cfg.data.latents:
        raise ConfigError("no latent directory: pass --data or set data.latents")
    flags = {"init_from_fm": "--init-from-fm", "teacher_checkpoint": "--teacher"}
    for key in cfg.train.requires:
        if not getattr(cfg.train, key):
            hint = f" (or pass {flags[key]})" if key in flags else ""
            raise ConfigError(f"config {args.config} needs train.{key}: set it{hint}")
    info = setup_distributed(args.device)
    try:
        return _train(cfg, args, info)
    finally:
        if info.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(cfg: Config, args: argparse.Namespace, info: DistInfo) -> dict:
    run_dir = Path(args.run_dir)
    if cfg.train.init_step and not cfg.train.init_from:
        raise ConfigError(
            f"{cfg.name}: train.init_step = {cfg.train.init_step} needs train.init_from (the run or "
            "checkpoint to continue), e.g. --set train.init_from=runs/alphaflow_xl2"
        )
    data = LatentShards(cfg.data.latents)
    if cfg.data.global_batch % info.world_size:
        raise ConfigError(f"data.global_batch {cfg.data.global_batch} is not divisible by {info.world_size} processes")
    local_batch = cfg.data.global_batch // info.world_size
    batches = EpochBatches(len(data), cfg.data.global_batch, cfg.train.seed)
    dit_cfg = dit_config_for(cfg, data.latent_shape, data.num_classes)
    if info.is_main:
        print(
            f"[train] {cfg.name}: {cfg.model.name} ({describe(dit_cfg)}), objective {cfg.objective['type']}, "
            f"{info.world_size} x {local_batch} = {cfg.data.global_batch} per step, {cfg.train.steps} steps, "
            f"{len(data)} images, device {info.device}"
        )
        if cfg.paper.title:
            print(
                f"[train] reproduces: {cfg.paper.title} ({cfg.paper.source}): {cfg.paper.gpus} GPUs, global batch "
                f"{cfg.paper.global_batch}, {cfg.paper.steps} steps, paper FID 1-NFE {cfg.paper.fid_1nfe} / "
                f"2-NFE {cfg.paper.fid_2nfe}"
            )
    trainer = Trainer(cfg, info, dit_cfg)
    m = data.manifest
    trainer.latents_info = {
        "vae": m["vae"],
        "scaling_factor": data.scaling_factor,
        "image_size": m["image_size"],
        "num_classes": data.num_classes,
    }

    existing = sorted(checkpoint_dir(run_dir).glob("step_*.pt"))
    if existing and not args.resume:
        raise SystemExit(
            f"{run_dir} already holds checkpoints ({existing[-1].name}); pass --resume to continue it "
            "or choose another --run-dir"
        )
    ckpt_path = find_latest_checkpoint(run_dir)
    if existing and ckpt_path is None:
        raise RuntimeError(
            f"--resume: none of the checkpoints in {checkpoint_dir(run_dir)} can be loaded "
            f"({', '.join(p.name for p in existing)}); see the messages above"
        )
    if ckpt_path is not None:
        ckpt = load_checkpoint_file(ckpt_path)
        check_checkpoint_model(ckpt, dit_cfg, ckpt_path)
        trainer.load_state_dict(ckpt)
        changed = config_changes(ckpt.get("config", {}), cfg.to_dict())
        del ckpt
        if info.is_main:
            print(f"[train] resumed from {ckpt_path} at step {trainer.step}")
            if changed:
                print(
                    "[train] note: the config differs from the checkpoint's in "
                    + ", ".join(changed)
                    + "; the optimizer's hyper-parameters (lr, betas, ...) come from the checkpoint",
                    file=sys.stderr,
                )
    elif cfg.train.init_from:
        src = resolve_checkpoint(cfg.train.init_from)
        ckpt = load_checkpoint_file(src)
        check_checkpoint_model(ckpt, dit_cfg, src)
        trainer.load_state_dict(ckpt, weights_only=True)
        trainer.step = cfg.train.init_step
        for group in trainer.optimizer.param_groups:  # the scheduler's counter follows the step
            group["lr"] = cfg.optim.lr
        trainer.scheduler.last_epoch = cfg.train.init_step
        del ckpt
        if info.is_main:
            print(f"[train] initialised model and EMA from {src}; starting at step {trainer.step}")
    elif cfg.train.init_from_fm:
        src = trainer.init_from_fm(cfg.train.init_from_fm, cfg.train.init_from_fm_weights)
        if info.is_main:
            print(
                f"[train] initialised model and EMA from the flow-matching checkpoint {src} "
                f"({cfg.train.init_from_fm_weights} weights, Emb_h folded); starting at step 0"
            )
    elif args.resume and info.is_main:
        print(f"[train] --resume: no checkpoint in {run_dir}, starting from step 0")
    if cfg.train.teacher_checkpoint:
        trainer.set_teacher(
            cfg.train.teacher_checkpoint,
            cfg.train.teacher_weights,
            cfg.train.teacher_guidance_scale,
            cfg.train.teacher_guidance_interval,
        )
        if info.is_main:
            lo, hi = cfg.train.teacher_guidance_interval
            print(
                f"[train] distilling from the frozen teacher {cfg.train.teacher_checkpoint} "
                f"({cfg.train.teacher_weights} weights, guidance scale {cfg.train.teacher_guidance_scale:g} "
                f"on t in [{lo:g}, {hi:g}])"
            )

    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    barrier(info)

    stop_flag = _StopFlag()
    previous_handlers = {}
    if threading_main():
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError, OSError):
                previous_handlers[sig] = signal.signal(sig, stop_flag)
    try:
        return _loop(cfg, args, info, trainer, data, batches, run_dir, stop_flag)
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)


def _loop(
    cfg: Config,
    args: argparse.Namespace,
    info: DistInfo,
    trainer: Trainer,
    data: LatentShards,
    batches: EpochBatches,
    run_dir: Path,
    stop_flag: _StopFlag,
) -> dict:

    logger = JsonlLogger(run_dir, cfg.train.tensorboard) if info.is_main else None
    vae_cache: dict[str, Any] = {}
    stop_at = cfg.train.steps if args.stop_at is None else min(args.stop_at, cfg.train.steps)
    sums: dict[str, Tensor] = {}
    count = 0  # steps with an update since the last log record
    saved_step = -1
    t_last, step_last = time.perf_counter(), trainer.step
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)
    g = torch.Generator(device=info.device)

    def checkpoint_now() -> None:
        nonlocal saved_step
        bad = trainer.nonfinite_weights()
        if any_rank(info, bool(bad))[0]:
            raise NonFiniteError(
                f"step {trainer.step}: the weights hold non-finite values ({', '.join(bad[:4]) or 'on another rank'}"
                f"{', ...' if len(bad) > 4 else ''}); no checkpoint was written. {newest_checkpoint_note(run_dir)}"
            )
        state = trainer.state_dict()
        error = None
        if info.is_main:
            try:
                path = save_checkpoint(run_dir, trainer.step, state, cfg.train.keep_checkpoints)
                print(f"[train] step {trainer.step}: saved {path}")
            except Exception as err:  # disk full, permissions: every rank stops (below), none waits
                error = err
        raise_if_any_failed(info, error, f"writing the checkpoint of step {trainer.step}")
        saved_step = trainer.step

    try:
        while trainer.step < stop_at:
            step = trainer.step
            g.manual_seed(step_seed(cfg.train.seed, step, info.rank))
            batch, error = None, None
            try:
                batch = data.sample_batch(batches.indices(step, info.rank, info.world_size), g, info.device)
            except Exception as err:  # a corrupt row, an I/O error: every rank hears of it just below
                error = err
            stop, failed = any_rank(info, stop_flag.requested, error is not None)
            if failed:
                raise_failures(info, error, f"reading its batch of step {step + 1}")
            if stop:
                if saved_step != trainer.step:
                    checkpoint_now()
                if info.is_main:
                    print(f"[train] stop requested (signal): exiting at step {trainer.step}")
                break
            x, y = batch
            out = trainer.loss_and_backward(x, y, g)
            report = trainer.optimizer_step(out.loss)
            if report.skipped:
                note_skipped_step(trainer, report, cfg, logger, run_dir)
            else:
                for k, v in out.terms.items():
                    if isinstance(v, Tensor) and v.numel() == 1:
                        sums[k] = sums.get(k, 0) + v.detach().float().reshape(())
                sums["grad_norm"] = sums.get("grad_norm", 0) + report.grad_norm.float()
                count += 1

            if trainer.step % cfg.train.log_every == 0 or trainer.step == stop_at:
                rec = interval_means(sums, count, info)
                now = time.perf_counter()
                steps_done = trainer.step - step_last
                rec.update(
                    step=trainer.step,
                    lr=trainer.scheduler.get_last_lr()[0],
                    skipped_steps=trainer.skipped_steps,
                    img_per_s=steps_done * cfg.data.global_batch / max(now - t_last, 1e-9),
                    sec_per_step=(now - t_last) / max(steps_done, 1),
                )
                if info.device.type == "cuda":
                    rec["peak_mem_gib"] = torch.cuda.max_memory_allocated(info.device) / 2**30
                if logger is not None:
                    logger.log(rec)
                sums, count, t_last, step_last = {}, 0, now, trainer.step

            if cfg.train.grid_every and (trainer.step % cfg.train.grid_every == 0 or trainer.step == cfg.train.steps):
                write_grids(trainer, cfg, data, info, run_dir, vae_cache)

            if trainer.step % cfg.train.ckpt_every == 0 or trainer.step == stop_at:
                checkpoint_now()
    finally:
        if logger is not None:
            logger.close()
    return {"step": trainer.step, "run_dir": str(run_dir), "skipped_steps": trainer.skipped_steps}


def interval_means(sums: dict[str, Tensor], count: int, info: DistInfo) -> dict[str, float]:
    """The logged terms averaged over the ``count`` updated steps of a log interval and over the ranks.

    Empty when every step of the interval was skipped (the same on every rank: skips are decided together).
    """
    if count == 0:
        return {}
    names = sorted(sums)
    vec = torch.stack([sums[k] for k in names]) / count
    if info.distributed:
        dist.all_reduce(vec)
        vec /= info.world_size
    return {k: float(v) for k, v in zip(names, vec.tolist(), strict=True)}


def note_skipped_step(
    trainer: Trainer, report: StepReport, cfg: Config, logger: JsonlLogger | None, run_dir: Path
) -> None:
    """Log a skipped (non-finite) step; raise :class:`NonFiniteError` after too many of them in a row."""
    what = " and ".join(
        w for w, bad in (("loss", report.nonfinite_loss), ("gradient norm", report.nonfinite_grad_norm)) if bad
    )
    if logger is not None:
        logger.log(
            {
                "event": "skipped_step",
                "step": trainer.step,
                "nonfinite": what,
                "consecutive": trainer.consecutive_skips,
                "skipped_steps": trainer.skipped_steps,
            }
        )
    limit, n = cfg.train.max_nonfinite_steps, trainer.consecutive_skips
    if n >= limit:
        span = f"step {trainer.step}" if n == 1 else f"steps {trainer.step - n + 1} to {trainer.step}"
        raise NonFiniteError(
            f"{span}: {n} consecutive step{'s' if n > 1 else ''} with a non-finite {what} "
            f"(train.max_nonfinite_steps = {limit}); stopping without saving. {newest_checkpoint_note(run_dir)} "
            "Lower optim.lr or clip harder (optim.grad_clip), check the latents, or allow longer streaks with "
            "--set train.max_nonfinite_steps=N"
        )


def newest_checkpoint_note(run_dir: Path) -> str:
    """A sentence naming the checkpoint ``latest`` points at, to resume from after an error."""
    newest = read_latest_pointer(checkpoint_dir(run_dir))
    if newest is None:
        return "No checkpoint of this run has been written yet."
    return f"The newest checkpoint is {newest}; --resume continues from it."


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def write_grids(
    trainer: Trainer, cfg: Config, data: LatentShards, info: DistInfo, run_dir: Path, vae_cache: dict[str, Any]
) -> None:
    """EMA samples at 1 and 2 steps; all ranks run the model (FSDP2 needs them), rank 0 decodes and saves."""
    trainer.ema.eval()
    with trainer.autocast:
        grids = sample_grid(
            trainer.ema.module,
            trainer.dit_cfg,
            cfg.train.grid_images,
            cfg.train.seed,
            info.device,
            cfg.sampling.two_step_method,
            cfg.sampling.two_step_mid,
            cfg.sampling.guidance_scale,
            cfg.sampling.guidance_interval,
        )
    if not info.is_main:
        return
    source = cfg.sampling.vae or data.manifest.get("vae", "")
    if source not in vae_cache:
        vae_cache[source] = None
        if source:
            try:
                from examples.imagenet_dit.prepare_latents import load_vae

                vae_cache[source] = load_vae(source, info.device)
            except Exception as err:  # no network, no diffusers: still write latent previews
                print(
                    f"[train] cannot load VAE {source!r} for sample grids ({err}); saving latent previews",
                    file=sys.stderr,
                )
    vae = vae_cache[source]
    for name, lat in grids.items():
        with torch.no_grad():
            images = latents_to_uint8(lat.float(), vae, data.scaling_factor)
        save_image_grid(images, run_dir / "samples" / f"step_{trainer.step:07d}_{name}.png")


class JsonlLogger:
    """One JSON object per line in ``<run-dir>/log.jsonl``; TensorBoard scalars too when asked."""

    def __init__(self, run_dir: Path, tensorboard: bool) -> None:
        run_dir.mkdir(parents=True, exist_ok=True)
        self.f = open(run_dir / "log.jsonl", "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError as err:
                print(f"[train] train.tensorboard = true but TensorBoard is unavailable ({err})", file=sys.stderr)

    def log(self, rec: dict) -> None:
        rec = {"time": time.time(), **rec}
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        print(
            "[train] "
            + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items() if k != "time")
        )
        if self.tb is not None:
            for k, v in rec.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, rec["step"])  # numbers only (event records hold strings)

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


if __name__ == "__main__":
    main()
