"""MeanFlow and flow matching: oracles, special cases and the JVP engine."""

from __future__ import annotations

import pytest
import torch

import meanflow_losses as mfl
from meanflow_losses.jvp import time_derivative
from tests.nets import MLP, IntervalMLP, TinyTransformer, central_fd_dudt
from tests.oracles import ExactAverageVelocity, exact_u, gaussian_batch, marginal_velocity

STRATEGIES = ["nograd", "joint", "finite_difference"]


def _pairs(batch: int, g: torch.Generator, equal_fraction: float = 0.25, dtype=torch.float64):
    pair = mfl.TimePairSampler("uniform", equal_fraction=equal_fraction).sample(batch, generator=g, dtype=dtype)
    # keep away from t = 0 where the Gaussian oracle is singular at sigma != 1 only through 0/0 rows
    t = pair.t.clamp(0.02, 0.98)
    r = torch.minimum(pair.r, t)
    return t, r


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gaussian_oracle_loss_vanishes(strategy, reduction):
    x, e, g = gaussian_batch(256, 3)
    t, r = _pairs(256, g)
    z = (1 - t[:, None]) * x + t[:, None] * e
    loss_fn = mfl.MeanFlowLoss(
        times=mfl.TimePairSampler("uniform"),
        jvp=strategy,
        reduction=reduction,
        weighting=mfl.AdaptiveWeight(p=1.0, c=1e-3),
    )
    out = loss_fn(ExactAverageVelocity(), x, t=t, r=r, noise=e, v_target=marginal_velocity(z, t))
    assert (r != t).sum() > 100
    assert out.per_sample.max().item() < 1e-10
    # the target itself equals the exact u
    torch.testing.assert_close(out.extras["target"], exact_u(z, r, t), rtol=1e-7, atol=1e-7)


def test_gaussian_oracle_detects_wrong_target():
    """The oracle test can fail: with the conditional velocity e - x the loss is far from zero."""
    x, e, g = gaussian_batch(256, 3)
    t, r = _pairs(256, g)
    out = mfl.MeanFlowLoss(times=mfl.TimePairSampler("uniform"))(ExactAverageVelocity(), x, t=t, r=r, noise=e)
    assert out.per_sample.max().item() > 1e-3


def _mlp_inputs(seed=0):
    torch.manual_seed(seed)
    model = MLP(dim=3, width=24).double()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(16, 3, generator=g, dtype=torch.float64)
    tan = torch.randn(16, 3, generator=g, dtype=torch.float64)
    t = torch.rand(16, generator=g, dtype=torch.float64) * 0.9 + 0.05
    r = t * torch.rand(16, generator=g, dtype=torch.float64)
    return model, z, r, t, tan


def _transformer_inputs(seed=0):
    torch.manual_seed(seed)
    model = TinyTransformer(channels=4).double()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(6, 5, 4, generator=g, dtype=torch.float64)
    tan = torch.randn(6, 5, 4, generator=g, dtype=torch.float64)
    t = torch.rand(6, generator=g, dtype=torch.float64) * 0.9 + 0.05
    r = t * torch.rand(6, generator=g, dtype=torch.float64)
    return model, z, r, t, tan


@pytest.mark.parametrize("make", [_mlp_inputs, _transformer_inputs], ids=["mlp", "sdpa_transformer"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dudt_matches_float64_finite_difference(make, strategy):
    model, z, r, t, tan = make()
    ref = central_fd_dudt(model, z, r, t, tan, eps=1e-6)
    got = time_derivative(model, z, r, t, tan, strategy=strategy).dudt
    rel = (got - ref).norm() / ref.norm()
    assert rel < 1e-6, rel


def test_dudt_of_linear_network_is_closed_form():
    """u = A z + b r + c t has du/dt = A v + c exactly (tangent (v, 0, 1): b must not appear)."""
    lin = torch.nn.Linear(3, 3).double()
    b = torch.randn(3, dtype=torch.float64)
    c = torch.randn(3, dtype=torch.float64)

    def model(z, r, t):
        return lin(z) + r[:, None] * b + t[:, None] * c

    z, v = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    t = torch.full((5,), 0.7, dtype=torch.float64)
    r = torch.full((5,), 0.2, dtype=torch.float64)
    for strategy in STRATEGIES:
        got = time_derivative(model, z, r, t, v, strategy=strategy).dudt
        want = v @ lin.weight.T.detach() + c
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


def test_sdpa_forward_ad_needs_math_backend_and_engine_provides_it():
    """Float32 SDPA on CPU uses a fused kernel without a forward-AD rule; the engine switches to math."""
    model, z, r, t, tan = _transformer_inputs()
    model, z, r, t, tan = model.float(), z.float(), r.float(), t.float(), tan.float()
    res = time_derivative(model, z, r, t, tan, strategy="nograd")
    ref = central_fd_dudt(model.double(), z.double(), r.double(), t.double(), tan.double())
    assert ((res.dudt.double() - ref).norm() / ref.norm()) < 1e-4
    model.float()
    try:
        with torch.no_grad():
            torch.func.jvp(lambda z_, t_: model(z_, r, t_), (z, t), (tan, torch.ones_like(t)))
    except (RuntimeError, NotImplementedError):
        pass  # the trap the engine avoids
    else:
        pytest.skip("this torch build has a forward-AD rule for the fused SDPA kernel")


def test_engine_switches_attention_only_during_the_jvp():
    seen = []

    class Spy(MLP):
        def forward(self, z, r, t, y=None):
            seen.append(torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled())
            return super().forward(z, r, t)

    torch.manual_seed(0)
    model = Spy()
    x = torch.randn(8, 2)
    t = torch.full((8,), 0.8)
    r = torch.tensor([0.8] * 4 + [0.1] * 4)
    mfl.MeanFlowLoss(runtime_checks=False)(model, x, t=t, r=r)
    assert seen == [False, True]  # JVP call with fused kernels off, then the gradient forward with them on


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_r_equals_t_everywhere_is_flow_matching_without_jvp(strategy, monkeypatch):
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(32, 2)
    g = torch.Generator().manual_seed(1)
    t = torch.rand(32, generator=g)
    e = torch.randn(32, 2, generator=g)
    w = mfl.AdaptiveWeight(p=1.0, c=1e-2)
    fm = mfl.FlowMatchingLoss(weighting=w, reduction="sum")(model, x, t=t, noise=e)
    import meanflow_losses.objectives.meanflow as mfmod

    def boom(*a, **k):
        raise AssertionError("JVP computed although r = t on every row")

    monkeypatch.setattr(mfmod, "time_derivative", boom)
    mf = mfl.MeanFlowLoss(weighting=w, reduction="sum", jvp=strategy)(model, x, t=t, r=t, noise=e)
    torch.testing.assert_close(mf.loss, fm.loss)
    torch.testing.assert_close(mf.per_sample, fm.per_sample)
    gf = torch.autograd.grad(fm.loss, list(model.parameters()))
    gm = torch.autograd.grad(mf.loss, list(model.parameters()))
    for a, b in zip(gf, gm, strict=True):
        torch.testing.assert_close(a, b)


def test_jvp_runs_only_on_rows_with_r_not_equal_t():
    sizes = []

    class Spy(MLP):
        def forward(self, z, r, t, y=None):
            sizes.append(z.shape[0])
            return super().forward(z, r, t)

    torch.manual_seed(0)
    loss_fn = mfl.MeanFlowLoss(times=mfl.TimePairSampler("logit_normal", equal_fraction=0.75), runtime_checks=False)
    loss_fn(Spy(), torch.randn(64, 2), generator=torch.Generator().manual_seed(0))
    assert sizes == [16, 64]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategies_agree_on_loss_and_gradient(strategy):
    torch.manual_seed(0)
    model = MLP().double()
    x = torch.randn(32, 2, dtype=torch.float64)
    kw = dict(generator=torch.Generator().manual_seed(3))
    ref = mfl.MeanFlowLoss(times=mfl.TimePairSampler("uniform", equal_fraction=0.5))(model, x, **kw)
    out = mfl.MeanFlowLoss(times=mfl.TimePairSampler("uniform", equal_fraction=0.5), jvp=strategy)(
        model, x, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-7, atol=1e-10)
    g1 = torch.autograd.grad(ref.loss, list(model.parameters()))
    g2 = torch.autograd.grad(out.loss, list(model.parameters()))
    for a, b in zip(g1, g2, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_gradient_flows_only_through_the_prediction():
    """Stop-gradient on the target: grad of the loss equals grad of sum w * ||u - const||^2."""
    torch.manual_seed(0)
    model = MLP().double()
    x = torch.randn(16, 2, dtype=torch.float64)
    out = mfl.MeanFlowLoss(times=mfl.TimePairSampler("uniform", equal_fraction=0.25), reduction="mean")(
        model, x, generator=torch.Generator().manual_seed(0)
    )
    target = out.extras["target"]
    u = model(*_recompute_inputs(x, out))
    sq = (u - target).square().mean(dim=1)
    w = 1.0 / (sq.detach() + 1e-3)
    manual = (w * sq).mean()
    torch.testing.assert_close(out.loss, manual)
    for a, b in zip(
        torch.autograd.grad(out.loss, list(model.parameters())),
        torch.autograd.grad(manual, list(model.parameters())),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


def _recompute_inputs(x, out):
    # rebuild z_t from the draws the loss reports (noise is recovered from the generator order)
    g = torch.Generator().manual_seed(0)
    mfl.TimePairSampler("uniform", equal_fraction=0.25).sample(x.shape[0], generator=g, dtype=x.dtype)
    e = torch.randn(x.shape, generator=g, dtype=x.dtype)
    z = (1 - out.t[:, None]) * x + out.t[:, None] * e
    return z, out.r, out.t


def test_interval_adapter_tangents_follow_from_the_adapter():
    """Through from_interval_net, du/dt equals d/dt net(z + tau v, t + tau, h + tau)."""
    torch.manual_seed(0)
    net = IntervalMLP(dim=3).double()
    model = mfl.adapters.from_interval_net(net)
    z, v = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    t = torch.rand(7, dtype=torch.float64) * 0.8 + 0.1
    r = t * 0.3
    got = time_derivative(model, z, r, t, v).dudt
    eps = 1e-6
    with torch.no_grad():
        ref = (net(z + eps * v, t + eps, t - r + eps) - net(z - eps * v, t - eps, t - r - eps)) / (2 * eps)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-8)
    # the wrong tangents (dh = 0) give a different answer, so the check above can fail
    with torch.no_grad():
        wrong = (net(z + eps * v, t + eps, t - r) - net(z - eps * v, t - eps, t - r)) / (2 * eps)
    assert (wrong - got).abs().max() > 1e-4


def test_bf16_autocast_runs_jvp_in_float32():
    states = []

    class Spy(MLP):
        def forward(self, z, r, t, y=None):
            states.append((torch.is_autocast_enabled("cpu"), z.dtype))
            return super().forward(z, r, t)

    torch.manual_seed(0)
    model = Spy()
    x = torch.randn(8, 2)
    t = torch.full((8,), 0.9)
    r = torch.tensor([0.9] * 4 + [0.2] * 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = mfl.MeanFlowLoss(runtime_checks=False)(model, x, t=t, r=r)
    assert states[0] == (False, torch.float32)  # the JVP
    assert states[1][0] is True  # the gradient forward stays under autocast
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()


def test_target_model_takes_every_no_grad_pass():
    calls = {"model": [], "target": []}

    class Spy(MLP):
        def __init__(self, tag):
            super().__init__(n_classes=3)
            self.tag = tag

        def forward(self, z, r, t, y=None):
            calls[self.tag].append((z.shape[0], torch.is_grad_enabled()))
            return super().forward(z, r, t, y=y)

    torch.manual_seed(0)
    model, target = Spy("model"), Spy("target")
    target.load_state_dict(model.state_dict())
    guidance = mfl.TrainingGuidance(
        omega=1.0, kappa=0.5, drop_prob=0.0, null_condition=lambda kw: {**kw, "y": torch.full_like(kw["y"], 3)}
    )
    x, y = torch.randn(16, 2), torch.randint(0, 3, (16,))
    t = torch.full((16,), 0.6)
    r = torch.tensor([0.6] * 8 + [0.1] * 8)
    mfl.MeanFlowLoss(guidance=guidance, runtime_checks=False)(
        model, x, model_kwargs={"y": y}, target_model=target, t=t, r=r
    )
    assert calls["model"] == [(16, True)]
    assert [c[1] for c in calls["target"]] == [False, False]  # guidance pass (cond+uncond batched), JVP
    assert calls["target"][0][0] == 32 and calls["target"][1][0] == 8


def test_joint_strategy_gradient_matches_nograd_with_guidance():
    torch.manual_seed(0)
    model = MLP(n_classes=2).double()
    x, y = torch.randn(12, 2, dtype=torch.float64), torch.randint(0, 2, (12,))
    guidance = mfl.TrainingGuidance(
        omega=0.5, kappa=0.3, drop_prob=0.2, null_condition=lambda kw: {**kw, "y": torch.full_like(kw["y"], 2)}
    )
    outs = []
    for s in ["nograd", "joint"]:
        out = mfl.MeanFlowLoss(guidance=guidance, jvp=s, times=mfl.TimePairSampler("uniform", equal_fraction=0.5))(
            model, x, model_kwargs={"y": y}, generator=torch.Generator().manual_seed(5)
        )
        outs.append((out.loss, torch.autograd.grad(out.loss, list(model.parameters()))))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        torch.testing.assert_close(a, b)


def test_velocity_only_network_is_refused_for_meanflow_rows():
    net = torch.nn.Linear(3, 2)
    model = mfl.adapters.from_velocity_net(lambda z, t: net(torch.cat([z, t[:, None]], 1)))
    x = torch.randn(4, 2)
    t = torch.full((4,), 0.5)
    with pytest.raises(ValueError, match="ignores r"):
        mfl.MeanFlowLoss()(model, x, t=t, r=t * 0.5)
    mfl.MeanFlowLoss()(model, x, t=t, r=t)  # r = t is flow matching: fine


def test_improved_meanflow_options():
    torch.manual_seed(0)
    model = MLP().double()
    x = torch.randn(16, 2, dtype=torch.float64)
    base = dict(times=mfl.TimePairSampler("uniform", equal_fraction=0.5), weighting=mfl.AdaptiveWeight(p=0.0))
    a = mfl.MeanFlowLoss(**base, tangent="model")(model, x, generator=torch.Generator().manual_seed(0))
    b = mfl.MeanFlowLoss(**base, tangent="model", compound=True)(model, x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.loss, b.loss)  # the compound form is the same regression
    c = mfl.MeanFlowLoss(**base)(model, x, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(a.loss, c.loss)  # a different tangent gives a different target
    d = mfl.MeanFlowLoss(**base, tangent="model", aux_velocity_weight=0.5)(
        model, x, generator=torch.Generator().manual_seed(0)
    )
    # aux term: 0.5 * ||u(z, t, t) - v||^2 (p = 0) added to every row's loss
    torch.testing.assert_close(d.loss, a.loss + 0.5 * d.terms["aux_mse"])


def test_per_row_weight_hooks():
    torch.manual_seed(0)
    model = MLP()
    x = torch.randn(16, 2)
    t = torch.full((16,), 0.9)
    r = torch.tensor([0.9] * 8 + [0.3] * 8)
    g = torch.Generator().manual_seed(0)
    e = torch.randn(16, 2, generator=g)
    ref = mfl.MeanFlowLoss(weighting=mfl.AdaptiveWeight(p=0.0))(model, x, t=t, r=r, noise=e)
    hooked = mfl.MeanFlowLoss(
        weighting=mfl.AdaptiveWeight(p=0.0),
        interval_weight=lambda t, r, s: torch.full_like(t, 2.0),
        velocity_weight=lambda t, r, s: torch.full_like(t, 3.0),
    )(model, x, t=t, r=r, noise=e)
    want = torch.where(r != t, 2 * ref.per_sample, 3 * ref.per_sample)
    torch.testing.assert_close(hooked.per_sample, want)
