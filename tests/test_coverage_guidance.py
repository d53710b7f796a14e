"""Training guidance: option checks, the single-term mixes, and the static-shape (compiled) branches run eagerly."""

from __future__ import annotations

import pytest
import torch

import meanflow_losses as mfl
from meanflow_losses import guidance as guidance_mod
from meanflow_losses.guidance import apply_guidance, draw_drop_mask

F64 = torch.float64


def _label_model(z, r, t, y):
    """u = z * (y + 1) + t: the label (the null class too) changes the output."""
    return z * (y.to(z.dtype) + 1)[:, None] + t[:, None]


def _input_model(z, r, t, y, omega, t_min, t_max):
    """A network of the guidance inputs: every input moves the output."""
    c = (y.to(z.dtype) + 1) * omega + t_min - 2 * t_max + t
    return z * c[:, None]


def _batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g, dtype=F64)
    v = torch.randn(n, 3, generator=g, dtype=F64)
    return z, v


def test_null_class_refuses_a_key_that_is_not_a_string():
    with pytest.raises(TypeError, match=r"key must be a string \(the label entry of model_kwargs\), got int"):
        mfl.null_class(10, key=3)


def test_training_guidance_refuses_a_null_condition_that_is_not_callable():
    with pytest.raises(TypeError, match=r"guidance\.null_condition must be a function model_kwargs -> model_kwargs"):
        mfl.TrainingGuidance(null_condition=5)


def test_guidance_as_input_refuses_unknown_options():
    nc = mfl.null_class(2)
    with pytest.raises(ValueError, match=r"guidance\.drop_rows must be one of \('per_row', 'first'\), got 'last'"):
        mfl.GuidanceAsInput(null_condition=nc, drop_rows="last")
    with pytest.raises(
        ValueError, match=r"guidance\.interval_test must be one of \('inclusive', 'strict'\), got 'open'"
    ):
        mfl.GuidanceAsInput(null_condition=nc, interval_test="open")


def test_guidance_as_input_strict_interval_excludes_the_bounds():
    g = mfl.GuidanceAsInput(null_condition=mfl.null_class(2), interval_test="strict")
    t = torch.tensor([0.2, 0.3, 0.5, 0.7])
    assert g.in_interval(t, 0.2, 0.7).tolist() == [False, True, True, False]
    inclusive = mfl.GuidanceAsInput(null_condition=mfl.null_class(2))
    assert inclusive.in_interval(t, 0.2, 0.7).tolist() == [True, True, True, True]


def test_draw_drop_mask_refuses_a_mask_of_another_type_or_shape():
    g = mfl.TrainingGuidance(drop_prob=0.0)
    t = torch.rand(3)
    with pytest.raises(ValueError, match=r"drop_mask must be a bool tensor of shape \(3,\), got torch\.int64 \(3,\)"):
        draw_drop_mask(g, t, 3, drop_mask=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"drop_mask must be a bool tensor of shape \(3,\), got <class 'list'>"):
        draw_drop_mask(g, t, 3, drop_mask=[False] * 3)


def test_conditional_term_only_when_the_unconditional_weight_is_zero():
    """omega + kappa = 1: v~ = omega v + kappa u(z, t, t | c), no null pass (no null condition needed)."""
    g = mfl.TrainingGuidance(omega=0.25, kappa=0.75, drop_prob=0.0)
    z, v = _batch()
    y = torch.tensor([0, 1, 2, 3])
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=F64)
    res = apply_guidance(g, _label_model, z, t, v, {"y": y})
    expected = 0.25 * v + 0.75 * _label_model(z, t, t, y)
    torch.testing.assert_close(res.v_tilde, expected)
    assert res.guided_mask.all() and not res.drop_mask.any()


def test_unconditional_term_only_when_kappa_is_zero():
    """kappa = 0: v~ = omega v + (1 - omega) u(z, t, t | null) inside the interval, v outside."""
    g = mfl.TrainingGuidance(omega=2.0, interval=(0.0, 0.5), drop_prob=0.0, null_condition=mfl.null_class(5))
    z, v = _batch()
    y = torch.tensor([0, 1, 2, 3])
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=F64)
    res = apply_guidance(g, _label_model, z, t, v, {"y": y})
    null = torch.full_like(y, 5)
    expected = v.clone()
    expected[:2] = 2.0 * v[:2] - _label_model(z[:2], t[:2], t[:2], null[:2])
    torch.testing.assert_close(res.v_tilde, expected)
    assert res.guided_mask.tolist() == [True, True, False, False]


@pytest.mark.parametrize("kappa", [0.0, 0.5])
def test_training_guidance_static_shape_branch_equals_the_eager_one(monkeypatch, kappa):
    """Traced by torch.compile every row is computed and the unguided ones kept: the same numbers as eagerly."""
    g = mfl.TrainingGuidance(
        omega=1.5, kappa=kappa, interval=(0.3, 0.8), drop_prob=0.0, null_condition=mfl.null_class(5)
    )
    z, v = _batch()
    y = torch.tensor([0, 1, 2, 3])
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=F64)
    drop = torch.tensor([False, True, False, False])
    eager = apply_guidance(g, _label_model, z, t, v, {"y": y}, drop_mask=drop)
    monkeypatch.setattr(guidance_mod, "compiling", lambda: True)
    static = apply_guidance(g, _label_model, z, t, v, {"y": y}, drop_mask=drop)
    assert eager.guided_mask.tolist() == [False, False, True, False]
    torch.testing.assert_close(static.v_tilde, eager.v_tilde)
    assert torch.equal(static.model_kwargs["y"], eager.model_kwargs["y"])
    assert static.model_kwargs["y"].tolist() == [0, 5, 2, 3]


def _input_kwargs(y):
    return {
        "y": y,
        "omega": torch.tensor([1.0, 3.0, 2.0, 4.0], dtype=F64),
        "t_min": torch.tensor([0.0, 0.2, 0.1, 0.0], dtype=F64),
        "t_max": torch.tensor([1.0, 0.9, 0.3, 1.0], dtype=F64),
    }


def test_guidance_as_input_static_shape_branch_equals_the_eager_one(monkeypatch):
    g = mfl.GuidanceAsInput(null_condition=mfl.null_class(5))
    z, v = _batch()
    y = torch.tensor([0, 1, 2, 3])
    t = torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=F64)
    drop = torch.tensor([False, False, False, True])
    tangent_rows = torch.tensor([True, True, False, False])
    eager = apply_guidance(g, _input_model, z, t, v, _input_kwargs(y), drop_mask=drop, tangent_rows=tangent_rows)
    # row 0: scale 1; row 1: guided; row 2: t outside its interval; row 3: dropped
    assert eager.guided_mask.tolist() == [False, True, False, False]
    w = torch.tensor(3.0, dtype=F64)
    v_c = _input_model(z[1:2], t[1:2], t[1:2], y[1:2], w[None], torch.zeros(1, dtype=F64), torch.ones(1, dtype=F64))
    v_u = _input_model(
        z[1:2],
        t[1:2],
        t[1:2],
        torch.tensor([5]),
        torch.ones(1, dtype=F64),
        torch.zeros(1, dtype=F64),
        torch.ones(1, dtype=F64),
    )
    expected = v.clone()
    expected[1:2] = v[1:2] + (1 - 1 / w) * (v_c - v_u)
    torch.testing.assert_close(eager.v_tilde, expected)
    monkeypatch.setattr(guidance_mod, "compiling", lambda: True)
    static = apply_guidance(g, _input_model, z, t, v, _input_kwargs(y), drop_mask=drop, tangent_rows=tangent_rows)
    torch.testing.assert_close(static.v_tilde, eager.v_tilde)
    torch.testing.assert_close(static.tangent, eager.tangent)
    assert static.model_kwargs["y"].tolist() == [0, 1, 2, 5]


def test_guidance_as_input_without_guided_rows_gives_v_as_the_tangent():
    """No row is guided and no tangent row is asked: v~ = v and the tangent is v~ (no network pass)."""
    g = mfl.GuidanceAsInput(null_condition=mfl.null_class(5))
    z, v = _batch()
    kw = _input_kwargs(torch.tensor([0, 1, 2, 3]))
    kw["omega"] = torch.ones(4, dtype=F64)

    def fail(*args, **kwargs):
        raise AssertionError("the network must not be called")

    res = apply_guidance(
        g,
        fail,
        z,
        torch.full((4,), 0.5, dtype=F64),
        v,
        kw,
        drop_mask=torch.zeros(4, dtype=torch.bool),
        tangent_rows=torch.zeros(4, dtype=torch.bool),
    )
    assert torch.equal(res.v_tilde, v) and torch.equal(res.tangent, v)
    assert not res.guided_mask.any()


def test_guidance_as_input_defaults_the_flow_matching_rows_to_every_row():
    """Without fm_rows every row gets the interval (0, 1): t_min = 0 and t_max = 1 wherever they were drawn."""
    g = mfl.GuidanceAsInput(null_condition=mfl.null_class(5), drop_prob=0.0)
    z, v = _batch()
    res = apply_guidance(
        g,
        _input_model,
        z,
        torch.full((4,), 0.5, dtype=F64),
        v,
        {"y": torch.arange(4)},
        generator=torch.Generator().manual_seed(0),
    )
    assert res.model_kwargs["t_min"].tolist() == [0.0] * 4
    assert res.model_kwargs["t_max"].tolist() == [1.0] * 4
    omega = res.model_kwargs["omega"]
    assert omega.shape == (4,) and bool(((omega >= 1) & (omega <= 8)).all())
