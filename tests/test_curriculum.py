"""Kim et al.'s difficulty-based time sampler: the DTD easy-to-hard curriculum on ``TimePairSampler``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import meanflow_losses as mfl


def _logit_normal_cdf(t, mean=-0.4, std=1.0):
    z = (np.log(t / (1 - t)) - mean) / std
    return 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))


@pytest.mark.parametrize("name", ["logit_normal", "uniform"])
def test_stage_times_follow_the_truncated_base_distribution(name):
    from scipy import stats

    cur = mfl.DifficultyCurriculum(clusters=5, stage_steps=100)
    sampler = mfl.TimePairSampler(name, equal_fraction=0.0, curriculum=cur)
    g = torch.Generator().manual_seed(0)
    for step, lo in ((0, 0.8), (150, 0.6), (399, 0.2)):
        assert cur.lower_bound(step) == pytest.approx(lo)
        pair = sampler.sample(200_000, step=step, generator=g, dtype=torch.float64)
        assert float(pair.r.min()) >= lo and float(pair.t.min()) >= lo  # rows="all": both draws in the stage
        # t = max of two i.i.d. draws conditioned on >= lo: CDF F_lo(x)^2
        if name == "uniform":
            f = lambda x, lo=lo: np.clip((x - lo) / (1 - lo), 0, 1)  # noqa: E731
        else:
            f = lambda x, lo=lo: np.clip(  # noqa: E731
                (_logit_normal_cdf(x) - _logit_normal_cdf(lo)) / (1 - _logit_normal_cdf(lo)), 0, 1
            )
        assert stats.kstest(pair.t.numpy(), lambda x, f=f: f(x) ** 2).statistic < 0.01
        assert stats.kstest(pair.r.numpy(), lambda x, f=f: 1 - (1 - f(x)) ** 2).statistic < 0.01


def test_after_the_last_stage_the_draws_are_the_plain_samplers():
    cur = mfl.DifficultyCurriculum(clusters=4, stage_steps=10)
    with_c, plain = mfl.TimePairSampler(curriculum=cur), mfl.TimePairSampler()
    for step in (30, 1000):
        a = with_c.sample(64, step=step, generator=torch.Generator().manual_seed(3))
        b = plain.sample(64, step=step, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a.t, b.t) and torch.equal(a.r, b.r) and torch.equal(a.interval_rows, b.interval_rows)


def test_equal_rows_mode_restricts_only_the_flow_matching_rows():
    cur = mfl.DifficultyCurriculum(clusters=10, stage_steps=1, rows="equal")
    sampler = mfl.TimePairSampler(
        "uniform", equal_fraction=0.5, equal_count="truncate", equal_rows="first", curriculum=cur
    )
    pair = sampler.sample(10_000, step=0, generator=torch.Generator().manual_seed(0))
    eq = pair.r == pair.t
    assert int(eq[:5000].sum()) == 5000 and torch.equal(pair.interval_rows, torch.arange(5000, 10_000))
    assert float(pair.t[:5000].min()) >= 0.9  # stage 0 of 10 clusters: the noisiest tenth
    assert float(pair.r[5000:].min()) < 0.01  # the interval rows keep the full range
    with pytest.raises(ValueError, match=r"rows='equal'\) needs a fixed count"):
        mfl.TimePairSampler(equal_count="coin", curriculum=cur).sample(8, step=0)


def test_bad_options_and_a_missing_step_are_errors():
    with pytest.raises(ValueError, match="clusters"):
        mfl.DifficultyCurriculum(clusters=1)
    with pytest.raises(ValueError, match="stage_steps"):
        mfl.DifficultyCurriculum(stage_steps=0)
    with pytest.raises(ValueError, match="rows"):
        mfl.DifficultyCurriculum(rows="some")
    with pytest.raises(TypeError, match="DifficultyCurriculum"):
        mfl.TimePairSampler(curriculum=5)
    loss = mfl.MeanFlowLoss(times=mfl.TimePairSampler(curriculum=mfl.DifficultyCurriculum()))
    with pytest.raises(ValueError, match="step="):
        loss(lambda z, r, t: z, torch.randn(4, 2))


def test_tiny_training_with_the_progressive_interval_weight():
    """Kim et al.'s two parts together: the curriculum sampler and the progressive interval weight."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2))

    def model(z, r, t):
        return net(torch.cat([z, t[:, None], (t - r)[:, None]], 1))

    total = 60
    cur = mfl.DifficultyCurriculum(clusters=3, stage_steps=20)
    loss_fn = mfl.presets.accelerated_meanflow(
        total, times=mfl.TimePairSampler("uniform", equal_fraction=0.5, curriculum=cur), reduction="mean", min_snr=False
    )
    assert loss_fn.velocity_weight is None and loss_fn.interval_weight is not None  # the L/XL scheme: DTD + beta
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    mins = []
    for step in range(total):
        x = torch.randn(128, 2) * 0.5 + 1.0
        out = loss_fn(model, x, step=step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        assert torch.isfinite(out.loss)
        mins.append(float(out.r.min()))
    assert min(mins[:20]) >= 2 / 3 and min(mins[20:40]) >= 1 / 3 and min(mins[40:]) < 1 / 3
