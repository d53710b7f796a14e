"""Improved MeanFlow's guidance as network input (``mfl.GuidanceAsInput``).

The oracle is a transcription of the official iMF training step (Lyy-iiis/imeanflow, ``imf.py``) written here in
torch from its formulas: per-row scale and interval, the guided target built from the network's conditional
velocity at the effective scale and its unconditional velocity at scale 1, the first rows dropped, the network's
guided velocity as the JVP tangent, the compound regression plus the auxiliary velocity loss, both adaptively
weighted.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import meanflow_losses as mfl
from meanflow_losses.guidance import apply_guidance

NUM_CLASSES = 3


class GuidedNet(nn.Module):
    """``net(z, r, t, y, omega, t_min, t_max)``: a smooth MLP of every input (float64)."""

    def __init__(self, dim: int = 2, width: int = 32, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(NUM_CLASSES + 1, 4, generator=g, dtype=torch.float64))
        self.l1 = nn.Linear(dim + 5 + 4, width, dtype=torch.float64)
        self.l2 = nn.Linear(width, dim, dtype=torch.float64)
        for p in (self.l1.weight, self.l1.bias, self.l2.weight, self.l2.bias):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)

    def forward(self, z, r, t, y, omega, t_min, t_max):
        feats = torch.stack([t, t - r, torch.log(omega), t_min, t_max], dim=1).to(z.dtype)
        h = torch.tanh(self.l1(torch.cat([z, feats, self.emb[y]], dim=1)))
        return self.l2(h) * (1 + 0.3 * torch.sin(3 * t))[:, None]


def official_step(net, x, e, t, r, y, omega, t_min, t_max, n_drop, norm_eps=0.01):
    """The official iMF loss on given draws (t, r, e, omega, interval, number of dropped first rows)."""
    bz = x.shape[0]
    fm = r == t
    z_t = (1 - t[:, None]) * x + t[:, None] * e
    v_t = e - x
    zeros, ones = torch.zeros_like(t), torch.ones_like(t)
    null = torch.full_like(y, NUM_CLASSES)

    def v_head(z, tt, w, labels):  # the velocity queries: h = 0, interval (0, 1)
        return net(z, tt, tt, labels, w, zeros[: z.shape[0]], ones[: z.shape[0]])

    with torch.no_grad():
        v_c = v_head(z_t, t, omega, y)
        v_u = v_head(z_t, t, ones, null)
        v_g_fm = v_t + (1 - 1 / omega)[:, None] * (v_c - v_u)
        w = torch.where((t >= t_min) & (t <= t_max), omega, ones)
        v_c = v_head(z_t, t, w, y)
        v_g = v_t + (1 - 1 / w)[:, None] * (v_c - v_u)
        v_g = torch.where(fm[:, None], v_g_fm, v_g)
        drop = torch.arange(bz) < n_drop
        labels = torch.where(drop, null, y)
        v_g = torch.where(drop[:, None], v_t, v_g)

    def u_fn(z, tt, rr):
        return net(z, rr, tt, labels, omega, t_min, t_max)

    u, dudt = torch.func.jvp(u_fn, (z_t, t, r), (v_c, ones, zeros))
    v = net(z_t, t, t, labels, omega, t_min, t_max)  # the auxiliary velocity of the same conditioning
    big_v = u + (t - r)[:, None] * dudt.detach()

    def adp(loss):
        return loss / (loss + norm_eps).detach()

    loss_u = adp(((big_v - v_g) ** 2).sum(1))
    loss_v = adp(((v - v_g) ** 2).sum(1))
    return (loss_u + loss_v).mean(), v_g, v_c


def _draws(bz=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(bz, 2, generator=g, dtype=torch.float64)
    e = torch.randn(bz, 2, generator=g, dtype=torch.float64)
    a = torch.sigmoid(torch.randn(bz, generator=g, dtype=torch.float64) - 0.4)
    b = torch.sigmoid(torch.randn(bz, generator=g, dtype=torch.float64) - 0.4)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    fm = torch.arange(bz) < bz // 2
    r = torch.where(fm, t, r)
    y = torch.randint(0, NUM_CLASSES, (bz,), generator=g)
    omega = torch.exp(torch.rand(bz, generator=g, dtype=torch.float64) * math.log(8.0))
    t_min = torch.where(fm, 0.0, 0.5 * torch.rand(bz, generator=g, dtype=torch.float64))
    t_max = torch.where(fm, 1.0, 0.5 + 0.5 * torch.rand(bz, generator=g, dtype=torch.float64))
    return x, e, t, r, y, omega, t_min, t_max


def _imf_loss(**kw):
    return mfl.MeanFlowLoss(
        times=mfl.TimePairSampler(
            "logit_normal", -0.4, 1.0, equal_fraction=0.5, equal_count="truncate", equal_rows="first"
        ),
        weighting=mfl.AdaptiveWeight(p=1.0, c=0.01),
        reduction="sum",
        guidance=mfl.GuidanceAsInput(null_condition=mfl.null_class(NUM_CLASSES)),
        tangent="model",
        compound=True,
        aux_velocity_weight=1.0,
        **kw,
    )


@pytest.mark.parametrize("n_drop", [0, 3])
@pytest.mark.parametrize("jvp", ["nograd", "finite_difference"])
def test_loss_target_tangent_and_gradient_equal_the_official_step(n_drop, jvp):
    net = GuidedNet()
    x, e, t, r, y, omega, t_min, t_max = _draws()
    want, v_g, _ = official_step(net, x, e, t, r, y, omega, t_min, t_max, n_drop)
    want_grad = torch.autograd.grad(want, list(net.parameters()))
    drop = torch.arange(x.shape[0]) < n_drop
    out = _imf_loss(jvp=jvp, **({"fd_eps": 1e-6} if jvp == "finite_difference" else {}))(
        net,
        x,
        t=t,
        r=r,
        noise=e,
        drop_mask=drop,
        model_kwargs={"y": y, "omega": omega, "t_min": t_min, "t_max": t_max},
    )
    tol = 1e-12 if jvp == "nograd" else 1e-7
    assert torch.allclose(out.loss, want, rtol=tol, atol=tol), (out.loss.item(), want.item())
    # the compound form: target + (t - r) du/dt is the guided velocity
    gap = (t - r)[:, None]
    assert torch.allclose(out.extras["target"] + gap * out.extras["dudt"], v_g, rtol=tol, atol=tol)
    got_grad = torch.autograd.grad(out.loss, list(net.parameters()))
    for a, b in zip(got_grad, want_grad, strict=True):
        assert torch.allclose(a, b, rtol=tol * 10, atol=tol * 10)


def test_guided_target_is_cfg_at_the_effective_scale_and_dropped_rows_keep_v():
    net = GuidedNet(seed=1)
    x, e, t, r, y, omega, t_min, t_max = _draws(seed=3)
    t_min[-1], t_max[-1] = 0.0, 0.5 * float(t[-1])  # the last row lies outside its interval: scale 1, target v
    z = (1 - t[:, None]) * x + t[:, None] * e
    v = e - x
    g = mfl.GuidanceAsInput(null_condition=mfl.null_class(NUM_CLASSES))
    drop = torch.zeros(x.shape[0], dtype=torch.bool)
    drop[2] = True
    res = apply_guidance(
        g, net, z, t, v, {"y": y, "omega": omega, "t_min": t_min, "t_max": t_max}, drop_mask=drop, fm_rows=r == t
    )
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    with torch.no_grad():
        v_c = net(z, t, t, y, omega, zeros, ones)
        v_u = net(z, t, t, torch.full_like(y, NUM_CLASSES), ones, zeros, ones)
    want = v + (1 - 1 / omega)[:, None] * (v_c - v_u)
    inside = (t >= t_min) & (t <= t_max)
    assert not bool(inside[-1]) and int(inside.sum()) >= 8  # rows on both sides of the test
    keep = inside.clone()
    keep[2] = False
    assert torch.allclose(res.v_tilde[keep], want[keep], atol=1e-13)
    assert torch.equal(res.v_tilde[~keep], v[~keep])
    assert res.guided_mask.tolist() == keep.tolist()
    # the dropped row's label is the null class; it keeps its drawn scale and interval
    assert int(res.model_kwargs["y"][2]) == NUM_CLASSES and float(res.model_kwargs["omega"][2]) == float(omega[2])
    assert torch.equal(res.model_kwargs["t_min"], t_min) and res.tangent is None


def test_scale_draw_matches_its_power_law_and_intervals_their_ranges():
    from scipy import stats

    n = 200_000
    g = torch.Generator().manual_seed(0)
    for beta in (1.0, 0.5, 2.0):
        gi = mfl.GuidanceAsInput(scale_max=7.0, scale_beta=beta, null_condition=mfl.null_class(2))
        w = gi.draw_scale(n, generator=g).double().numpy()
        assert w.min() >= 1.0 and w.max() <= 8.0

        def cdf(s, beta=beta):
            s = np.clip(s, 1.0, 8.0)
            if beta == 1.0:
                return np.log(s) / np.log(8.0)
            a = 1.0 - beta
            return (s**a - 1.0) / (8.0**a - 1.0)

        assert stats.kstest(w, cdf).statistic < 0.01
    gi = mfl.GuidanceAsInput(t_min_range=(0.1, 0.4), t_max_range=(0.6, 0.9), null_condition=mfl.null_class(2))
    fm = torch.arange(1000) < 300
    lo, hi = gi.draw_interval(fm, generator=g)
    assert torch.all(lo[fm] == 0) and torch.all(hi[fm] == 1)
    assert lo[~fm].min() >= 0.1 and lo[~fm].max() <= 0.4 and hi[~fm].min() >= 0.6 and hi[~fm].max() <= 0.9
    assert abs(float(lo[~fm].mean()) - 0.25) < 0.02 and abs(float(hi[~fm].mean()) - 0.75) < 0.02


def test_drawn_inputs_reach_the_network_and_flow_matching_rows_get_the_full_interval():
    seen = {}

    class Spy(GuidedNet):
        def forward(self, z, r, t, y, omega, t_min, t_max):
            if torch.is_grad_enabled():
                seen.update(r=r, t=t, omega=omega, t_min=t_min, t_max=t_max)
            return super().forward(z, r, t, y, omega, t_min, t_max)

    net = Spy()
    x = torch.randn(64, 2, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (64,))
    _imf_loss()(net, x, model_kwargs={"y": y}, generator=torch.Generator().manual_seed(0))
    rows = slice(0, 64)  # the gradient forward: u rows (then the auxiliary velocity rows)
    fm = seen["r"][rows] == seen["t"][rows]
    assert int(fm.sum()) == 32 and bool(fm[:32].all())  # iMF's sampler: the first half r = t
    assert torch.all(seen["t_min"][rows][fm] == 0) and torch.all(seen["t_max"][rows][fm] == 1)
    assert torch.all((seen["omega"] >= 1) & (seen["omega"] <= 8))
    assert float(seen["t_max"][rows][~fm].min()) >= 0.5 and float(seen["t_min"][rows][~fm].max()) <= 0.5


def test_bad_setups_are_refused_with_the_cause():
    with pytest.raises(TypeError, match="null_condition"):
        mfl.GuidanceAsInput()
    with pytest.raises(ValueError, match="three distinct"):
        mfl.GuidanceAsInput(null_condition=mfl.null_class(2), scale_key="t_min")
    with pytest.raises(ValueError, match="scale_max"):
        mfl.GuidanceAsInput(null_condition=mfl.null_class(2), scale_max=0.0)
    net = GuidedNet()
    x = torch.randn(8, 2, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (8,))
    with pytest.raises(ValueError, match=r"model_kwargs\['omega'\].*float tensor of shape \(8,\)"):
        _imf_loss()(net, x, model_kwargs={"y": y, "omega": torch.ones(8, 1)})
    with pytest.raises(ValueError, match="teacher= with GuidanceAsInput"):
        _imf_loss()(net, x, model_kwargs={"y": y}, teacher=net)


@pytest.mark.slow
def test_sampling_inputs_and_a_tiny_training_run_learn_the_scale():
    """Two separated classes: after a short run, a larger sampling scale pushes one-step samples further out."""
    torch.manual_seed(0)
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(3, 8)
            self.f = nn.Sequential(nn.Linear(2 + 5 + 8, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2))

        def forward(self, z, r, t, y, omega, t_min, t_max):
            c = torch.stack([t, t - r, torch.log(omega), t_min, t_max], 1)
            return self.f(torch.cat([z, c, self.emb(y)], 1))

    net = Net()
    gi = mfl.GuidanceAsInput(null_condition=mfl.null_class(2), drop_prob=0.2, drop_rows="per_row")
    loss_fn = mfl.MeanFlowLoss(
        times=mfl.TimePairSampler("uniform", equal_fraction=0.5),
        weighting=mfl.AdaptiveWeight(p=0.0),
        reduction="mean",
        guidance=gi,
        tangent="model",
        aux_velocity_weight=1.0,
    )
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = last = 0.0
    for _ in range(200):
        y = torch.randint(0, 2, (256,))
        x = means[y] + 0.3 * torch.randn(256, 2)
        out = loss_fn(net, x, model_kwargs={"y": y})
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first or out.terms["mse"].item()
        last = out.terms["mse"].item()
    assert last < 0.7 * first
    y = torch.ones(512, dtype=torch.long)
    noise = torch.randn(512, 2)
    kw1 = gi.inputs(512, 1.0)
    assert set(kw1) == {"omega", "t_min", "t_max"} and kw1["omega"].shape == (512,)
    with torch.no_grad():
        s1 = mfl.sample(net, noise, steps=1, model_kwargs={"y": y, **kw1})
        s4 = mfl.sample(net, noise, steps=1, model_kwargs={"y": y, **gi.inputs(512, 4.0)})
    assert float(s1[:, 0].mean()) > 0.3  # class 1 lies at x = +2
    assert float(s4[:, 0].mean()) > float(s1[:, 0].mean()) + 0.5  # guidance pushes away from the other class


def test_compiled_step_has_no_graph_break_and_equals_eager():
    net = GuidedNet().float()
    loss = _imf_loss()
    x, y = torch.randn(32, 2), torch.randint(0, NUM_CLASSES, (32,))

    def step(x, y):
        return loss(net, x, model_kwargs={"y": y}).loss

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(x, y)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    g = torch.Generator().manual_seed(0)
    pair = loss.times.sample(32, generator=g)
    gi = loss.guidance
    lo, hi = gi.draw_interval(pair.r == pair.t, generator=g)
    kw = {"y": y, "omega": gi.draw_scale(32, generator=g), "t_min": lo, "t_max": hi}
    draws = {"t": pair.t, "r": pair.r, "noise": torch.randn(32, 2, generator=g), "drop_mask": torch.arange(32) < 3}

    def step2(x, kw, draws):
        return loss(net, x, model_kwargs=kw, **draws).loss

    torch._dynamo.reset()
    got = torch.compile(step2, backend="aot_eager")(x, kw, draws)
    torch.testing.assert_close(got, step2(x, kw, draws), rtol=1e-5, atol=1e-7)
