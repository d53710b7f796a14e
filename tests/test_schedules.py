"""Schedules (step -> value) and the published alpha-Flow presets."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import meanflow_losses as mfl
from meanflow_losses.schedules import Constant, Linear, Sigmoid, Step


def _reference_alpha(k: float, ks: int, ke: int, gamma: float = 25.0) -> float:
    """alpha(k) = 1 - sigmoid(gamma (k - (ks + ke)/2) / (ke - ks)), computed independently."""
    x = gamma * (k - (ks + ke) / 2) / (ke - ks)
    return 1.0 - 1.0 / (1.0 + math.exp(-x))


def test_sigmoid_endpoints_midpoint_and_clamps():
    ks, ke = 100_000, 500_000
    s = Sigmoid(start=ks, end=ke, gamma=25.0)
    # clamps outside the window
    assert s(0) == 1.0 and s(ks - 1) == 1.0
    assert s(ke + 1) == 0.0 and s(10**9) == 0.0
    # endpoints follow the formula (within sigmoid(-12.5) = 3.7e-6 of 1 and 0)
    assert s(ks) == pytest.approx(_reference_alpha(ks, ks, ke), abs=1e-15)
    assert s(ke) == pytest.approx(_reference_alpha(ke, ks, ke), abs=1e-15)
    assert 1 - s(ks) == pytest.approx(1 / (1 + math.exp(12.5)), rel=1e-12)
    assert s(ke) == pytest.approx(1 / (1 + math.exp(12.5)), rel=1e-12)
    # midpoint and interior
    assert s((ks + ke) // 2) == 0.5
    for k in (150_000, 280_000, 333_333, 420_000):
        assert s(k) == pytest.approx(_reference_alpha(k, ks, ke), rel=1e-12)
    values = [s(k) for k in range(0, 600_000, 10_000)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    # steepness
    assert Sigmoid(ks, ke, gamma=5.0)(150_000) < s(150_000)


def test_eta_clamps_on_the_sigmoid():
    ks, ke, eta = 0, 400_000, 5e-3
    af = mfl.AlphaFlowLoss(alpha=Sigmoid(ks, ke), eta=eta)
    # alpha = eta where gamma (k - mid) / (ke - ks) = log((1 - eta) / eta)
    k_low = (ks + ke) / 2 + math.log((1 - eta) / eta) / 25.0 * (ke - ks)
    k_high = (ks + ke) / 2 - math.log((1 - eta) / eta) / 25.0 * (ke - ks)
    assert af.alpha_at(int(k_low) - 1) > 0 and af.alpha_at(int(k_low) + 1) == 0.0
    assert af.alpha_at(int(k_high) - 1) == 1.0 and af.alpha_at(int(k_high) + 1) < 1.0
    assert af.regime_at(0) == "trajectory_fm" and af.regime_at(200_000) == "consistency"
    assert af.regime_at(400_000) == "meanflow"


def test_constant_step_linear():
    assert Constant(0.25)(0) == 0.25 and Constant(0.25)(10**7) == 0.25
    st = Step(at=50, before=0.75, after=0.25)
    assert st(49) == 0.75 and st(50) == 0.25 and st(10**6) == 0.25
    lin = Linear(start=10, end=20, initial=1.0, final=0.0)
    assert lin(0) == 1.0 and lin(15) == 0.5 and lin(20) == 0.0 and lin(99) == 0.0


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Sigmoid(start=10, end=10), "end must be > start"),
        (lambda: Sigmoid(start=-1, end=10), "start must be >= 0"),
        (lambda: Sigmoid(start=0, end=10, gamma=0.0), "gamma"),
        (lambda: Sigmoid(start=0.5, end=10), "start must be an integer"),
        (lambda: Constant(float("nan")), "value"),
        (lambda: Step(at=-3), "at must be"),
        (lambda: Linear(start=5, end=1), "end must be > start"),
    ],
)
def test_bad_schedules_are_named(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_scheduled_equal_fraction_in_the_sampler():
    sampler = mfl.TimePairSampler("uniform", equal_fraction=Sigmoid(0, 100, initial=0.5, final=0.25))
    assert sampler.num_equal(100, step=0) == 49  # floor(0.4999963 * 100)
    assert sampler.num_equal(100, step=50) == 37
    assert sampler.num_equal(100, step=101) == 25


# --- presets ---------------------------------------------------------------------------------------------------------


def _null(kw):
    return {**kw, "y": torch.full_like(kw["y"], 1000)}


def test_b2_preset():
    af = mfl.presets.alphaflow_preset("B/2")
    assert af.guidance is None and af.reduction == "mean" and af.eta == 5e-3 and af.target_clip == 4.0
    assert af.weighting == mfl.AdaptiveWeight(p=1.0, c=1e-3)
    assert (af.times.name, af.times.mean, af.times.std, af.times.equal_fraction) == ("logit_normal", -0.4, 1.0, 0.5)
    assert af.times.equal_draw == "single"  # official code: the r = t rows get their own draw
    assert af.alpha == Sigmoid(0, 400_000, gamma=25.0)
    assert af.regime_at(0) == "trajectory_fm" and af.regime_at(200_000) == "consistency"
    assert af.regime_at(400_000) == "meanflow"


def test_cfg_presets():
    b2 = mfl.presets.alphaflow_preset("B/2-cfg", null_condition=_null)
    assert b2.times.equal_fraction == 0.25 and b2.alpha == Sigmoid(0, 1_200_000)
    g = b2.guidance
    assert (g.omega, g.kappa, g.interval, g.drop_prob, g.drop_only_in_interval) == (1.0, 0.5, (0.0, 1.0), 0.1, True)
    xl = mfl.presets.alphaflow_preset("XL/2-cfg", null_condition=_null, jvp="finite_difference")
    assert xl.jvp == "finite_difference" and xl.times.equal_fraction == 0.5
    assert xl.alpha == Sigmoid(600_000, 1_000_000)
    assert xl.regime_at(599_999) == "trajectory_fm" and xl.regime_at(800_000) == "consistency"
    assert xl.regime_at(1_000_000) == "meanflow"
    g = xl.guidance
    assert (g.omega, g.kappa, g.interval, g.drop_prob) == (0.2, 0.92, (0.0, 0.75), 0.1)
    assert g.effective_scale == pytest.approx(2.5)
    preset = mfl.presets.ALPHAFLOW_PRESETS["XL/2-cfg"]
    assert (preset.total_steps, preset.lr, preset.betas, preset.grad_clip, preset.ema_half_life) == (
        1_200_000,
        1e-4,
        (0.9, 0.95),
        16.0,
        6931.0,
    )
    with pytest.raises(ValueError, match="null_condition"):
        mfl.presets.alphaflow_preset("XL/2-cfg")
    with pytest.raises(ValueError, match="name must be one of"):
        mfl.presets.alphaflow_preset("S/2")


def test_preset_runs_on_a_conditional_model():
    from tests.nets import MLP

    torch.manual_seed(0)
    model = MLP(dim=2, width=16, n_classes=1000)
    af = mfl.presets.alphaflow_preset("XL/2-cfg", null_condition=_null)
    x = torch.randn(32, 2)
    y = torch.randint(0, 1000, (32,))
    for step in (0, 800_000, 1_100_000):
        out = af(model, x, model_kwargs={"y": y}, step=step)
        assert torch.isfinite(out.loss) and out.extras["regime"] == af.regime_at(step)
