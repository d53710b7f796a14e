"""Run configuration: TOML files in ``configs/`` -> typed sections -> model and objective.

A config file has the sections below; every key is checked, so a typo is an error that lists the valid keys,
never a silently ignored option. ``--set section.key=value`` on the command line overrides any key (values are
TOML literals: ``--set optim.lr=2e-4 --set objective.times.equal_fraction=0.5 --set train.bf16=false``).

The ``[objective]`` table is built by name from ``meanflow_losses``: ``type`` names a class of the package
(``FlowMatchingLoss``, ``MeanFlowLoss``, ``AlphaFlowLoss``, ...) or an objective name of
``meanflow_losses.OBJECTIVES`` (``flow_matching``, ``meanflow``, ``alphaflow``, ``splitmeanflow``, ``shortcut``
and their aliases), the other keys are its constructor arguments, and every nested table with a ``type`` key is built
the same way (``TimePairSampler``, ``AdaptiveWeight``, ``TrainingGuidance``, ``schedules.Sigmoid``, ...). Keys are
checked against the constructor's signature. ``null_condition = "null_class"`` stands for "replace the label
by the null class index ``num_classes``".
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "CONFIG_DIR",
    "Config",
    "ConfigError",
    "build_objective",
    "list_configs",
    "load_config",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """An unknown key, a bad value or an objective the installed meanflow_losses cannot build."""


# ------------------------------------------------------------------------------------------------ sections
@dataclass
class ModelSection:
    name: str = "DiT-B/2"  # DiT-S/2, DiT-B/2, DiT-B/4, DiT-L/2, DiT-XL/2
    depth: int | None = None  # optional overrides of the named size (tests use tiny models)
    hidden_size: int | None = None
    num_heads: int | None = None
    patch_size: int | None = None
    time_scale: float = 1.0  # 1 = raw t in [0, 1]; never 1000 with JVP objectives
    grad_checkpointing: bool = False
    decoupled_last_blocks: int = 0  # Decoupled MeanFlow: the last k blocks see r instead of t (0 = off)
    guidance_inputs: bool = False  # iMF: omega, t_min, t_max are network inputs (objective.guidance GuidanceAsInput)


@dataclass
class DataSection:
    latents: str = ""  # directory written by prepare_latents.py (or --data on the command line)
    global_batch: int = 256  # summed over all processes


@dataclass
class OptimSection:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    grad_clip: float = 0.0  # max global grad norm; 0 disables


@dataclass
class EmaSection:
    decay: float = 0.9999  # ignored when half_life_steps > 0
    half_life_steps: float = 0.0  # alpha-Flow: 6931 steps (= decay 0.9999)
    warmup_ratio: float = 0.0  # > 0: half-life min(h, ratio * updates) (EDM-style ramp-up); 0: none

    def half_life(self) -> float:
        """Half-life in optimizer steps (``decay = 0.5 ** (1 / half_life)``)."""
        if self.half_life_steps > 0:
            return self.half_life_steps
        return math.log(0.5) / math.log(self.decay) if self.decay > 0 else 1e-9


@dataclass
class TrainSection:
    steps: int = 400_000  # total optimizer steps of the schedule
    seed: int = 0
    bf16: bool = True  # bf16 autocast on CUDA (the JVP runs in float32, see objective.jvp_fp32)
    distributed: str = "ddp"  # "ddp" or "fsdp2" (shards parameters, gradients and optimizer state; for XL)
    init_from: str = ""  # checkpoint to start from (weights + EMA; fresh optimizer), e.g. XL/2+
    init_step: int = 0  # step counter after init_from (schedules continue from there)
    # fine-tuning: a flow-matching run (or checkpoint) of this train.py to start from (weights into model and EMA,
    # Emb_h folded so that u(z, t, t) is the FM network exactly; fresh optimizer, step 0). Also --init-from-fm.
    init_from_fm: str = ""
    init_from_fm_weights: str = "ema"  # "ema" (the FM run's EMA network) or "model" (its raw weights)
    # distillation: a frozen teacher (a flow-matching checkpoint of this train.py) whose velocity replaces e - x in
    # the objective (called with teacher=); its own classifier-free guidance scale and interval. Also --teacher.
    teacher_checkpoint: str = ""
    # keys of this section a config needs set before it trains (e.g. ["init_from_fm"] for a fine-tuning config):
    # an empty one is an error at the start of train.py, not a silent run from scratch
    requires: tuple[str, ...] = ()
    teacher_weights: str = "ema"  # "ema" or "model"
    teacher_guidance_scale: float = 1.0  # 1 = no guidance; else the null class is the unconditional branch
    teacher_guidance_interval: tuple[float, float] = (0.0, 1.0)  # guidance where t_min <= t <= t_max
    log_every: int = 100
    ckpt_every: int = 10_000
    keep_checkpoints: int = 2
    max_nonfinite_steps: int = 10  # this many non-finite (skipped) steps in a row stop the run
    grid_every: int = 10_000  # sample grids (EMA, 1 and 2 steps); 0 disables
    grid_images: int = 16
    tensorboard: bool = False


@dataclass
class SamplingSection:
    two_step_method: str = "ode"  # "ode" or "consistency" (2-NFE grids and sample.py default)
    two_step_mid: float = 0.5  # middle time of the 2-step grid [1, mid, 0]
    vae: str = ""  # VAE for decoding grids; default: the one in the latent manifest
    guidance_scale: float = 1.0  # guidance-input models (model.guidance_inputs): the scale omega given at sampling
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # ... and the interval [t_min, t_max]


@dataclass
class PaperSection:
    """What the config reproduces (informational; printed at start, used in the README)."""

    title: str = ""
    source: str = ""
    gpus: int = 0
    global_batch: int = 0
    steps: int = 0
    fid_1nfe: float = 0.0
    fid_2nfe: float = 0.0
    notes: str = ""


SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "data": DataSection,
    "optim": OptimSection,
    "ema": EmaSection,
    "train": TrainSection,
    "sampling": SamplingSection,
    "paper": PaperSection,
}


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    ema: EmaSection = field(default_factory=EmaSection)
    train: TrainSection = field(default_factory=TrainSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    paper: PaperSection = field(default_factory=PaperSection)
    objective: dict[str, Any] = field(default_factory=lambda: {"type": "FlowMatchingLoss"})
    name: str = ""

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, name: str = "") -> Config:
        raw = dict(raw)
        unknown = set(raw) - set(SECTIONS) - {"objective", "name"}
        if unknown:
            raise ConfigError(
                f"unknown config section(s) {sorted(unknown)}; valid sections: {sorted([*SECTIONS, 'objective'])}"
            )
        kwargs: dict[str, Any] = {"name": raw.get("name", name)}
        for sec, typ in SECTIONS.items():
            kwargs[sec] = _section(sec, typ, raw.get(sec, {}))
        obj = raw.get("objective", {"type": "FlowMatchingLoss"})
        if not isinstance(obj, dict) or "type" not in obj:
            raise ConfigError("[objective] must be a table with a 'type' key, e.g. type = \"MeanFlowLoss\"")
        kwargs["objective"] = obj
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out = {sec: dataclasses.asdict(getattr(self, sec)) for sec in SECTIONS}
        out["objective"] = json.loads(json.dumps(self.objective))
        out["name"] = self.name
        return out

    def validate(self) -> None:
        if self.data.global_batch < 1:
            raise ConfigError(f"data.global_batch must be >= 1, got {self.data.global_batch}")
        if self.train.steps < 1:
            raise ConfigError(f"train.steps must be >= 1, got {self.train.steps}")
        if not 0 <= self.train.init_step < self.train.steps:
            raise ConfigError(f"train.init_step must lie in [0, train.steps), got {self.train.init_step}")
        if self.train.max_nonfinite_steps < 1:
            raise ConfigError(f"train.max_nonfinite_steps must be >= 1, got {self.train.max_nonfinite_steps}")
        for key in self.train.requires:
            if key not in {f.name for f in dataclasses.fields(TrainSection)} or key == "requires":
                raise ConfigError(f"train.requires names {key!r}, which is not a key of [train]")
        for key in ("init_from_fm_weights", "teacher_weights"):
            if getattr(self.train, key) not in ("ema", "model"):
                raise ConfigError(f"train.{key} must be 'ema' or 'model', got {getattr(self.train, key)!r}")
        if self.train.init_from_fm and self.train.init_from:
            raise ConfigError(
                "train.init_from and train.init_from_fm are exclusive: init_from continues a run of this config, "
                "init_from_fm starts a fine-tuning from a flow-matching run"
            )
        lo_hi = self.train.teacher_guidance_interval
        if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0:
            raise ConfigError(f"train.teacher_guidance_interval must be [t_min, t_max] in [0, 1], got {list(lo_hi)}")
        if not self.train.teacher_guidance_scale > 0:
            raise ConfigError(f"train.teacher_guidance_scale must be > 0, got {self.train.teacher_guidance_scale}")
        if self.model.decoupled_last_blocks < 0:
            raise ConfigError(f"model.decoupled_last_blocks must be >= 0, got {self.model.decoupled_last_blocks}")
        if self.train.distributed not in ("ddp", "fsdp2"):
            raise ConfigError(f"train.distributed must be 'ddp' or 'fsdp2', got {self.train.distributed!r}")
        if self.sampling.two_step_method not in ("ode", "consistency"):
            raise ConfigError(
                f"sampling.two_step_method must be 'ode' or 'consistency', got {self.sampling.two_step_method!r}"
            )
        if not 0.0 < self.sampling.two_step_mid < 1.0:
            raise ConfigError(f"sampling.two_step_mid must lie in (0, 1), got {self.sampling.two_step_mid}")
        iv = self.sampling.guidance_interval
        if len(iv) != 2 or not 0.0 <= iv[0] <= iv[1] <= 1.0:
            raise ConfigError(f"sampling.guidance_interval must be [t_min, t_max] in [0, 1], got {list(iv)}")
        if not self.sampling.guidance_scale >= 1.0:
            raise ConfigError(f"sampling.guidance_scale must be >= 1, got {self.sampling.guidance_scale}")
        guidance = self.objective.get("guidance")
        as_input = isinstance(guidance, dict) and guidance.get("type") == "GuidanceAsInput"
        if as_input != self.model.guidance_inputs:
            raise ConfigError(
                "objective.guidance of type GuidanceAsInput and model.guidance_inputs = true go together "
                f"(got guidance type {guidance.get('type') if isinstance(guidance, dict) else None!r}, "
                f"model.guidance_inputs = {self.model.guidance_inputs}): the network must take omega, t_min, t_max"
            )
        if not 0.0 < self.ema.decay < 1.0:
            raise ConfigError(f"ema.decay must lie in (0, 1), got {self.ema.decay}")
        if self.ema.half_life_steps < 0 or self.ema.warmup_ratio < 0:
            raise ConfigError("ema.half_life_steps and ema.warmup_ratio must be >= 0")
        if len(self.optim.betas) != 2:
            raise ConfigError(f"optim.betas must hold two numbers, got {self.optim.betas}")


def _section(sec: str, typ: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"[{sec}] must be a table, got {values!r}")
    valid = {f.name: f for f in dataclasses.fields(typ)}
    unknown = set(values) - set(valid)
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(f'{sec}.{k}' for k in sorted(unknown))}; "
            f"valid keys in [{sec}]: {', '.join(sorted(valid))}"
        )
    out = {}
    for k, v in values.items():
        default = valid[k].default
        if isinstance(default, tuple) and isinstance(v, list):
            v = tuple(v)
        if isinstance(default, bool) and not isinstance(v, bool):
            raise ConfigError(f"{sec}.{k} must be true or false, got {v!r}")
        if isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if default is not None and not isinstance(default, bool) and type(default) in (int, float, str):
            if not isinstance(v, type(default)) or isinstance(v, bool):
                raise ConfigError(f"{sec}.{k} must be a {type(default).__name__}, got {v!r}")
        out[k] = v
    return typ(**out)


# ----------------------------------------------------------------------------------------- loading + overrides
def list_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text  # bare strings: --set model.name=DiT-XL/2


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``section.key[.sub]=value`` to a raw config dict (new keys allowed; they are checked later)."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}")
    key, value = assignment.split("=", 1)
    parts = key.strip().split(".")
    if len(parts) < 2:
        raise ConfigError(f"--set needs a dotted key such as optim.lr, got {key!r}")
    node = raw
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {key}: {p!r} is a value, not a table")
        node = nxt
    node[parts[-1]] = _parse_value(value.strip())


def load_config(name_or_path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load ``configs/<name>.toml`` (or a path to any TOML file) and apply ``--set`` overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise ConfigError(f"config {str(name_or_path)!r} not found; available: {', '.join(list_configs())}")
    with open(path, "rb") as f:
        raw = tomllib.load(f)
    for o in overrides:
        apply_override(raw, o)
    return Config.from_dict(raw, name=path.stem)


# --------------------------------------------------------------------------------------------- objectives
def _resolve(type_name: str, where: str) -> Any:
    import meanflow_losses as mfl

    registry = getattr(mfl, "objective_class", None)
    if registry is not None and "." not in type_name:
        try:  # an objective by name or alias ("meanflow", "fm", "MeanFlowLoss", ...): meanflow_losses.registry
            return registry(type_name)
        except ValueError as err:
            if type_name[:1].islower() and not hasattr(mfl, type_name):  # not a class either: a misspelt name
                raise ConfigError(f"{where}: {err}") from None
    name = type_name
    obj: Any = mfl
    for part in name.split("."):
        nxt = getattr(obj, part, None)
        if nxt is None:
            try:  # a submodule that is not imported by the package's __init__
                import importlib

                nxt = importlib.import_module(f"{obj.__name__}.{part}") if inspect.ismodule(obj) else None
            except ImportError:
                nxt = None
        if nxt is None:
            version = getattr(mfl, "__version__", "?")
            raise ConfigError(
                f"{where}: type {type_name!r} needs meanflow_losses.{name}, which the installed meanflow_losses "
                f"{version} does not provide; update meanflow_losses or choose another objective"
            )
        obj = nxt
    return obj


def _build(spec: dict[str, Any], where: str, num_classes: int) -> Any:
    spec = dict(spec)
    cls = _resolve(str(spec.pop("type")), where)
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    valid = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    kwargs = {}
    for key, value in spec.items():
        if params and not accepts_any and key not in params:
            raise ConfigError(
                f"unknown config key {where}.{key}: {getattr(cls, '__name__', cls)} takes {', '.join(valid)}"
            )
        kwargs[key] = _value(value, f"{where}.{key}", num_classes)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: cannot build {getattr(cls, '__name__', cls)}: {err}") from err


def _value(value: Any, where: str, num_classes: int) -> Any:
    if isinstance(value, dict):
        if "type" in value:
            return _build(value, where, num_classes)
        return {k: _value(v, f"{where}.{k}", num_classes) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_value(v, where, num_classes) for v in value)
    if value == "null_class":
        return null_class_condition(num_classes)
    return value


class null_class_condition:
    """``model_kwargs -> model_kwargs`` with the label replaced by the null class ``num_classes`` (picklable)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def __call__(self, kw: dict[str, Any]) -> dict[str, Any]:
        import torch

        return {**kw, "y": torch.full_like(kw["y"], self.num_classes)}

    def __repr__(self) -> str:
        return f"null_class_condition({self.num_classes})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, null_class_condition) and other.num_classes == self.num_classes

    def __hash__(self) -> int:
        return hash(("null_class_condition", self.num_classes))


def build_objective(objective: dict[str, Any], num_classes: int) -> Any:
    """Build the objective of an ``[objective]`` table (see the module docstring)."""
    if "type" not in objective:
        raise ConfigError("[objective] needs a 'type', e.g. type = \"MeanFlowLoss\"")
    return _build(objective, "objective", num_classes)
