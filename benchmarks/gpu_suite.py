"""The GPU suite in one command: DiT-B/2 bf16 throughput and memory of FM, MeanFlow and alpha-Flow, the attention
kernels, and the attention-JVP variants (on one H100/H200 in a few minutes; ``--tiny`` runs it on the CPU).

    python benchmarks/gpu_suite.py --json runs/gpu_suite.json          # on a GPU
    python benchmarks/gpu_suite.py --tiny                               # CI smoke on the CPU (numbers meaningless)

What it measures:

1. Training throughput (images/s, median over interleaved rounds) and the allocator's peak memory of one step
   (``torch.cuda.max_memory_allocated``) of DiT-B/2 (examples/imagenet_dit) on 32 x 32 x 4 latents with bf16
   autocast and Adam, for FM, MeanFlow (``nograd``, ``joint``, ``finite_difference``) and alpha-Flow (consistency
   regime, MeanFlow regime), each eager and with ``torch.compile(net)``; every ratio is against FM of the same mode.
   Targets (issue 11): MeanFlow at least 0.83x FM images/s, peak memory at most 1.10x FM.
2. A profiler check that the GRADIENT forward of a MeanFlow step uses a fused attention kernel (flash,
   memory-efficient or cuDNN; on the CPU the flash-for-CPU kernel), while the JVP runs on its own route.
3. The JVP of one attention call at DiT-B/2's head shape (12 heads x 64) for several token counts: time, peak memory
   and error against forward AD through the math backend, for ``blockwise``, (when installed) ``flash`` and, at the
   largest size, the compiled JVP region a ``torch.compile``-d network gets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import meanflow_losses as mfl
from benchmarks.harness import attention_section, peak_bytes
from examples.imagenet_dit.dit import build_dit

FUSED = ("flash", "efficient_attention", "cudnn_attention", "fmha")
TIMES = mfl.TimePairSampler("logit_normal", -0.4, 1.0, equal_fraction=0.75)


def _methods() -> dict:
    mf = {"runtime_checks": False, "times": TIMES}
    return {
        "fm": lambda: mfl.FlowMatchingLoss(times=TIMES.base, runtime_checks=False),
        "meanflow": lambda: mfl.MeanFlowLoss(**mf),
        "meanflow[joint]": lambda: mfl.MeanFlowLoss(jvp="joint", **mf),
        "meanflow[fd]": lambda: mfl.MeanFlowLoss(jvp="finite_difference", **mf),
        "alphaflow[consistency]": lambda: mfl.AlphaFlowLoss(alpha=0.5, **mf),
        "alphaflow[meanflow]": lambda: mfl.AlphaFlowLoss(alpha=0.0, **mf),
    }


class PassLabels(nn.Module):
    """Wraps the model and labels each call in the profiler: ``gradient_forward`` or ``no_grad_pass``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, z, r, t, **kw):
        label = "gradient_forward" if torch.is_grad_enabled() else "no_grad_pass"
        with torch.profiler.record_function(label):
            return self.model(z, r, t, **kw)


def make_model(tiny: bool, device: str) -> nn.Module:
    torch.manual_seed(0)
    if tiny:
        net = build_dit("DiT-S/2", depth=1, hidden_size=32, num_heads=2, input_size=8, num_classes=10)
    else:
        net = build_dit("DiT-B/2", input_size=32, num_classes=1000)
    return mfl.adapters.from_interval_net(net).to(device)


def make_step(model: nn.Module, loss_fn, x: torch.Tensor, y: torch.Tensor, bf16: bool):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    gen = torch.Generator(device=x.device).manual_seed(0)
    device_type = x.device.type

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16), mfl.value_checks(False):
            out = loss_fn(model, x, model_kwargs={"y": y}, generator=gen, step=1)
        out.loss.backward()
        opt.step()

    return step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def throughput(args, device: torch.device) -> dict:
    """Images/s and peak memory of every method, eager and compiled."""
    results = {}
    batch = args.batch
    for compiled in (False, True) if args.compile else (False,):
        base = make_model(args.tiny, device)
        model = torch.compile(base) if compiled else base
        size = 8 if args.tiny else 32
        x = torch.randn(batch, 4, size, size, device=device)
        y = torch.randint(0, 10 if args.tiny else 1000, (batch,), device=device)
        steps = {name: make_step(model, make(), x, y, args.bf16) for name, make in _methods().items()}
        t0 = time.perf_counter()
        for step in steps.values():
            step()
            step()
        _sync(device)
        warm = time.perf_counter() - t0
        times: dict[str, list[float]] = {m: [] for m in steps}
        for _ in range(args.rounds):
            for m, step in steps.items():
                _sync(device)
                t1 = time.perf_counter()
                for _ in range(args.per_round):
                    step()
                _sync(device)
                times[m].append((time.perf_counter() - t1) / args.per_round)
        mode = "compiled" if compiled else "eager"
        res = {}
        for m, step in steps.items():
            ratio = statistics.median([a / b for a, b in zip(times["fm"], times[m], strict=True)])  # FM time / m
            res[m] = {
                "images_per_s": batch / statistics.median(times[m]),
                "throughput_x_fm": ratio,
                "peak_bytes": peak_bytes(step, str(device)),
            }
        for m in res:
            res[m]["peak_x_fm"] = res[m]["peak_bytes"] / max(res["fm"]["peak_bytes"], 1)
        res["_warmup_s"] = warm
        results[mode] = res
        label = "tiny" if args.tiny else "B/2"
        print(f"\n[DiT-{label}, {mode}, batch {batch}, bf16 {args.bf16}]  warm-up {warm:.0f} s")
        print(f"{'method':<24}{'images/s':>10}{'x FM':>8}{'peak MiB':>10}{'peak x FM':>11}")
        for m, rec in res.items():
            if not m.startswith("_"):
                print(
                    f"{m:<24}{rec['images_per_s']:>10.1f}{rec['throughput_x_fm']:>8.3f}"
                    f"{rec['peak_bytes'] / 2**20:>10.1f}{rec['peak_x_fm']:>11.2f}"
                )
    return results


def fused_attention_check(args, device: torch.device) -> dict:
    """Which attention kernels the gradient forward and the no-grad passes of one MeanFlow step launch."""
    from torch.profiler import ProfilerActivity, profile

    model = PassLabels(make_model(args.tiny, device))
    size = 8 if args.tiny else 32
    x = torch.randn(args.batch, 4, size, size, device=device)
    y = torch.randint(0, 10 if args.tiny else 1000, (args.batch,), device=device)
    step = make_step(model, _methods()["meanflow"](), x, y, args.bf16)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    found: dict[str, set[str]] = {"gradient_forward": set(), "no_grad_pass": set()}
    for ev in prof.events():
        if "attention" not in ev.name.lower() and "fmha" not in ev.name.lower():
            continue
        parent = ev.cpu_parent
        while parent is not None and parent.name not in found:
            parent = parent.cpu_parent
        if parent is not None:
            found[parent.name].add(ev.name)
    fused = sorted(n for n in found["gradient_forward"] if any(k in n.lower() for k in FUSED))
    ok = bool(fused)
    print(f"\n[profiler] attention ops in the gradient forward: {sorted(found['gradient_forward'])}")
    print(f"[profiler] attention ops in the no-grad passes (JVP): {sorted(found['no_grad_pass'])}")
    print(f"[profiler] CHECK the gradient forward uses a fused attention kernel: {'PASS' if ok else 'FAIL'}")
    return {"gradient_forward": sorted(found["gradient_forward"]), "no_grad": sorted(found["no_grad_pass"]), "ok": ok}


def attention_variants(args, device: torch.device) -> dict:
    out = {}
    tokens = (64, 256) if args.tiny else (256, 1024, 4096)
    heads, dim = (2, 16) if args.tiny else (12, 64)
    for n in tokens:
        # the compiled JVP region (what a torch.compile-d network gets) at the largest size only: one compilation
        compiled = args.compile and n == tokens[-1]
        res = attention_section(str(device), n, heads, dim, 1 if args.tiny else 5, compiled=compiled)
        out[str(n)] = res
        print(f"\n[attention JVP, {n} tokens, {heads} heads x {dim}]")
        for v, rec in res.items():
            peak = "n/a" if rec["peak_bytes"] is None else f"{rec['peak_bytes'] / 2**20:8.1f} MiB"
            mem = "n/a" if rec["mem_x_math"] is None else f"{rec['mem_x_math']:6.3f}"
            print(
                f"  {v:<10} {rec['ms']:8.2f} ms  time x math {rec['time_x_math']:5.2f}  "
                f"peak {peak}  mem x math {mem}  rel err {rec['rel_err']:.1e}"
            )
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny DiT on whatever device: the CI smoke run")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--batch", type=int, default=None, help="global batch (default 64; 4 with --tiny)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-round", type=int, default=3)
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile runs")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32 instead of bf16 autocast")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if a.tiny:
        a.batch, a.rounds, a.per_round = a.batch or 4, 1, 1
    a.batch = a.batch or 64
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    flash = mfl.jvp_attention.flash_kernel() is not None
    print(f"torch {torch.__version__}, {name}, jvp-flash-attention installed: {flash}")
    t0 = time.perf_counter()
    results = {
        "device": name,
        "throughput": throughput(a, device),
        "fused_attention": fused_attention_check(a, device),
        "attention_jvp": attention_variants(a, device),
    }
    results["wall_s"] = time.perf_counter() - t0
    print(f"\nwall time {results['wall_s']:.0f} s")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return results


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
