"""The eager forward-AD routes (meanflow_losses.forward_ad.ROUTES): the same numbers as PyTorch's own rules."""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

from meanflow_losses.forward_ad import ForwardADRoutes

F64 = torch.float64


def _jvp(fn, x, dx, routed):
    with fwAD.dual_level():
        ctx = ForwardADRoutes() if routed else torch.enable_grad()
        with ctx:
            out = fn(fwAD.make_dual(x, dx))
        return fwAD.unpack_dual(out)


def test_linear_route_equals_pytorchs_rule_and_keeps_the_gradient():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 4, generator=g, dtype=F64)
    dx = torch.randn(x.shape, generator=g, dtype=F64)
    w = torch.randn(6, 4, generator=g, dtype=F64, requires_grad=True)
    b = torch.randn(6, generator=g, dtype=F64, requires_grad=True)
    for bias in (b, None):
        (p_ref, t_ref), (p, t) = (
            _jvp(lambda a, bias=bias: F.linear(a, w, bias), x, dx, routed) for routed in (False, True)
        )
        torch.testing.assert_close(t, t_ref, rtol=1e-13, atol=1e-14)
        torch.testing.assert_close(p, p_ref, rtol=1e-13, atol=1e-14)
        # the "joint" strategy differentiates the primal: the route's backward is the linear backward
        params = [w] if bias is None else [w, b]
        g_ref = torch.autograd.grad(p_ref.square().sum(), params)
        g_got = torch.autograd.grad(p.square().sum(), params)
        for a, c in zip(g_got, g_ref, strict=True):
            torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-13)


def test_group_norm_route_takes_non_contiguous_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 4, 4, generator=g, dtype=F64).contiguous(memory_format=torch.channels_last)
    dx = torch.randn(x.shape, generator=g, dtype=F64)
    _, t = _jvp(lambda a: F.group_norm(a, 4), x, dx, routed=True)
    ref = torch.func.jvp(lambda a: F.group_norm(a.contiguous(), 4), (x,), (dx,))[1]
    torch.testing.assert_close(t, ref, rtol=1e-12, atol=1e-13)
