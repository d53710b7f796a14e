"""diffusers models through ``meanflow_losses.diffusers``: velocity networks, teachers, starting points."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")

import meanflow_losses as mfl  # noqa: E402
from meanflow_losses.conditioning import Conditioning  # noqa: E402
from meanflow_losses.diffusers import DiffusersAdapter, from_diffusers, with_interval_embedding  # noqa: E402
from meanflow_losses.teachers import teacher_velocity  # noqa: E402

B = 4


# ------------------------------------------------------------------------------------------------------ tiny models
def tiny_unet(**overrides):
    """UNet2DModel with one attention down and up block (GroupNorm after attention), 3 channels, 8 x 8."""
    from benchmarks.time_scale import TINY_UNET

    torch.manual_seed(0)
    cfg = {**TINY_UNET, **overrides}
    return diffusers.UNet2DModel(**cfg)


def tiny_dit(out_channels=8):
    """DiTTransformer2DModel with a learned-variance head (out_channels = 2 in_channels), 10 classes."""
    torch.manual_seed(0)
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=out_channels,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )


def tiny_sd3():
    """SD3Transformer2DModel: 2 joint blocks, text tokens of width 16, pooled projections of width 12."""
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=12,
        pos_embed_max_size=8,
    )


def _cases():
    g = torch.Generator().manual_seed(1)
    return {
        "unet": (lambda: tiny_unet(), (3, 8, 8), {}),
        "unet_interval": (lambda: tiny_unet(class_embed_type="timestep"), (3, 8, 8), {}),
        "dit": (lambda: tiny_dit().eval(), (4, 8, 8), {"class_labels": torch.randint(0, 10, (B,), generator=g)}),
        "sd3": (
            tiny_sd3,
            (4, 8, 8),
            {"encoder_hidden_states": torch.randn(B, 5, 16, generator=g), "pooled_projections": torch.randn(B, 12)},
        ),
    }


CASES = _cases()


def _draws(shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *shape, generator=g, dtype=dtype)
    e = torch.randn(B, *shape, generator=g, dtype=dtype)
    t = (0.2 + 0.6 * torch.rand(B, generator=g, dtype=torch.float64)).to(torch.promote_types(dtype, torch.float32))
    r = t * torch.rand(B, generator=g, dtype=t.dtype)
    return x, e, t, r


def _z(x, e, t):
    tt = t.to(x.dtype).view(-1, 1, 1, 1)
    return (1 - tt) * x + tt * e


def _raw(net, z, t, **kw):
    """The diffusers model called as its pipelines call it: timestep = 1000 sigma."""
    return net(z, timestep=1000 * t, return_dict=False, **kw)[0]


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---------------------------------------------------------------------------------------------------- the protocol
@pytest.mark.slow
def test_importing_the_package_does_not_import_diffusers():
    code = (
        "import sys, meanflow_losses, meanflow_losses.diffusers; "
        "assert 'diffusers' not in sys.modules, sorted(m for m in sys.modules if 'diffusers' in m)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=Path(__file__).resolve().parents[1])


@pytest.mark.parametrize("name", list(CASES))
def test_r_equals_t_output_is_the_raw_model_at_1000_t(name):
    """(a) Exact: u(z, t, t) = net(z, timestep = 1000 t) (first half of a learned-variance head)."""
    build, shape, kw = CASES[name]
    net = build()
    model = from_diffusers(net)
    x, e, t, _ = _draws(shape)
    z = _z(x, e, t)
    with torch.no_grad():
        got = model(z, t, t, **kw)
        extra = {"class_labels": torch.zeros_like(t)} if name == "unet_interval" else {}
        want = _raw(net, z, t, **kw, **extra)[:, : shape[0]]
    assert torch.equal(got, want)
    assert model.ignores_r is (name != "unet_interval")
    assert mfl.adapters.ignores_r(model) is model.ignores_r


def test_adapter_shares_the_models_names_and_state():
    net = tiny_unet(class_embed_type="timestep")
    model = from_diffusers(net)
    assert list(model.state_dict()) == list(net.state_dict())
    assert [(n, id(p)) for n, p in model.named_parameters()] == [(n, id(p)) for n, p in net.named_parameters()]
    other = tiny_unet(class_embed_type="timestep")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    model.load_state_dict(other.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), other.parameters(), strict=True))
    model.eval()
    assert not net.training
    assert "timestep_scale=1000" in model.extra_repr()


def test_y_is_an_alias_of_class_labels():
    net = tiny_dit().eval()
    model = from_diffusers(net)
    x, _, t, _ = _draws((4, 8, 8))
    y = torch.arange(B)
    with torch.no_grad():
        assert torch.equal(model(x, t, t, y=y), model(x, t, t, class_labels=y))


# ------------------------------------------------------------------------------------------------------ training
def _train(model, objective, shape, kw, steps=3):
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, *shape, generator=g)
    kw8 = {k: torch.cat([v, v]) for k, v in kw.items()}
    losses = []
    for _ in range(steps):
        out = objective(model, x, model_kwargs=kw8, generator=g)
        opt.zero_grad()
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(gr is not None and bool(torch.isfinite(gr).all()) for gr in grads)
        assert sum(float(gr.abs().sum()) for gr in grads) > 0
        opt.step()
        losses.append(float(out.loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    return losses


def test_unet_with_timestep_class_embedding_trains_under_meanflow():
    """(b) MeanFlow through the interval route: finite gradients reach the class (interval) embedding."""
    net = tiny_unet(class_embed_type="timestep")
    model = from_diffusers(net, timestep_scale=1.0)
    objective = mfl.MeanFlowLoss(times=mfl.TimePairSampler("uniform", equal_fraction=0.5), runtime_checks=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 8, 8, generator=g)
    for _ in range(3):
        out = objective(model, x, generator=g)
        opt.zero_grad()
        out.loss.backward()
        assert bool(torch.isfinite(out.loss))
        assert all(bool(torch.isfinite(p.grad).all()) for p in net.parameters() if p.grad is not None)
        assert float(net.class_embedding.linear_1.weight.grad.abs().sum()) > 0
        opt.step()


@pytest.mark.parametrize("name", ["dit", "sd3"])
def test_transformers_train_by_flow_matching_and_meanflow_refuses_them(name):
    """(b) Velocity-only adapters: flow matching trains; MeanFlow on r != t rows is a clear error (no interval)."""
    build, shape, kw = CASES[name]
    model = from_diffusers(build())
    _train(model, mfl.FlowMatchingLoss(), shape, kw, steps=2)
    with pytest.raises(ValueError, match="ignores r"):
        mfl.MeanFlowLoss()(model, torch.randn(8, *shape), model_kwargs={k: torch.cat([v, v]) for k, v in kw.items()})


# ----------------------------------------------------------------------------------------------------------- JVP
def _sinusoid(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1, max_period=10000):
    """diffusers' sinusoidal timestep projection, in the timesteps' own dtype (diffusers casts to float32)."""
    half = embedding_dim // 2
    k = torch.arange(half, dtype=timesteps.dtype, device=timesteps.device)
    freqs = torch.exp(-math.log(max_period) * k / (half - downscale_freq_shift))
    arg = scale * timesteps[:, None] * freqs[None]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if embedding_dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


@pytest.fixture
def float64_time_projection(monkeypatch):
    """Make diffusers' time projection keep float64 (it casts to float32), for the float64 reference only."""
    from diffusers.models import embeddings

    ts = torch.tensor([0.0, 3.7, 512.25, 999.0])
    for flip, shift in [(True, 0), (True, 1), (False, 1)]:
        want = embeddings.get_timestep_embedding(ts, 32, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        got = _sinusoid(ts.double(), 32, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        assert torch.allclose(got.float(), want, atol=2e-4)  # the same function (float32 rounding at 1000 rad)
    monkeypatch.setattr(embeddings, "get_timestep_embedding", _sinusoid)


def _fd_dudt(model, z, r, t, v, kw, eps=1e-6):
    """Central float64 difference of u along (dz, dr, dt) = (v, 0, 1)."""
    with torch.no_grad():
        plus = model(z + eps * v, r, t + eps, **kw)
        minus = model(z - eps * v, r, t - eps, **kw)
    return (plus - minus) / (2 * eps)


@pytest.mark.parametrize(("name", "scale"), [("unet_interval", 1000.0), ("unet_interval", 1.0), ("dit", 1000.0)])
def test_default_jvp_matches_a_float64_finite_difference(name, scale, float64_time_projection):
    """(c) du/dt of the default JVP (float32, forward AD through attention and GroupNorm) vs a float64 difference."""
    build, shape, kw = CASES[name]
    net = build()
    model = from_diffusers(net, timestep_scale=scale)
    x, e, t, r = _draws(shape)
    if model.ignores_r:
        r = t
    z, v = _z(x, e, t), e - x
    got = mfl.time_derivative(model, z, r, t, v, kw).dudt
    model64 = from_diffusers(copy.deepcopy(net).double(), timestep_scale=scale)
    ref = _fd_dudt(model64, z.double(), r.double(), t.double(), v.double(), kw)
    assert float(ref.abs().max()) > 1e-2
    assert _rel(got, ref) < 2e-3
    ad64 = mfl.time_derivative(model64, z.double(), r.double(), t.double(), v.double(), kw).dudt
    assert _rel(ad64, ref) < 1e-6


# ------------------------------------------------------------------------------------------------------- teachers
@pytest.mark.parametrize("name", ["unet", "dit", "sd3"])
def test_each_model_serves_as_a_teacher(name):
    """(d) The teacher velocity is the raw model's at timestep = 1000 t, and FM on the teacher itself is 0."""
    build, shape, kw = CASES[name]
    net = build().eval()
    teacher = mfl.Teacher(from_diffusers(net).requires_grad_(False))
    x, e, t, _ = _draws(shape)
    z = _z(x, e, t)
    v_t = teacher_velocity(teacher, z, t, Conditioning.from_kwargs(kw, B), x.dtype)
    with torch.no_grad():
        assert torch.equal(v_t, _raw(net, z, t, **kw)[:, : shape[0]])
    out = mfl.FlowMatchingLoss()(teacher.model, x, t=t, noise=e, model_kwargs=kw, teacher=teacher)
    assert float(out.per_sample.abs().max()) == 0.0


def test_unet_teacher_distils_into_a_meanflow_unet_student():
    teacher = mfl.Teacher(from_diffusers(tiny_unet().eval()).requires_grad_(False))
    student = from_diffusers(tiny_unet(class_embed_type="timestep"))
    x = torch.randn(8, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    out = mfl.MeanFlowLoss(runtime_checks=False)(student, x, teacher=teacher, generator=g)
    out.loss.backward()
    assert bool(torch.isfinite(out.loss))


# ------------------------------------------------------------------------------------------------ interval routing
def test_interval_routes_to_the_timestep_class_embedding():
    """(e) class_labels = 1000 (t - r) exactly; r = t is the model at class_labels = 0; the output moves with r."""
    net = tiny_unet(class_embed_type="timestep")
    model = from_diffusers(net, interval="class_embedding")
    x, e, t, r = _draws((3, 8, 8))
    z = _z(x, e, t)
    with torch.no_grad():
        u = model(z, r, t)
        assert torch.equal(u, _raw(net, z, t, class_labels=(t - r) * 1000.0))
        assert torch.equal(model(z, t, t), _raw(net, z, t, class_labels=torch.zeros_like(t)))
        assert _rel(u, model(z, t, t)) > 1e-3
        half = from_diffusers(net, interval_scale=1.0)
        assert torch.equal(half(z, r, t), _raw(net, z, t, class_labels=t - r))


def test_with_interval_embedding_starts_from_the_fm_model_exactly():
    """A pretrained FM UNet2DModel gets a zero-initialised interval embedding: equal for every (r, t) at init."""
    fm = tiny_unet()
    mf_net = with_interval_embedding(fm)
    assert set(mf_net.state_dict()) - set(fm.state_dict()) == {k for k in mf_net.state_dict() if "class_emb" in k}
    fm_model, mf_model = from_diffusers(fm), from_diffusers(mf_net)
    assert not mf_model.ignores_r and fm_model.ignores_r
    x, e, t, r = _draws((3, 8, 8))
    z = _z(x, e, t)
    with torch.no_grad():
        assert torch.equal(mf_model(z, r, t), fm_model(z, r, t))
        assert torch.equal(mf_model(z, t, t), fm_model(z, t, t))
    out = mfl.MeanFlowLoss(runtime_checks=False)(mf_model, x, t=t, r=r, noise=e)
    out.loss.backward()
    assert float(mf_net.class_embedding.linear_2.weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="without class embedding"):
        with_interval_embedding(mf_net)


# --------------------------------------------------------------------------------------------------- check_model
def test_check_model_reports_the_timestep_1000_embedding():
    """``t * 1000`` is reported as a high-frequency time embedding; ``timestep_scale=1`` is not (DiT: velocity-only,
    so ``ignores_r`` is reported too; the UNet2DModel's runtime warning is in the slow test below)."""
    net = tiny_dit().eval()
    x = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = {"class_labels": torch.arange(8) % 10}
    low = mfl.check_model(from_diffusers(net, timestep_scale=1.0), x, model_kwargs=kw, rows=4)
    assert low.codes("error") == ["ignores_r"], low
    high = mfl.check_model(from_diffusers(net), x, model_kwargs=kw, rows=4)
    assert set(high.codes("error")) == {"ignores_r", "high_frequency_time"}, high


# -------------------------------------------------------------------------------------------------------- errors
def test_unsupported_models_and_settings_are_clear_errors():
    """(f)"""
    with pytest.raises(TypeError, match="supports UNet2DModel"):
        from_diffusers(nn.Linear(2, 2))
    unet = tiny_unet()
    with pytest.raises(ValueError, match="DDPM/VP"):
        from_diffusers(unet, prediction="epsilon")
    with pytest.raises(ValueError, match="must be 'velocity'"):
        from_diffusers(unet, prediction="flow")
    with pytest.raises(ValueError, match="not a flow-matching scheduler"):
        from_diffusers(unet, scheduler=diffusers.DDPMScheduler())
    fm = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=500, shift=3.0)
    assert from_diffusers(unet, scheduler=fm).timestep_scale == 500.0
    with pytest.raises(ValueError, match="disagrees"):
        from_diffusers(unet, scheduler=fm, timestep_scale=1000.0)
    with pytest.raises(ValueError, match="positive finite"):
        from_diffusers(unet, timestep_scale=0.0)
    with pytest.raises(ValueError, match="fourier"):
        from_diffusers(tiny_unet(time_embedding_type="fourier", flip_sin_to_cos=False, block_out_channels=(16, 16)))
    with pytest.raises(ValueError, match="learned"):
        from_diffusers(tiny_unet(time_embedding_type="learned", num_train_timesteps=1000))
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        from_diffusers(unet, interval="class_embedding")
    with pytest.raises(ValueError, match="no spare embedding"):
        from_diffusers(tiny_dit(), interval="class_embedding")
    with pytest.raises(ValueError, match="interval must be"):
        from_diffusers(unet, interval="t_minus_r")
    with pytest.raises(ValueError, match="out_channels=5"):
        from_diffusers(tiny_unet(out_channels=5))
    with pytest.raises(ValueError, match="first_half"):
        from_diffusers(unet, output="first_half")
    with pytest.raises(ValueError, match="output='all'"):
        from_diffusers(tiny_dit(), output="all")
    with pytest.raises(ValueError, match="already an adapter"):
        DiffusersAdapter(from_diffusers(unet))  # type: ignore[arg-type]
    x, _, t, _ = _draws((3, 8, 8))
    routed = from_diffusers(tiny_unet(class_embed_type="timestep"))
    with pytest.raises(ValueError, match="feeds the interval"):
        routed(x, t, t, class_labels=t)
    with pytest.raises(ValueError, match="computes it"):
        routed(x, t, t, timestep=t)
    dit = from_diffusers(tiny_dit().eval())
    x4 = torch.randn(B, 4, 8, 8)
    with pytest.raises(ValueError, match="needs class labels"):
        dit(x4, t, t)
    with pytest.raises(ValueError, match="both 'y' and 'class_labels'"):
        dit(x4, t, t, y=torch.zeros(B, dtype=torch.long), class_labels=torch.zeros(B, dtype=torch.long))
    with pytest.raises(ValueError, match="text embeddings"):
        from_diffusers(tiny_sd3())(x4, t, t, pooled_projections=torch.randn(B, 12))


def test_label_dropout_off_makes_a_train_mode_dit_deterministic():
    net = tiny_dit()
    x, _, t, _ = _draws((4, 8, 8))
    y = torch.arange(B)
    with torch.no_grad():
        want = from_diffusers(net).eval()(x, t, t, y=y)
        model = from_diffusers(net, label_dropout=False).train()
        assert all(torch.equal(model(x, t, t, y=y), want) for _ in range(8))


@pytest.mark.slow
def test_meanflow_runtime_check_warns_about_timestep_1000():
    """The objective's own probe warns within its first calls for ``t * 1000``, not for ``timestep_scale=1``."""
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    times = mfl.TimePairSampler("uniform", equal_fraction=0.0)
    with pytest.warns(mfl.MeanFlowWarning, match="high-frequency"):
        loss = mfl.MeanFlowLoss(times=times)
        model = from_diffusers(tiny_unet(class_embed_type="timestep"))
        for _ in range(4):
            loss(model, x, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", mfl.MeanFlowWarning)
        loss = mfl.MeanFlowLoss(times=times)
        model = from_diffusers(tiny_unet(class_embed_type="timestep"), timestep_scale=1.0)
        for _ in range(4):
            loss(model, x, generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
def test_time_scale_benchmark_runs_tiny():
    from benchmarks import time_scale

    res = time_scale.main(["--tiny", "--models", "dit"])
    assert res["dit@1000"]["init"]["dudt/u"] > 5 * res["dit@1"]["init"]["dudt/u"]
    assert "high_frequency_time" in res["dit@1000"]["init"]["warn"] and not res["dit@1"]["init"]["warn"]


# ------------------------------------------------------------------------------ transformers with an added interval
@pytest.mark.slow
@pytest.mark.parametrize("name", ["dit", "sd3"])
def test_transformer_with_interval_embedding_starts_from_the_fm_model_and_trains_under_meanflow(name):
    """A DiT / SD3 copy with a zero-initialised E_h added to every timestep embedding: equal to the FM model for
    every (r, t) at init, r-dependent once E_h moves, MeanFlow trains it and gradients reach E_h."""
    build, shape, kw = CASES[name]
    fm = build()
    mf_net = with_interval_embedding(fm)
    added = set(mf_net.state_dict()) - set(fm.state_dict())
    assert added and all(k.startswith("mfl_interval_embedder.") for k in added)
    fm_model, mf_model = from_diffusers(fm), from_diffusers(mf_net)
    assert mf_model.interval == "added_embedding" and not mf_model.ignores_r and fm_model.ignores_r
    x, e, t, r = _draws(shape)
    z = _z(x, e, t)
    with torch.no_grad():
        assert torch.equal(mf_model(z, r, t, **kw), fm_model(z, t, t, **kw))
        assert torch.equal(_raw(mf_net, z, t, **kw), _raw(fm, z, t, **kw))  # diffusers' own call: r = t
    objective = mfl.MeanFlowLoss(times=mfl.TimePairSampler("uniform", equal_fraction=0.5), runtime_checks=False)
    opt = torch.optim.Adam(mf_model.parameters(), lr=1e-2)
    kw2 = {k: torch.cat([v, v]) for k, v in kw.items()}
    for _ in range(2):
        out = objective(mf_model, torch.randn(2 * B, *shape), model_kwargs=kw2)
        opt.zero_grad()
        out.loss.backward()
        assert bool(torch.isfinite(out.loss))
        assert float(mf_net.mfl_interval_embedder.timestep_embedder.linear_2.weight.grad.abs().sum()) > 0
        opt.step()
    with torch.no_grad():
        assert not torch.allclose(mf_model(z, r, t, **kw), mf_model(z, t, t, **kw))  # now r matters
        bare = _raw(mf_net, z, t, **kw)[:, : shape[0]]  # diffusers' own call (velocity half of a DiT's head)
        assert torch.equal(mf_model(z, t, t, **kw), bare)  # a bare call is the model at r = t
        ema = copy.deepcopy(mf_model)  # the copy's hooks read the copy's interval, not the original's
        assert torch.equal(ema(z, r, t, **kw), mf_model(z, r, t, **kw))
    with pytest.raises(ValueError, match="already has an interval embedding"):
        with_interval_embedding(mf_net)
    with pytest.raises(ValueError, match="needs a model made by with_interval_embedding"):
        from_diffusers(fm, interval="added_embedding")


def test_transformer_interval_embedding_jvp_matches_a_float64_finite_difference(float64_time_projection):
    build, shape, kw = CASES["dit"]
    mf_net = with_interval_embedding(build())
    with torch.no_grad():
        for p in mf_net.mfl_interval_embedder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model = from_diffusers(mf_net)
    x, e, t, r = _draws(shape)
    z, v = _z(x, e, t), e - x
    model64 = from_diffusers(copy.deepcopy(mf_net).double())
    ref = _fd_dudt(model64, z.double(), r.double(), t.double(), v.double(), kw)
    ad64 = mfl.time_derivative(model64, z.double(), r.double(), t.double(), v.double(), kw).dudt
    assert _rel(ad64, ref) < 1e-6
    assert _rel(mfl.time_derivative(model, z, r, t, v, kw).dudt, ref) < 2e-3
