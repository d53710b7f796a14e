"""alpha-Flow: oracle limits, special cases, thresholds, weights and options."""

from __future__ import annotations

import pytest
import torch

import meanflow_losses as mfl
from meanflow_losses.guidance import apply_guidance
from tests.nets import MLP
from tests.oracles import ExactAverageVelocity, exact_u, gaussian_batch, marginal_velocity

F64 = torch.float64
PLAIN = mfl.AdaptiveWeight(p=0.0)


class Counting(torch.nn.Module):
    """Wraps a model and records (grad_enabled, batch) of every call."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        self.calls: list[tuple[bool, int]] = []

    def forward(self, z, r, t, **kw):
        self.calls.append((torch.is_grad_enabled(), z.shape[0]))
        return self.net(z, r, t, **kw)


def _batch(batch=64, dim=3, seed=0, equal=0.25):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, dim, generator=g, dtype=F64)
    e = torch.randn(batch, dim, generator=g, dtype=F64)
    t = torch.rand(batch, generator=g, dtype=F64) * 0.9 + 0.1
    r = t * torch.rand(batch, generator=g, dtype=F64)
    n_eq = int(equal * batch)
    r[:n_eq] = t[:n_eq]
    return x, e, t, r


def _model(dim=3, seed=0, **kw):
    torch.manual_seed(seed)
    return MLP(dim=dim, width=32, **kw).double()


def _flat_grad(loss, model):
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return torch.cat([g.reshape(-1) for g in grads])


# --- Gaussian oracle -------------------------------------------------------------------------------------------------


def test_alpha_target_error_falls_like_alpha_squared():
    x, e, g = gaussian_batch(256, 3)
    t = torch.rand(256, generator=g, dtype=F64) * 0.9 + 0.05
    r = t * torch.rand(256, generator=g, dtype=F64)
    z = (1 - t[:, None]) * x + t[:, None] * e
    errors = []
    for alpha in (0.1, 0.01, 0.001):
        loss_fn = mfl.AlphaFlowLoss(alpha=alpha, eta=0.0, times=mfl.TimePairSampler("uniform"))
        out = loss_fn(ExactAverageVelocity(), x, t=t, r=r, noise=e, v_target=marginal_velocity(z, t))
        assert out.extras["regime"] == "consistency"
        errors.append((out.extras["target"] - exact_u(z, r, t)).abs().max().item())
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(70 < q < 140 for q in ratios), (errors, ratios)  # O(alpha^2): x100 per decade
    assert 1e-5 < errors[1] < 1e-3  # reference: 1.5e-4 at alpha = 0.01 (depends on mu, sigma, times)


# --- special cases ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1.0, 0.997])  # 0.997 > 1 - eta snaps to 1
def test_alpha_one_is_trajectory_flow_matching_with_one_forward(alpha):
    x, e, t, r = _batch()
    model = Counting(_model())
    weighting = mfl.AdaptiveWeight(p=1.0, c=1e-3)
    out = mfl.AlphaFlowLoss(alpha=alpha, weighting=weighting, reduction="mean")(model, x, t=t, r=r, noise=e)
    assert model.calls == [(True, 64)]
    assert out.extras["regime"] == "trajectory_fm" and out.terms["alpha"].item() == 1.0
    assert out.terms["regime"].item() == mfl.objectives.alphaflow.REGIMES.index("trajectory_fm")
    ref = mfl.FlowMatchingLoss(times=mfl.TimePairSampler(), weighting=weighting, reduction="mean")(
        model.net, x, t=t, r=r, noise=e
    )
    torch.testing.assert_close(out.per_sample, ref.per_sample, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(_flat_grad(out.loss, model.net), _flat_grad(ref.loss, model.net), rtol=1e-12, atol=0)


def test_alpha_half_with_model_velocity_is_twice_the_shortcut_loss():
    x, e, t, r = _batch(equal=0.0)
    model = _model()
    s = 0.5 * (t + r)
    z = (1 - t[:, None]) * x + t[:, None] * e
    with torch.no_grad():
        v_model = model(z, s, t)  # v~ replaced by u(z_t, s, t)
    af = mfl.AlphaFlowLoss(alpha=0.5, eta=0.0, weighting=PLAIN, alpha_scale="inverse", reduction="mean")
    out_af = af(model, x, t=t, r=r, noise=e, v_target=v_model)
    sc = mfl.ShortcutLoss(weighting=PLAIN, target_clip=None, reduction="mean")
    out_sc = sc(model, x, t=t, r=r, noise=e)
    torch.testing.assert_close(out_af.per_sample, 2 * out_sc.per_sample, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out_af.extras["target"], out_sc.extras["target"], rtol=1e-12, atol=1e-14)


def test_gradient_tends_to_meanflow_gradient_as_alpha_vanishes():
    x, e, t, r = _batch(equal=0.0)
    model = _model()
    g_mf = _flat_grad(mfl.MeanFlowLoss(weighting=PLAIN, reduction="sum")(model, x, t=t, r=r, noise=e).loss, model)
    errs = []
    for alpha in (1e-2, 1e-3, 1e-4):
        af = mfl.AlphaFlowLoss(alpha=alpha, eta=0.0, alpha_scale="inverse", weighting=PLAIN, reduction="sum")
        g_a = _flat_grad(af(model, x, t=t, r=r, noise=e).loss, model)
        errs.append(((g_a - g_mf).norm() / g_mf.norm()).item())
    assert errs[0] < 0.1
    assert 5 < errs[0] / errs[1] < 20 and 5 < errs[1] / errs[2] < 20, errs  # O(alpha)
    # the paper's L_alpha itself (alpha^-1 ||u - sg(target)||^2), computed by hand from the reported target
    af = mfl.AlphaFlowLoss(alpha=1e-4, eta=0.0, weighting=PLAIN, alpha_scale="one", reduction="sum")
    out = af(model, x, t=t, r=r, noise=e)
    z = (1 - t[:, None]) * x + t[:, None] * e
    paper = (model(z, r, t) - out.extras["target"]).square().sum(1).mean() / 1e-4
    assert ((_flat_grad(paper, model) - g_mf).norm() / g_mf.norm()).item() < 1e-3


def test_consistency_target_formula_and_passes():
    x, e, t, r = _batch()
    net = _model()
    model, teacher = Counting(net), Counting(net)
    alpha = 0.3
    out = mfl.AlphaFlowLoss(alpha=alpha, eta=5e-3)(model, x, t=t, r=r, noise=e, target_model=teacher)
    n_neq = int((r != t).sum())
    assert model.calls == [(True, 64)] and teacher.calls == [(False, n_neq)]
    z = (1 - t[:, None]) * x + t[:, None] * e
    v = e - x
    s = alpha * r + (1 - alpha) * t
    z_s = z - (t - s)[:, None] * v  # minus sign (the algorithm and the official code)
    with torch.no_grad():
        expected = alpha * v + (1 - alpha) * net(z_s, r, s)
    neq = r != t
    torch.testing.assert_close(out.extras["target"][neq], expected[neq], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.extras["target"][~neq], v[~neq])


# --- thresholds, schedules and regimes -------------------------------------------------------------------------------


def test_small_alpha_runs_the_meanflow_loss():
    x, e, t, r = _batch()
    model = _model()
    out = mfl.AlphaFlowLoss(alpha=0.004, eta=5e-3, reduction="sum")(model, x, t=t, r=r, noise=e)
    ref = mfl.MeanFlowLoss(
        times=mfl.TimePairSampler("logit_normal", -0.4, 1.0, 0.5),
        weighting=mfl.AdaptiveWeight(p=1.0, c=1e-3),
        reduction="sum",
    )(model, x, t=t, r=r, noise=e)
    assert out.extras["regime"] == "meanflow"
    assert out.terms["alpha"].item() == 0.0 and out.terms["alpha_raw"].item() == pytest.approx(0.004)
    torch.testing.assert_close(out.per_sample, ref.per_sample, rtol=1e-12, atol=1e-14)
    # eta = 0 disables the snap: the same alpha runs the consistency loss
    out0 = mfl.AlphaFlowLoss(alpha=0.004, eta=0.0, reduction="sum")(model, x, t=t, r=r, noise=e)
    assert out0.extras["regime"] == "consistency"
    assert not torch.allclose(out0.per_sample, ref.per_sample)


def test_scheduled_alpha_follows_the_step():
    x, e, t, r = _batch()
    model = _model()
    af = mfl.AlphaFlowLoss(alpha=mfl.schedules.Sigmoid(start=100, end=300))
    assert af(model, x, t=t, r=r, noise=e, step=0).extras["regime"] == "trajectory_fm"
    mid = af(model, x, t=t, r=r, noise=e, step=200)
    assert mid.extras["regime"] == "consistency" and mid.terms["alpha"].item() == pytest.approx(0.5)
    assert af(model, x, t=t, r=r, noise=e, step=300).extras["regime"] == "meanflow"
    assert af.regime_at(10**9) == "meanflow"
    assert af.alpha_at(180) == pytest.approx(1 - torch.sigmoid(torch.tensor(25.0 * (180 - 200) / 200)).item())
    assert af.alpha_at(150) == 1.0  # 0.998 > 1 - eta snaps to 1
    with pytest.raises(ValueError, match="alpha is a schedule"):
        af(model, x, t=t, r=r, noise=e)
    with pytest.raises(ValueError, match="alpha must lie in"):
        mfl.AlphaFlowLoss(alpha=lambda k: 1.5)(model, x, t=t, r=r, noise=e, step=3)


def test_scheduled_equal_fraction():
    x = torch.randn(40, 2)
    loss_fn = mfl.AlphaFlowLoss(
        alpha=0.5,
        times=mfl.TimePairSampler("uniform", equal_fraction=mfl.schedules.Step(at=10, before=0.5, after=0.25)),
    )
    model = MLP(dim=2)
    assert loss_fn(model, x, step=0).terms["frac_equal"].item() == pytest.approx(0.5)
    assert loss_fn(model, x, step=10).terms["frac_equal"].item() == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 1.5}, "alpha must lie"),
        ({"alpha": 0.5, "eta": 0.6}, "eta must lie"),
        ({"alpha": 0.5, "target_clip": 0.0}, "target_clip"),
        ({"alpha": 0.5, "alpha_scale": "sqrt"}, "alpha_scale"),
        ({"alpha": 0.5, "jvp": "magic"}, "jvp must be one of"),
        ({"alpha": 0.5, "reduction": "max"}, "reduction"),
        ({"alpha": 0.5, "times": mfl.TimeSampler()}, "times must be a TimePairSampler"),
    ],
)
def test_bad_options_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        mfl.AlphaFlowLoss(**kwargs)


def test_velocity_only_network_is_refused():
    net = mfl.adapters.from_velocity_net(lambda z, t: z * t[:, None])
    x, e, t, r = _batch()
    with pytest.raises(ValueError, match="ignores r"):
        mfl.AlphaFlowLoss(alpha=0.5)(net, x, t=t, r=r, noise=e)


# --- weights, clip, hooks, guidance ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("scale", "factor"), [("alpha", 0.3), ("inverse", 1 / 0.3), ("one", 1.0)])
def test_weight_is_alpha_over_error_on_interval_rows_only(scale, factor):
    x, e, t, r = _batch()
    model = _model()
    c = 1e-3
    out = mfl.AlphaFlowLoss(alpha=0.3, alpha_scale=scale, weighting=mfl.AdaptiveWeight(p=1.0, c=c))(
        model, x, t=t, r=r, noise=e
    )
    z = (1 - t[:, None]) * x + t[:, None] * e
    with torch.no_grad():
        sq = (model(z, r, t) - out.extras["target"]).square().mean(1)
    w = 1 / (sq + c) * torch.where(r != t, torch.tensor(factor, dtype=F64), torch.tensor(1.0, dtype=F64))
    torch.testing.assert_close(out.per_sample.detach(), w * sq, rtol=1e-10, atol=0)


def test_target_clip_applies_to_interval_rows():
    x, e, t, r = _batch()
    x = 5 * x  # large velocities
    model = _model()
    out = mfl.AlphaFlowLoss(alpha=0.5, target_clip=0.5)(model, x, t=t, r=r, noise=e)
    neq = r != t
    assert out.extras["target"][neq].abs().max().item() <= 0.5
    assert out.extras["target"][~neq].abs().max().item() > 0.5
    torch.testing.assert_close(out.extras["target"][~neq], (e - x)[~neq])


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_per_row_weight_hooks(alpha):
    x, e, t, r = _batch()
    model = _model()
    base = dict(alpha=alpha, eta=5e-3, reduction="sum")
    plain = mfl.AlphaFlowLoss(**base)(model, x, t=t, r=r, noise=e)
    hooked = mfl.AlphaFlowLoss(
        **base,
        interval_weight=lambda t_, r_, k: torch.full_like(t_, 2.0),
        velocity_weight=lambda t_, r_, k: torch.full_like(t_, 3.0),
    )(model, x, t=t, r=r, noise=e, step=0)
    ratio = hooked.per_sample / plain.per_sample
    torch.testing.assert_close(ratio, torch.where(r != t, 2.0, 3.0).to(F64), rtol=1e-10, atol=0)


def test_guidance_enters_target_and_euler_step():
    torch.manual_seed(0)
    model = MLP(dim=3, width=32, n_classes=4).double()
    x, e, t, r = _batch()
    y = torch.randint(0, 4, (64,))
    drop = torch.zeros(64, dtype=torch.bool)
    drop[::5] = True
    guidance = mfl.TrainingGuidance(
        omega=1.0, kappa=0.5, drop_prob=0.1, null_condition=lambda kw: {**kw, "y": torch.full_like(kw["y"], 4)}
    )
    alpha = 0.4
    out = mfl.AlphaFlowLoss(alpha=alpha, guidance=guidance)(
        model, x, model_kwargs={"y": y}, t=t, r=r, noise=e, drop_mask=drop
    )
    z = (1 - t[:, None]) * x + t[:, None] * e
    g = apply_guidance(guidance, model, z, t, e - x, {"y": y}, drop_mask=drop)
    s = alpha * r + (1 - alpha) * t
    with torch.no_grad():
        u_next = model(z - (t - s)[:, None] * g.v_tilde, r, s, **g.model_kwargs)
    expected = torch.where((r != t)[:, None], alpha * g.v_tilde + (1 - alpha) * u_next, g.v_tilde)
    torch.testing.assert_close(out.extras["target"], expected, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(g.v_tilde, e - x)  # guidance really changed the velocity
    assert out.terms["drop_frac"].item() == pytest.approx(drop.float().mean().item())
