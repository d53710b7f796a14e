"""Bad input raises errors that name the argument; hypothesis fuzzes shapes, dtypes and edge times."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import meanflow_losses as mfl
from tests.nets import MLP


def _model():
    torch.manual_seed(0)
    return MLP()


LOSSES = [mfl.FlowMatchingLoss, mfl.MeanFlowLoss]


@pytest.mark.parametrize("loss_cls", LOSSES)
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(t=torch.full((3,), 0.5)), r"t must have shape \(4,\)"),
        (dict(t=torch.full((4,), 1.5)), r"t must lie in \[0, 1\]"),
        (dict(t=torch.full((4,), -0.1)), r"t must lie in \[0, 1\]"),
        (dict(t=torch.full((4,), float("nan"))), "t contains non-finite"),
        (dict(t=torch.full((4,), 0.3), r=torch.full((4,), 0.6)), "r must satisfy r <= t"),
        (dict(r=torch.full((4,), 0.3)), "r was given without t"),
        (dict(noise=torch.randn(4, 3)), r"noise must have the shape of x"),
        (dict(noise=torch.full((4, 2), float("inf"))), "noise contains non-finite"),
        (dict(v_target=torch.randn(5, 2)), "v_target must have the shape of x"),
        (dict(v_target=torch.full((4, 2), float("nan"))), "v_target contains non-finite"),
        (dict(model_kwargs=[1, 2]), "model_kwargs must be a dict"),
    ],
)
def test_bad_arguments_are_named(loss_cls, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        loss_cls()(_model(), torch.randn(4, 2), **kwargs)


@pytest.mark.parametrize("loss_cls", LOSSES)
def test_bad_data(loss_cls):
    with pytest.raises(ValueError, match="x contains non-finite"):
        loss_cls()(_model(), torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"x must have shape \(B, \*D\)"):
        loss_cls()(_model(), torch.randn(4))
    with pytest.raises(TypeError, match="x must be a floating-point"):
        loss_cls()(_model(), torch.ones(4, 2, dtype=torch.long))


@pytest.mark.parametrize("loss_cls", LOSSES)
def test_network_returning_wrong_shape(loss_cls):
    def bad(z, r, t):
        return z[:, :1]

    with pytest.raises(ValueError, match="must return a tensor of the shape of z"):
        loss_cls()(bad, torch.randn(4, 2), t=torch.full((4,), 0.5), r=torch.full((4,), 0.2))


def test_bad_objective_options():
    with pytest.raises(ValueError, match="jvp must be one of"):
        mfl.MeanFlowLoss(jvp="forward")
    with pytest.raises(ValueError, match="reduction must be one of"):
        mfl.MeanFlowLoss(reduction="none")
    with pytest.raises(TypeError, match="times must be a TimePairSampler"):
        mfl.MeanFlowLoss(times=mfl.TimeSampler())
    with pytest.raises(ValueError, match="tangent"):
        mfl.MeanFlowLoss(tangent="data")
    with pytest.raises(ValueError, match="drop_mask"):
        mfl.FlowMatchingLoss()(_model(), torch.randn(4, 2), drop_mask=torch.ones(4, dtype=torch.bool))


DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batch=st.integers(1, 9),
    extra=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    dtype=st.sampled_from(sorted(DTYPES)),
    edge=st.sampled_from(["random", "t_eq_r", "t0", "t1", "r0_t1"]),
    strategy=st.sampled_from(list(mfl.JVP_STRATEGIES)),
    reduction=st.sampled_from(["sum", "mean"]),
)
def test_fuzz_shapes_dtypes_edges(batch, extra, dtype, edge, strategy, reduction):
    dt = DTYPES[dtype]
    shape = (batch, 2, *extra)
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(shape, generator=g).to(dt)
    t = torch.rand(batch, generator=g).to(dt)
    r = (t * torch.rand(batch, generator=g).to(dt)).to(dt)
    if edge == "t_eq_r":
        r = t
    elif edge == "t0":
        t = torch.zeros(batch, dtype=dt)
        r = t
    elif edge == "t1":
        t = torch.ones(batch, dtype=dt)
    elif edge == "r0_t1":
        t, r = torch.ones(batch, dtype=dt), torch.zeros(batch, dtype=dt)

    def model(z, r_, t_):  # a smooth network of any data shape
        scale = torch.sin(3 * t_) + torch.cos(2 * r_) * 0.5
        return torch.tanh(z) * scale.reshape(-1, *([1] * (z.ndim - 1))) + z.mean()

    out = mfl.MeanFlowLoss(jvp=strategy, reduction=reduction)(model, x, t=t, r=r)
    assert out.per_sample.shape == (batch,)
    assert out.loss.ndim == 0 and bool(torch.isfinite(out.loss))
    assert out.t.dtype == dt  # explicit times are used as given
    fm = mfl.FlowMatchingLoss(reduction=reduction)(model, x, t=t)
    assert fm.per_sample.shape == (batch,) and bool(torch.isfinite(fm.loss))
    s = mfl.sample(model, torch.randn(shape, generator=g).to(dt), steps=2)
    assert s.shape == shape and s.dtype == dt


def test_value_checks_can_be_switched_off_in_a_block():
    bad_t = torch.full((4,), 1.5)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        mfl.FlowMatchingLoss()(_model(), torch.randn(4, 2), t=bad_t)
    with mfl.value_checks(False):
        mfl.FlowMatchingLoss()(_model(), torch.randn(4, 2), t=bad_t)  # no host sync, no check
        with pytest.raises(ValueError, match=r"t must have shape"):  # shape checks always run
            mfl.FlowMatchingLoss()(_model(), torch.randn(4, 2), t=torch.full((3,), 0.5))
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):  # restored after the block
        mfl.FlowMatchingLoss()(_model(), torch.randn(4, 2), t=bad_t)


def test_null_class_helper():
    import pickle

    fn = pickle.loads(pickle.dumps(mfl.null_class(10)))
    assert fn({"y": torch.tensor([1, 2]), "s": 3})["y"].tolist() == [10, 10]
    with pytest.raises(KeyError, match="'y'"):
        fn({"label": torch.tensor([1])})
    with pytest.raises(ValueError, match="num_classes"):
        mfl.null_class(0)


def test_every_objective_shares_the_call_signature():
    import inspect

    from meanflow_losses.objectives.base import COMMON_CALL_ARGS

    for cls in (mfl.FlowMatchingLoss, mfl.MeanFlowLoss, mfl.AlphaFlowLoss, mfl.SplitMeanFlowLoss, mfl.ShortcutLoss):
        params = inspect.signature(cls.__call__).parameters
        missing = [
            a for a in COMMON_CALL_ARGS if a not in params or params[a].kind is not inspect.Parameter.KEYWORD_ONLY
        ]
        assert not missing, (cls.__name__, missing)
