"""Process setup, checkpoint files and image helpers shared by train.py and sample.py.

Checkpoint files are written atomically: ``torch.save`` into a hidden temporary file in the same directory, fsync,
rename to ``step_XXXXXXX.pt``, then the one-line ``latest`` pointer is replaced the same way. A process killed at
any moment leaves either the old or the new checkpoint as ``latest``, never a torn one; loaders also skip any
unreadable file and fall back to the newest intact one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

CKPT_FORMAT = "meanflow-losses-imagenet-dit-v1"


# ------------------------------------------------------------------------------------------------ distributed
@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None = None) -> DistInfo:
    """Read torchrun's environment; NCCL on CUDA, Gloo on CPU. Without torchrun: one process."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, world, local, dev)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def step_seed(seed: int, step: int, rank: int) -> int:
    """Seed of every random draw of ``step`` on ``rank`` (independent of how the run was interrupted)."""
    return (seed * 1_000_003 + step) * 4096 + rank


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_checkpoint_file(state: dict, path: Path) -> None:
    """``torch.save`` to ``path`` and fsync it (a separate function so tests can simulate a crash in it)."""
    with open(path, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict, keep: int = 2) -> Path:
    """Atomically write ``step_XXXXXXX.pt`` and point ``latest`` at it; keep the newest ``keep`` files."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step_{step:07d}.pt"
    tmp = d / f".{final.name}.tmp-{os.getpid()}"
    write_checkpoint_file(state, tmp)
    os.replace(tmp, final)
    _fsync_dir(d)
    latest_tmp = d / f".latest.tmp-{os.getpid()}"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, d / "latest")
    _fsync_dir(d)
    if keep > 0:
        for old in sorted(d.glob("step_*.pt"))[:-keep]:
            if old != final:
                old.unlink(missing_ok=True)
    return final


def load_checkpoint_file(path: str | os.PathLike) -> dict:
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of this train.py (format {ckpt.get('format')!r})")
    return ckpt


def find_latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest loadable checkpoint: ``latest`` if it is intact, else the newest intact ``step_*.pt``."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return None
    candidates: list[Path] = []
    latest = d / "latest"
    if latest.is_file():
        candidates.append(d / latest.read_text().strip())
    candidates += sorted(d.glob("step_*.pt"), reverse=True)
    for p in candidates:
        if not p.is_file():
            continue
        try:
            load_checkpoint_file(p)
            return p
        except Exception as err:  # a truncated or foreign file: skip it, say so
            print(f"[train] skipping unreadable checkpoint {p}: {type(err).__name__}: {err}", file=sys.stderr)
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, a ``checkpoints/`` directory or a run directory -> the checkpoint file."""
    p = Path(path)
    if p.is_file():
        return p
    for run_dir in (p, p.parent):
        found = find_latest_checkpoint(run_dir)
        if found is not None:
            return found
    raise FileNotFoundError(f"no loadable checkpoint at {str(path)!r}")


def load_checkpoint(path: str | os.PathLike) -> dict:
    return load_checkpoint_file(resolve_checkpoint(path))


def rng_state() -> dict:
    st = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "key": torch.from_numpy(st[1].astype(np.int64)),
            "pos": int(st[2]),
            "has_gauss": int(st[3]),
            "cached_gaussian": float(st[4]),
        },
        "python": random.getstate(),
    }


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    if st["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    n = st["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def save_image_grid(images: np.ndarray, path: Path) -> None:
    """uint8 (N, H, W, 3) -> one PNG, about square."""
    from PIL import Image

    n, h, w, _ = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    canvas = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = im
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)


def latents_to_uint8(latents: Tensor, vae: Any, scaling_factor: float) -> np.ndarray:
    """Decode with the VAE (or, without one, show the first three latent channels) -> uint8 (N, H, W, 3)."""
    if vae is None:
        x = latents[:, :3].float()
        x = x / x.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-6)
    else:
        param = next(vae.parameters())
        x = vae.decode(latents.to(param) / scaling_factor).sample.float()
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()
