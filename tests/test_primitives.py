"""Time samplers, weighting, guidance, adapters and samplers, each alone."""

from __future__ import annotations

import math

import pytest
import torch

import meanflow_losses as mfl
from meanflow_losses.guidance import apply_guidance
from meanflow_losses.weighting import reduce_data_dims
from tests.nets import IntervalMLP
from tests.oracles import ExactAverageVelocity, flow_map, gaussian_batch


# ---------------------------------------------------------------- times
def test_logit_normal_moments():
    g = torch.Generator().manual_seed(0)
    t = mfl.TimeSampler("logit_normal", mean=-0.4, std=1.0).sample(200_000, generator=g, dtype=torch.float64)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() + 0.4) < 0.01 and abs(logit.std().item() - 1.0) < 0.01


def test_uniform_is_uniform():
    t = mfl.TimeSampler("uniform").sample(100_000, generator=torch.Generator().manual_seed(0))
    assert abs(t.mean().item() - 0.5) < 0.01 and t.min() >= 0 and t.max() <= 1


@pytest.mark.parametrize("frac,batch,expected", [(0.75, 64, 48), (0.25, 10, 2), (0.0, 8, 0), (1.0, 8, 8)])
def test_pair_sampler_exact_equal_count(frac, batch, expected):
    pair = mfl.TimePairSampler("logit_normal", equal_fraction=frac).sample(batch, generator=torch.Generator())
    assert int((pair.r == pair.t).sum()) == expected
    assert bool((pair.r <= pair.t).all())


def test_pair_sampler_sorted_min_max_distribution():
    pair = mfl.TimePairSampler("uniform", equal_fraction=0.0).sample(
        200_000, generator=torch.Generator().manual_seed(1)
    )
    # max of two uniforms has mean 2/3, min 1/3
    assert abs(pair.t.mean().item() - 2 / 3) < 0.01 and abs(pair.r.mean().item() - 1 / 3) < 0.01


def test_pair_sampler_scheduled_fraction_and_reproducibility():
    sampler = mfl.TimePairSampler("uniform", equal_fraction=lambda k: 0.0 if k < 10 else 0.5)
    assert sampler.num_equal(100, step=0) == 0 and sampler.num_equal(100, step=10) == 50
    a = sampler.sample(32, step=20, generator=torch.Generator().manual_seed(7))
    b = sampler.sample(32, step=20, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.t, b.t) and torch.equal(a.r, b.r)


def test_pair_sampler_equal_draw_single_gives_base_distribution_to_equal_rows():
    g = torch.Generator().manual_seed(3)
    n = 200_000
    pair = mfl.TimePairSampler("uniform", equal_fraction=0.5).sample(n, generator=g, dtype=torch.float64)
    single = mfl.TimePairSampler("uniform", equal_fraction=0.5, equal_draw="single").sample(
        n, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    for p in (pair, single):
        assert int((p.r == p.t).sum()) == n // 2 and bool((p.r <= p.t).all())
    eq_pair, eq_single = pair.t[pair.r == pair.t], single.t[single.r == single.t]
    # "pair": the r = t rows keep t = max of two uniforms (mean 2/3, density 2t); "single": U(0, 1) (mean 1/2)
    assert abs(eq_pair.mean().item() - 2 / 3) < 0.005
    assert abs(eq_single.mean().item() - 0.5) < 0.005 and abs(eq_single.var().item() - 1 / 12) < 0.002
    # r != t rows are the same sorted pairs in both modes (the extra draw comes after the pairs and the permutation)
    neq = single.r != single.t
    assert torch.equal(neq, pair.r != pair.t)
    assert torch.equal(single.t[neq], pair.t[neq]) and torch.equal(single.r[neq], pair.r[neq])
    again = mfl.TimePairSampler("uniform", equal_fraction=0.5, equal_draw="single").sample(
        n, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    )
    assert torch.equal(again.t, single.t) and torch.equal(again.r, single.r)


def test_pair_sampler_default_stream_is_pinned():
    # values of the sampler as first released: equal_draw="pair" must keep a seeded step reproducible
    p = mfl.TimePairSampler("uniform", equal_fraction=0.5).sample(
        6, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    t = [
        0.9700530018065531,
        0.707819864399788,
        0.5813409198075745,
        0.9207476841219603,
        0.6450241201227648,
        0.7911478921803037,
    ]
    r = [
        0.9700530018065531,
        0.3511076243939284,
        0.5813409198075745,
        0.9207476841219603,
        0.4528688488811142,
        0.17679952620371409,
    ]
    torch.testing.assert_close(p.t, torch.tensor(t, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(p.r, torch.tensor(r, dtype=torch.float64), rtol=0, atol=1e-15)


def test_pair_sampler_equal_draw_single_logit_normal_moments():
    pair = mfl.TimePairSampler("logit_normal", mean=-0.4, std=1.0, equal_fraction=1.0, equal_draw="single").sample(
        200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    assert torch.equal(pair.r, pair.t)
    logit = torch.log(pair.t / (1 - pair.t))
    assert abs(logit.mean().item() + 0.4) < 0.01 and abs(logit.std().item() - 1.0) < 0.01


@pytest.mark.parametrize(
    "kwargs", [dict(name="beta"), dict(std=0.0), dict(equal_fraction=1.5), dict(equal_draw="fresh")]
)
def test_sampler_bad_options(kwargs):
    with pytest.raises(ValueError):
        mfl.TimePairSampler(**kwargs)


# ---------------------------------------------------------------- weighting
def test_adaptive_weight_formula_and_reductions():
    d = torch.randn(4, 3, 5, dtype=torch.float64)
    sq_sum = reduce_data_dims(d.square(), "sum")
    sq_mean = reduce_data_dims(d.square(), "mean")
    torch.testing.assert_close(sq_sum, d.square().flatten(1).sum(1))
    torch.testing.assert_close(sq_mean, sq_sum / 15)
    w = mfl.AdaptiveWeight(p=0.75, c=0.01)(sq_sum.requires_grad_())
    torch.testing.assert_close(w, (sq_sum.detach() + 0.01) ** -0.75)
    assert not w.requires_grad
    assert torch.equal(mfl.AdaptiveWeight(p=0.0)(sq_sum), torch.ones(4, dtype=torch.float64))
    with pytest.raises(ValueError, match="reduction"):
        reduce_data_dims(d, "max")
    with pytest.raises(ValueError, match="c must"):
        mfl.AdaptiveWeight(c=0.0)


# ---------------------------------------------------------------- guidance
class KnownModel(torch.nn.Module):
    """u(z, r, t | y) = a_y * z + b_y * t with known per-class constants; null class = 2."""

    def __init__(self):
        super().__init__()
        self.a = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
        self.b = torch.tensor([0.5, -1.0, 4.0], dtype=torch.float64)

    def forward(self, z, r, t, y):
        return self.a[y][:, None] * z + self.b[y][:, None] * t[:, None]


def test_guidance_target_matches_formula():
    omega, kappa = 0.6, 0.25
    guidance = mfl.TrainingGuidance(
        omega=omega,
        kappa=kappa,
        interval=(0.2, 0.8),
        drop_prob=0.0,
        null_condition=lambda kw: {**kw, "y": torch.full_like(kw["y"], 2)},
    )
    model = KnownModel()
    z = torch.randn(6, 3, dtype=torch.float64)
    v = torch.randn(6, 3, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.5], dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    drop = torch.tensor([False, False, False, False, False, True])
    res = apply_guidance(guidance, model, z, t, v, {"y": y}, drop_mask=drop)
    a, b = model.a, model.b
    u_c = a[y][:, None] * z + b[y][:, None] * t[:, None]
    u_u = a[2] * z + b[2] * t[:, None]
    want = omega * v + kappa * u_c + (1 - omega - kappa) * u_u
    inside = torch.tensor([False, True, True, True, False, False])  # t in [0.2, 0.8] and not dropped
    want = torch.where(inside[:, None], want, v)
    torch.testing.assert_close(res.v_tilde, want)
    assert torch.equal(res.guided_mask, inside)
    assert res.model_kwargs["y"].tolist() == [0, 1, 0, 1, 0, 2]  # dropped row carries the null class
    assert guidance.effective_scale == pytest.approx(omega / (1 - kappa))


def test_guidance_dropout_rate_and_interval_only_option():
    null = lambda kw: {**kw, "y": torch.full_like(kw["y"], 2)}  # noqa: E731
    g = mfl.TrainingGuidance(omega=1.0, kappa=0.0, drop_prob=0.3, null_condition=null)
    z = torch.zeros(20_000, 1, dtype=torch.float64)
    t = torch.rand(20_000, dtype=torch.float64)
    res = apply_guidance(
        g,
        KnownModel(),
        z,
        t,
        z,
        {"y": torch.zeros(20_000, dtype=torch.long)},
        generator=torch.Generator().manual_seed(0),
    )
    assert abs(res.drop_mask.double().mean().item() - 0.3) < 0.015
    g2 = mfl.TrainingGuidance(
        omega=1.0, kappa=0.0, drop_prob=0.3, null_condition=null, interval=(0.0, 0.5), drop_only_in_interval=True
    )
    res2 = apply_guidance(
        g2,
        KnownModel(),
        z,
        t,
        z,
        {"y": torch.zeros(20_000, dtype=torch.long)},
        generator=torch.Generator().manual_seed(0),
    )
    assert not bool((res2.drop_mask & (t > 0.5)).any())


def test_guidance_bad_options():
    with pytest.raises(ValueError, match="null_condition"):
        mfl.TrainingGuidance(omega=1.0, kappa=0.5, drop_prob=0.1)
    with pytest.raises(ValueError, match="interval"):
        mfl.TrainingGuidance(interval=(0.8, 0.2), drop_prob=0.0)
    with pytest.raises(ValueError, match="kappa"):
        mfl.TrainingGuidance(kappa=1.0, drop_prob=0.0, null_condition=lambda kw: kw)


def test_guided_velocity_is_the_jvp_tangent():
    """v~ replaces v as the JVP tangent: with a linear net the MeanFlow target is v~ - (t - r)(A v~ + c)."""
    lin = torch.nn.Linear(2, 2).double()
    c = torch.tensor([0.3, -0.2], dtype=torch.float64)
    gamma = torch.tensor([1.0, -0.5, 0.0], dtype=torch.float64)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = lin

        def forward(self, z, r, t, y):
            return self.lin(z) + t[:, None] * c + gamma[y][:, None]

    model = Net()
    guidance = mfl.TrainingGuidance(
        omega=0.5, kappa=0.2, drop_prob=0.0, null_condition=lambda kw: {**kw, "y": torch.full_like(kw["y"], 2)}
    )
    x = torch.randn(8, 2, dtype=torch.float64)
    e = torch.randn(8, 2, dtype=torch.float64)
    y = torch.randint(0, 2, (8,))
    t = torch.full((8,), 0.7, dtype=torch.float64)
    r = torch.full((8,), 0.2, dtype=torch.float64)
    out = mfl.MeanFlowLoss(guidance=guidance)(model, x, model_kwargs={"y": y}, t=t, r=r, noise=e)
    z = 0.3 * x + 0.7 * e
    v = e - x
    with torch.no_grad():
        vt = 0.5 * v + 0.2 * model(z, t, t, y) + 0.3 * model(z, t, t, torch.full_like(y, 2))
        want = vt - 0.5 * (vt @ lin.weight.T + c)
    torch.testing.assert_close(out.extras["target"], want)


# ---------------------------------------------------------------- adapters
def test_interval_adapter_and_conventions():
    net = IntervalMLP(dim=2).double()
    z = torch.randn(3, 2, dtype=torch.float64)
    t = torch.tensor([0.9, 0.5, 0.3], dtype=torch.float64)
    r = torch.tensor([0.1, 0.5, 0.0], dtype=torch.float64)
    m = mfl.adapters.from_interval_net(net)
    torch.testing.assert_close(m(z, r, t), net(z, t, t - r))
    flipped = mfl.adapters.from_interval_net(net, time_convention="noise_at_0")
    torch.testing.assert_close(flipped(z, r, t), -net(z, 1 - t, t - r))
    assert list(m.parameters())  # parameters are registered (optimisers and DDP see them)


def test_velocity_adapter_noise_at_zero_convention():
    """A torchcfm-style net (t' = 1 - t, velocity x - e) becomes e - x in our convention."""
    x, e = torch.randn(5, 2), torch.randn(5, 2)

    def cfm_net(z, tp):  # exact conditional velocity in the flipped convention for this (x, e) pair
        return x - e

    m = mfl.adapters.from_velocity_net(cfm_net, time_convention="noise_at_0")
    t = torch.rand(5)
    torch.testing.assert_close(m(torch.zeros(5, 2), t, t), e - x)


def test_adapter_misuse_errors():
    net = IntervalMLP()
    with pytest.raises(ValueError, match="from_interval_net"):
        mfl.MeanFlowLoss()(net, torch.randn(4, 2))
    with pytest.raises(ValueError, match="already an adapter"):
        mfl.adapters.from_interval_net(mfl.adapters.from_interval_net(net))
    with pytest.raises(TypeError, match="callable"):
        mfl.adapters.from_interval_net(3)
    with pytest.raises(ValueError, match="time_convention"):
        mfl.adapters.from_interval_net(net, time_convention="t1_data")
    bad = mfl.adapters.from_interval_net(lambda z, t, h: z[:, :1])
    with pytest.raises(ValueError, match="shape of z"):
        bad(torch.randn(4, 2), torch.zeros(4), torch.ones(4))


# ---------------------------------------------------------------- samplers
def test_one_step_sampler_is_e_minus_u():
    model = ExactAverageVelocity()
    e = torch.randn(64, 3, dtype=torch.float64)
    x = mfl.sample(model, e, steps=1)
    ones, zeros = torch.ones(64, dtype=torch.float64), torch.zeros(64, dtype=torch.float64)
    torch.testing.assert_close(x, e - model(e, zeros, ones))
    # the exact average velocity transports noise exactly along the flow map
    torch.testing.assert_close(x, flow_map(e, zeros, ones))


@pytest.mark.parametrize("grid", [[1.0, 0.5, 0.0], [1.0, 0.8, 0.3, 0.0]])
def test_ode_sampler_on_a_grid_follows_the_exact_flow(grid):
    model = ExactAverageVelocity()
    e = torch.randn(32, 2, dtype=torch.float64)
    _, traj = mfl.sample(model, e, grid=grid, return_trajectory=True)
    assert len(traj) == len(grid)
    for z, tau in zip(traj, grid, strict=True):
        tt = torch.full((32,), tau, dtype=torch.float64)
        torch.testing.assert_close(z, flow_map(e, tt, torch.ones(32, dtype=torch.float64)))


def test_consistency_sampler_renoises():
    model = ExactAverageVelocity()
    e = torch.randn(16, 2, dtype=torch.float64)
    e2 = torch.randn(16, 2, dtype=torch.float64)
    x = mfl.sample(model, e, grid=[1.0, 0.55, 0.0], method="consistency", renoise=[e2])
    ones, zeros = torch.ones(16, dtype=torch.float64), torch.zeros(16, dtype=torch.float64)
    x1 = e - model(e, zeros, ones)
    z = 0.45 * x1 + 0.55 * e2
    tt = torch.full((16,), 0.55, dtype=torch.float64)
    torch.testing.assert_close(x, z - 0.55 * model(z, zeros, tt))


@pytest.mark.parametrize("grid", [[1.0, 0.5], [0.5, 0.7, 0.0], [1.0, 0.5, 0.1]])
def test_sampler_bad_grid(grid):
    with pytest.raises(ValueError, match="grid"):
        mfl.sample(ExactAverageVelocity(), torch.randn(2, 2, dtype=torch.float64), grid=grid)


def test_gaussian_helpers_consistent():
    x, e, _ = gaussian_batch(4, 2)
    assert x.dtype == torch.float64 and math.isfinite(float(e.sum()))


def test_guide_dropped_rows_matches_official_alphaflow_mix():
    omega, kappa = 0.2, 0.5
    null = lambda kw: {**kw, "y": torch.full_like(kw["y"], 2)}  # noqa: E731
    guidance = mfl.TrainingGuidance(
        omega=omega, kappa=kappa, drop_prob=0.0, null_condition=null, guide_dropped_rows=True
    )
    model = KnownModel()
    z = torch.randn(4, 3, dtype=torch.float64)
    v = torch.randn(4, 3, dtype=torch.float64)
    t = torch.full((4,), 0.5, dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    drop = torch.tensor([False, True, False, True])
    res = apply_guidance(guidance, model, z, t, v, {"y": y}, drop_mask=drop)
    u_null = model.a[2] * z + model.b[2] * t[:, None]
    u_c = model.a[y][:, None] * z + model.b[y][:, None] * t[:, None]
    want = torch.where(
        drop[:, None], omega * v + (1 - omega) * u_null, omega * v + kappa * u_c + (1 - omega - kappa) * u_null
    )
    torch.testing.assert_close(res.v_tilde, want)


def test_scheduled_fraction_requires_step():
    sampler = mfl.TimePairSampler("uniform", equal_fraction=lambda k: 0.5)
    with pytest.raises(ValueError, match="step="):
        sampler.sample(8)


def test_bf16_data_gets_float32_times_and_float32_residual():
    torch.manual_seed(0)
    x = torch.randn(4096, 2).bfloat16()
    out = mfl.MeanFlowLoss(times=mfl.TimePairSampler("uniform", equal_fraction=0.0))(
        lambda z, r, t: z * 0.5, x, generator=torch.Generator().manual_seed(0)
    )
    assert out.t.dtype == torch.float32 and float(out.terms["frac_equal"]) == 0.0


def test_residual_is_taken_in_float32_for_a_bf16_network():
    """A bf16 network output is compared with the float32 target without rounding the target to bf16."""
    x = torch.randn(64, 8)
    e = torch.randn(64, 8)
    t = torch.full((64,), 0.5)
    v = e - x
    u_bf16 = (v * 1.01).bfloat16()
    out = mfl.FlowMatchingLoss(weighting=mfl.AdaptiveWeight(p=0.0))(lambda z, r, t_: u_bf16, x, t=t, noise=e)
    want = (u_bf16.float() - v).square().mean(1)
    torch.testing.assert_close(out.per_sample, want)


def test_bf16_weights_without_autocast_run_the_jvp_in_bf16():
    lin = torch.nn.Linear(2, 2).bfloat16()
    x = torch.randn(8, 2).bfloat16()
    out = mfl.MeanFlowLoss(times=mfl.TimePairSampler("uniform", equal_fraction=0.5))(
        lambda z, r, t: lin(z) * t[:, None].to(z.dtype), x, generator=torch.Generator().manual_seed(0)
    )
    assert torch.isfinite(out.loss)
