"""Training-step time and memory of every objective and JVP strategy, as ratios of a flow-matching step.

    python benchmarks/harness.py                              # every network and method, eager and compiled
    python benchmarks/harness.py --networks mlp dit --compile none
    python benchmarks/harness.py --attention                  # also the attention-JVP section (N = 4096 tokens)
    python benchmarks/harness.py --tiny                       # seconds: the CI smoke run (numbers meaningless)

A step is zero_grad, loss, backward and an Adam step on the same network and batch. Methods of one network run
interleaved (every round runs each method once); the ratio reported is the median over rounds of (method step /
FM step of that round), so a drifting shared machine hits both alike; (IQR) is the interquartile range of those
per-round ratios, the spread a reader should allow. "compiled" means ``torch.compile(net)``
with the loss in eager code (the engine then compiles its JVP region too); its ratios are against the compiled FM
step. Memory: on every device the bytes saved for backward by one loss evaluation ("act", the activation memory)
and the peak bytes of the tensors one step creates ("peak", counted by a dispatch mode: the CPU has no allocator
peak); on CUDA the allocator's peak over a step (``torch.cuda.max_memory_allocated``). Runtime checks are off:
they cost only an objective's first calls.

``naive`` is what the public ports do: one ``torch.func.jvp`` with gradient through the primal over EVERY row, the
math attention backend, no row selection.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import meanflow_losses as mfl
from benchmarks.nets import NETWORKS, build
from tests.memory import LiveTensorBytes

TIMES = mfl.TimePairSampler("logit_normal", -0.4, 1.0, equal_fraction=0.75)  # 25% of the rows r != t


def _mf(**kw) -> mfl.MeanFlowLoss:
    return mfl.MeanFlowLoss(times=TIMES, runtime_checks=False, **kw)


#: name -> objective factory (None: the naive joint JVP over every row)
METHODS: dict[str, Callable[[], object] | None] = {
    "fm": lambda: mfl.FlowMatchingLoss(times=TIMES.base, weighting=mfl.AdaptiveWeight(p=0.0), runtime_checks=False),
    "meanflow": lambda: _mf(),
    "meanflow[joint]": lambda: _mf(jvp="joint"),
    "meanflow[fd]": lambda: _mf(jvp="finite_difference"),
    "alphaflow[consistency]": lambda: mfl.AlphaFlowLoss(alpha=0.5, times=TIMES, runtime_checks=False),
    "alphaflow[meanflow]": lambda: mfl.AlphaFlowLoss(alpha=0.0, times=TIMES, runtime_checks=False),
    "alphaflow[tfm]": lambda: mfl.AlphaFlowLoss(alpha=1.0, times=TIMES, runtime_checks=False),
    "splitmeanflow": lambda: mfl.SplitMeanFlowLoss(times=TIMES, runtime_checks=False),
    "kim": lambda: mfl.presets.accelerated_meanflow(10**6, times=TIMES, runtime_checks=False),
    "naive": None,
}


def naive_loss(model, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """MeanFlow as the public ports write it: a joint ``torch.func.jvp`` on every row, math attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    pair = TIMES.sample(x.shape[0], generator=generator, device=x.device)
    t, r = pair.t, pair.r
    e = torch.randn(x.shape, generator=generator, device=x.device)
    shape = (-1, *([1] * (x.ndim - 1)))
    z = (1 - t.view(shape)) * x + t.view(shape) * e
    v = e - x
    with sdpa_kernel(SDPBackend.MATH):
        u, dudt = torch.func.jvp(model, (z, r, t), (v, torch.zeros_like(r), torch.ones_like(t)))
    target = (v - (t - r).view(shape) * dudt).detach()
    sq = (u - target).square().flatten(1).sum(1)
    return (sq / (sq.detach() + 1e-3)).mean()


def make_step(model, x: torch.Tensor, method: str, device: str) -> Callable[[], None]:
    objective = METHODS[method]
    loss_fn = None if objective is None else objective()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with mfl.value_checks(False):
            loss = naive_loss(model, x, gen) if loss_fn is None else loss_fn(model, x, generator=gen, step=1).loss
        loss.backward()
        opt.step()

    return step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def activation_bytes(model, x: torch.Tensor, method: str, device: str) -> int:
    """Bytes saved for backward by one loss evaluation."""
    objective = METHODS[method]
    loss_fn = None if objective is None else objective()
    seen: set[int] = set()
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        try:
            key, size = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        except RuntimeError:  # dual tensors hide their storage
            key, size = id(t), t.numel() * t.element_size()
        if key not in seen:
            seen.add(key)
            total += size
        return t

    gen = torch.Generator(device=device).manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        (naive_loss(model, x, gen) if loss_fn is None else loss_fn(model, x, generator=gen, step=1).loss)
    return total


def peak_bytes(step: Callable[[], None], device: str) -> int:
    """Peak bytes alive over one step: the CUDA allocator's, or the tensors the step creates (CPU)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    tracker = LiveTensorBytes()
    with tracker:
        step()
    return tracker.peak


def run_network(name: str, methods: list[str], compiled: bool, device: str, rounds: int, per_round: int,
                batch: int | None, clock: Callable[[], float] = time.perf_counter) -> dict:  # fmt: skip
    base, x = build(name, device, batch)
    model = torch.compile(base) if compiled else base
    if compiled:
        methods = [m for m in methods if m != "naive"]  # func.jvp does not trace through compiled convs and norms
    steps = {m: make_step(model, x, m, device) for m in methods}
    t0 = time.perf_counter()
    for m in methods:  # warm-up (and compilation)
        for _ in range(2):
            steps[m]()
    warm = time.perf_counter() - t0
    rows: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(rounds):
        for m in methods:
            _sync(device)
            t1 = clock()
            for _ in range(per_round):
                steps[m]()
            _sync(device)
            rows[m].append((clock() - t1) / per_round)
    out = {}
    for m in methods:
        ratios = [a / b for a, b in zip(rows[m], rows["fm"], strict=True)]
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
        rec = {
            "step_ms": 1e3 * statistics.median(rows[m]),
            "time_x_fm": statistics.median(ratios),
            "time_iqr": [q1, q3],
        }
        if not compiled:
            rec["activation_bytes"] = activation_bytes(base, x, m, device)
            rec["peak_bytes"] = peak_bytes(steps[m], device)
        out[m] = rec
    for m in methods:
        if not compiled:
            out[m]["act_x_fm"] = out[m]["activation_bytes"] / max(out["fm"]["activation_bytes"], 1)
            out[m]["peak_x_fm"] = out[m]["peak_bytes"] / max(out["fm"]["peak_bytes"], 1)
    out["_warmup_s"] = warm
    return out


class SelfAttention(torch.nn.Module):
    """``model(z, r, t) = SDPA(z, z, z)``: its du/dt along ``(dz, 0, 1)`` is the attention JVP along ``dz``."""

    def forward(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(z, z, z)


def _attention_inputs(device: str, tokens: int, heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, heads, tokens, dim, generator=g, device=device)
    return q, torch.randn(q.shape, generator=g, device=device)


def attention_jvp(variant: str, q: torch.Tensor, dq: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The tangent of ``SDPA(q, q, q)`` along ``dq``: eager forward AD through the route ``variant``, or
    (``"compiled"``) du/dt of a ``torch.compile``-d :class:`SelfAttention`, the engine's compiled JVP region."""
    import torch.autograd.forward_ad as fwAD
    import torch.nn.functional as F

    from meanflow_losses.forward_ad import forward_ad_context
    from meanflow_losses.jvp import time_derivative

    if variant == "compiled":
        net, r, t = torch.compile(SelfAttention()), q.new_zeros(1), q.new_ones(1)
        return lambda: time_derivative(net, q, r, t, dq).dudt

    def run() -> torch.Tensor:
        with torch.no_grad(), fwAD.dual_level(), forward_ad_context(variant):
            out = F.scaled_dot_product_attention(*(fwAD.make_dual(q, dq) for _ in range(3)))
            return fwAD.unpack_dual(out)[1]

    return run


def peak_rss_bytes(variant: str, tokens: int, heads: int, dim: int, block: int | None = None) -> int | None:
    """Peak resident memory one attention JVP adds, measured in a child process (Linux; else ``None``).

    Compiled code cannot run under the dispatch mode that counts tensors on the CPU, so the child warms the
    variant up (compiling it), resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), runs it once and
    reports ``VmHWM - VmRSS``. ``MALLOC_MMAP_THRESHOLD_`` makes every large tensor its own mapping, returned on
    free, so the mark sees each JVP's own peak. ``block`` overrides the traced attention's query block.
    """
    import re
    import subprocess

    if not os.path.exists("/proc/self/clear_refs"):
        return None
    cmd = [sys.executable, os.path.abspath(__file__), "--attention-child", variant, str(tokens), str(heads), str(dim)]
    threads = str(torch.get_num_threads())
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    env.pop("MFL_QUERY_BLOCK", None)
    if block is not None:
        env["MFL_QUERY_BLOCK"] = str(block)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    found = re.search(r"^PEAK_RSS (\d+|none)$", out.stdout, re.MULTILINE)
    if out.returncode != 0 or found is None:
        raise RuntimeError(f"the peak-RSS child ({variant}) failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return None if found.group(1) == "none" else int(found.group(1))


def _attention_child(variant: str, tokens: int, heads: int, dim: int) -> None:
    import meanflow_losses.traced_jvp

    if "MFL_QUERY_BLOCK" in os.environ:
        meanflow_losses.traced_jvp.QUERY_BLOCK = int(os.environ["MFL_QUERY_BLOCK"])

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    run = attention_jvp(variant, *_attention_inputs("cpu", tokens, heads, dim))
    run(), run()  # warm-up (and compilation)
    base = status("VmRSS:")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak-RSS mark
    except OSError:  # a sandbox without writable /proc marks
        print("PEAK_RSS none")
        return
    run()
    print(f"PEAK_RSS {status('VmHWM:') - base}")


def attention_section(device: str, tokens: int, heads: int, dim: int, rounds: int, compiled: bool = False) -> dict:
    """Memory and time of the JVP of one attention call: blockwise (and flash; with ``compiled``, the compiled JVP
    region) against the math backend.

    Peak memory: the CUDA allocator's, or on the CPU the tensors the JVP creates (a dispatch mode); the compiled
    variant's on the CPU is the resident memory it adds (:func:`peak_rss_bytes`), against the math backend's
    measured the same way (``mem_x_math``; ``peak_how`` says which).
    """
    q, dq = _attention_inputs(device, tokens, heads, dim)
    variants = ["math", "blockwise"] + (["flash"] if device.startswith("cuda") else [])
    variants += ["compiled"] if compiled else []
    runs = {a: attention_jvp(a, q, dq) for a in variants}
    ref = runs["math"]().double()
    res = {}
    for a in variants:
        res[a] = {"rel_err": float((runs[a]().double() - ref).norm() / ref.norm())}
        if a == "compiled" and not device.startswith("cuda"):
            rss = peak_rss_bytes("compiled", tokens, heads, dim), peak_rss_bytes("math", tokens, heads, dim)
            res[a]["peak_bytes"] = rss[0]
            res[a]["peak_how"] = "rss"
            res[a]["mem_x_math"] = None if None in rss else rss[0] / rss[1]
        else:
            res[a]["peak_bytes"] = peak_bytes(runs[a], device)
            res[a]["peak_how"] = "allocator" if device.startswith("cuda") else "tensors"
    times = {a: [] for a in variants}
    for _ in range(rounds):
        for a in variants:
            _sync(device)
            t0 = time.perf_counter()
            runs[a]()
            _sync(device)
            times[a].append(time.perf_counter() - t0)
    for a in variants:
        res[a]["ms"] = 1e3 * statistics.median(times[a])
        res[a]["time_x_math"] = statistics.median([x / y for x, y in zip(times[a], times["math"], strict=True)])
        if "mem_x_math" not in res[a]:
            res[a]["mem_x_math"] = res[a]["peak_bytes"] / res["math"]["peak_bytes"]
    return res


def print_table(name: str, compiled: bool, res: dict) -> None:
    fm = res["fm"]
    kind = "compiled" if compiled else "eager"
    print(f"\n[{name}, {kind}]  FM step {fm['step_ms']:.1f} ms  (warm-up {res['_warmup_s']:.0f} s)")
    head = f"{'method':<24}{'step ms':>10}{'time x FM':>11}{'(IQR)':>14}"
    if not compiled:
        head += f"{'act x FM':>10}{'peak x FM':>11}"
    print(head)
    for m, rec in res.items():
        if m.startswith("_"):
            continue
        q1, q3 = rec["time_iqr"]
        line = f"{m:<24}{rec['step_ms']:>10.1f}{rec['time_x_fm']:>11.3f}{f'({q1:.2f}-{q3:.2f})':>14}"
        if not compiled:
            line += f"{rec['act_x_fm']:>10.2f}{rec['peak_x_fm']:>11.2f}"
        print(line)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--compile", choices=["none", "net", "both"], default="both",
                   help="eager networks, compiled networks (torch.compile(net)), or both")  # fmt: skip
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (the median of per-round ratios)")
    p.add_argument("--per-round", type=int, default=3, help="steps per method per round")
    p.add_argument("--attention", action="store_true", help="also the attention-JVP section")
    p.add_argument("--attention-child", nargs=4, default=None, help=argparse.SUPPRESS)  # see peak_rss_bytes
    p.add_argument("--tokens", type=int, default=4096, help="tokens of the attention section")
    p.add_argument("--tiny", action="store_true", help="tiny batches, one round: a smoke run for CI")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="time steps by the wall clock or by this process's CPU time (CPU only: immune to a "
                   "virtual machine's stolen time; use with --threads 1)")  # fmt: skip
    a = p.parse_args(argv)
    if a.attention_child:
        variant, *sizes = a.attention_child
        _attention_child(variant, *map(int, sizes))
        return {}
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    clock = time.process_time if a.clock == "cpu" else time.perf_counter  # CPU time: immune to stolen time
    methods = ["fm"] + [m for m in a.methods if m != "fm"]
    rounds, per, batch = (1, 1, 4) if a.tiny else (a.rounds, a.per_round, None)
    print(
        f"torch {torch.__version__}, device {a.device}, threads {torch.get_num_threads()}, clock {a.clock}, "
        "r != t share 25%"
    )
    modes = {"none": [False], "net": [True], "both": [False, True]}[a.compile]
    results: dict = {}
    for name in a.networks:
        for compiled in modes:
            res = run_network(name, methods, compiled, a.device, rounds, per, batch, clock)
            results[f"{name}{'/compiled' if compiled else ''}"] = res
            print_table(name, compiled, res)
    if a.attention:
        tokens, heads, dim = (256, 1, 16) if a.tiny else (a.tokens, 2, 64)
        att = attention_section(a.device, tokens, heads, dim, 1 if a.tiny else 5, compiled=a.compile != "none")
        results["attention"] = att
        print(f"\n[attention JVP, {tokens} tokens, {heads} heads, head dim {dim}]")
        print(f"{'variant':<12}{'ms':>10}{'time x math':>13}{'peak MiB':>10}{'mem x math':>12}{'rel err':>10}  peak of")
        for v, rec in att.items():
            peak = "n/a" if rec["peak_bytes"] is None else f"{rec['peak_bytes'] / 2**20:.1f}"
            mem = "n/a" if rec["mem_x_math"] is None else f"{rec['mem_x_math']:.3f}"
            print(f"{v:<12}{rec['ms']:>10.1f}{rec['time_x_math']:>13.2f}{peak:>10}{mem:>12}{rec['rel_err']:>10.1e}"
                  f"  {rec['peak_how']}")  # fmt: skip
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
