"""Interval splitting (SplitMeanFlow, Shortcut models) and the EMA averaging functions."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

import meanflow_losses as mfl
from meanflow_losses.ema import ema_avg_fn, ema_decay, ema_multi_avg_fn
from tests.nets import MLP
from tests.oracles import ExactAverageVelocity, exact_u, gaussian_batch, marginal_velocity

F64 = torch.float64


class Counting(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls: list[tuple[bool, int]] = []

    def forward(self, z, r, t, **kw):
        self.calls.append((torch.is_grad_enabled(), z.shape[0]))
        return self.net(z, r, t, **kw)


def _model(dim=3, seed=0):
    torch.manual_seed(seed)
    return MLP(dim=dim, width=32).double()


def _batch(batch=64, dim=3, seed=0, equal=0.25):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g, dtype=F64)
    e = torch.randn(batch, dim, generator=g, dtype=F64)
    t = torch.rand(batch, generator=g, dtype=F64) * 0.9 + 0.1
    r = t * torch.rand(batch, generator=g, dtype=F64)
    n_eq = int(equal * batch)
    r[:n_eq] = t[:n_eq]
    return x, e, t, r


# --- Gaussian oracle -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [None, 0.5, 0.9])
def test_splitting_target_is_exact_on_the_gaussian_oracle(lam):
    x, e, g = gaussian_batch(256, 3)
    t = torch.rand(256, generator=g, dtype=F64) * 0.9 + 0.05
    r = t * torch.rand(256, generator=g, dtype=F64)
    r[:32] = t[:32]
    z = (1 - t[:, None]) * x + t[:, None] * e
    loss_fn = mfl.SplitMeanFlowLoss(lam=lam)
    out = loss_fn(ExactAverageVelocity(), x, t=t, r=r, noise=e, v_target=marginal_velocity(z, t), generator=g)
    err = (out.extras["target"] - exact_u(z, r, t)).abs().max().item()
    assert err < 1e-10
    assert out.per_sample.max().item() < 1e-10
    if lam is None:  # lambda ~ U(0, 1) on the r != t rows, 0 on the boundary rows
        lams = out.extras["lam"]
        assert (lams[:32] == 0).all() and 0.3 < lams[32:].mean().item() < 0.7 and lams[32:].std().item() > 0.2


def test_splitting_target_formula_and_no_jvp(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("interval splitting must not compute a JVP")

    monkeypatch.setattr(torch.func, "jvp", boom)
    monkeypatch.setattr(torch.autograd.forward_ad, "make_dual", boom)
    x, e, t, r = _batch()
    net = _model()
    model, teacher = Counting(net), Counting(net)
    lam = torch.rand(64, generator=torch.Generator().manual_seed(3), dtype=F64)
    out = mfl.SplitMeanFlowLoss()(model, x, t=t, r=r, noise=e, lam=lam, target_model=teacher)
    n = int((r != t).sum())
    assert model.calls == [(True, 64)] and teacher.calls == [(False, n), (False, n)]
    z = (1 - t[:, None]) * x + t[:, None] * e
    s = (1 - lam) * t + lam * r
    with torch.no_grad():
        u2 = net(z, s, t)
        u1 = net(z - (t - s)[:, None] * u2, r, s)
    expected = torch.where((r != t)[:, None], lam[:, None] * u2 + (1 - lam[:, None]) * u1, e - x)
    torch.testing.assert_close(out.extras["target"], expected, rtol=1e-12, atol=1e-14)
    # the boundary rows are plain flow matching
    fm = mfl.FlowMatchingLoss(weighting=mfl.AdaptiveWeight(p=1.0, c=1e-3), reduction="sum")(net, x, t=t, noise=e)
    eq = r == t
    torch.testing.assert_close(out.per_sample[eq], fm.per_sample[eq])


def test_explicit_draws_make_the_loss_deterministic():
    x, e, t, r = _batch()
    model = _model()
    sm = mfl.SplitMeanFlowLoss()
    a = sm(model, x, t=t, r=r, noise=e, lam=0.3)
    b = sm(model, x, t=t, r=r, noise=e, lam=torch.full((64,), 0.3, dtype=F64))
    torch.testing.assert_close(a.per_sample, b.per_sample)
    c = sm(model, x, generator=torch.Generator().manual_seed(1))
    d = sm(model, x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(c.per_sample, d.per_sample)
    assert not torch.allclose(a.per_sample, sm(model, x, t=t, r=r, noise=e, lam=0.6).per_sample)


def test_splitting_options_and_errors():
    x, e, t, r = _batch()
    model = _model()
    with pytest.raises(ValueError, match="lam must lie in"):
        mfl.SplitMeanFlowLoss(lam=1.0)
    with pytest.raises(ValueError, match="lam must be a number or a floating tensor"):
        mfl.SplitMeanFlowLoss()(model, x, t=t, r=r, noise=e, lam=torch.zeros(3, dtype=F64))
    with pytest.raises(ValueError, match="lam must lie in"):
        mfl.SplitMeanFlowLoss()(model, x, t=t, r=r, noise=e, lam=1.5)
    with pytest.raises(ValueError, match="target_clip"):
        mfl.SplitMeanFlowLoss(target_clip=-1.0)
    with pytest.raises(TypeError, match="times must be"):
        mfl.SplitMeanFlowLoss(times=mfl.TimeSampler())
    with pytest.raises(ValueError, match="ignores r"):
        mfl.SplitMeanFlowLoss()(mfl.adapters.from_velocity_net(lambda z, t: z), x, t=t, r=r, noise=e)
    hooked = mfl.SplitMeanFlowLoss(
        interval_weight=lambda t_, r_, k: torch.full_like(t_, 2.0),
        velocity_weight=lambda t_, r_, k: torch.full_like(t_, 3.0),
    )(model, x, t=t, r=r, noise=e, lam=0.4)
    plain = mfl.SplitMeanFlowLoss()(model, x, t=t, r=r, noise=e, lam=0.4)
    torch.testing.assert_close(hooked.per_sample / plain.per_sample, torch.where(r != t, 2.0, 3.0).to(F64))


# --- Shortcut models -------------------------------------------------------------------------------------------------


def test_dyadic_sampler_grid():
    sampler = mfl.DyadicPairSampler()
    pair = sampler.sample(4096, generator=torch.Generator().manual_seed(0), dtype=F64)
    n_c = sampler.num_consistency(4096)
    assert n_c == 512
    t_c, r_c = pair.t[:n_c], pair.r[:n_c]
    gap = t_c - r_c
    levels = -torch.log2(gap)
    assert torch.equal(levels, levels.round()) and levels.min() == 0 and levels.max() == 6  # 2d in {1, ..., 1/64}
    assert torch.equal(torch.remainder(t_c / gap, 1.0), torch.zeros_like(t_c))  # t on multiples of 2d
    assert (r_c >= 0).all() and (t_c <= 1).all()
    counts = torch.bincount(levels.long(), minlength=7).double()
    assert counts.min() > 0.6 * counts.mean()  # levels uniform
    assert torch.equal(pair.t[n_c:], pair.r[n_c:])  # the rest: flow matching


def test_shortcut_target_and_defaults():
    x, e, _, _ = _batch(batch=64)
    net = _model()
    teacher = Counting(_model(seed=1))
    out = mfl.ShortcutLoss()(net, x, noise=e, target_model=teacher, generator=torch.Generator().manual_seed(0))
    t, r = out.t, out.r
    n_c = 8  # 1/8 of the batch
    assert (r[:n_c] < t[:n_c]).all() and torch.equal(r[n_c:], t[n_c:])
    assert teacher.calls == [(False, n_c), (False, n_c)]
    d = (t - r) / 2
    s = t - d
    z = (1 - t[:, None]) * x + t[:, None] * e
    with torch.no_grad():
        u_a = teacher.net(z, s, t)
        u_b = teacher.net(z - d[:, None] * u_a, r, s)
    expected = ((u_a + u_b) / 2).clamp(-4, 4)
    torch.testing.assert_close(out.extras["target"][:n_c], expected[:n_c], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.extras["target"][n_c:], (e - x)[n_c:])
    # plain squared error, mean over data dims
    with torch.no_grad():
        sq = (net(z, r, t) - out.extras["target"]).square().mean(1)
    torch.testing.assert_close(out.per_sample.detach(), sq)


def test_shortcut_clips_targets():
    x, e, t, r = _batch(equal=0.0)
    net = _model()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(6.0)  # large outputs
    out = mfl.ShortcutLoss()(net, x, t=t, r=r, noise=e)
    assert out.extras["target"].abs().max().item() == pytest.approx(4.0)
    unclipped = mfl.ShortcutLoss(target_clip=None)(net, x, t=t, r=r, noise=e)
    assert unclipped.extras["target"].abs().max().item() > 4.0


def test_ema_teacher_through_averaged_model():
    net = _model()
    ema = AveragedModel(net, multi_avg_fn=ema_multi_avg_fn(100.0, warmup_ratio=0.5))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x = _batch()[0]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        out = mfl.ShortcutLoss()(net, x, target_model=ema.module, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        ema.update_parameters(net)
    assert all(p.grad is None for p in ema.module.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert not torch.equal(next(ema.module.parameters()), next(net.parameters()))


# --- EMA averaging functions -----------------------------------------------------------------------------------------


def test_ema_half_life_and_warmup():
    assert ema_decay(6931, 10_000) == pytest.approx(0.9999, abs=1e-8)  # alpha-Flow's half-life
    assert ema_decay(10, 0, warmup_ratio=0.1) == 0.0
    assert ema_decay(10, 20, warmup_ratio=0.1) == pytest.approx(0.5 ** (1 / 2.0))
    assert ema_decay(10, 10_000, warmup_ratio=0.1) == pytest.approx(0.5 ** (1 / 10))
    with pytest.raises(ValueError, match="half_life_steps"):
        ema_decay(0, 1)
    with pytest.raises(ValueError, match="warmup_ratio"):
        ema_avg_fn(10, warmup_ratio=-1.0)


@pytest.mark.parametrize("multi", [False, True])
def test_ema_halves_the_gap_after_one_half_life(multi):
    lin = torch.nn.Linear(2, 2, bias=False).double()
    with torch.no_grad():
        lin.weight.zero_()
    fn = ema_multi_avg_fn(8.0) if multi else ema_avg_fn(8.0)
    ema = AveragedModel(lin, multi_avg_fn=fn) if multi else AveragedModel(lin, avg_fn=fn)
    ema.update_parameters(lin)  # first update copies
    with torch.no_grad():
        lin.weight.fill_(1.0)
    for _ in range(8):
        ema.update_parameters(lin)
    torch.testing.assert_close(ema.module.weight, torch.full((2, 2), 0.5, dtype=F64))
    assert math.isclose(ema_decay(8.0, 5) ** 8, 0.5)


def test_ema_warmup_on_device_counter_matches_float_formula():
    """The warm-up path computes the decay from AveragedModel's tensor counter without a host sync."""
    avg = [torch.zeros(3, dtype=F64)]
    cur = [torch.ones(3, dtype=F64)]
    fn = ema_multi_avg_fn(10.0, warmup_ratio=0.1)
    fn(avg, cur, torch.tensor(20))
    want = 1.0 - ema_decay(10.0, 20, warmup_ratio=0.1)
    torch.testing.assert_close(avg[0], torch.full((3,), want, dtype=F64))
    fn2 = ema_multi_avg_fn(10.0, warmup_ratio=0.1)
    avg2 = [torch.zeros(3, dtype=F64)]
    fn2(avg2, cur, torch.tensor(0))  # half-life 0: copy the model
    torch.testing.assert_close(avg2[0], cur[0])
