"""Attention under the JVP: the blockwise exact tangent, its routing, memory, and the flash kernel's fallback."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import meanflow_losses as mfl
from meanflow_losses import jvp_attention as ja
from meanflow_losses.forward_ad import forward_ad_context
from meanflow_losses.jvp import time_derivative
from tests.memory import LiveTensorBytes
from tests.nets import TinyTransformer


def jvp_of_sdpa(attention, q, k, v, dq, dk, dv, **kw):
    with torch.no_grad(), fwAD.dual_level(), forward_ad_context(attention):
        out = F.scaled_dot_product_attention(fwAD.make_dual(q, dq), fwAD.make_dual(k, dk), fwAD.make_dual(v, dv), **kw)
        return fwAD.unpack_dual(out)


def rel(a, b):
    return float((a - b).double().norm() / b.double().norm())


CASES = {
    "plain": ({}, 4, 40),
    "cross_attention": ({}, 4, 23),
    "causal": ({"is_causal": True}, 4, 40),
    "bool_mask": ({"attn_mask": "bool"}, 4, 40),
    "additive_broadcast_mask": ({"attn_mask": "float"}, 4, 40),
    "scale": ({"scale": 0.3}, 4, 40),
    "gqa": ({"enable_gqa": True}, 2, 40),
}


def case_inputs(case, dtype, seed, permuted=False):
    """``(q, k, v, dq, dk, dv, kw)`` of a CASES entry; ``permuted``: (B, L, H, E) views, as a qkv projection leaves."""
    kw, kv_heads, S = CASES[case]
    g = torch.Generator().manual_seed(seed)

    def draw(b, n, h, e):
        if permuted:
            return torch.randn(b, n, h, e, generator=g, dtype=dtype).transpose(1, 2)
        return torch.randn(b, h, n, e, generator=g, dtype=dtype)

    q, k, v = draw(2, 40, 4, 8), draw(2, S, kv_heads, 8), draw(2, S, kv_heads, 6)
    kw = dict(kw)
    if kw.get("attn_mask") == "bool":
        kw["attn_mask"] = torch.rand(40, S, generator=g) > 0.3
    elif kw.get("attn_mask") == "float":
        kw["attn_mask"] = torch.randn(2, 1, 40, S, generator=g, dtype=dtype)
    dq, dk, dv = (torch.randn(x.shape, generator=g, dtype=dtype) for x in (q, k, v))
    return q, k, v, dq, dk, dv, kw


@pytest.mark.parametrize("block", [1, 7, 256])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.float64, 1e-10)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_blockwise_jvp_equals_forward_ad_through_the_math_backend(case, dtype, tol, block):
    q, k, v, dq, dk, dv, kw = case_inputs(case, dtype, seed=0)
    primal_ref, ref = jvp_of_sdpa("math", q, k, v, dq, dk, dv, **kw)
    out = F.scaled_dot_product_attention(q, k, v, **kw)
    got = ja.attention_jvp_blockwise(q, k, v, out, dq, dk, dv, block=block, **kw)
    assert rel(got, ref) < tol
    primal, routed = jvp_of_sdpa("blockwise", q, k, v, dq, dk, dv, **kw)
    assert rel(routed, ref) < tol and rel(primal, primal_ref) < tol


@pytest.mark.parametrize("block", [1, 7, 256])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-6), (torch.float64, 1e-10)])
@pytest.mark.parametrize("case", sorted(CASES))
def test_dual_blockwise_primal_and_tangent_equal_the_math_backend(case, dtype, tol, block):
    """The no-grad route computes the primal from the blocks' own P (no fused pass): both equal math."""
    q, k, v, dq, dk, dv, kw = case_inputs(case, dtype, seed=2, permuted=True)
    primal_ref, ref = jvp_of_sdpa("math", q, k, v, dq, dk, dv, **kw)
    primal, got = ja.attention_dual_blockwise(q, k, v, dq, dk, dv, block=block, **kw)
    assert rel(got, ref) < tol and rel(primal, primal_ref) < tol
    assert primal.dtype == got.dtype == dtype
    with torch.no_grad(), fwAD.dual_level(), forward_ad_context("blockwise", block=block):
        duals = [fwAD.make_dual(a, b) for a, b in ((q, dq), (k, dk), (v, dv))]
        routed = fwAD.unpack_dual(F.scaled_dot_product_attention(*duals, **kw))
    assert rel(routed.tangent, ref) < tol and rel(routed.primal, primal_ref) < tol


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("case", ["plain", "causal", "gqa"])
def test_dual_blockwise_in_half_precision_returns_the_input_dtype(case, dtype, tol):
    """Half inputs: the blocks compute in float32 and return SDPA's dtype (the primal came back in float32, so the
    rest of a half network's JVP ran in float32 unlike its forward), equal to float32 math to half rounding."""
    q, k, v, dq, dk, dv, kw = case_inputs(case, dtype, seed=3)
    primal_ref, ref = jvp_of_sdpa("math", *(a.float() for a in (q, k, v, dq, dk, dv)), **kw)
    primal, got = ja.attention_dual_blockwise(q, k, v, dq, dk, dv, block=7, **kw)
    assert primal.dtype == got.dtype == dtype
    assert rel(got, ref) < tol and rel(primal, primal_ref) < tol


def test_missing_tangents_count_as_zero():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 16, 8, generator=g) for _ in range(3))
    dq = torch.randn(q.shape, generator=g)
    with torch.no_grad(), fwAD.dual_level(), forward_ad_context("math"):
        ref = fwAD.unpack_dual(F.scaled_dot_product_attention(fwAD.make_dual(q, dq), k, v))[1]
    with torch.no_grad(), fwAD.dual_level(), forward_ad_context("blockwise"):
        got = fwAD.unpack_dual(F.scaled_dot_product_attention(fwAD.make_dual(q, dq), k, v))[1]
    assert rel(got, ref) < 1e-6


@pytest.mark.parametrize("strategy", ["nograd", "joint"])
def test_network_jvp_is_routed_and_exact(strategy):
    """A network's own SDPA call inside the engine: blockwise equals math, for the no-grad and the joint JVP."""
    torch.manual_seed(0)
    model = TinyTransformer()
    z, tan = torch.randn(3, 10, 8), torch.randn(3, 10, 8)
    t, r = torch.tensor([0.9, 0.5, 0.7]), torch.tensor([0.1, 0.2, 0.3])
    ref = time_derivative(model, z, r, t, tan, strategy=strategy, attention="math")
    got = time_derivative(model, z, r, t, tan, strategy=strategy, attention="blockwise")
    assert rel(got.dudt, ref.dudt) < 1e-6
    if strategy == "joint":  # the primal keeps its gradient through the custom attention function
        ga = torch.autograd.grad(got.u.square().sum(), list(model.parameters()))
        gb = torch.autograd.grad(ref.u.square().sum(), list(model.parameters()))
        for a, b in zip(ga, gb, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_meanflow_option_selects_the_attention_jvp():
    torch.manual_seed(0)
    model = TinyTransformer()
    x = torch.randn(8, 10, 8)
    outs = [
        mfl.MeanFlowLoss(jvp_attention=a)(model, x, generator=torch.Generator().manual_seed(0)).extras["dudt"]
        for a in ("math", "blockwise", "auto")
    ]
    assert rel(outs[1], outs[0]) < 1e-6 and rel(outs[2], outs[0]) < 1e-6
    with pytest.raises(ValueError, match="jvp_attention must be one of"):
        mfl.MeanFlowLoss(jvp_attention="fast")


def test_blockwise_memory_at_4096_tokens_is_under_an_eighth_of_math():
    """The JVP of one attention call at N = 4096 tokens: peak bytes of the tensors it creates."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 4096, 32, generator=g)
    dq = torch.randn(q.shape, generator=g)
    peaks = {}
    for attention in ("math", "blockwise"):
        tracker = LiveTensorBytes()
        with tracker:
            jvp_of_sdpa(attention, q, q, q, dq, dq, dq)
        peaks[attention] = tracker.peak
    assert peaks["blockwise"] <= peaks["math"] / 8, peaks


def test_attention_dropout_falls_back_to_the_math_backend():
    q = torch.randn(1, 2, 8, 4)
    with torch.no_grad(), fwAD.dual_level(), forward_ad_context("blockwise"):
        out = F.scaled_dot_product_attention(fwAD.make_dual(q, q), q, q, dropout_p=0.5)
        assert fwAD.unpack_dual(out)[1] is not None


@pytest.fixture
def fake_flash(monkeypatch):
    """A stand-in for the jvp_flash_attention package (CUDA only in reality): records its calls."""
    calls = []
    pkg = types.ModuleType("jvp_flash_attention")
    mod = types.ModuleType("jvp_flash_attention.jvp_attention")

    def attention(q, k, v, attn_mask=None, causal=False, sm_scale=None):
        calls.append(q.shape)
        if mod.fail:
            raise RuntimeError("unsupported head dim")
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=sm_scale)

    mod.attention, mod.fail = attention, False
    pkg.jvp_attention = mod
    monkeypatch.setitem(sys.modules, "jvp_flash_attention", pkg)
    monkeypatch.setitem(sys.modules, "jvp_flash_attention.jvp_attention", mod)
    monkeypatch.setattr(ja, "_FLASH", [])
    monkeypatch.setattr(ja, "_WARNED", set())
    return mod, calls


def test_flash_kernel_is_used_where_supported_and_falls_back(fake_flash, monkeypatch):
    mod, calls = fake_flash
    q = torch.randn(1, 2, 16, 8)
    dq = torch.randn_like(q)
    _, ref = jvp_of_sdpa("math", q, q, q, dq, dq, dq)
    # on the CPU the kernel does not apply: "auto" is silently blockwise, "flash" says why
    _, got = jvp_of_sdpa("auto", q, q, q, dq, dq, dq)
    assert calls == [] and rel(got, ref) < 1e-6
    with pytest.warns(UserWarning, match="does not support this call"):
        jvp_of_sdpa("flash", q, q, q, dq, dq, dq)
    # where it applies (CUDA in reality) it is called; when it fails, the blockwise JVP takes over
    monkeypatch.setattr(ja, "_flash_supported", lambda *a: True)
    _, got = jvp_of_sdpa("auto", q, q, q, dq, dq, dq)
    assert len(calls) == 1 and rel(got, ref) < 1e-6
    mod.fail = True
    with pytest.warns(UserWarning, match="jvp-flash-attention failed"):
        _, got = jvp_of_sdpa("auto", q, q, q, dq, dq, dq)
    assert rel(got, ref) < 1e-6


def test_flash_not_installed_warns_and_uses_blockwise(monkeypatch):
    monkeypatch.setattr(ja, "_FLASH", [None])
    monkeypatch.setattr(ja, "_WARNED", set())
    q = torch.randn(1, 2, 16, 8)
    with pytest.warns(UserWarning, match="is not installed"):
        _, got = jvp_of_sdpa("flash", q, q, q, q, q, q)
    _, ref = jvp_of_sdpa("math", q, q, q, q, q, q)
    assert rel(got, ref) < 1e-6


@pytest.mark.parametrize("strategy", ["nograd", "joint"])
def test_mask_that_depends_on_t_is_differentiated(strategy):
    """An additive mask computed from t carries a tangent: it enters dS (PyTorch's own rule through math)."""
    g = torch.Generator().manual_seed(3)
    wq, wk, wv = (torch.randn(8, 8, generator=g, dtype=torch.float64) for _ in range(3))

    def model(z, r, t):
        bias = t[:, None, None] * torch.arange(z.shape[1], dtype=z.dtype)[None, None, :]
        return F.scaled_dot_product_attention(z @ wq, z @ wk, z @ wv, attn_mask=bias)

    z, tan = torch.randn(3, 6, 8, generator=g, dtype=torch.float64), torch.randn(3, 6, 8, dtype=torch.float64)
    t, r = torch.tensor([0.9, 0.5, 0.7], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        _, ref = torch.func.jvp(lambda z_, t_: model(z_, r, t_), (z, t), (tan, torch.ones_like(t)))
    got = time_derivative(model, z, r, t, tan, strategy=strategy)
    torch.testing.assert_close(got.dudt, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("mask", ["bool", "additive"])
def test_fully_masked_query_row_gives_zero_like_pytorch(mask, grad):
    g = torch.Generator().manual_seed(4)
    q, k, v, dq, dk, dv = (torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64) for _ in range(6))
    keep = torch.ones(5, 5, dtype=torch.bool)
    keep[1] = False  # query row 1 sees no key
    m = keep if mask == "bool" else torch.zeros(5, 5, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.set_grad_enabled(grad), fwAD.dual_level():
        duals = [fwAD.make_dual(a, b) for a, b in ((q, dq), (k, dk), (v, dv))]
        with sdpa_kernel(SDPBackend.MATH):  # PyTorch's own forward-mode rule
            ref = fwAD.unpack_dual(F.scaled_dot_product_attention(*duals, attn_mask=m))
        with forward_ad_context("blockwise"):
            got = fwAD.unpack_dual(F.scaled_dot_product_attention(*duals, attn_mask=m))
    assert torch.isfinite(got.tangent).all() and torch.isfinite(got.primal).all()
    torch.testing.assert_close(got.primal, ref.primal, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.tangent, ref.tangent, rtol=1e-12, atol=1e-12)
