"""Loss decomposition, gradient cosines and the conflict tracker; the paper's conflict at toy scale."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import meanflow_losses as mfl
from meanflow_losses.diagnostics import ConflictTracker, gradient_cosines
from tests.nets import MLP

F64 = torch.float64


def _setup(equal=0.25, seed=0):
    torch.manual_seed(seed)
    model = MLP(dim=3, width=32).double()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 3, generator=g, dtype=F64)
    e = torch.randn(64, 3, generator=g, dtype=F64)
    t = torch.rand(64, generator=g, dtype=F64) * 0.9 + 0.1
    r = t * torch.rand(64, generator=g, dtype=F64)
    r[: int(equal * 64)] = t[: int(equal * 64)]
    return model, x, e, t, r


def _grad(loss, model):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)])


HOOKS = {
    "plain": dict(weighting=mfl.AdaptiveWeight(p=0.0)),
    "adaptive": dict(weighting=mfl.AdaptiveWeight(p=1.0, c=1e-3)),
    "adaptive+rows": dict(
        weighting=mfl.AdaptiveWeight(p=0.75, c=1e-2),
        interval_weight=lambda t, r, k: 1 + (t - r),
        velocity_weight=lambda t, r, k: 2 - t,
    ),
}


@pytest.mark.parametrize("weights", list(HOOKS))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_meanflow_gradient_is_tfm_plus_tcc(weights, reduction):
    model, x, e, t, r = _setup()
    out = mfl.MeanFlowLoss(decompose=True, reduction=reduction, **HOOKS[weights])(model, x, t=t, r=r, noise=e, step=0)
    d = out.decomposition
    g_mf, g_sum = _grad(out.loss, model), _grad(d["tfm"], model) + _grad(d["tcc"], model)
    assert ((g_mf - g_sum).norm() / g_mf.norm()).item() < 1e-10
    # the split is not trivial: both parts matter and they differ from the whole
    assert _grad(d["tcc"], model).norm() > 1e-3 * g_mf.norm()
    assert ((_grad(d["tfm"], model) - g_mf).norm() / g_mf.norm()).item() > 1e-3
    # L_FM' is the flow-matching part on r = t rows
    eq = r == t
    assert d["fm_border"].item() == pytest.approx(out.per_sample[eq].mean().item(), rel=1e-12)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_alphaflow_decomposition_in_every_regime(alpha):
    model, x, e, t, r = _setup()
    out = mfl.AlphaFlowLoss(alpha=alpha, decompose=True, target_clip=2.0, **HOOKS["adaptive"])(
        model, x, t=t, r=r, noise=e
    )
    d = out.decomposition
    g, g_sum = _grad(out.loss, model), _grad(d["tfm"], model) + _grad(d["tcc"], model)
    assert ((g - g_sum).norm() / g.norm()).item() < 1e-10


def test_gradient_cosines_match_a_flattened_computation_and_leave_grad_alone():
    model, x, e, t, r = _setup()
    out = mfl.MeanFlowLoss(decompose=True)(model, x, t=t, r=r, noise=e)
    params = list(model.parameters())
    sentinel = [torch.full_like(p, 7.0) for p in params]
    for p, s in zip(params, sentinel, strict=True):
        p.grad = s.clone()
    params[0].grad = None
    groups = {"first": model.net[0], "rest": params[2:]}
    res = gradient_cosines(model, out.decomposition, param_groups=groups)
    assert params[0].grad is None
    for p, s in zip(params[1:], sentinel[1:], strict=True):
        assert torch.equal(p.grad, s)
    flat = {k: _grad(v, model) for k, v in out.decomposition.items()}
    for a, b in [("tfm", "tcc"), ("tfm", "fm_border"), ("fm_border", "tcc")]:
        ref = torch.dot(flat[a], flat[b]) / (flat[a].norm() * flat[b].norm())
        assert res[(a, b)] == pytest.approx(ref.item(), abs=1e-12)
        assert res[(b, a)] == res[(a, b)] and (b, a) in res
    assert set(res) == {("tfm", "fm_border"), ("tfm", "tcc"), ("fm_border", "tcc")} and len(res) == 3
    assert res.norms["tcc"] == pytest.approx(flat["tcc"].norm().item(), rel=1e-12)
    n_first = sum(p.numel() for p in model.net[0].parameters())
    ga, gb = flat["tfm"][:n_first], flat["tcc"][:n_first]
    assert res.groups["first"][("tfm", "tcc")] == pytest.approx((ga @ gb / (ga.norm() * gb.norm())).item(), abs=1e-12)
    assert set(res.groups) == {"first", "rest"}
    # the graph is still there: the usual backward works afterwards
    for p in params:
        p.grad = None
    out.loss.backward()
    assert all(p.grad is not None for p in params)


def test_gradient_cosines_errors():
    model, x, e, t, r = _setup()
    out = mfl.MeanFlowLoss(decompose=True)(model, x, t=t, r=r, noise=e)
    with pytest.raises(ValueError, match="at least two"):
        gradient_cosines(model, {"tfm": out.decomposition["tfm"]})
    with pytest.raises(ValueError, match="does not require grad"):
        gradient_cosines(model, {"a": out.loss, "b": out.loss.detach()})
    with pytest.raises(ValueError, match="param_groups"):
        gradient_cosines(model, out.decomposition, param_groups={"alien": [torch.nn.Parameter(torch.ones(2))]})
    zero = (0.0 * out.loss).detach().requires_grad_()
    assert math.isnan(gradient_cosines(model, {"a": out.loss, "zero": zero})[("a", "zero")])


def test_conflict_tracker_statistics_and_cost_when_idle():
    tracker = ConflictTracker(every=5, start=2)
    assert [k for k in range(20) if tracker.due(k)] == [2, 7, 12, 17]
    # not due: nothing is evaluated, not even the losses
    assert tracker.maybe_measure(3, model=None, named_losses=None) is None  # type: ignore[arg-type]
    model, x, e, t, r = _setup()
    mf = mfl.MeanFlowLoss(decompose=True)
    for k in range(2, 40):
        out = mf(model, x, t=t, r=r, noise=e + 0.01 * k)
        tracker.maybe_measure(k, model, out.decomposition)
    steps, values = tracker.history("tcc", "tfm")
    assert steps.tolist() == [2, 7, 12, 17, 22, 27, 32, 37]
    stats = tracker.summary()[("tfm", "tcc")]
    assert stats.count == 8 and stats.mean == pytest.approx(values.mean())
    assert stats.p5 == pytest.approx(np.percentile(values, 5)) and stats.p95 == pytest.approx(np.percentile(values, 95))
    assert stats.frac_negative == pytest.approx((values < 0).mean())
    with pytest.raises(ValueError, match="named_losses is None"):
        tracker.maybe_measure(42, model, None)
    with pytest.raises(ValueError, match="every"):
        ConflictTracker(every=0)
    tracker.reset()
    assert tracker.summary() == {}


# --- the paper's finding at toy scale --------------------------------------------------------------------------------


def checkerboard(n: int, g: torch.Generator) -> torch.Tensor:
    """2-D checkerboard on [-2, 2]^2 (8 of 16 unit squares)."""
    x1 = torch.rand(n, generator=g) * 4 - 2
    x2 = torch.rand(n, generator=g) - 2 * torch.randint(0, 2, (n,), generator=g).float() + torch.floor(x1) % 2
    return torch.stack([x1, x2], dim=1)


@pytest.mark.slow
def test_meanflow_from_scratch_shows_gradient_conflict():
    """cos(grad L_TFM, grad L_TCc) < 0 on average over the first 1000 MeanFlow steps (alpha-Flow's finding)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = MLP(dim=2, width=64, depth=3)  # low-frequency time embeddings (max 8 rad per unit time)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mf = mfl.MeanFlowLoss(times=mfl.TimePairSampler("uniform", equal_fraction=0.75), reduction="sum")
    tracker = ConflictTracker(every=10)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for step in range(1000):
            mf.decompose = tracker.due(step)
            out = mf(model, checkerboard(256, g), generator=g, step=step)
            tracker.maybe_measure(step, model, out.decomposition)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    stats = tracker.summary()
    conflict, border = stats[("tfm", "tcc")], stats[("fm_border", "tcc")]
    assert conflict.count == 100
    assert conflict.mean < 0 and conflict.frac_negative > 0.5, conflict
    assert border.mean > conflict.mean  # cos(grad L_FM', grad L_TCc) is higher, as in the paper
