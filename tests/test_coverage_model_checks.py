"""check_model and the du/dt probe on networks built to show one finding each."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import meanflow_losses as mfl
from meanflow_losses.conditioning import Conditioning
from meanflow_losses.model_checks import RuntimeChecks, check_model, probe_time_derivative


class _NoJvp(torch.autograd.Function):
    """sin with a backward rule and no forward-mode rule."""

    @staticmethod
    def forward(x):
        return x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        return g * ctx.saved_tensors[0].cos()


class _WrongJvp(torch.autograd.Function):
    """sin whose forward-mode rule is three times too large."""

    @staticmethod
    def forward(x):
        return x.sin()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx, dx):
        (x,) = ctx.saved_tensors
        return 3 * dx * x.cos()


def _no_jvp(z, r, t):
    return _NoJvp.apply(z + t[:, None]) * (1 + r[:, None])


def _wrong_jvp(z, r, t):
    return _WrongJvp.apply(z + t[:, None]) * (1 + r[:, None])


def _x():
    return torch.randn(8, 3, generator=torch.Generator().manual_seed(0))


def _check(model, **kwargs):
    return check_model(model, _x(), generator=torch.Generator().manual_seed(1), **kwargs)


@pytest.mark.parametrize(("strategy", "severity"), [("nograd", "error"), ("finite_difference", "info")])
def test_forward_ad_failure_is_an_error_unless_the_strategy_does_not_need_it(strategy, severity):
    report = _check(_no_jvp, strategy=strategy)
    assert report.codes() == ["forward_ad_failed"]
    finding = report.findings[0]
    assert finding.severity == severity
    assert (
        "NotImplementedError: You must implement the jvp" in finding.message and f"jvp={strategy!r}" in finding.message
    )
    assert math.isnan(report.measurements["rel_mismatch"]) and math.isnan(report.measurements["ad_over_fd_t"])
    assert report.ok is (severity == "info")


def test_a_wrong_jvp_rule_is_a_time_derivative_mismatch():
    report = _check(_wrong_jvp)
    assert report.codes() == ["time_derivative_mismatch"]
    # AD = 3 FD: |AD - FD| / |AD| = 2/3
    assert report.measurements["rel_mismatch"] == pytest.approx(2 / 3, rel=1e-2)
    assert report.measurements["ad_over_fd_t"] == pytest.approx(3.0, rel=1e-2)
    with pytest.raises(ValueError, match=r"check_model found problems:\n- \[time_derivative_mismatch\]"):
        _check(_wrong_jvp, raise_on_problems=True)


def test_a_coarse_finite_difference_step_is_reported_with_its_error():
    def model(z, r, t):
        return torch.sin(8 * t)[:, None] * z + r[:, None]

    report = _check(model, strategy="finite_difference", fd_eps=0.3)
    assert report.codes() == ["finite_difference_inaccurate"]
    assert report.measurements["fd_rel_error"] > 0.3
    assert "its step is too coarse" in report.findings[0].message
    fine = _check(model, strategy="finite_difference", fd_eps=1e-3)
    assert fine.codes() == [] and fine.measurements["fd_rel_error"] < 1e-2


def test_non_finite_output_is_an_error():
    report = _check(lambda z, r, t: z * float("nan") + r[:, None])
    assert "non_finite_output" in report.codes("error")
    assert math.isnan(report.measurements["rel_mismatch"])  # not 0.0, which would read as perfect agreement


def test_a_time_dependence_below_rounding_is_inconclusive():
    report = _check(lambda z, r, t: z * (1 + r[:, None]) + 1e-20 * t[:, None])
    assert report.codes() == ["dudt_inconclusive"]
    assert report.findings[0].severity == "warning"


def test_zero_output_without_perturbation_is_a_warning_not_ignores_r():
    net = nn.Linear(3, 3)
    nn.init.zeros_(net.weight)
    nn.init.zeros_(net.bias)

    class Zero(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, z, r, t):
            return self.net(z * (1 + r[:, None] + t[:, None]))

    report = _check(Zero(), perturb_zero_init=False)
    assert "zero_output" in report.codes("warning")
    assert "ignores_r" not in report.codes()
    assert report.measurements["u_rms"] == 0.0


def test_batchnorm_in_train_mode_is_reported():
    class WithBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, z, r, t):
            return self.bn(z) * (1 + r[:, None]) + t[:, None] * z

    net = WithBN()
    before = net.bn.running_mean.clone()
    report = _check(net)
    assert "batch_statistics" in report.codes("warning")
    assert "bn" in next(f.message for f in report.findings if f.code == "batch_statistics")
    assert torch.equal(net.bn.running_mean, before)  # buffers untouched


def test_probe_reraises_a_runtime_error_that_is_not_about_dtypes():
    def model(z, r, t):
        raise RuntimeError("the network broke")

    z = torch.randn(2, 3)
    with pytest.raises(RuntimeError, match=r"the network broke"):
        probe_time_derivative(model, z, torch.zeros(2), torch.full((2,), 0.5), torch.randn(2, 3))


def test_runtime_checks_skip_a_call_without_rows():
    checks = RuntimeChecks()
    z = torch.zeros(0, 3)
    empty = torch.zeros(0)
    checks(
        mfl.adapters.from_velocity_net(lambda z, t: z),
        z,
        empty,
        empty,
        z,
        Conditioning.from_kwargs({}, 0),
        strategy="nograd",
        fd_eps=None,
        objective="MeanFlowLoss",
    )
    assert checks.seen == 0 and checks.counts == {}
