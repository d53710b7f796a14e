"""Accelerated MeanFlow training (Kim et al.): progressive interval weight and Min-SNR, composed with objectives."""

from __future__ import annotations

import pytest
import torch

import meanflow_losses as mfl
from meanflow_losses.weighting import expected_gap
from tests.nets import MLP

F64 = torch.float64


def test_lambda_from_the_sampler():
    assert mfl.ProgressiveIntervalWeight(100).lam_resolved == pytest.approx(1.3045, abs=5e-4)  # reference: ~1.304
    assert mfl.ProgressiveIntervalWeight(100, times=mfl.TimePairSampler("uniform")).lam_resolved == pytest.approx(1.5)
    assert mfl.ProgressiveIntervalWeight(100, lam=2.0).lam_resolved == 2.0
    # the quadrature agrees with a Monte Carlo estimate for another logit-normal
    sampler = mfl.TimePairSampler("logit_normal", mean=0.5, std=1.7, equal_fraction=0.0)
    pair = sampler.sample(400_000, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert expected_gap(sampler) == pytest.approx((pair.t - pair.r).mean().item(), abs=2e-3)


def test_beta_has_mean_one_at_step_zero():
    beta = mfl.ProgressiveIntervalWeight(total_steps=1000)  # default sampler: logit-normal(-0.4, 1.0)
    pair = mfl.TimePairSampler(equal_fraction=0.0).sample(1_000_000, generator=torch.Generator().manual_seed(0))
    w = beta(pair.t, pair.r, 0)
    assert abs(w.double().mean().item() - 1.0) < 0.01
    # short gaps dominate at the start; the weight is uniform from T on
    torch.testing.assert_close(w, beta.lam_resolved * (1 - (pair.t - pair.r)))
    assert torch.equal(beta(pair.t, pair.r, 1000), torch.ones_like(pair.t))
    assert torch.equal(beta(pair.t, pair.r, 5000), torch.ones_like(pair.t))


def test_beta_formula_between_the_ends():
    t = torch.tensor([0.9, 0.5, 0.3], dtype=F64)
    r = torch.tensor([0.1, 0.5, 0.0], dtype=F64)
    for k, step in ((1.0, 250), (2.0, 500), (0.5, 900)):
        beta = mfl.ProgressiveIntervalWeight(1000, k=k, lam=1.3)
        s = 1 - (step / 1000) ** k
        torch.testing.assert_close(beta(t, r, step), 1 - s + 1.3 * s * (1 - (t - r)))
    with pytest.raises(ValueError, match="step"):
        mfl.ProgressiveIntervalWeight(1000)(t, r, None)
    with pytest.raises(ValueError, match="total_steps"):
        mfl.ProgressiveIntervalWeight(0)
    with pytest.raises(ValueError, match="k must lie in"):
        mfl.ProgressiveIntervalWeight(10, k=0.0)


def test_min_snr_forms():
    t = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.9, 1.0], dtype=F64)
    w = mfl.MinSNRWeight(gamma=5.0)(t, t, None)
    inner = t[1:-1]
    snr = ((1 - inner) / inner) ** 2
    torch.testing.assert_close(w[1:-1], torch.clamp(snr, max=5.0) / (snr + 1))
    w0 = mfl.MinSNRWeight(gamma=5.0, form="x0_matched")(t, t, None)
    torch.testing.assert_close(w0[1:-1], torch.clamp(snr, max=5.0) * inner**2)
    assert torch.isfinite(w).all() and w[0] == 0 and w[-1] == 0 and w0[0] == 0 and w0[-1] == 0
    with pytest.raises(ValueError, match="gamma"):
        mfl.MinSNRWeight(gamma=0.0)
    with pytest.raises(ValueError, match="form"):
        mfl.MinSNRWeight(form="eps")


def _setup():
    torch.manual_seed(0)
    model = MLP(dim=3, width=32).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g, dtype=F64)
    e = torch.randn(64, 3, generator=g, dtype=F64)
    pair = mfl.TimePairSampler(equal_fraction=0.5).sample(64, generator=g, dtype=F64)
    return model, x, e, pair.t, pair.r


@pytest.mark.parametrize("objective", ["meanflow", "alphaflow", "alphaflow_mf"])
def test_weights_compose_after_adaptive_normalization_on_their_rows(objective):
    model, x, e, t, r = _setup()
    times = mfl.TimePairSampler(equal_fraction=0.5)
    beta = mfl.ProgressiveIntervalWeight(total_steps=100, times=times)
    snr = mfl.MinSNRWeight(5.0)

    def make(**hooks):
        if objective == "meanflow":
            return mfl.MeanFlowLoss(times=times, **hooks)
        alpha = 0.5 if objective == "alphaflow" else 0.0
        return mfl.AlphaFlowLoss(alpha=alpha, times=times, **hooks)

    step = 30
    plain = make()(model, x, t=t, r=r, noise=e, step=step)
    acc = make(interval_weight=beta, velocity_weight=snr)(model, x, t=t, r=r, noise=e, step=step)
    expected = torch.where(r != t, beta(t, r, step), snr(t, r, step))
    torch.testing.assert_close(acc.per_sample / plain.per_sample, expected, rtol=1e-10, atol=0)
    assert (r != t).any() and (r == t).any()


def test_accelerated_meanflow_preset():
    mf = mfl.presets.accelerated_meanflow(total_steps=1000, reduction="mean")
    assert isinstance(mf, mfl.MeanFlowLoss) and mf.reduction == "mean"
    assert isinstance(mf.interval_weight, mfl.ProgressiveIntervalWeight)
    assert mf.interval_weight.lam_resolved == pytest.approx(1.3045, abs=5e-4)
    assert isinstance(mf.velocity_weight, mfl.MinSNRWeight) and mf.velocity_weight.gamma == 5.0
    model, x, e, t, r = _setup()
    out = mf(model, x, t=t, r=r, noise=e, step=10)
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match="training step"):
        mf(model, x, t=t, r=r, noise=e)
