"""The explicit forward-mode rules of meanflow_losses.tangent_rules: PyTorch's own numbers, without its slow paths.

Every rule must give the primal and the tangent of PyTorch's own forward-AD rule (float64, to rounding), keep the
primal's gradient (the ``"joint"`` strategy differentiates it), leave the tangent without autograd history, and
hand every call it does not cover to PyTorch.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from hypothesis import given, settings
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.nets import build
from meanflow_losses.forward_ad import ROUTES, forward_ad_context
from meanflow_losses.jvp import time_derivative
from meanflow_losses.tangent_rules import TANGENT_RULES

F64 = torch.float64
G = torch.Generator().manual_seed(0)
X = torch.randn(4, 6, 5, 5, generator=G, dtype=F64)
Y = torch.randn(4, 6, 5, 5, generator=G, dtype=F64)
W6 = torch.randn(6, generator=G, dtype=F64, requires_grad=True)
B6 = torch.randn(6, generator=G, dtype=F64, requires_grad=True)
W5 = torch.randn(5, generator=G, dtype=F64, requires_grad=True)
WL = torch.randn(7, 5, generator=G, dtype=F64, requires_grad=True)
BL = torch.randn(7, generator=G, dtype=F64, requires_grad=True)
WC = torch.randn(3, 6, 3, 3, generator=G, dtype=F64, requires_grad=True)
RM = torch.randn(6, generator=G, dtype=F64)
RV = torch.rand(6, generator=G, dtype=F64) + 0.5

CASES = {
    "x + y": lambda a: a + Y,
    "y + x": lambda a: Y + a,
    "1 + x": lambda a: 1 + a,
    "x + param": lambda a: a + W5,
    "add alpha": lambda a: torch.add(Y, a, alpha=3),
    "x - y": lambda a: a - Y,
    "y - x": lambda a: Y - a,
    "1 - x": lambda a: 1 - a,
    "sub alpha": lambda a: torch.sub(Y, a, alpha=2.5),
    "rsub": lambda a: torch.rsub(a, Y, alpha=2),
    "rsub other": lambda a: torch.rsub(Y, a, alpha=2),
    "x * y": lambda a: a * Y,
    "2 * x": lambda a: 2 * a,
    "x * channel param": lambda a: a * W6[:, None, None],
    "mask * x": lambda a: (Y > 0) * a,
    "x * int": lambda a: a * torch.arange(5),
    "x / y": lambda a: a / Y,
    "y / x": lambda a: Y / a,
    "2 / x": lambda a: 2 / a,
    "x / 2": lambda a: a / 2,
    "div floor": lambda a: torch.div(a, Y, rounding_mode="floor"),
    "x * x": lambda a: a * a,
    "linear": lambda a: F.linear(a, WL, BL),
    "linear no bias": lambda a: F.linear(a, WL),
    "conv2d": lambda a: F.conv2d(a, WC, B6[:3], padding=1),
    "conv2d kwargs": lambda a: F.conv2d(a, weight=WC, stride=2),
    "conv_transpose2d": lambda a: F.conv_transpose2d(a, WC.transpose(0, 1), B6[:3], stride=2, output_padding=1),
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu tanh": lambda a: F.gelu(a, approximate="tanh"),
    "relu": F.relu,
    "sigmoid": torch.sigmoid,
    "tanh method": lambda a: a.tanh(),
    "sin": torch.sin,
    "cos method": lambda a: a.cos(),
    "exp": torch.exp,
    "layer_norm": lambda a: F.layer_norm(a, (5, 5)),
    "layer_norm affine": lambda a: F.layer_norm(a, (5,), W5, W5 * 0.5),
    "group_norm": lambda a: F.group_norm(a, 3),
    "group_norm affine": lambda a: F.group_norm(a, 2, W6, B6),
    "group_norm non-contiguous": lambda a: F.group_norm(a.transpose(2, 3), 3, W6, B6),
    "batch_norm eval": lambda a: F.batch_norm(a, RM, RV, W6, B6, False),
    "batch_norm train": lambda a: F.batch_norm(a, RM.clone(), RV.clone(), W6, B6, True),
    "batch_norm batch stats": lambda a: F.batch_norm(a, None, None, W6, None, True),
    "rms_norm": lambda a: F.rms_norm(a, (5,), W5),
    "rms_norm eps": lambda a: F.rms_norm(a, (5, 5), None, 1e-3),
}


def dual_call(fn, x, dx, routed, grad):
    with torch.set_grad_enabled(grad), fwAD.dual_level():
        ctx = forward_ad_context("math") if routed else torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            out = fn(fwAD.make_dual(x, dx))
        p, t = fwAD.unpack_dual(out)
        return p, t


@pytest.mark.parametrize("grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_rule_equals_pytorchs_own_rule(case, grad):
    fn = CASES[case]
    x = X.clone().requires_grad_(grad)
    dx = torch.randn(X.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    p_ref, t_ref = dual_call(fn, x, dx, routed=False, grad=grad)
    p, t = dual_call(fn, x, dx, routed=True, grad=grad)
    torch.testing.assert_close(p, p_ref, rtol=1e-13, atol=1e-13)
    if t_ref is None:  # a call without a derivative (rounding division): no tangent either way
        assert t is None or not bool(t.any())
        return
    torch.testing.assert_close(t, t_ref, rtol=1e-11, atol=1e-12)
    if not grad:
        return
    # the primal keeps PyTorch's own gradient; the tangent carries no autograd history
    assert not t.requires_grad
    leaves = [x, *(w for w in (W6, B6, W5, WL, BL, WC) if w.requires_grad)]
    g_ref = torch.autograd.grad(p_ref.square().sum(), leaves, allow_unused=True)
    g = torch.autograd.grad(p.square().sum(), leaves, allow_unused=True)
    for a, b in zip(g, g_ref, strict=True):
        if b is None:
            assert a is None or not bool(a.any())
        else:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "op",
    [lambda a: a + Y, lambda a: Y + a, lambda a: a - 1.0, lambda a: torch.rsub(Y, a), lambda a: torch.add(Y, a)],
    ids=["x + y", "y + x", "x - 1", "rsub", "torch.add"],
)
def test_in_place_op_on_the_output_leaves_the_inputs_tangent_alone(op):
    """An add whose tangent is the input's own must hand out a fresh tensor (PyTorch's rule does)."""
    dx = torch.ones(X.shape, dtype=F64)
    with torch.no_grad(), fwAD.dual_level(), forward_ad_context("math"):
        x = fwAD.make_dual(X, dx.clone())
        out = op(x)
        out.mul_(2.0)
        assert torch.equal(fwAD.unpack_dual(x).tangent, dx)


@pytest.mark.parametrize("op", [torch.sigmoid, torch.tanh, torch.exp, torch.sin], ids=lambda f: f.__name__)
def test_complex_activations_keep_pytorchs_rule_under_grad(op):
    """sigmoid_backward / tanh_backward conjugate for complex inputs: the rules apply to real tensors only."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, generator=g, dtype=torch.complex128)
    dx = torch.randn(3, 4, generator=g, dtype=torch.complex128)
    _, t_ref = dual_call(op, x, dx, routed=False, grad=True)
    _, t = dual_call(op, x, dx, routed=True, grad=True)
    torch.testing.assert_close(t, t_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_rms_norm_tangent_is_computed_in_float32(dtype):
    g = torch.Generator().manual_seed(6)
    x, dx = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
    w = torch.randn(32, generator=g)
    _, exact = torch.func.jvp(lambda a: F.rms_norm(a, (32,), w.double()), (x.double(),), (dx.double(),))
    _, t_ref = dual_call(lambda a: F.rms_norm(a, (32,), w.to(dtype)), x.to(dtype), dx.to(dtype), False, False)
    _, t = dual_call(lambda a: F.rms_norm(a, (32,), w.to(dtype)), x.to(dtype), dx.to(dtype), True, False)
    err, err_ref = (float((a.double() - exact).abs().max()) for a in (t, t_ref))
    assert t.dtype == dtype and err <= 1.5 * err_ref, (err, err_ref)


def test_rules_raise_pytorchs_own_errors():
    with pytest.raises(TypeError):
        dual_call(lambda a: F.rms_norm(a, 5, W5), X, torch.ones_like(X), routed=True, grad=False)


def test_linear_rule_equals_pytorchs_rule_and_keeps_the_gradient():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, generator=g, dtype=F64)
    dx = torch.randn(x.shape, generator=g, dtype=F64)
    w = torch.randn(6, 4, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=F64, requires_grad=True)
    for bias in (b, None):
        (p_ref, t_ref), (p, t) = (
            dual_call(lambda a, bias=bias: F.linear(a, w, bias), x, dx, routed, grad=True) for routed in (False, True)
        )
        torch.testing.assert_close(t, t_ref, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(p, p_ref, rtol=1e-13, atol=1e-14)
        # the "joint" strategy differentiates the primal: the rule's primal keeps the linear backward
        params = [w] if bias is None else [w, b]
        g_ref = torch.autograd.grad(p_ref.square().sum(), params)
        g_got = torch.autograd.grad(p.square().sum(), params)
        for a, c in zip(g_got, g_ref, strict=True):
            torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-13)


def test_group_norm_rule_takes_channels_last_inputs():
    """PyTorch's own rule views its input and fails on channels_last (diffusers' UNet2DModel leaves such tensors)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 4, 4, generator=g, dtype=F64).contiguous(memory_format=torch.channels_last)
    dx = torch.randn(x.shape, generator=g, dtype=F64)
    _, t = dual_call(lambda a: F.group_norm(a, 4), x, dx, routed=True, grad=True)
    ref = torch.func.jvp(lambda a: F.group_norm(a.contiguous(), 4), (x,), (dx,))[1]
    torch.testing.assert_close(t, ref, rtol=1e-12, atol=1e-13)


def test_every_rule_is_an_eager_route():
    assert all(ROUTES[f] is h for f, h in TANGENT_RULES.items())


shapes = st.lists(st.integers(1, 3), min_size=0, max_size=3)


@settings(max_examples=60, deadline=None)
@given(
    a_shape=shapes,
    b_shape=shapes,
    kind=st.sampled_from(["add", "sub", "mul", "div", "rsub", "rdiv"]),
    dual_first=st.booleans(),
    scalar=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    other_dtype=st.sampled_from([torch.float32, torch.float64, torch.int64]),
    two_duals=st.booleans(),
)
def test_binary_rules_broadcast_and_promote_like_pytorch(
    a_shape, b_shape, kind, dual_first, scalar, dtype, other_dtype, two_duals
):
    """Broadcasting shapes, type promotion, Python numbers: the rule's dual equals PyTorch's."""
    g = torch.Generator().manual_seed(3)
    # right-aligned broadcastable shapes
    n = max(len(a_shape), len(b_shape))
    a_shape = [1] * (n - len(a_shape)) + a_shape
    b_shape = [
        a if b != a and 1 not in (a, b) else b for a, b in zip(a_shape, [1] * (n - len(b_shape)) + b_shape, strict=True)
    ]
    x = torch.rand(a_shape, generator=g, dtype=dtype) + 0.5
    dx = torch.randn(a_shape, generator=g, dtype=dtype)
    if scalar:
        other = 1.7
    elif other_dtype == torch.int64:
        other = torch.randint(1, 4, b_shape, generator=g)
    else:
        other = torch.rand(b_shape, generator=g, dtype=other_dtype) + 0.5
    op = {
        "add": lambda a, b: a + b,
        "sub": lambda a, b: a - b,
        "mul": lambda a, b: a * b,
        "div": lambda a, b: a / b,
        "rsub": lambda a, b: torch.rsub(a, b) if isinstance(a, torch.Tensor) else b.__rsub__(a),
        "rdiv": lambda a, b: b.__rdiv__(a) if isinstance(b, torch.Tensor) else a.__rdiv__(b),
    }[kind]

    if two_duals and not scalar and other.is_floating_point():
        other_dual = (other, torch.randn(other.shape, generator=g, dtype=other.dtype))
    else:
        other_dual = None

    def fn(d):
        o = fwAD.make_dual(*other_dual) if other_dual is not None else other
        return op(d, o) if dual_first or scalar else op(o, d)

    p_ref, t_ref = dual_call(fn, x, dx, routed=False, grad=False)
    p, t = dual_call(fn, x, dx, routed=True, grad=False)
    assert p.dtype == p_ref.dtype and p.shape == p_ref.shape
    torch.testing.assert_close(p, p_ref, rtol=0, atol=0)
    assert t is not None and t.dtype == t_ref.dtype and t.shape == t_ref.shape
    tol = 1e-5 if torch.float32 in (p.dtype, dtype) else 1e-12
    torch.testing.assert_close(t, t_ref, rtol=tol, atol=tol)


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["mlp", "dit", "unet", "timm_dit"])
def test_benchmark_networks_jvp_takes_no_zero_tensor_path(name):
    """The JVP of the benchmark networks dispatches no efficient-zero-tensor arithmetic (the slow path)."""
    model, x = build(name, batch=2)
    t = torch.tensor([0.9, 0.6])
    r = t * 0.5
    with _Ops() as ops:
        res = time_derivative(model, x, r, t, torch.randn_like(x))
    assert torch.isfinite(res.dudt).all()
    slow = sorted({n for n in ops.names if "efficientzerotensor" in n or n.startswith("prims.")})
    assert not slow, slow
