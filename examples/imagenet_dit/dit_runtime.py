"""Process setup, checkpoint files and image helpers shared by train.py and sample.py.

Checkpoint files are written atomically: ``torch.save`` into a hidden temporary file in the same directory, fsync,
its SHA-256 into ``step_XXXXXXX.pt.sha256`` (``sha256sum -c`` format, written first), rename to
``step_XXXXXXX.pt``, then the one-line ``latest`` pointer is replaced the same way. A process killed at any moment
leaves either the old or the new checkpoint as ``latest``, never a torn one. Loaders verify the checksum (a
checkpoint without a ``.sha256`` file, from an older train.py, is loaded with a warning) and skip, saying so on
stderr, any file that is unreadable or does not match it, and a ``latest`` pointer that is not a checkpoint name,
falling back to the newest intact checkpoint.

Collectives that keep ranks in lockstep when something goes wrong: :func:`any_rank` (one all-reduce of a few flags)
and :func:`raise_if_any_failed` (every rank raises when one rank failed, naming that rank and its error).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

CKPT_FORMAT = "meanflow-losses-imagenet-dit-v1"
CKPT_NAME = re.compile(r"step_(\d+)\.pt")


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


def any_rank(info: DistInfo, *flags: bool | Tensor) -> list[bool]:
    """Whether each flag is set on at least one rank: one all-reduce (MAX) of all of them together.

    Every rank must call it with the same number of flags. Tensors (e.g. ``~torch.isfinite(loss)``) are reduced
    without a host sync before the collective; the result is read back once.

    Args:
        info: the process group of the run.
        *flags: booleans or 0-dim tensors, nonzero = set.

    Returns:
        One bool per flag, identical on every rank.
    """
    vec = torch.stack([torch.as_tensor(f, dtype=torch.float32, device=info.device).reshape(()) for f in flags])
    if info.distributed:
        dist.all_reduce(vec, op=dist.ReduceOp.MAX)
    return [v > 0 for v in vec.tolist()]


def raise_failures(info: DistInfo, error: BaseException | None, what: str) -> NoReturn:
    """Raise on every rank once :func:`any_rank` said that some rank failed.

    The failing rank raises its own ``error``; the others a RuntimeError naming each failing rank and its message
    (gathered here: a collective, every rank calls it).

    Args:
        info: the process group of the run.
        error: this rank's error, or None.
        what: what failed, for the others' message, e.g. ``"reading its batch of step 3"``.
    """
    mine = None if error is None else f"{type(error).__name__}: {error}"
    messages = [mine]
    if info.distributed:
        messages = [None] * info.world_size
        dist.all_gather_object(messages, mine)
    if error is not None:
        raise error
    failed = "; ".join(f"rank {r} failed {what}: {m}" for r, m in enumerate(messages) if m is not None)
    raise RuntimeError(f"rank {info.rank} stops because another rank failed: {failed}")


def raise_if_any_failed(info: DistInfo, error: BaseException | None, what: str) -> None:
    """A collective check point: returns when no rank failed, else every rank raises (see :func:`raise_failures`).

    Without it, a rank that raises leaves the others blocked in their next collective until the backend notices.
    """
    if any_rank(info, error is not None)[0]:
        raise_failures(info, error, what)


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


def _write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by a file holding ``text``: temporary file, fsync, rename, fsync of the directory."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def checksum_path(path: str | os.PathLike) -> Path:
    """The ``.sha256`` file that goes with checkpoint ``path``."""
    p = Path(path)
    return p.with_name(p.name + ".sha256")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 16 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return h.hexdigest()


class CheckpointError(ValueError):
    """A checkpoint file that does not match its checksum or is not a checkpoint of this train.py."""


_verified: set[tuple] = set()  # (path, inode, size, mtime) of files whose checksum matched in this process


def verify_checksum(path: str | os.PathLike) -> bool:
    """Check ``path`` against its ``.sha256`` file; False when there is none (a checkpoint of an older train.py).

    A file is hashed once per process while it is unchanged (same inode, size and mtime).

    Raises:
        CheckpointError: the checksum file is unreadable or names another digest (the file is corrupt).
    """
    p = Path(path)
    side = checksum_path(p)
    if not side.is_file():
        return False
    st = p.stat()
    key = (str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _verified:
        return True
    try:
        expected = side.read_bytes().decode("ascii").split()[0].lower()
    except (UnicodeDecodeError, IndexError) as err:
        raise CheckpointError(f"{side} is not a checksum file ({type(err).__name__}): {p} is unverifiable") from err
    actual = file_sha256(p)
    if actual != expected:
        raise CheckpointError(
            f"{p} does not match its checksum (SHA-256 {actual[:16]}..., {side.name} says {expected[:16]}...): "
            "the file is corrupt"
        )
    _verified.add(key)
    return True


def checkpoint_step(path: Path) -> int | None:
    """The step in a checkpoint file name ``step_XXXXXXX.pt``; None for any other name."""
    m = CKPT_NAME.fullmatch(path.name)
    return int(m.group(1)) if m else None


def rotate_checkpoints(d: Path, newest: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints of steps up to ``newest``'s, with their checksum files.

    ``newest`` (just written, so finite and intact) is never deleted, nor are files of later steps (left by a run
    that was resumed from an older checkpoint; saving those steps again replaces them).
    """
    last = checkpoint_step(newest)
    steps = {p: checkpoint_step(p) for p in d.glob("step_*.pt")}
    older = sorted((p for p, s in steps.items() if s is not None and s < last), key=steps.__getitem__)
    for old in older[: max(len(older) - (keep - 1), 0)]:
        old.unlink(missing_ok=True)
        checksum_path(old).unlink(missing_ok=True)


def save_checkpoint(run_dir: str | os.PathLike, step: int, state: dict, keep: int = 2) -> Path:
    """Atomically write ``step_XXXXXXX.pt`` and its checksum, point ``latest`` at it; keep the newest ``keep``."""
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    final = d / f"step_{step:07d}.pt"
    tmp = d / f".{final.name}.tmp-{os.getpid()}"
    write_checkpoint_file(state, tmp)
    # The checksum goes in first: a crash before the rename leaves a checksum without a file (or one that a
    # previous file of the same step does not match, which is then skipped), never an unverified new file.
    _write_text_atomic(checksum_path(final), f"{file_sha256(tmp)}  {final.name}\n")
    os.replace(tmp, final)
    _fsync_dir(d)
    _write_text_atomic(d / "latest", final.name + "\n")
    if keep > 0:
        rotate_checkpoints(d, final, keep)
    return final


def load_checkpoint_file(path: str | os.PathLike) -> dict:
    """Verify ``path`` against its checksum and load it (memory-mapped).

    Raises:
        CheckpointError: a checksum mismatch, or a file that is not a checkpoint of this train.py.
    """
    if not verify_checksum(path):
        print(f"[train] note: {path} has no {checksum_path(path).name}; loading it unverified", file=sys.stderr)
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        fmt = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not a checkpoint of this train.py (format {fmt!r})")
    return ckpt


def read_latest_pointer(d: Path) -> Path | None:
    """The checkpoint ``d/latest`` names; None (with a message naming the file) when it is absent or garbage."""
    latest = d / "latest"
    if not latest.is_file():
        return None
    try:
        name = latest.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        why = f"{type(err).__name__}: {err}"
    else:
        if checkpoint_step(Path(name)) is None or Path(name).name != name:
            why = f"it holds {name[:60]!r}, not a step_XXXXXXX.pt name"
        elif not (d / name).is_file():
            why = f"{name} does not exist"
        else:
            return d / name
    print(f"[train] ignoring the checkpoint pointer {latest} ({why}); using the newest intact file", file=sys.stderr)
    return None


def find_latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest loadable checkpoint: ``latest`` if it is intact, else the newest intact ``step_*.pt``.

    Every file skipped (unreadable, checksum mismatch, foreign) is named on stderr.
    """
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return None
    candidates = [p for p in [read_latest_pointer(d)] if p is not None]
    candidates += sorted((p for p in d.glob("step_*.pt") if checkpoint_step(p) is not None), reverse=True)
    for p in dict.fromkeys(candidates):
        try:
            load_checkpoint_file(p)
            return p
        except Exception as err:  # a truncated, corrupt or foreign file: skip it, say so
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
