"""Teachers: a frozen flow model's (guided) velocity replaces e - x in every objective."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import meanflow_losses as mfl
from tests.nets import MLP
from tests.oracles import ExactAverageVelocity, gaussian_batch

F64 = torch.float64


def _draws(batch=64, dim=3, seed=0):
    x, e, g = gaussian_batch(batch, dim, seed=seed)
    t = torch.rand(batch, generator=g, dtype=F64) * 0.9 + 0.05
    r = t * torch.rand(batch, generator=g, dtype=F64)
    r[: batch // 4] = t[: batch // 4]
    return x, e, t, r, g


@pytest.mark.parametrize(
    "objective",
    [
        mfl.FlowMatchingLoss(),
        mfl.MeanFlowLoss(),
        mfl.MeanFlowLoss(jvp="joint"),
        mfl.SplitMeanFlowLoss(),
        mfl.AlphaFlowLoss(alpha=0.0),
    ],
    ids=["fm", "meanflow", "meanflow_joint", "splitmeanflow", "alphaflow_limit"],
)
def test_gaussian_oracle_losses_vanish_with_the_exact_teacher(objective):
    """Exact marginal velocity as teacher, exact average velocity as network: every loss is 0 (float64)."""
    x, e, t, r, g = _draws()
    teacher = mfl.Teacher(ExactAverageVelocity())  # u(z, t, t) is the marginal velocity
    kw = {"lam": torch.rand(64, generator=g, dtype=F64)} if isinstance(objective, mfl.SplitMeanFlowLoss) else {}
    if isinstance(objective, mfl.FlowMatchingLoss):
        r = t  # flow matching regresses the instantaneous velocity
    out = objective(ExactAverageVelocity(), x, t=t, r=r, noise=e, teacher=teacher, **kw)
    assert float(out.per_sample.abs().max()) < 1e-10
    # the same objective with e - x as the target does not vanish: the check can fail
    assert float(objective(ExactAverageVelocity(), x, t=t, r=r, noise=e, **kw).loss) > 1e-3


class Known(nn.Module):
    """A hand-built teacher: u(z | y) = z * (1 + y) with the null class y = 5 giving u = 0.5 * z."""

    def forward(self, z, r, t, y):
        scale = torch.where(y == 5, torch.full_like(y, 0.5, dtype=z.dtype), (1 + y).to(z.dtype))
        return z * scale[:, None]


def test_guided_teacher_velocity_is_the_cfg_formula():
    z = torch.randn(6, 2, dtype=F64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9, 0.95], dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 4, 1])
    teacher = mfl.Teacher(Known(), guidance_scale=3.0, interval=(0.2, 0.8), null_condition=mfl.null_class(5))
    cond = mfl.Conditioning.from_kwargs({"y": y}, 6)
    got = mfl.teachers.teacher_velocity(teacher, z, t, cond, F64)
    u_c, u_u = z * (1 + y)[:, None].to(F64), 0.5 * z
    inside = ((t >= 0.2) & (t <= 0.8))[:, None]
    torch.testing.assert_close(got, torch.where(inside, u_u + 3.0 * (u_c - u_u), u_c))


def test_dropped_rows_get_the_teachers_unconditional_velocity():
    """Through an objective: student guidance drops rows; the teacher sees their null condition."""
    x = torch.randn(8, 2, dtype=F64)
    e = torch.randn(8, 2, dtype=F64)
    t = torch.full((8,), 0.5, dtype=F64)
    y = torch.arange(8) % 5
    drop = torch.tensor([True, False] * 4)
    guidance = mfl.TrainingGuidance(omega=1.0, kappa=0.0, drop_prob=0.1, null_condition=mfl.null_class(5))
    teacher = mfl.Teacher(Known(), guidance_scale=2.0, null_condition=mfl.null_class(5))
    out = mfl.FlowMatchingLoss(guidance=guidance, weighting=mfl.AdaptiveWeight(p=0.0), reduction="sum")(
        lambda z, r, t_, y: torch.zeros_like(z),
        x,
        t=t,
        noise=e,
        model_kwargs={"y": y},
        drop_mask=drop,
        teacher=teacher,
    )
    z = 0.5 * x + 0.5 * e
    u_c = z * (1 + y)[:, None].to(F64)
    want = torch.where(drop[:, None], 0.5 * z, 0.5 * z + 2.0 * (u_c - 0.5 * z))
    torch.testing.assert_close(out.per_sample, want.square().sum(1))


def test_teacher_is_the_jvp_tangent_and_gets_no_gradient():
    torch.manual_seed(0)
    student, teacher_net = MLP().double(), MLP().double()
    x, e, t, r, _ = _draws(dim=2)
    out = mfl.MeanFlowLoss()(student, x, t=t, r=r, noise=e, teacher=teacher_net)
    out.loss.backward()
    assert all(p.grad is None for p in teacher_net.parameters())
    # du/dt along the teacher's velocity
    z = (1 - t[:, None]) * x + t[:, None] * e
    with torch.no_grad():
        v_t = teacher_net(z, t, t)
    j = r != t
    ref = mfl.time_derivative(student, z[j], r[j], t[j], v_t[j]).dudt
    torch.testing.assert_close(out.extras["dudt"][j], ref)


def test_teacher_options_are_checked():
    with pytest.raises(ValueError, match="null_condition is required"):
        mfl.Teacher(MLP(), guidance_scale=2.0)
    with pytest.raises(TypeError, match="teacher must be"):
        mfl.FlowMatchingLoss()(MLP(), torch.randn(4, 2), teacher=3)
    with pytest.raises(ValueError, match="not both"):
        mfl.FlowMatchingLoss()(MLP(), torch.randn(4, 2), teacher=MLP(), v_target=torch.randn(4, 2))
    with pytest.warns(mfl.MeanFlowWarning, match="train mode"):
        mfl.FlowMatchingLoss()(MLP(), torch.randn(4, 2), teacher=MLP().train())


def test_student_guidance_applies_on_top_of_the_teacher():
    """FM with TrainingGuidance(omega, kappa): v_tgt = omega v_T + kappa u_c + (1 - omega - kappa) u_null."""
    x = torch.randn(8, 2, dtype=F64)
    e = torch.randn(8, 2, dtype=F64)
    t = torch.full((8,), 0.5, dtype=F64)
    y = torch.arange(8) % 5
    drop = torch.zeros(8, dtype=torch.bool)
    omega, kappa = 0.6, 0.3
    guidance = mfl.TrainingGuidance(omega=omega, kappa=kappa, drop_prob=0.1, null_condition=mfl.null_class(5))
    student = Known()  # the student's own conditional / null velocities are known too
    out = mfl.FlowMatchingLoss(guidance=guidance, weighting=mfl.AdaptiveWeight(p=0.0), reduction="sum")(
        lambda z, r, t_, y: torch.zeros_like(z),
        x,
        t=t,
        noise=e,
        model_kwargs={"y": y},
        drop_mask=drop,
        teacher=mfl.Teacher(lambda z, r, t_, y: 3.0 * z),
        target_model=student,
    )
    z = 0.5 * x + 0.5 * e
    want = omega * 3.0 * z + kappa * z * (1 + y)[:, None].to(F64) + (1 - omega - kappa) * 0.5 * z
    torch.testing.assert_close(out.per_sample, want.square().sum(1))


def test_teacher_composes_with_target_model_and_bf16_autocast():
    torch.manual_seed(0)
    student, teacher_net = MLP(), MLP().eval()
    x, e, t, r, _ = _draws(dim=2)
    x, e, t, r = x.float(), e.float(), t.float(), r.float()
    loss = mfl.MeanFlowLoss()
    ref = loss(student, x, t=t, r=r, noise=e, teacher=teacher_net)
    same = loss(student, x, t=t, r=r, noise=e, teacher=teacher_net, target_model=student)
    torch.testing.assert_close(same.per_sample, ref.per_sample, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = loss(student, x, t=t, r=r, noise=e, teacher=teacher_net)
    assert half.loss.dtype == torch.float32 and bool(torch.isfinite(half.loss))
    assert abs(float(half.loss) - float(ref.loss)) < 0.05 * float(ref.loss)
    half.loss.backward()
    assert all(p.grad is None for p in teacher_net.parameters())
