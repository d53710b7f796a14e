"""A tiny, CPU-only run of the whole pipeline, and the pieces the tests build it from.

    python -m examples.imagenet_dit.dit_smoke --workdir /tmp/dit_smoke          # ~1 minute on 2 CPU cores

It writes a synthetic ImageFolder (random images, 2 classes), a randomly initialised tiny ``AutoencoderKL``,
prepares latents, trains a 2-block DiT for a few steps with two Gloo processes under torchrun, samples with 1 and 2
steps and computes an FID with a tiny random feature network. The numbers mean nothing; the point is that every
stage runs and hands the next one what it expects, which is what you want to know before asking for 64 GPUs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from examples import cli
from examples.imagenet_dit.dit_config import list_configs

REPO = Path(__file__).resolve().parents[2]  # the repository root (examples/ is not installed)

# --set overrides that shrink any config to a CPU-sized model and run
TINY_OVERRIDES = [
    "model.depth=2",
    "model.hidden_size=32",
    "model.num_heads=2",
    "data.global_batch=8",
    "train.steps=4",
    "train.bf16=false",
    "train.log_every=2",
    "train.ckpt_every=2",
    "train.grid_every=0",
    "train.grid_images=4",
]


def make_image_folder(
    root: str | os.PathLike, num_classes: int = 2, per_class: int = 8, size: tuple[int, int] = (24, 20), seed: int = 0
) -> Path:
    """Random RGB images in ``root/class_<k>/img_<i>.png`` (non-square, so the center crop is exercised)."""
    from PIL import Image

    root = Path(root)
    rng = np.random.default_rng(seed)
    for k in range(num_classes):
        d = root / f"class_{k}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = rng.integers(0, 256, size=(1, 1, 3))
            noise = rng.integers(-40, 40, size=(size[1], size[0], 3))
            arr = np.clip(base + noise + 60 * k, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"img_{i:03d}.png")
    return root


def make_tiny_vae(seed: int = 0):
    """A randomly initialised ``diffusers.AutoencoderKL`` with 4 latent channels and downsampling factor 2."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    ).eval()


class TinyFeatures(nn.Module):
    """A stand-in for Inception in FID tests: uint8 (N, 3, H, W) -> (N, 8) random conv features."""

    num_features = 8

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, self.num_features, 3, stride=2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.2)
            self.conv.bias.zero_()
        self.requires_grad_(False)

    def forward(self, images: Tensor) -> Tensor:
        x = images.float() / 127.5 - 1.0
        return torch.tanh(self.conv(x)).mean(dim=(2, 3))


def tiny_features() -> nn.Module:
    """Factory for ``--fid-feature examples.imagenet_dit.dit_smoke:tiny_features``."""
    return TinyFeatures()


def build_tiny_latents(
    workdir: str | os.PathLike, *, num_classes: int = 2, per_class: int = 8, shard_size: int = 6
) -> dict[str, Path]:
    """Synthetic ImageFolder + tiny VAE (saved to a directory) + prepared 8x8x4 latents; returns the paths."""
    from examples.imagenet_dit.prepare_latents import prepare_latents

    work = Path(workdir)
    images = make_image_folder(work / "images", num_classes=num_classes, per_class=per_class)
    vae_dir = work / "vae"
    make_tiny_vae().save_pretrained(vae_dir)
    prepare_latents(
        images,
        work / "latents",
        vae=str(vae_dir),
        image_size=16,
        batch_size=8,
        shard_size=shard_size,
        num_workers=0,
        dtype="float32",
        progress=False,
    )
    return {"images": images, "vae": vae_dir, "latents": work / "latents"}


def torchrun_process(
    module: str, args: list[str], nproc: int = 2, env: dict | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``python -m torch.distributed.run --standalone -m <module>`` from the repository root, one thread each.

    Raises:
        subprocess.TimeoutExpired: the run did not end within ``timeout`` seconds (its processes are killed).
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--standalone",
        "-m",
        module,
        *args,
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p)
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def torchrun(module: str, args: list[str], nproc: int = 2, env: dict | None = None, timeout: float = 300) -> str:
    """:func:`torchrun_process` that must succeed; returns its stdout and stderr."""
    res = torchrun_process(module, args, nproc, env, timeout)
    if res.returncode != 0:
        cmd = " ".join(map(str, res.args))
        raise RuntimeError(f"{cmd} failed ({res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-6000:]}")
    return res.stdout + res.stderr


def _parser() -> argparse.ArgumentParser:
    p = cli.make_parser(
        "python -m examples.imagenet_dit.dit_smoke", "tiny CPU run of prepare_latents -> train -> sample -> FID"
    )
    p.add_argument("--workdir", required=True, help="folder of the synthetic images, latents, run and samples")
    p.add_argument(
        "--config",
        default="meanflow_b2",
        help=f"training config, shrunk to a tiny DiT: a name in configs/ ({', '.join(list_configs())}) or a "
        "path to a .toml",
    )
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    work = Path(args.workdir)
    paths = build_tiny_latents(work)
    images = paths["images"]
    sets = [x for o in TINY_OVERRIDES for x in ("--set", o)]
    print(
        torchrun(
            "examples.imagenet_dit.train",
            [
                "--config",
                args.config,
                "--data",
                str(work / "latents"),
                "--run-dir",
                str(work / "run"),
                "--device",
                "cpu",
                *sets,
                "--set",
                "train.grid_every=4",
            ],
        )
    )
    print(
        torchrun(
            "examples.imagenet_dit.sample",
            [
                "--ckpt",
                str(work / "run"),
                "--num-images",
                "16",
                "--steps",
                "1",
                "--out",
                str(work / "samples_1step.npz"),
                "--batch-size",
                "4",
                "--device",
                "cpu",
                "--fid-ref",
                str(images),
                "--fid-feature",
                "examples.imagenet_dit.dit_smoke:tiny_features",
            ],
        )
    )


if __name__ == "__main__":
    main()
