"""Latent shards: the on-disk format written by ``prepare_latents.py`` and read by ``train.py``.

Layout of a prepared directory::

    manifest.json                 what was encoded and how (VAE, image size, scaling factor, classes, shard size)
    shard_00000/mean.npy          (n, F, C, h, w) posterior means; F = 2 (image, horizontally flipped image) or 1
    shard_00000/std.npy           (n, F, C, h, w) posterior standard deviations
    shard_00000/labels.npy        (n,) int64 class indices (sorted class-folder order, as ImageFolder)
    shard_00000/meta.json         written last; a shard without it is incomplete and is redone on resume
    shard_00001/...

A shard is built in ``shard_XXXXX.tmp-<pid>/`` and renamed into place, so a half-written shard is never mistaken
for a finished one. The trainer memory-maps every array, draws a flip per sample and a posterior sample
``x = scaling_factor * (mean + std * eps)``, as the papers do.

Checks, each naming the shard (and the row where there is one): at open time what is cheap (every ``.npy`` header,
dtype and file size, so a truncated file says which rows it lacks; every label against the manifest's classes);
when a batch is gathered, every row in it is checked for non-finite means and stds, so a NaN row anywhere fails at
the first step that reads it instead of turning the loss into NaN. A full scan of the latents (~40 GB for
ImageNet) at open time would cost minutes on every start.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "FORMAT",
    "EpochBatches",
    "LatentDataError",
    "LatentShards",
    "check_finite_rows",
    "check_labels",
    "open_npy",
    "read_manifest",
    "shard_dir",
    "write_shard",
]

FORMAT = "meanflow-losses-latents-v1"
MANIFEST = "manifest.json"


class LatentDataError(RuntimeError):
    """A prepared latent directory is missing, incomplete, empty or corrupt."""


def shard_dir(root: str | os.PathLike, index: int) -> Path:
    return Path(root) / f"shard_{index:05d}"


def read_manifest(root: str | os.PathLike) -> dict:
    """Read and check ``manifest.json`` of a prepared latent directory."""
    root = Path(root)
    if not root.exists():
        raise LatentDataError(f"latent directory {str(root)!r} does not exist; run prepare_latents.py first")
    path = root / MANIFEST
    if not path.is_file():
        raise LatentDataError(f"{str(root)!r} has no {MANIFEST}: it is not a directory written by prepare_latents.py")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LatentDataError(f"{path} is not valid JSON ({err}); rerun prepare_latents.py") from err
    if manifest.get("format") != FORMAT:
        raise LatentDataError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def write_shard(
    root: str | os.PathLike, index: int, mean: np.ndarray, std: np.ndarray, labels: np.ndarray, start: int
) -> Path:
    """Write one shard atomically (temporary directory, then rename)."""
    final = shard_dir(root, index)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    np.save(tmp / "mean.npy", mean)
    np.save(tmp / "std.npy", std)
    np.save(tmp / "labels.npy", labels.astype(np.int64))
    meta = {"index": index, "start": int(start), "count": len(labels), "shape": list(mean.shape[1:])}
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # a previous complete copy (a racing rank or a forced redo): keep the first one
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
        return final
    os.replace(tmp, final)
    return final


def shard_is_complete(root: str | os.PathLike, index: int) -> bool:
    return (shard_dir(root, index) / "meta.json").is_file()


@dataclass
class _Shard:
    path: Path
    mean: np.ndarray  # (n, F, C, h, w), memory-mapped
    std: np.ndarray
    labels: np.ndarray  # (n,)


def _npy_header(f: BinaryIO) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from the header of an open ``.npy`` file, leaving ``f`` at the first data byte."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return tuple(shape), dtype


def open_npy(path: Path, where: str, kind: str) -> np.ndarray:
    """Memory-map ``path`` after checking its header, its dtype kind and that the file holds every row.

    Args:
        path: a ``.npy`` file of a shard.
        where: how errors name the shard, e.g. ``"latent shard '/data/lat/shard_00003'"``.
        kind: the dtype kinds accepted, e.g. ``"f"`` (floating) or ``"iu"`` (integer).

    Raises:
        LatentDataError: an unreadable header, a wrong dtype, or a file shorter than its header says (it names the
            rows that are missing).
    """
    try:
        with open(path, "rb") as f:
            shape, dtype = _npy_header(f)
            offset = f.tell()
        size = path.stat().st_size
    except (OSError, ValueError, EOFError) as err:  # missing file, not a .npy, bad header
        raise _unreadable(path, where, err) from err
    if dtype.kind not in kind:
        raise LatentDataError(f"{where} is corrupt: {path.name} has dtype {dtype}, expected kind {kind!r}")
    rows = shape[0] if shape else 1
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    if size < offset + rows * row_bytes:
        whole = (size - offset) // row_bytes if row_bytes else rows
        raise LatentDataError(
            f"{where} is corrupt: {path.name} is truncated ({size} bytes, its header promises {shape} {dtype}): "
            f"rows {whole} to {rows - 1} are missing; delete the shard and rerun prepare_latents.py to rebuild it"
        )
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        raise _unreadable(path, where, err) from err


def _unreadable(path: Path, where: str, err: Exception) -> LatentDataError:
    return LatentDataError(
        f"{where} is corrupt: {path.name} is unreadable ({type(err).__name__}: {err}); delete the shard and "
        "rerun prepare_latents.py to rebuild it"
    )


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Raise naming the first row whose label lies outside ``[0, num_classes)``.

    ``num_classes`` itself is refused too: it is the DiT's null class (guidance), so such a row would train as
    "unconditional" without any error.

    Args:
        labels: (n,) integer labels of every row of a shard.
        num_classes: the number of classes in the manifest.
        where: how the error names the shard.
    """
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        i = int(np.argmax(bad))
        value = int(labels[i])
        null = " (= num_classes: the null class of guidance)" if value == num_classes else ""
        raise LatentDataError(
            f"{where} is corrupt: labels.npy row {i} holds label {value}{null}, outside [0, "
            f"{num_classes}) for the manifest's {num_classes} classes; delete the shard and rerun prepare_latents.py"
        )


def check_finite_rows(arrays: dict[str, np.ndarray], rows: np.ndarray, where: str, first_image: int) -> None:
    """Raise naming the first of ``rows`` that holds a non-finite value in any of ``arrays``.

    Args:
        arrays: name (``"mean"``, ``"std"``) -> (n, ...) values read from that shard's rows ``rows``.
        rows: (n,) shard row of each value row.
        where: how the error names the shard.
        first_image: the dataset index of shard row 0 (the error gives both).
    """
    for name, values in arrays.items():
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if bad.any():
            row = int(rows[int(np.argmax(bad))])
            raise LatentDataError(
                f"{where} is corrupt: {name}.npy row {row} (dataset image {first_image + row}) holds non-finite "
                "values; delete the shard and rerun prepare_latents.py to rebuild it"
            )


class LatentShards:
    """All shards of a prepared directory, memory-mapped; ``len()`` is the number of images.

    Raises :class:`LatentDataError` naming the shard for a missing, empty, truncated or inconsistent shard.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.manifest = read_manifest(self.root)
        m = self.manifest
        self.scaling_factor = float(m["scaling_factor"])
        self.latent_shape = tuple(int(s) for s in m["latent_shape"])  # (C, h, w)
        self.num_classes = len(m["classes"])
        self.num_flips = 2 if m["flips"] else 1
        self.shards: list[_Shard] = []
        for i in range(int(m["num_shards"])):
            self.shards.append(self._open(i))
        counts = np.array([len(s.labels) for s in self.shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        if int(self.starts[-1]) != int(m["num_images"]):
            raise LatentDataError(
                f"{self.root}: shards hold {int(self.starts[-1])} images, manifest says {m['num_images']}"
            )

    def _open(self, i: int) -> _Shard:
        d = shard_dir(self.root, i)
        where = f"latent shard {str(d)!r}"
        if not d.is_dir() or not (d / "meta.json").is_file():
            raise LatentDataError(
                f"{where} is missing or incomplete: latent preparation did not finish; rerun prepare_latents.py "
                "with the same arguments to resume it"
            )
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError) as err:  # bad JSON, bad bytes
            raise LatentDataError(
                f"{where} is corrupt (meta.json: {type(err).__name__}: {err}); delete it and rerun "
                "prepare_latents.py to rebuild it"
            ) from err
        arrays = {k: open_npy(d / f"{k}.npy", where, "iu" if k == "labels" else "f") for k in ("mean", "std", "labels")}
        n = int(meta.get("count", -1))
        if n <= 0 or len(arrays["labels"]) == 0:
            raise LatentDataError(f"{where} is empty (count {n}); delete it and rerun prepare_latents.py")
        expected = (n, self.num_flips, *self.latent_shape)
        for k in ("mean", "std"):
            if tuple(arrays[k].shape) != expected:
                raise LatentDataError(
                    f"{where} is corrupt: {k}.npy has shape {tuple(arrays[k].shape)}, expected {expected}"
                )
        if tuple(arrays["labels"].shape) != (n,):
            raise LatentDataError(
                f"{where} is corrupt: labels.npy has shape {tuple(arrays['labels'].shape)}, expected ({n},)"
            )
        check_labels(np.asarray(arrays["labels"]), self.num_classes, where)  # n x 8 bytes: cheap to read in full
        return _Shard(d, arrays["mean"], arrays["std"], arrays["labels"])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def gather(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``indices`` (global): mean (n, F, C, h, w), std (same), labels (n,), in the order given.

        Raises:
            IndexError: an index outside ``[0, len(self))``.
            LatentDataError: a row holds a non-finite mean or std (the error names the shard and the row).
        """
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"latent index out of range [0, {len(self)})")
        which = np.searchsorted(self.starts, idx, side="right") - 1
        shape = (len(idx), self.num_flips, *self.latent_shape)
        mean = np.empty(shape, dtype=np.float32)
        std = np.empty(shape, dtype=np.float32)
        labels = np.empty(len(idx), dtype=np.int64)
        for s in np.unique(which):
            rows = np.nonzero(which == s)[0]
            local = idx[rows] - self.starts[s]
            order = np.argsort(local, kind="stable")  # sorted reads are kinder to the page cache
            sel = local[order]
            shard = self.shards[int(s)]
            values = {"mean": shard.mean[sel], "std": shard.std[sel]}
            check_finite_rows(values, sel, f"latent shard {str(shard.path)!r}", int(self.starts[s]))
            mean[rows[order]] = values["mean"]
            std[rows[order]] = values["std"]
            labels[rows[order]] = shard.labels[sel]
        return mean, std, labels

    def sample_batch(
        self, indices: Sequence[int] | np.ndarray, generator: torch.Generator, device: torch.device | str
    ) -> tuple[Tensor, Tensor]:
        """Posterior samples ``scaling_factor * (mean + std * eps)`` with a random flip per row, and labels.

        All randomness comes from ``generator`` (on ``device``), so a run is reproducible from its seed and step.
        """
        mean, std, labels = self.gather(indices)
        n = len(labels)
        device = torch.device(device)
        mean_t = torch.from_numpy(mean).to(device)
        std_t = torch.from_numpy(std).to(device)
        flip = torch.randint(0, self.num_flips, (n,), generator=generator, device=device)
        rows = torch.arange(n, device=device)
        mean_t, std_t = mean_t[rows, flip], std_t[rows, flip]
        eps = torch.randn(mean_t.shape, generator=generator, device=device, dtype=mean_t.dtype)
        x = (mean_t + std_t * eps) * self.scaling_factor
        return x, torch.from_numpy(labels).to(device)


class EpochBatches:
    """Global batches of dataset indices: a fresh permutation per epoch, drop-last, rank slices.

    Step ``k`` of the run always maps to the same indices (seeded by ``(seed, epoch)``), so resuming needs only the
    step, and ``world_size`` processes together see exactly the batch one process would see.
    """

    def __init__(self, num_items: int, global_batch: int, seed: int) -> None:
        if num_items < global_batch:
            raise LatentDataError(f"the dataset has {num_items} images, fewer than one global batch ({global_batch})")
        self.num_items, self.global_batch, self.seed = num_items, global_batch, seed
        self.steps_per_epoch = num_items // global_batch
        self._epoch = -1
        self._perm: np.ndarray | None = None

    def indices(self, step: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        if self.global_batch % world_size:
            raise ValueError(f"global batch {self.global_batch} is not divisible by world size {world_size}")
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm = torch.randperm(self.num_items, generator=g).numpy()
            self._epoch = epoch
        assert self._perm is not None
        batch = self._perm[pos * self.global_batch : (pos + 1) * self.global_batch]
        local = self.global_batch // world_size
        return batch[rank * local : (rank + 1) * local]
