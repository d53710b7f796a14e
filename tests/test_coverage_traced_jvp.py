"""The explicit forward-mode rules of traced_jvp against PyTorch's own, for tangents on some inputs only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp

from meanflow_losses.traced_jvp import TRACED_ROUTES, _add, _Conv

F64 = torch.float64


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _rand(*shape, g):
    return torch.randn(*shape, generator=g, dtype=F64)


def _route(fn):
    handler = TRACED_ROUTES[fn]
    return lambda *args, **kwargs: handler(fn, args, kwargs)


def _same_jvp(fn, build, primals, tangents):
    """``build(f)`` with the route of ``fn`` has PyTorch's JVP (``build(fn)``) along the same tangents."""
    out, tan = jvp(build(_route(fn)), primals, tangents)
    ref_out, ref_tan = jvp(build(fn), primals, tangents)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(tan, ref_tan)
    return tan


def test_add_of_missing_tangents():
    a = torch.ones(2)
    assert _add(None, None) is None
    assert _add(None, a) is a
    assert _add(a, None) is a
    assert _add(a, a).tolist() == [2.0, 2.0]


def test_conv_tangent_in_the_weight_only():
    g = _g()
    x, w, b = _rand(2, 3, 5, 5, g=g), _rand(4, 3, 3, 3, g=g), _rand(4, g=g)
    dw = _rand(4, 3, 3, 3, g=g)
    tan = _same_jvp(F.conv2d, lambda f: lambda w_: f(x, w_, b, 1, 1), (w,), (dw,))
    assert tan.shape == (2, 4, 5, 5)
    # the handler itself, with the tangent in w only: conv(x, dw)
    _, tan2 = jvp(lambda w_: _route(F.conv2d)(x, w_, b, padding=1), (w,), (dw,))
    torch.testing.assert_close(tan2, F.conv2d(x, dw, None, 1, 1))


def test_conv_tangent_in_the_bias_only_is_the_broadcast_bias():
    g = _g(1)
    x, w, b = _rand(2, 3, 6, g=g), _rand(4, 3, 3, g=g), _rand(4, g=g)
    db = _rand(4, g=g)
    _, tan = jvp(lambda b_: _route(F.conv1d)(x, w, b_), (b,), (db,))
    assert tan.shape == (2, 4, 4)
    torch.testing.assert_close(tan, db.reshape(1, 4, 1).expand(2, 4, 4))


def test_conv_tangent_in_weight_and_bias():
    g = _g(2)
    x, w, b = _rand(2, 3, 5, 5, g=g), _rand(4, 3, 3, 3, g=g), _rand(4, g=g)
    _same_jvp(F.conv2d, lambda f: lambda w_, b_: f(x, w_, b_), (w, b), (_rand(4, 3, 3, 3, g=g), _rand(4, g=g)))


def test_conv_backward_without_an_output_gradient_returns_no_gradients():
    assert _Conv.backward(None, None) == (None,) * 8


def test_layer_norm_tangent_in_the_affine_parameters():
    g = _g(3)
    x, w, b = _rand(2, 3, 4, g=g), _rand(4, g=g), _rand(4, g=g)
    dw, db = _rand(4, g=g), _rand(4, g=g)
    tan = _same_jvp(F.layer_norm, lambda f: lambda w_, b_: f(x, (4,), w_, b_), (w, b), (dw, db))
    xhat = F.layer_norm(x, (4,))
    torch.testing.assert_close(tan, xhat * dw + db)


def test_group_norm_tangent_in_the_weight():
    g = _g(4)
    x, w, b = _rand(2, 4, 3, g=g), _rand(4, g=g), _rand(4, g=g)
    dw = _rand(4, g=g)
    tan = _same_jvp(F.group_norm, lambda f: lambda w_: f(x, 2, w_, b), (w,), (dw,))
    torch.testing.assert_close(tan, F.group_norm(x, 2) * dw.reshape(1, 4, 1))


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_tangent_in_the_weight(training):
    g = _g(5)
    x, w, b = _rand(4, 3, 2, g=g), _rand(3, g=g), _rand(3, g=g)
    mean, var = _rand(3, g=g), _rand(3, g=g).abs() + 0.5
    dw = _rand(3, g=g)

    def bn(w_):
        return F.batch_norm(x, mean.clone(), var.clone(), w_, b, training, 0.1, 1e-5)

    out, tan = jvp(
        lambda w_: _route(F.batch_norm)(x, mean.clone(), var.clone(), w_, b, training, 0.1, 1e-5), (w,), (dw,)
    )
    ref_out, ref_tan = jvp(bn, (w,), (dw,))
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(tan, ref_tan)


def _reference_attention(q, k, v, mask):
    """SDPA with grouped heads written out (PyTorch's CPU kernel has no forward-AD rule)."""
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


def test_traced_attention_refuses_a_mask_with_a_tangent():
    g = _g(7)
    q, m, dm = _rand(1, 2, 4, 3, g=g), _rand(4, 4, g=g), _rand(4, 4, g=g)
    attention = _route(F.scaled_dot_product_attention)
    with pytest.raises(NotImplementedError, match="attention mask computed from z or t"):
        jvp(lambda m_: attention(q, q, q, attn_mask=m_), (m,), (dm,))


def test_traced_attention_fully_masked_row_is_zero():
    g = _g(8)
    q, dq = _rand(1, 2, 4, 3, g=g), _rand(1, 2, 4, 3, g=g)
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[2] = False
    out, tan = jvp(lambda q_: _route(F.scaled_dot_product_attention)(q_, q, q, attn_mask=keep), (q,), (dq,))
    assert torch.isfinite(out).all() and torch.isfinite(tan).all()
    assert not out[..., 2, :].any() and not tan[..., 2, :].any()
