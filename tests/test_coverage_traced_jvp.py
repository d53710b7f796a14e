"""The primitive forms of traced_jvp against PyTorch's own operators: primal and JVP (float64, eagerly).

Eagerly, ``torch.func.jvp`` differentiates the primitive forms with PyTorch's own formulas, which is what the
compiler does with them; the compiled JVPs themselves are tested in ``tests/test_compile.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from meanflow_losses.jvp_attention import DEFAULT_BLOCK
from meanflow_losses.traced_jvp import TRACED_ROUTES, DropZeroProducts

F64 = torch.float64


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, g):
    return torch.randn(*shape, generator=g, dtype=F64)


def _route(fn):
    handler = TRACED_ROUTES[fn]
    return lambda *args, **kwargs: handler(fn, args, kwargs)


def _same_jvp(fn, build, primals, tangents):
    """``build(f)`` with the route of ``fn`` has PyTorch's primal and JVP (``build(fn)``) along the same tangents."""
    out, tan = jvp(build(_route(fn)), primals, tangents)
    with sdpa_kernel(SDPBackend.MATH):
        ref_out, ref_tan = jvp(build(fn), primals, tangents)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tan, ref_tan, rtol=1e-10, atol=1e-12)
    return tan


def test_layer_norm_tangents_in_input_and_affine_parameters():
    g = _g(3)
    x, w, b = _rand(2, 3, 4, g=g), _rand(4, g=g), _rand(4, g=g)
    dx, dw, db = _rand(2, 3, 4, g=g), _rand(4, g=g), _rand(4, g=g)
    tan = _same_jvp(F.layer_norm, lambda f: lambda w_, b_: f(x, (4,), w_, b_), (w, b), (dw, db))
    torch.testing.assert_close(tan, F.layer_norm(x, (4,)) * dw + db)
    _same_jvp(F.layer_norm, lambda f: lambda x_: f(x_, (3, 4), eps=1e-3), (x,), (dx,))
    _same_jvp(F.layer_norm, lambda f: lambda x_: f(x_, [4], w, b), (x,), (dx,))


def test_group_norm_tangents():
    g = _g(4)
    x, w, b = _rand(2, 4, 3, 2, g=g), _rand(4, g=g), _rand(4, g=g)
    tan = _same_jvp(F.group_norm, lambda f: lambda w_: f(x, 2, w_, b), (w,), (_rand(4, g=g),))
    assert tan.shape == x.shape
    _same_jvp(F.group_norm, lambda f: lambda x_: f(x_, 2, w, b), (x,), (_rand(*x.shape, g=g),))
    _same_jvp(F.group_norm, lambda f: lambda x_: f(x_, 4), (x,), (_rand(*x.shape, g=g),))


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_tangents_with_and_without_batch_statistics(training):
    g = _g(5)
    x, w, b = _rand(4, 3, 2, g=g), _rand(3, g=g), _rand(3, g=g)
    mean, var = _rand(3, g=g), _rand(3, g=g).abs() + 0.5
    dx, dw = _rand(4, 3, 2, g=g), _rand(3, g=g)

    def build(f):
        return lambda x_, w_: f(x_, mean.clone(), var.clone(), w_, b, training, 0.1, 1e-5)

    _same_jvp(F.batch_norm, build, (x, w), (dx, dw))
    _same_jvp(F.batch_norm, lambda f: lambda x_: f(x_, None, None, training=True), (x,), (dx,))


def test_batch_norm_route_leaves_the_running_statistics_alone():
    g = _g(6)
    x, mean, var = _rand(4, 3, g=g), torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    _route(F.batch_norm)(x, mean, var, None, None, True, 0.1, 1e-5)
    assert not mean.any() and bool((var == 1).all())


@pytest.mark.parametrize("input_stats", [True, False])
def test_instance_norm_tangents(input_stats):
    g = _g(7)
    x, w, b = _rand(2, 3, 5, g=g), _rand(3, g=g), _rand(3, g=g)
    mean, var = _rand(3, g=g), _rand(3, g=g).abs() + 0.5

    def build(f):
        return lambda x_, b_: f(x_, mean.clone(), var.clone(), w, b_, use_input_stats=input_stats, eps=1e-4)

    _same_jvp(F.instance_norm, build, (x, b), (_rand(2, 3, 5, g=g), _rand(3, g=g)))
    _same_jvp(F.instance_norm, lambda f: lambda x_: f(x_), (x,), (_rand(2, 3, 5, g=g),))


def test_torch_namespace_spellings_of_the_norms_are_routed():
    """``torch.layer_norm`` / ``group_norm`` / ``batch_norm`` / ``instance_norm`` (other argument orders) too."""
    g = _g(10)
    x, w, b = _rand(4, 3, 5, g=g), _rand(3, g=g), _rand(3, g=g)
    mean, var = _rand(3, g=g), _rand(3, g=g).abs() + 0.5
    dx = _rand(4, 3, 5, g=g)
    lw, lb = _rand(5, g=g), _rand(5, g=g)
    cases = {
        torch.layer_norm: lambda f: lambda x_: f(x_, [5], lw, lb, 1e-5, False),
        torch.group_norm: lambda f: lambda x_: f(x_, 3, w, b, eps=1e-4),
        torch.batch_norm: lambda f: lambda x_: f(x_, w, b, mean.clone(), var.clone(), False, 0.1, 1e-5, False),
        torch.instance_norm: lambda f: lambda x_: f(x_, w, b, None, None, True, 0.1, 1e-5, False),
    }
    for fn, build in cases.items():
        _same_jvp(fn, build, (x,), (dx,))


def test_half_precision_normalisation_is_computed_in_float32():
    g = _g(8)
    x = torch.randn(3, 64, generator=g, dtype=torch.float32) * 50 + 1000
    got = _route(F.layer_norm)(x.bfloat16(), (64,))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), F.layer_norm(x.bfloat16().float(), (64,)), rtol=1e-2, atol=1e-2)


def _reference_attention(q, k, v, mask):
    """SDPA with grouped heads written out."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    s = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    return torch.softmax(s, dim=-1) @ v


def test_attention_with_grouped_query_heads_and_a_mask():
    g = _g(6)
    q, k, v = _rand(2, 4, 5, 8, g=g), _rand(2, 2, 5, 8, g=g), _rand(2, 2, 5, 8, g=g)
    dq, dk, dv = _rand(2, 4, 5, 8, g=g), _rand(2, 2, 5, 8, g=g), _rand(2, 2, 5, 8, g=g)
    mask = torch.rand(5, 5, generator=g) > 0.3
    mask.fill_diagonal_(True)  # no fully masked row
    route = _route(F.scaled_dot_product_attention)
    for m in (mask, _rand(5, 5, g=g)):
        out, tan = jvp(lambda *a, m=m: route(*a, attn_mask=m, enable_gqa=True), (q, k, v), (dq, dk, dv))
        ref_out, ref_tan = jvp(lambda *a, m=m: _reference_attention(*a, m), (q, k, v), (dq, dk, dv))
        assert out.shape == (2, 4, 5, 8)
        torch.testing.assert_close(out, ref_out)
        torch.testing.assert_close(tan, ref_tan)


@pytest.mark.parametrize(("mask_shape", "causal"), [(None, False), (None, True), ("LS", False), ("BHLS", False),
                                                     ("1S", False)])  # fmt: skip
def test_attention_over_several_query_blocks(mask_shape, causal):
    """More query rows than one block: the blocks' outputs, masks and causal offsets join up exactly."""
    g = _g(9)
    n, s = DEFAULT_BLOCK + 37, DEFAULT_BLOCK + 37
    q, k, v = _rand(1, 2, n, 4, g=g), _rand(1, 2, s, 4, g=g), _rand(1, 2, s, 4, g=g)
    shapes = {"LS": (n, s), "BHLS": (1, 2, n, s), "1S": (1, s)}
    mask = None if mask_shape is None else _rand(*shapes[mask_shape], g=g)
    tangents = tuple(torch.randn_like(a) for a in (q, k, v))
    _same_jvp(
        F.scaled_dot_product_attention,
        lambda f: lambda *a: f(*a, attn_mask=mask, is_causal=causal),
        (q, k, v),
        tangents,
    )


def test_attention_mask_with_a_tangent_is_differentiated():
    """A mask computed from z or t: its tangent enters the scores (PyTorch's formulas on the primitive form)."""
    g = _g(7)
    q, m, dm = _rand(1, 2, 4, 3, g=g), _rand(4, 4, g=g), _rand(4, 4, g=g)
    _same_jvp(F.scaled_dot_product_attention, lambda f: lambda m_: f(q, q, q, attn_mask=m_), (m,), (dm,))


def test_traced_attention_refuses_dropout():
    q = torch.ones(1, 1, 2, 2)
    with pytest.raises(NotImplementedError, match="attention dropout"):
        _route(F.scaled_dot_product_attention)(q, q, q, dropout_p=0.1)


def test_traced_attention_fully_masked_row_is_zero():
    g = _g(8)
    q, dq = _rand(1, 2, 4, 3, g=g), _rand(1, 2, 4, 3, g=g)
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[2] = False
    out, tan = jvp(lambda q_: _route(F.scaled_dot_product_attention)(q_, q, q, attn_mask=keep), (q,), (dq,))
    assert torch.isfinite(out).all() and torch.isfinite(tan).all()
    assert not out[..., 2, :].any() and not tan[..., 2, :].any()


# ---- the compiler pass --------------------------------------------------------------------------------------------


class _Counting(DropZeroProducts):
    """The pass, recording the matrix products in the graph before and after it."""

    def __init__(self) -> None:
        self.products: list[tuple[int, int]] = []

    def __call__(self, graph):
        def count():
            ops = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                   torch.ops.aten.convolution.default}  # fmt: skip
            return sum(n.op == "call_function" and n.target in ops for n in graph.nodes)

        before = count()
        super().__call__(graph)
        self.products.append((before, count()))


def _linear_net():
    return torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 16), torch.nn.Linear(16, 3))


def _conv_net():
    conv = torch.nn.Conv2d
    return torch.nn.Sequential(conv(3, 8, 3, padding=1), torch.nn.SiLU(), conv(8, 8, 3, padding=1), conv(8, 3, 1))


LINEAR, CONV = (_linear_net, (8, 3)), (_conv_net, (2, 3, 6, 6))


@pytest.mark.slow
@pytest.mark.parametrize("case", [LINEAR, CONV], ids=["linear", "conv"])
def test_drop_zero_products_removes_the_weight_tangent_products_and_keeps_the_jvp(case):
    """Traced, each layer's JVP has a third product ``x @ 0`` / ``conv(x, 0)`` (the weight's zero tangent, and for a
    convolution a zero bias tangent too); the pass drops it."""
    make, shape = case
    torch.manual_seed(0)
    net = make()
    x, dx = torch.randn(shape), torch.randn(shape)

    def tangent(x_, dx_):
        with torch.no_grad():
            return torch.func.jvp(net, (x_,), (dx_,))[1]

    counting = _Counting()
    torch._dynamo.reset()
    options = {"post_grad_custom_pre_pass": counting, "fx_graph_cache": False}  # the pass must run
    got = torch.compile(tangent, options=options)(x, dx)
    torch.testing.assert_close(got, tangent(x, dx), rtol=1e-5, atol=1e-6)
    (before, after), *_ = counting.products
    # before: 3 tangent products, 3 products with a zero weight tangent, the primals of layers 1 and 2; after: the
    # tangent products and layer 1's primal (its SiLU's derivative needs it; layer 2's fed only a zero product)
    assert (before, after) == (8, 4), counting.products


def test_drop_zero_products_on_a_hand_written_graph():
    """``a + 0 -> a``, ``addmm(c, a, 0) -> c``; kept: a zero add of other strides, and a rewire onto an input (a
    later in-place write to the input would reach the output)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    aten = torch.ops.aten
    mode = FakeTensorMode()
    with mode:
        val = torch.empty(4, 3)
    graph = torch.fx.Graph()
    a, c_in = graph.placeholder("a"), graph.placeholder("c")
    a.meta["val"] = c_in.meta["val"] = val
    c = graph.call_function(aten.mul.Tensor, (c_in, 2.0))
    c.meta["val"] = val
    z = graph.call_function(aten.full.default, ([3, 3], 0))
    zt = graph.call_function(aten.permute.default, (z, [1, 0]))
    mm = graph.call_function(aten.addmm.default, (c, a, zt))
    mm.meta["val"] = val
    s = graph.call_function(aten.add.Tensor, (mm, graph.call_function(aten.zeros.default, ([4, 3],))))
    s.meta["val"] = val
    wide = graph.call_function(aten.add.Tensor, (s, graph.call_function(aten.full.default, ([4, 3], 0))))
    with mode:
        wide.meta["val"] = torch.empty_strided((4, 3), (1, 4))  # other strides than its operand: kept
    onto_input = graph.call_function(aten.add.Tensor, (a, graph.call_function(aten.zeros.default, ([4, 3],))))
    onto_input.meta["val"] = val
    graph.output((wide, onto_input))
    DropZeroProducts()(graph)
    targets = [n.target for n in graph.nodes if n.op == "call_function"]
    assert aten.addmm.default not in targets
    assert targets.count(aten.add.Tensor) == 2  # the strided one and the one onto the input
    assert graph.output_node().args[0][0].args[0] is c  # wide = c + 0, with the addmm and the first add gone


def test_drop_zero_products_cache_key_names_the_class():
    class Other(DropZeroProducts):
        pass

    assert DropZeroProducts().uuid() == DropZeroProducts().uuid() != Other().uuid()
