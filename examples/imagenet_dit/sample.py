"""Sample N images with 1 or 2 steps from a train.py checkpoint into an ADM-format .npz; optionally compute FID.

    # 50K one-step samples on 8 GPUs, EMA weights, uniformly random labels
    torchrun --nproc_per_node 8 -m examples.imagenet_dit.sample --ckpt runs/mf_b2 --num-images 50000 --steps 1 \
        --out mf_b2_1nfe.npz
    # two steps: ODE step with the middle time 0.5, or consistency step at 0.55 (alpha-Flow XL/2)
    torchrun --nproc_per_node 8 -m examples.imagenet_dit.sample --ckpt runs/mf_b2 --num-images 50000 \
        --grid 1.0,0.5,0.0 --method ode ...
    torchrun --nproc_per_node 8 -m examples.imagenet_dit.sample --ckpt runs/af_xl2 --num-images 50000 \
        --grid 1.0,0.55,0.0 --method consistency ...
    # in-process FID against reference images (an ADM reference batch .npz, or an ImageFolder directory)
    ... --fid-ref VIRTUAL_imagenet256_labeled.npz

The .npz holds ``arr_0``: uint8 (N, H, W, 3) and ``arr_1``: int64 labels (N,), what the ADM evaluation suite
(guided-diffusion/evaluations/evaluator.py) reads; the papers' FIDs come from that suite. The in-process FID uses
``torchmetrics.image.fid.FrechetInceptionDistance`` (Inception weights via ``torch-fidelity``); its feature network
can be replaced with ``--fid-feature module:factory`` (the tests pass a tiny one). Its values are close to, but not
the same as, the ADM suite's TensorFlow Inception.

Image i always gets the same noise and label (seeded by ``--seed`` and i), whatever the number of processes.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

import meanflow_losses as mfl
from examples import cli
from examples.imagenet_dit.dit import DiT, DiTConfig, guidance_kwargs
from examples.imagenet_dit.dit_runtime import (
    DistInfo,
    latents_to_uint8,
    load_checkpoint,
    resolve_checkpoint,
    setup_distributed,
)


# ------------------------------------------------------------------------------------------------------ model
def load_model(
    ckpt_path: str | os.PathLike, weights: str = "ema", device: torch.device | str = "cpu"
) -> tuple[nn.Module, DiTConfig, dict]:
    """The protocol model ``u(z, r, t, y=...)`` of a checkpoint (EMA or raw weights), its DiTConfig, the checkpoint."""
    if weights not in ("ema", "model"):
        raise ValueError(f"weights must be 'ema' or 'model', got {weights!r}")
    ckpt = load_checkpoint(ckpt_path)
    dit_cfg = DiTConfig(**ckpt["model_config"])
    net = DiT(dit_cfg)
    net.load_state_dict(ckpt[weights])
    model = mfl.adapters.from_interval_net(net).to(device).eval().requires_grad_(False)
    return model, dit_cfg, ckpt


def draw(index: int, seed: int, dit_cfg: DiTConfig, labels: str) -> tuple[Tensor, int]:
    """Noise and label of image ``index`` (independent of batching and process count)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    noise = torch.randn((dit_cfg.in_channels, dit_cfg.input_size, dit_cfg.input_size), generator=g)
    if labels == "balanced":
        y = index % dit_cfg.num_classes
    else:
        y = int(torch.randint(0, dit_cfg.num_classes, (1,), generator=g))
    return noise, y


@torch.no_grad()
def generate(
    model: nn.Module,
    dit_cfg: DiTConfig,
    indices: Sequence[int],
    *,
    grid: Sequence[float],
    method: str = "ode",
    seed: int = 0,
    labels: str = "random",
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    decode: Callable[[Tensor], np.ndarray] | None = None,
    bf16: bool = False,
    progress: bool = False,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Samples for ``indices``: decoded uint8 images (or float latents when ``decode`` is None) and labels.

    A guidance-input DiT (``guidance_inputs``, improved MeanFlow) samples at ``guidance_scale`` and
    ``guidance_interval``; the other DiTs ignore both (their guidance was fixed in training).
    """
    device = torch.device(device)
    outs: list[np.ndarray] = []
    ys: list[int] = []
    chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(indices), desc="sampling", unit="img", dynamic_ncols=True)
    for chunk in chunks:
        draws = [draw(int(i), seed, dit_cfg, labels) for i in chunk]
        noise = torch.stack([d[0] for d in draws]).to(device)
        y = torch.tensor([d[1] for d in draws], device=device)
        renoise = None
        if method == "consistency" and len(grid) > 2:
            g = torch.Generator().manual_seed(seed * 7_919 + int(chunk[0]) + 1)
            renoise = [torch.randn(noise.shape, generator=g).to(device) for _ in range(len(grid) - 2)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            kw = {"y": y, **guidance_kwargs(dit_cfg, len(chunk), guidance_scale, guidance_interval, device)}
            z = mfl.sample(model, noise, grid=list(grid), method=method, model_kwargs=kw, renoise=renoise)
        z = z.float()
        outs.append(decode(z) if decode is not None else z.cpu().numpy())
        ys.extend(d[1] for d in draws)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return np.concatenate(outs), np.asarray(ys, dtype=np.int64)


def write_npz(path: str | os.PathLike, images: np.ndarray, labels: np.ndarray) -> Path:
    """ADM format (``arr_0`` images uint8 NHWC, ``arr_1`` labels), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npz")
    np.savez(tmp, arr_0=images, arr_1=labels)
    os.replace(tmp, path)
    return path


# -------------------------------------------------------------------------------------------------------- FID
def load_reference_images(ref: str | os.PathLike, image_size: int, limit: int | None = None) -> np.ndarray:
    """uint8 (N, H, W, 3) reference images: ``arr_0`` of an .npz, or an ImageFolder (ADM center crop)."""
    ref = Path(ref)
    if not ref.exists():
        raise FileNotFoundError(f"FID reference {str(ref)!r} does not exist (an .npz with arr_0, or an image folder)")
    if ref.is_file():
        with np.load(ref) as f:
            if "arr_0" not in f:
                raise ValueError(f"{ref} has no arr_0 (ADM reference batches store uint8 NHWC images there)")
            arr = f["arr_0"][:limit]
    else:
        from examples.imagenet_dit.prepare_latents import load_image, scan_image_folder

        _, samples = scan_image_folder(ref, limit)
        arr = np.stack([load_image(p, image_size) for p, _ in samples])
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"reference images must be uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}")
    return arr


def load_feature(spec: str) -> nn.Module:
    """``module:factory`` or ``path/to/file.py:factory`` -> an nn.Module mapping uint8 (N, 3, H, W) to (N, d)."""
    if ":" not in spec:
        raise ValueError(f"--fid-feature expects module:factory, got {spec!r}")
    mod_name, attr = spec.rsplit(":", 1)
    if mod_name.endswith(".py"):
        loader_spec = importlib.util.spec_from_file_location(Path(mod_name).stem, mod_name)
        if loader_spec is None or loader_spec.loader is None:
            raise ImportError(f"cannot import {mod_name}")
        module = importlib.util.module_from_spec(loader_spec)
        loader_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(mod_name)
    obj = getattr(module, attr)
    feature = obj() if not isinstance(obj, nn.Module) else obj
    if not isinstance(feature, nn.Module):
        raise TypeError(f"{spec} must be (or return) an nn.Module, got {type(feature).__name__}")
    return feature


def compute_fid(
    fake: np.ndarray,
    real: np.ndarray,
    *,
    feature: nn.Module | None = None,
    batch_size: int = 100,
    device: torch.device | str = "cpu",
) -> float:
    """FID between uint8 NHWC image sets with torchmetrics; under torch.distributed each rank passes its share.

    ``feature``: any nn.Module mapping uint8 (N, 3, H, W) to (N, d) features (default: torchmetrics' Inception,
    2048-d pool features, which needs ``torch-fidelity``).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(
        feature=feature if feature is not None else 2048, normalize=False, reset_real_features=True
    ).to(device)
    for arr, real_flag in ((real, True), (fake, False)):
        for i in range(0, len(arr), batch_size):
            imgs = torch.from_numpy(np.ascontiguousarray(arr[i : i + batch_size])).permute(0, 3, 1, 2).to(device)
            fid.update(imgs, real=real_flag)
    return float(fid.compute())


# ------------------------------------------------------------------------------------------------------- main
def parse_grid(args: argparse.Namespace) -> list[float]:
    if args.grid:
        return [float(v) for v in args.grid.split(",")]
    return mfl.make_grid(args.steps)


def _parser() -> argparse.ArgumentParser:
    p = cli.make_parser(
        "python -m examples.imagenet_dit.sample", "1-/2-step sampling to an ADM .npz, and in-process FID."
    )
    p.add_argument("--ckpt", required=True, help="checkpoint file, checkpoints/ directory or run directory")
    p.add_argument("--out", required=True, help="output .npz (arr_0 uint8 NHWC images, arr_1 labels)")
    p.add_argument("--num-images", type=int, default=50_000, help="images to generate, over all processes")
    p.add_argument("--steps", type=int, default=1, help="uniform grid of this many steps (ignored with --grid)")
    p.add_argument("--grid", default="", help="explicit grid, e.g. 1.0,0.55,0.0")
    p.add_argument(
        "--method",
        default="ode",
        choices=["ode", "consistency"],
        help="sampler: ode (z_r = z_t - (t - r) u, MeanFlow) or consistency (jump to t = 0, re-noise to the next "
        "time: alpha-Flow's 2-step sampler)",
    )
    p.add_argument(
        "--weights", default="ema", choices=["ema", "model"], help="weights of the checkpoint: EMA or online"
    )
    p.add_argument(
        "--labels",
        default="random",
        choices=["random", "balanced"],
        help="class labels: uniformly random, or balanced (image i gets class i mod the number of classes)",
    )
    p.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="guidance-input DiTs (imf_b2): the guidance scale to sample at (default: the run's "
        "sampling.guidance_scale; other DiTs ignore it, their guidance was fixed in training)",
    )
    p.add_argument(
        "--guidance-interval",
        default=None,
        metavar="T_MIN,T_MAX",
        help="guidance-input DiTs: the t interval where guidance applies, e.g. 0.4,0.65 (default: the run's "
        "sampling.guidance_interval)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of every image's noise and label (image i: seed and i)")
    p.add_argument("--batch-size", type=int, default=125, help="images per forward per process")
    p.add_argument("--vae", default="", help="VAE for decoding (default: the one the latents were made with)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for the DiT (the VAE decodes in float32)")
    p.add_argument("--fid-ref", default="", help="reference images for FID: ADM .npz (arr_0) or ImageFolder")
    p.add_argument(
        "--fid-ref-limit", type=int, default=None, help="only the first N reference images (default: all of them)"
    )
    p.add_argument("--fid-feature", default="", help="module:factory of a replacement FID feature network")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    return p


def main(argv: list[str] | None = None) -> dict:
    p = _parser()
    args = p.parse_args(argv)

    info = setup_distributed(args.device)
    try:
        return _run(args, info)
    finally:
        if info.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _run(args: argparse.Namespace, info: DistInfo) -> dict:
    t0 = time.perf_counter()
    ckpt_file = resolve_checkpoint(args.ckpt)
    model, dit_cfg, ckpt = load_model(ckpt_file, args.weights, info.device)
    latents_info = ckpt.get("latents", {})
    run_sampling = ckpt.get("config", {}).get("sampling", {})
    scale = args.guidance_scale if args.guidance_scale is not None else float(run_sampling.get("guidance_scale", 1.0))
    if args.guidance_interval:
        interval = tuple(float(v) for v in args.guidance_interval.split(","))
        if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
            raise ValueError(f"--guidance-interval must be t_min,t_max in [0, 1], got {args.guidance_interval!r}")
    else:
        interval = tuple(run_sampling.get("guidance_interval", (0.0, 1.0)))
    del ckpt
    grid = parse_grid(args)
    vae_source = args.vae or latents_info.get("vae", "")
    if not vae_source:
        raise ValueError("no VAE known for this checkpoint: pass --vae (hub id or directory)")
    from examples.imagenet_dit.prepare_latents import load_vae

    vae = load_vae(vae_source, info.device)
    scaling = float(latents_info.get("scaling_factor", getattr(vae.config, "scaling_factor", 0.18215)))

    def decode(z: Tensor) -> np.ndarray:
        with torch.no_grad():
            return latents_to_uint8(z, vae, scaling)

    per = (args.num_images + info.world_size - 1) // info.world_size
    mine = list(range(info.rank * per, min(args.num_images, (info.rank + 1) * per)))
    empty = not mine  # more processes than images: sample one and keep none, so the shapes are known
    images, labels = generate(
        model,
        dit_cfg,
        mine or [0],
        grid=grid,
        method=args.method,
        seed=args.seed,
        labels=args.labels,
        batch_size=args.batch_size,
        device=info.device,
        decode=decode,
        bf16=args.bf16,
        guidance_scale=scale,
        guidance_interval=interval,
        progress=info.is_main,
    )
    if empty:
        images, labels = images[:0], labels[:0]
    out = Path(args.out)
    part = out.with_name(f".{out.stem}.part{info.rank:04d}.npz")
    if info.distributed:
        write_npz(part, images, labels)
        dist.barrier()
        if info.is_main:
            parts = [out.with_name(f".{out.stem}.part{r:04d}.npz") for r in range(info.world_size)]
            all_imgs, all_labels = [], []
            for pp in parts:
                with np.load(pp) as f:
                    all_imgs.append(f["arr_0"])
                    all_labels.append(f["arr_1"])
            write_npz(out, np.concatenate(all_imgs), np.concatenate(all_labels))
            for pp in parts:
                pp.unlink()
        dist.barrier()
    else:
        write_npz(out, images, labels)
    result: dict[str, Any] = {
        "out": str(out),
        "num_images": args.num_images,
        "grid": grid,
        "method": args.method,
        "seconds": time.perf_counter() - t0,
    }
    if args.fid_ref:
        feature = load_feature(args.fid_feature) if args.fid_feature else None
        real = load_reference_images(args.fid_ref, images.shape[1], args.fid_ref_limit)
        rper = (len(real) + info.world_size - 1) // info.world_size
        real_mine = real[info.rank * rper : (info.rank + 1) * rper]
        result["fid"] = compute_fid(images, real_mine, feature=feature, device=info.device)
        result["fid_feature"] = args.fid_feature or "inception-2048"
    if info.is_main:
        nfe = len(grid) - 1
        msg = f"[sample] {args.num_images} images, {nfe}-NFE {args.method} grid {grid} -> {out}"
        if "fid" in result:
            msg += f"; FID {result['fid']:.3f} ({result['fid_feature']}, {len(real)} reference images)"
        print(msg, flush=True)
    return result


if __name__ == "__main__":
    main()
