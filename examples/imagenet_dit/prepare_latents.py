"""Encode an ImageFolder-layout ImageNet into Stable-Diffusion-VAE latent shards for train.py.

    # one GPU
    python -m examples.imagenet_dit.prepare_latents --data-path /data/imagenet/train --out /data/latents/in256
    # 8 GPUs on one node (shards are split between ranks; rerun the same command to resume)
    torchrun --nproc_per_node 8 -m examples.imagenet_dit.prepare_latents \
        --data-path /data/imagenet/train --out /data/latents/in256

Every image is center-cropped to ``--image-size`` the ADM way (halve with a box filter while the short side is at
least twice the target, bicubic resize of the short side to the target, center crop), scaled to [-1, 1] and
encoded, together with its horizontal flip, by ``diffusers.AutoencoderKL`` (``stabilityai/sd-vae-ft-ema`` by
default; a local directory or another hub id also works). The posterior mean and standard deviation are stored, so
training samples a fresh latent each time it sees an image. See latent_data.py for the format.

The work is cut into fixed shards of ``--shard-size`` images of the sorted file list; a finished shard is never
redone, so an interrupted run resumes where it stopped. Images are decoded with PIL (no torchvision).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from examples import cli
from examples.imagenet_dit.latent_data import FORMAT, MANIFEST, read_manifest, shard_is_complete, write_shard

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_VAE = "stabilityai/sd-vae-ft-ema"


# ----------------------------------------------------------------------------------------------------- images
def scan_image_folder(root: str | os.PathLike, limit: int | None = None) -> tuple[list[str], list[tuple[str, int]]]:
    """ImageFolder layout: ``root/<class>/<image>``. Returns the sorted class names and (path, label) pairs."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"dataset path {str(root)!r} does not exist (expected root/<class>/<image> files)")
    if not root.is_dir():
        raise NotADirectoryError(f"dataset path {str(root)!r} is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"dataset path {str(root)!r} has no class sub-directories (root/<class>/<image>)")
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(root / name, followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(dirpath, f), label))
    if not samples:
        raise FileNotFoundError(f"dataset path {str(root)!r} holds no images with extensions {IMAGE_EXTENSIONS}")
    if limit is not None:
        samples = samples[:limit]
    return classes, samples


def center_crop_adm(image: Image.Image, size: int) -> np.ndarray:
    """ADM center crop: box-filter halvings, bicubic resize of the short side to ``size``, center crop. uint8 HWC."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image.convert("RGB"))
    top = (arr.shape[0] - size) // 2
    left = (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def load_image(path: str, size: int) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return center_crop_adm(im.convert("RGB"), size)
    except Exception as err:  # PIL raises many types for broken files
        raise RuntimeError(f"cannot read image {path!r}: {type(err).__name__}: {err}") from err


class _CroppedImages(Dataset):
    def __init__(self, samples: list[tuple[str, int]], size: int) -> None:
        self.samples, self.size = samples, size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return torch.from_numpy(load_image(path, self.size).copy()), label


# ------------------------------------------------------------------------------------------------------- VAE
def load_vae(vae: Any, device: torch.device, dtype: torch.dtype = torch.float32) -> Any:
    """``vae``: an ``AutoencoderKL`` instance, a local directory, or a hub id (``stabilityai/sd-vae-ft-ema``)."""
    if isinstance(vae, (str, os.PathLike)):
        from diffusers import AutoencoderKL

        src = str(vae)
        try:
            vae = AutoencoderKL.from_pretrained(src)
        except Exception as err:
            raise RuntimeError(f"cannot load the VAE {src!r} (diffusers.AutoencoderKL.from_pretrained): {err}") from err
    vae = vae.to(device)
    if next(vae.parameters()).dtype != dtype:
        vae = vae.to(dtype)
    return vae.eval().requires_grad_(False)


def vae_name(vae: Any) -> str:
    if isinstance(vae, (str, os.PathLike)):
        return str(vae)
    return getattr(getattr(vae, "config", None), "_name_or_path", "") or type(vae).__name__


def latent_geometry(vae: Any, image_size: int) -> tuple[int, int]:
    """(latent channels, latent side) for ``image_size`` pixels."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if image_size % factor:
        raise ValueError(f"--image-size {image_size} is not divisible by the VAE's downsampling factor {factor}")
    return int(vae.config.latent_channels), image_size // factor


@torch.no_grad()
def encode(vae: Any, images: torch.Tensor, flips: bool) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (B, H, W, 3) -> posterior mean, std of shape (B, F, C, h, w), float32 numpy."""
    param = next(vae.parameters())
    x = images.to(param.device).permute(0, 3, 1, 2).to(param.dtype) / 127.5 - 1.0
    if flips:
        x = torch.cat([x, x.flip(-1)])
    dist = vae.encode(x).latent_dist
    mean, std = dist.mean.float(), dist.std.float()
    f = 2 if flips else 1
    b = images.shape[0]
    mean = mean.reshape(f, b, *mean.shape[1:]).transpose(0, 1)
    std = std.reshape(f, b, *std.shape[1:]).transpose(0, 1)
    return mean.cpu().numpy(), std.cpu().numpy()


# ---------------------------------------------------------------------------------------------------- driver
def _files_digest(samples: list[tuple[str, int]], root: Path) -> str:
    h = hashlib.sha1()
    for path, label in samples:
        h.update(f"{os.path.relpath(path, root)}\t{label}\n".encode())
    return h.hexdigest()


def _check_or_write_manifest(out: Path, manifest: dict, rank: int) -> None:
    path = out / MANIFEST
    if path.exists():
        old = read_manifest(out)
        keys = (
            "files_sha1",
            "num_images",
            "shard_size",
            "image_size",
            "latent_shape",
            "flips",
            "dtype",
            "vae",
            "scaling_factor",
            "classes",
        )
        diff = [k for k in keys if old.get(k) != manifest.get(k)]
        if diff:
            raise RuntimeError(
                f"{out} already holds latents prepared with different settings ({', '.join(diff)} differ); "
                "use another --out, or delete it to start over"
            )
        return
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f"{MANIFEST}.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, path)


def prepare_latents(
    data_path: str | os.PathLike,
    out: str | os.PathLike,
    *,
    vae: Any = DEFAULT_VAE,
    image_size: int = 256,
    batch_size: int = 64,
    shard_size: int = 10_000,
    num_workers: int = 4,
    flips: bool = True,
    dtype: str = "float16",
    limit: int | None = None,
    device: str | torch.device | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Any = None,
    progress: bool = True,
    max_shards: int | None = None,
) -> dict:
    """Encode ``data_path`` into shards under ``out``; returns the manifest.

    Rank ``rank`` of ``world_size`` does shards ``rank, rank + world_size, ...``; ``barrier`` (a callable) is called
    after the manifest is written. ``max_shards`` stops after that many shards of this rank (for tests: an
    interrupted run). ``vae`` may be an ``AutoencoderKL`` instance.
    """
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    out = Path(out)
    data_root = Path(data_path)
    classes, samples = scan_image_folder(data_root, limit)
    if device is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    name = vae_name(vae)
    vae = load_vae(vae, device)
    channels, side = latent_geometry(vae, image_size)
    num_shards = (len(samples) + shard_size - 1) // shard_size
    manifest = {
        "format": FORMAT,
        "source": str(data_root.resolve()),
        "files_sha1": _files_digest(samples, data_root),
        "num_images": len(samples),
        "num_shards": num_shards,
        "shard_size": shard_size,
        "classes": classes,
        "image_size": image_size,
        "latent_shape": [channels, side, side],
        "flips": flips,
        "dtype": dtype,
        "vae": name,
        "scaling_factor": float(getattr(vae.config, "scaling_factor", 0.18215)),
    }
    _check_or_write_manifest(out, manifest, rank)
    if barrier is not None:
        barrier()
    # leftovers of a killed run
    for stale in out.glob("shard_*.tmp-*"):
        if rank == 0 or world_size == 1:
            shutil.rmtree(stale, ignore_errors=True)

    mine = [i for i in range(num_shards) if i % world_size == rank and not shard_is_complete(out, i)]
    if max_shards is not None:
        mine = mine[:max_shards]
    todo_images = sum(min(shard_size, len(samples) - i * shard_size) for i in mine)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(
            total=todo_images,
            desc=f"rank {rank} encoding",
            unit="img",
            position=rank,
            disable=not sys.stderr.isatty() and rank != 0,
            dynamic_ncols=True,
        )
    np_dtype = np.float16 if dtype == "float16" else np.float32
    for i in mine:
        start = i * shard_size
        part = samples[start : start + shard_size]
        loader = DataLoader(
            _CroppedImages(part, image_size),
            batch_size=batch_size,
            num_workers=num_workers,
            shuffle=False,
            pin_memory=device.type == "cuda",
        )
        means, stds, labels = [], [], []
        for images, y in loader:
            m, s = encode(vae, images, flips)
            means.append(m.astype(np_dtype))
            stds.append(s.astype(np_dtype))
            labels.append(y.numpy())
            if bar is not None:
                bar.update(len(y))
        write_shard(out, i, np.concatenate(means), np.concatenate(stds), np.concatenate(labels), start)
    if bar is not None:
        bar.close()
    return manifest


def _parser() -> argparse.ArgumentParser:
    p = cli.make_parser("python -m examples.imagenet_dit.prepare_latents", __doc__.split("\n")[0])
    p.add_argument("--data-path", required=True, help="ImageFolder root: <data-path>/<class>/<image>")
    p.add_argument("--out", required=True, help="output directory for the latent shards")
    p.add_argument("--vae", default=DEFAULT_VAE, help="diffusers AutoencoderKL: hub id or local directory")
    p.add_argument("--image-size", type=int, default=256, help="side of the ADM center crop, in pixels")
    p.add_argument("--batch-size", type=int, default=64, help="images per VAE forward (x2 with flips)")
    p.add_argument("--shard-size", type=int, default=10_000, help="images per shard (a finished shard is never redone)")
    p.add_argument("--num-workers", type=int, default=8, help="PIL decoding workers per process")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="storage dtype")
    p.add_argument("--no-flip", action="store_true", help="do not store horizontally flipped copies")
    p.add_argument("--limit", type=int, default=None, help="only the first N images of the sorted list")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> None:
    p = _parser()
    args = p.parse_args(argv)

    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    barrier = None
    if world_size > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        barrier = dist.barrier
    try:
        manifest = prepare_latents(
            args.data_path,
            args.out,
            vae=args.vae,
            image_size=args.image_size,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            num_workers=args.num_workers,
            flips=not args.no_flip,
            dtype=args.dtype,
            limit=args.limit,
            rank=rank,
            world_size=world_size,
            barrier=barrier,
            progress=not args.no_progress,
        )
        if barrier is not None:
            barrier()
        if rank == 0:
            done = sum(shard_is_complete(args.out, i) for i in range(manifest["num_shards"]))
            print(
                f"{done}/{manifest['num_shards']} shards, {manifest['num_images']} images, "
                f"{len(manifest['classes'])} classes, latents {manifest['latent_shape']} -> {args.out}"
            )
    finally:
        if world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    main()
