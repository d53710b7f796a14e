"""Training-step time and peak memory of MeanFlow strategies as ratios of a plain flow-matching step.

Usage:
    python benchmarks/step_time.py                 # both networks, all strategies
    python benchmarks/step_time.py --quick         # fewer repetitions
    python benchmarks/step_time.py --device cuda   # on a GPU (peak memory from the CUDA allocator)

Every step is one full training step (zero_grad, loss, backward, Adam step) on the same network and batch.
Timings are medians over interleaved rounds (FM and each strategy alternate, so drift of a shared machine
hits them alike). Memory: on every device, the bytes saved for backward by one loss evaluation (the
activation memory, which is what differs between strategies: the no-grad JVP's own buffers are freed before
the gradient forward); on CUDA also the allocator's peak over one step (``torch.cuda.max_memory_allocated``).
The CPU has no allocator peak counter, and the resident-set size of a glibc process does not track it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import meanflow_losses as mfl

METHODS = ["fm", "nograd", "joint", "finite_difference"]


def _feats(t: torch.Tensor, dim: int, max_freq: float = 16.0) -> torch.Tensor:
    freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), dim // 2, device=t.device))
    ang = t[:, None] * freqs
    return torch.cat([ang.sin(), ang.cos()], 1)


class ToyMLP(nn.Module):
    """4 x 256 MLP on 2-D data with low-frequency embeddings of t and t - r."""

    def __init__(self, width: int = 256, depth: int = 4) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(2 + 32, width), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, 2))

    def forward(self, z, r, t):
        return self.net(torch.cat([z, _feats(t, 16), _feats(t - r, 16)], 1))


class Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.n1 = nn.LayerNorm(width, elementwise_affine=False)
        self.n2 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
        self.ada = nn.Linear(width, 6 * width)

    def forward(self, x, c):
        b, n, w = x.shape
        s1, g1, a1, s2, g2, a2 = self.ada(F.silu(c))[:, None].chunk(6, dim=2)
        h = self.n1(x) * (1 + g1) + s1
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w)
        x = x + a1 * self.proj(att)
        return x + a2 * self.mlp(self.n2(x) * (1 + g2) + s2)


class SmallDiT(nn.Module):
    """A DiT-like transformer on 4 x 16 x 16 latents, patch 2 (64 tokens), adaLN conditioning on (t, t - r)."""

    def __init__(self, width: int = 192, depth: int = 4, heads: int = 4) -> None:
        super().__init__()
        self.patch = nn.Conv2d(4, width, 2, 2)
        self.pos = nn.Parameter(torch.randn(1, 64, width) * 0.02)
        self.temb = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.out = nn.Linear(width, 4 * 4)

    def forward(self, z, r, t):
        b = z.shape[0]
        c = self.temb(torch.cat([_feats(t, 32), _feats(t - r, 32)], 1))
        x = self.patch(z).flatten(2).transpose(1, 2) + self.pos
        for blk in self.blocks:
            x = blk(x, c)
        x = self.out(x).view(b, 8, 8, 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(b, 4, 16, 16)


def build(config: str, device: str):
    torch.manual_seed(0)
    if config == "mlp":
        return ToyMLP().to(device), torch.randn(4096, 2, device=device)
    return SmallDiT().to(device), torch.randn(64, 4, 16, 16, device=device)


def make_loss(method: str, equal_fraction: float):
    times = mfl.TimePairSampler("logit_normal", -0.4, 1.0, equal_fraction=equal_fraction)
    if method == "fm":
        return mfl.FlowMatchingLoss(times=times.base, weighting=mfl.AdaptiveWeight(p=0.0), reduction="mean")
    return mfl.MeanFlowLoss(times=times, weighting=mfl.AdaptiveWeight(p=1.0, c=1e-3), reduction="sum", jvp=method)


def make_step(model, x, method, equal_fraction, device):
    loss_fn = make_loss(method, equal_fraction)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        opt.zero_grad(set_to_none=True)
        out = loss_fn(model, x, generator=gen)
        out.loss.backward()
        opt.step()

    return step


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_methods(config, methods, equal_fraction, device, rounds, steps_per_round):
    model, x = build(config, device)
    steps = {m: make_step(model, x, m, equal_fraction, device) for m in methods}
    for m in methods:  # warm-up
        for _ in range(2):
            steps[m]()
    times = {m: [] for m in methods}
    for _ in range(rounds):
        for m in methods:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                steps[m]()
            _sync(device)
            times[m].append((time.perf_counter() - t0) / steps_per_round)
    return {m: statistics.median(v) for m, v in times.items()}


def activation_bytes(config, method, equal_fraction, device) -> int:
    """Bytes saved for backward by one loss evaluation (the activation memory a strategy adds)."""
    model, x = build(config, device)
    loss_fn = make_loss(method, equal_fraction)
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        try:
            key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        except RuntimeError:  # dual tensors of forward-mode AD hide their storage
            key, size = id(t), t.numel() * t.element_size()
        if key not in seen:
            seen.add(key)
            total += size
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_fn(model, x, generator=torch.Generator(device=device).manual_seed(0))
    return total


def cuda_peak_bytes(config, method, equal_fraction, device) -> int:
    """Rise of the CUDA allocator's peak over one training step (after a warm-up step)."""
    model, x = build(config, device)
    step = make_step(model, x, method, equal_fraction, device)
    step()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--configs", nargs="+", default=["mlp", "dit"])
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--equal-fraction", type=float, default=0.75, help="share of r = t rows (0.75: 25%% r != t)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    a = p.parse_args()
    methods = ["fm"] + [m for m in a.methods if m != "fm"]
    rounds, per = (3, 2) if a.quick else (7, 3)
    print(
        f"torch {torch.__version__}, device {a.device}, threads {torch.get_num_threads()}, "
        f"r != t share {1 - a.equal_fraction:.0%}"
    )
    cuda = a.device.startswith("cuda")
    results = {}
    for config in a.configs:
        t = time_methods(config, methods, a.equal_fraction, a.device, rounds, per)
        act = {m: activation_bytes(config, m, a.equal_fraction, a.device) for m in methods}
        peak = {m: cuda_peak_bytes(config, m, a.equal_fraction, a.device) for m in methods} if cuda else None
        results[config] = {
            m: {"step_s": t[m], "activation_bytes": act[m], "cuda_peak_bytes": peak[m] if peak else None}
            for m in methods
        }
        print(f"\n[{config}]  FM step {t['fm'] * 1e3:.1f} ms, FM activations {act['fm'] / 2**20:.1f} MiB")
        head = f"{'method':<20}{'step ms':>10}{'time x FM':>11}{'act MiB':>10}{'act x FM':>10}"
        print(head + (f"{'peak MiB':>10}{'peak x FM':>11}" if cuda else ""))
        for m in methods:
            line = (
                f"{m:<20}{t[m] * 1e3:>10.1f}{t[m] / t['fm']:>11.2f}{act[m] / 2**20:>10.1f}"
                f"{act[m] / max(act['fm'], 1):>10.2f}"
            )
            if peak:
                line += f"{peak[m] / 2**20:>10.1f}{peak[m] / max(peak['fm'], 1):>11.2f}"
            print(line)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
