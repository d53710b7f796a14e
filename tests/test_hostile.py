"""Hostile setups: networks and habits we did not design, each right or refused loudly (issue: no silent wrong answer).

Every case either matches a reference (eager / eval mode / float32 / a closure without the trap; the tolerance is
stated at the assertion) or raises / warns with a message that names the cause.
"""

from __future__ import annotations

import functools
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import meanflow_losses as mfl
from meanflow_losses.jvp import finite_difference_points, time_derivative
from meanflow_losses.model_checks import MeanFlowWarning
from tests import zoo
from tests.nets import MLP, central_fd_dudt

F64 = torch.float64
STRATEGIES = list(mfl.JVP_STRATEGIES)
NULL = mfl.null_class(3)


def draws(batch=16, dim=2, seed=0, equal=0.25, dtype=torch.float32, shape=None):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, dim) if shape is None else (batch, *shape)
    x = torch.randn(shape, generator=g, dtype=dtype)
    e = torch.randn(shape, generator=g, dtype=dtype)
    t = (torch.rand(batch, generator=g, dtype=torch.float64) * 0.8 + 0.1).to(dtype)
    r = t * (torch.rand(batch, generator=g, dtype=torch.float64).to(dtype) * 0.9)
    n_eq = int(equal * batch)
    r[:n_eq] = t[:n_eq]
    return x, e, t, r


def rel(a, b):
    return float((a - b).double().norm() / b.double().norm().clamp_min(1e-30))


def flat_grad(loss, module, retain=False):
    params = [p for p in module.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain)
    pairs = zip(params, grads, strict=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in pairs])


# every objective, in the regimes that matter, as factories (fresh runtime-check state per call)
OBJECTIVES = {
    "fm": lambda **kw: mfl.FlowMatchingLoss(**{k: v for k, v in kw.items() if k == "guidance"}),
    "meanflow": lambda **kw: mfl.MeanFlowLoss(**kw),
    "alphaflow_consistency": lambda **kw: mfl.AlphaFlowLoss(alpha=0.4, **{k: v for k, v in kw.items() if k != "jvp"}),
    "alphaflow_meanflow": lambda **kw: mfl.AlphaFlowLoss(alpha=0.0, **kw),
    "splitmeanflow": lambda **kw: mfl.SplitMeanFlowLoss(**{k: v for k, v in kw.items() if k == "guidance"}),
    "shortcut": lambda **kw: mfl.ShortcutLoss(**{k: v for k, v in kw.items() if k == "guidance"}),
    "kim": lambda **kw: mfl.presets.accelerated_meanflow(100, **kw),
}
JVP_OBJECTIVES = ("meanflow", "alphaflow_meanflow", "kim")


def objective_cases():
    for name in OBJECTIVES:
        for strategy in STRATEGIES if name in JVP_OBJECTIVES else [None]:
            yield pytest.param(name, strategy, id=f"{name}-{strategy}" if strategy else name)


def build(name, strategy, guidance=None):
    kw = {}
    if strategy is not None:
        kw["jvp"] = strategy
    if guidance is not None:
        kw["guidance"] = guidance
    return OBJECTIVES[name](**kw)


def call(objective, model, x, e, t, r, **kw):
    extra = {"step": 50} if isinstance(objective, mfl.MeanFlowLoss) and objective.interval_weight else {}
    kw.setdefault("generator", torch.Generator().manual_seed(7))  # the split lambda and drop masks, reproducibly
    return objective(model, x, t=t, r=r, noise=e, **extra, **kw)


# ----------------------------------------------------------------------------------------------- compiled models
@pytest.fixture(scope="module")
def compiled_pair():
    torch.manual_seed(0)
    net = MLP(dim=2, width=32)
    return net, torch.compile(net)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_compiled_model_dudt_equals_eager(compiled_pair, strategy):
    """du/dt of torch.compile(net) equals the eager network's to 1e-5 relative (float32), every strategy."""
    net, compiled = compiled_pair
    x, e, t, r = draws()
    z = (1 - t[:, None]) * x + t[:, None] * e
    eager = time_derivative(net, z, r, t, e - x, strategy=strategy).dudt
    got = time_derivative(compiled, z, r, t, e - x, strategy=strategy).dudt
    assert eager.abs().max() > 1e-3  # a zero du/dt would make the comparison vacuous
    assert rel(got, eager) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(("name", "strategy"), list(objective_cases()))
def test_compiled_model_every_objective_matches_eager(compiled_pair, name, strategy):
    """Loss and gradient of every objective on the compiled network equal the eager network's (1e-5 relative)."""
    net, compiled = compiled_pair
    x, e, t, r = draws()
    ref = call(build(name, strategy), net, x, e, t, r)
    got = call(build(name, strategy), compiled, x, e, t, r)
    assert abs(float(got.loss - ref.loss)) <= 1e-5 * abs(float(ref.loss))
    assert rel(flat_grad(got.loss, net), flat_grad(ref.loss, net)) < 1e-4


def test_network_with_compiled_blocks_gets_eager_dudt():
    torch.manual_seed(0)
    net = zoo.CompiledBlocks()
    x, e, t, r = draws()
    z = (1 - t[:, None]) * x + t[:, None] * e
    got = time_derivative(net, z, r, t, e - x).dudt
    ref = central_fd_dudt(_eager_blocks_copy(net).double(), z.double(), r.double(), t.double(), (e - x).double())
    assert rel(got, ref) < 1e-4


def _eager_blocks_copy(net):
    import copy

    clone = copy.deepcopy(net)
    clone.block = net.block._orig_mod
    return clone


def test_missing_tangent_is_an_error_not_zeros():
    class NoForwardAD(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            return g * 2

    class Net(nn.Module):
        def forward(self, z, r, t):
            return NoForwardAD.apply(z * t[:, None])

    x, e, t, r = draws(equal=0.0)
    with pytest.raises((mfl.jvp.MissingTangentError, RuntimeError, NotImplementedError)):
        time_derivative(Net(), x, r, t, e - x)


def test_output_independent_of_z_and_t_gets_zero_dudt():
    class Const(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.ones(2))

        def forward(self, z, r, t):
            return self.b.expand_as(z) + 0 * r[:, None]

    x, e, t, r = draws(equal=0.0)
    assert bool((time_derivative(Const(), x, r, t, e - x).dudt == 0).all())


# ------------------------------------------------------------------------------------------------ stochastic layers
def _same_start(fn):
    with torch.random.fork_rng():
        torch.manual_seed(123)
        return fn()


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_dropout_fd_halves_share_masks_and_agree_with_ad(p):
    """Dropout in train mode: the FD du/dt (both halves one mask) equals AD with that mask to float32 FD accuracy."""
    torch.manual_seed(0)
    net = zoo.EmbMLP(dropout=p).train()
    x, e, t, r = draws(equal=0.0)
    z = (1 - t[:, None]) * x + t[:, None] * e
    ad = _same_start(lambda: time_derivative(net, z, r, t, e - x, strategy="nograd").dudt)
    fd = _same_start(lambda: time_derivative(net, z, r, t, e - x, strategy="finite_difference").dudt)
    assert rel(fd, ad) < 2e-3  # float32 central difference at eps = 5e-3
    # and the size is that of the network's derivative (the bug gave 17x to 40x)
    eval_dudt = time_derivative(net.eval(), z, r, t, e - x).dudt
    assert 0.3 < float(fd.norm() / eval_dudt.norm()) < 3


def test_joint_strategy_shares_masks_between_prediction_and_dudt():
    """jvp='joint': the primal of the JVP is the prediction, so one mask serves both (MeanFlow's rows r != t)."""
    torch.manual_seed(0)
    net = zoo.EmbMLP(dropout=0.3).train()
    x, e, t, r = draws(equal=0.0)
    z = (1 - t[:, None]) * x + t[:, None] * e
    res = _same_start(lambda: time_derivative(net, z, r, t, e - x, strategy="joint"))
    fd = _same_start(lambda: time_derivative(net, z, r, t, e - x, strategy="finite_difference").dudt)
    primal = _same_start(lambda: net(z, r, t))
    torch.testing.assert_close(res.u, primal)  # the same mask as a plain call from that state
    assert rel(res.dudt, fd) < 2e-3


@pytest.mark.slow
def test_in_network_label_dropout_warns_and_fd_stays_consistent():
    torch.manual_seed(0)
    net = zoo.EmbMLP(n_classes=3, label_dropout=0.3).train()
    x, e, t, r = draws(batch=32, equal=0.25)
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(1))
    loss_fn = mfl.MeanFlowLoss(jvp="finite_difference")
    with pytest.warns(MeanFlowWarning, match="in-network condition dropout"):
        for _ in range(10):
            call(loss_fn, net, x, e, t, r, model_kwargs={"y": y})
    z = (1 - t[:, None]) * x + t[:, None] * e
    ad = _same_start(lambda: time_derivative(net, z[8:], r[8:], t[8:], (e - x)[8:], {"y": y[8:]}).dudt)
    fd = _same_start(
        lambda: time_derivative(net, z[8:], r[8:], t[8:], (e - x)[8:], {"y": y[8:]}, strategy="finite_difference").dudt
    )
    assert rel(fd, ad) < 2e-3


# ------------------------------------------------------------------------------------------ batch-statistics layers
def _buffers(module):
    return {k: v.clone() for k, v in module.named_buffers()}


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
@pytest.mark.parametrize(("name", "strategy"), [c for c in objective_cases() if c.values[1] != "joint"])
def test_batchnorm_buffers_updated_once_per_step(name, strategy, guided):
    """After one step, every buffer equals its value after ONE plain forward of the gradient batch."""
    torch.manual_seed(0)
    net = zoo.EmbMLP(batchnorm=True, n_classes=3).train()
    x, e, t, r = draws(batch=16)
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(2))
    guidance = mfl.TrainingGuidance(omega=0.6, kappa=0.3, drop_prob=0.2, null_condition=NULL) if guided else None
    objective = build(name, strategy, guidance)
    import copy

    ref_net = copy.deepcopy(net)
    drop = (torch.arange(16) % 5 == 0) if guided else torch.zeros(16, dtype=torch.bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MeanFlowWarning)  # the batch-statistics warning is expected here
        out = call(objective, net, x, e, t, r, model_kwargs={"y": y}, drop_mask=drop if guided else None)
    # the reference: the same gradient batch, one plain forward (dropped rows carry the null label)
    y_in = torch.where(drop, 3, y)
    z = (1 - out.t[:, None]) * x + out.t[:, None] * e
    with torch.no_grad():
        ref_net(z, out.r, out.t, y=y_in)
    for k, v in _buffers(ref_net).items():
        torch.testing.assert_close(dict(net.named_buffers())[k], v, rtol=0, atol=0, msg=k)


def test_batchnorm_refused_where_it_cannot_be_right():
    torch.manual_seed(0)
    net = zoo.EmbMLP(batchnorm=True).train()
    x, e, t, r = draws()
    with pytest.raises(ValueError, match="batch statistics"):
        mfl.MeanFlowLoss(jvp="joint")(net, x, t=t, r=r, noise=e)
    with pytest.raises(ValueError, match="batch statistics"):
        mfl.MeanFlowLoss(aux_velocity_weight=0.5)(net, x, t=t, r=r, noise=e)
    one = r.clone()
    one[: x.shape[0] - 1] = t[: x.shape[0] - 1]  # a single r != t row
    with pytest.raises(ValueError, match="at least 2 rows"):
        mfl.MeanFlowLoss(runtime_checks=False)(net, x, t=t, r=one, noise=e)


def test_batchnorm_warns_at_runtime():
    torch.manual_seed(0)
    net = zoo.EmbMLP(batchnorm=True).train()
    x, e, t, r = draws()
    with pytest.warns(MeanFlowWarning, match="batch statistics"):
        mfl.MeanFlowLoss()(net, x, t=t, r=r, noise=e)


# ----------------------------------------------------------------------------------------- shared conditioning
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_shared_tensor_with_sub_batch_size_is_not_sliced(strategy, guided):
    """A shared tensor whose first dimension equals the number of r != t rows (and of guided rows) stays whole."""
    torch.manual_seed(0)
    net = zoo.SharedContextMLP()
    x, e, t, r = draws(batch=16, equal=0.5)  # 8 rows r != t
    ctx = torch.randn(8, 3)
    loss_kw = {}
    if guided:
        loss_kw["guidance"] = mfl.TrainingGuidance(omega=0.5, kappa=0.3, drop_prob=0.0, null_condition=lambda kw: kw)
    got = call(mfl.MeanFlowLoss(jvp=strategy, **loss_kw), net, x, e, t, r, model_kwargs={"ctx": ctx})

    class Closure(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = net

        def forward(self, z, r_, t_):
            return self.inner(z, r_, t_, ctx)

    ref = call(mfl.MeanFlowLoss(jvp=strategy, **loss_kw), Closure(), x, e, t, r)
    torch.testing.assert_close(got.extras["dudt"], ref.extras["dudt"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, ref.loss, rtol=1e-6, atol=1e-7)


def test_shared_marker_for_a_tensor_of_batch_size():
    torch.manual_seed(0)
    net = zoo.SharedContextMLP()
    x, e, t, r = draws(batch=16)
    ctx = torch.randn(16, 3)  # shared, but its first dimension is B
    got = call(mfl.MeanFlowLoss(), net, x, e, t, r, model_kwargs={"ctx": mfl.shared(ctx)})
    ref = call(mfl.MeanFlowLoss(), lambda z, r_, t_: net(z, r_, t_, ctx), x, e, t, r)
    torch.testing.assert_close(got.loss, ref.loss)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nested_conditioning_dict_is_sliced_per_row(strategy):
    torch.manual_seed(0)
    net = zoo.NestedCondMLP()
    x, e, t, r = draws(batch=16)
    emb = torch.randn(16, 32)
    got = call(mfl.MeanFlowLoss(jvp=strategy), net, x, e, t, r, model_kwargs={"extra": {"emb": emb}})
    z = (1 - t[:, None]) * x + t[:, None] * e
    j = r != t
    ref = time_derivative(
        lambda z_, r_, t_: net(z_, r_, t_, {"emb": emb[j]}), z[j], r[j], t[j], (e - x)[j], strategy=strategy
    )
    torch.testing.assert_close(got.extras["dudt"][j], ref.dudt, rtol=1e-5, atol=1e-6)


def test_null_condition_changing_a_shared_entry_is_refused():
    net = zoo.SharedContextMLP()
    x, e, t, r = draws()
    g = mfl.TrainingGuidance(
        omega=1.0, kappa=0.5, drop_prob=0.2, null_condition=lambda kw: {**kw, "ctx": kw["ctx"] * 0}
    )
    with pytest.raises(ValueError, match="shared by every row"):
        call(mfl.MeanFlowLoss(guidance=g), net, x, e, t, r, model_kwargs={"ctx": torch.randn(3, 3)})


# ------------------------------------------------------------------------------------------------ time embeddings
@pytest.mark.parametrize(
    ("style", "code"),
    [
        ("t1000", "high_frequency_time"),
        ("long", "cut_time_derivative"),
        ("detach", "cut_time_derivative"),
        ("round", "cut_time_derivative"),
    ],
)
def test_check_model_names_broken_time_embeddings(style, code):
    torch.manual_seed(0)
    report = mfl.diagnostics.check_model(zoo.EmbMLP(style=style), torch.randn(16, 2))
    assert code in report.codes("error"), str(report)
    assert not report.ok
    with pytest.raises(ValueError, match=code):
        report.raise_for_problems()


@pytest.mark.slow
@pytest.mark.parametrize("style", ["t1000", "long", "detach", "round"])
@pytest.mark.parametrize("name", JVP_OBJECTIVES)
def test_runtime_warning_for_broken_time_embeddings(style, name):
    torch.manual_seed(0)
    net = zoo.EmbMLP(style=style)
    x, e, t, r = draws(batch=32)
    objective = build(name, "nograd")
    with pytest.warns(MeanFlowWarning, match="t \\* 1000|time path is cut"):
        for _ in range(10):  # a finding is warned once it came back in most probes
            call(objective, net, x, e, t, r)


def _dit(time_scale):
    from examples.imagenet_dit.dit import build_dit

    torch.manual_seed(0)
    net = build_dit(
        "DiT-S/2", depth=2, hidden_size=64, num_heads=2, input_size=8, num_classes=10, time_scale=time_scale
    )
    return mfl.adapters.from_interval_net(net)


def _train_steps(model, loss_fn, steps, shape, classes=None, lr=1e-4):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(32, *shape, generator=g)
        kw = {} if classes is None else {"model_kwargs": {"y": torch.randint(0, classes, (32,), generator=g)}}
        out = loss_fn(model, x, generator=g, **kw)
        opt.zero_grad()
        out.loss.backward()
        opt.step()


@pytest.mark.slow
def test_t1000_dit_warns_within_ten_steps():
    """The natural DDPM port of DiT (t * 1000 embedding, adaLN-Zero so u = 0 at first) is caught within 10 steps."""
    model = _dit(1000.0)
    with pytest.warns(MeanFlowWarning, match="t \\* 1000"):
        _train_steps(model, mfl.MeanFlowLoss(), 10, (4, 8, 8), classes=10)


@pytest.mark.slow
def test_examples_networks_raise_no_alarm():
    """No warning in 10 MeanFlow steps, and a clean check_model, on every example's network."""
    from examples.digits.model import DiT as DigitsDiT
    from examples.toy2d.nets import VelocityMLP

    torch.manual_seed(0)
    nets = [
        (VelocityMLP(), (2,), None),
        (DigitsDiT(width=32, depth=2, heads=2, num_classes=10), (1, 8, 8), 10),
        (_dit(1.0), (4, 8, 8), 10),
    ]
    for model, shape, classes in nets:
        with warnings.catch_warnings():
            warnings.simplefilter("error", MeanFlowWarning)
            _train_steps(model, mfl.MeanFlowLoss(), 10, shape, classes)
        kw = {} if classes is None else {"model_kwargs": {"y": torch.randint(0, classes, (16,))}}
        report = mfl.diagnostics.check_model(model, torch.randn(16, *shape), **kw)
        assert report.ok, f"{type(model).__name__}: {report}"


# --------------------------------------------------------------------------------------- finite-difference domain
def test_fd_points_stay_inside_the_domain():
    r = torch.tensor([0.0, 0.5, 0.499, 0.2, 0.9999, 0.3])
    t = torch.tensor([0.001, 0.5001, 0.5, 0.999, 1.0, 0.6])
    hi, lo = finite_difference_points(r, t, 5e-3)
    assert bool((lo >= r).all()) and bool((hi <= 1).all()) and bool((hi > lo).all())
    torch.testing.assert_close(hi[-1:], t[-1:] + 5e-3)  # interior: central
    torch.testing.assert_close(lo[-1:], t[-1:] - 5e-3)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_fd_at_the_edges_of_the_domain_is_finite_and_accurate(dtype):
    """FD never leaves [r, 1] (a network of sqrt(t - r) and sqrt(1 - t) gave NaN) and stays accurate at the edges."""
    torch.manual_seed(0)
    x = torch.randn(4, 2, dtype=dtype)
    v = torch.randn(4, 2, dtype=dtype)
    t = torch.tensor([0.3, 0.999, 0.5, 0.998], dtype=dtype)
    r = torch.tensor([0.299, 0.2, 0.1, 0.9975], dtype=dtype)  # t - r < eps, t > 1 - eps, interior, both
    fd = time_derivative(zoo.SqrtGapNet().to(dtype), x, r, t, v, strategy="finite_difference").dudt
    assert bool(torch.isfinite(fd).all())
    smooth = zoo.EmbMLP().to(dtype)
    fd = time_derivative(smooth, x, r, t, v, strategy="finite_difference").dudt
    ad = time_derivative(smooth, x, r, t, v, strategy="nograd").dudt
    eps = mfl.jvp.default_fd_eps(dtype)
    # the interior row is central (O(eps^2)); the shifted stencils are first order (O(eps))
    assert rel(fd[2:3], ad[2:3]) < (2e-4 if dtype == torch.float32 else 1e-9)
    assert rel(fd, ad) < 20 * eps


def test_meanflow_fd_with_tiny_intervals_is_finite():
    torch.manual_seed(0)
    net = zoo.SqrtGapNet()
    x, e, _, _ = draws(batch=8)
    t = torch.full((8,), 0.9995)
    r = t - 1e-4
    out = mfl.MeanFlowLoss(jvp="finite_difference")(net, x, t=t, r=r, noise=e)
    assert bool(torch.isfinite(out.loss))


# ---------------------------------------------------------------------------------------- real U-Nets, diffusers
@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_diffusers_unet_with_attention_every_strategy(strategy):
    """diffusers UNet2DModel (attention block -> non-contiguous GroupNorm input) under every strategy."""
    model = zoo.UNetVelocity(zoo.tiny_unet())
    x, e, t, r = draws(batch=4, shape=(3, 8, 8), equal=0.0)
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * e
    got = time_derivative(model, z, r, t, e - x, strategy=strategy).dudt
    # diffusers' time projection is float32 whatever the model's dtype, so the reference is a float32 difference
    # (nograd vs finite_difference: two independent computations)
    other = "finite_difference" if strategy != "finite_difference" else "nograd"
    ref = time_derivative(model, z, r, t, e - x, strategy=other).dudt
    assert ref.abs().max() > 1e-3 and rel(got, ref) < 2e-3
    out = mfl.MeanFlowLoss(jvp=strategy)(model, x, t=t, r=r, noise=e)
    out.loss.backward()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_diffusers_dit_eval_and_train_mode(strategy):
    """DiTTransformer2DModel: eval mode matches an FD reference; train mode (label drops) keeps FD consistent."""
    model = zoo.DiffusersDiTVelocity(zoo.tiny_diffusers_dit()).eval()
    x, e, t, r = draws(batch=8, shape=(4, 8, 8), equal=0.0)
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(3))
    z = (1 - t.view(-1, 1, 1, 1)) * x + t.view(-1, 1, 1, 1) * e
    got = time_derivative(model, z, r, t, e - x, {"y": y}, strategy=strategy).dudt
    ref = central_fd_dudt(model.double(), z.double(), r.double(), t.double(), (e - x).double(), y=y)
    model.float()
    assert rel(got, ref) < 5e-4
    model.train()
    fd = _same_start(lambda: time_derivative(model, z, r, t, e - x, {"y": y}, strategy="finite_difference").dudt)
    ad = _same_start(lambda: time_derivative(model, z, r, t, e - x, {"y": y}, strategy="nograd").dudt)
    assert rel(fd, ad) < 2e-3  # the bug: 30x too large
    loss = mfl.MeanFlowLoss(jvp=strategy)  # the runtime checks live in the objective: built once, as in training
    with pytest.warns(MeanFlowWarning, match="in-network condition dropout"):
        for _ in range(10):
            loss(model, x, t=t, r=r, noise=e, model_kwargs={"y": y})


@pytest.mark.slow
def test_diffusers_models_train_under_meanflow():
    for model, shape, kw in [
        (zoo.UNetVelocity(zoo.tiny_unet()), (3, 8, 8), {}),
        (zoo.DiffusersDiTVelocity(zoo.tiny_diffusers_dit()).eval(), (4, 8, 8), {"y": torch.randint(0, 10, (8,))}),
    ]:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        g = torch.Generator().manual_seed(0)
        for _ in range(2):
            out = mfl.MeanFlowLoss()(model, torch.randn(8, *shape, generator=g), model_kwargs=kw, generator=g)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
        assert bool(torch.isfinite(out.loss))


def test_mha_fast_path_network_in_eval_mode():
    torch.manual_seed(0)
    net = zoo.MHAEncoder().eval()
    x, e, t, r = draws(batch=4, shape=(5, 4), equal=0.0)
    z = (1 - t.view(-1, 1, 1)) * x + t.view(-1, 1, 1) * e
    got = time_derivative(net, z, r, t, e - x).dudt
    ref = central_fd_dudt(net.double(), z.double(), r.double(), t.double(), (e - x).double())
    assert rel(got, ref) < 1e-4


# -------------------------------------------------------------------------------------------------- low precision
def test_sampler_times_stay_float32_for_bf16_noise():
    seen = []

    def model(z, r, t):
        seen.append((t.dtype, float(t[0]), float(r[0])))
        return torch.zeros_like(z)

    mfl.sample(model, torch.randn(4, 2).bfloat16(), grid=[1.0, 0.999, 0.0])
    assert [s[0] for s in seen] == [torch.float32, torch.float32]
    assert seen[0][2] == pytest.approx(0.999) and seen[1][1] == pytest.approx(0.999)


def test_half_model_without_autocast_gets_a_finite_float32_dudt():
    torch.manual_seed(0)
    net = zoo.ExpScaleNet()
    x, e, _, _ = draws(batch=8)
    t = torch.full((8,), 0.99)
    r = torch.full((8,), 0.2)
    half = net.half()
    z = ((1 - t[:, None]) * x + t[:, None] * e).half()
    tan = (e - x).half()
    got = time_derivative(half, z, r, t, tan).dudt
    assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
    ref = time_derivative(half.float(), z.float(), r, t, tan.float()).dudt  # the same weights in float32
    half.half()
    assert rel(got, ref) < 1e-6
    assert float(got.abs().max()) > 65504  # it would have overflowed in float16
    out = mfl.MeanFlowLoss(runtime_checks=False)(half, x.half(), t=t, r=r, noise=e.half())
    assert bool(torch.isfinite(out.extras["dudt"]).all())


# ------------------------------------------------------------------------------------------- signatures, adapters
def test_partial_of_an_interval_net_is_refused():
    from tests.nets import IntervalMLP

    with pytest.raises(ValueError, match="from_interval_net"):
        mfl.MeanFlowLoss()(functools.partial(IntervalMLP()), torch.randn(8, 2))


@pytest.mark.parametrize("net", [zoo.ThirdPartyDiTLike(), zoo.IntervalWithLabels()], ids=["x_t_y", "z_t_h_y"])
def test_unwrapped_third_party_signature_is_refused(net):
    with pytest.raises(ValueError, match="from_interval_net"):
        mfl.MeanFlowLoss()(net, torch.randn(8, 2), model_kwargs={"y": torch.zeros(8, dtype=torch.long)})


def test_binding_type_error_is_reraised_with_the_adapter_hint():
    class Opaque(nn.Module):  # names that the guard cannot read as times
        def __init__(self):
            super().__init__()
            self.net = zoo.ThirdPartyDiTLike()

        def forward(self, x, s, y):
            return self.net(x, s, y)

    with pytest.raises(TypeError, match=r"multiple values for argument 'y'.*from_interval_net"):
        mfl.MeanFlowLoss()(Opaque(), torch.randn(8, 2), model_kwargs={"y": torch.zeros(8, dtype=torch.long)})


def test_adapter_state_dict_is_the_bare_networks():
    from examples.imagenet_dit.dit import build_dit

    torch.manual_seed(0)
    net = build_dit("DiT-S/2", depth=1, hidden_size=32, num_heads=2, input_size=8, num_classes=4)
    model = mfl.adapters.from_interval_net(net)
    assert list(model.state_dict()) == list(net.state_dict())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in net.named_parameters()]
    # a bare checkpoint loads into the adapter and back
    bare = build_dit("DiT-S/2", depth=1, hidden_size=32, num_heads=2, input_size=8, num_classes=4)
    model.load_state_dict(bare.state_dict())
    torch.testing.assert_close(net.final_layer.linear.weight, bare.final_layer.linear.weight)
    bare.load_state_dict(model.state_dict())
    # DiT's update_ema, written for the bare network, works on an adapter and an EMA of the bare network
    ema = build_dit("DiT-S/2", depth=1, hidden_size=32, num_heads=2, input_size=8, num_classes=4)
    ema_params, model_params = OrderedDict(ema.named_parameters()), OrderedDict(model.named_parameters())
    with torch.no_grad():
        for name, param in model_params.items():
            ema_params[name].mul_(0.9).add_(param.data, alpha=0.1)
    # an old checkpoint with net.-prefixed keys still loads, with a warning
    with pytest.warns(FutureWarning, match="net."):
        model.load_state_dict({f"net.{k}": v for k, v in bare.state_dict().items()})
    # train/eval reach the root network, .to() moves it, deepcopy keeps the sharing
    model.eval()
    assert not net.training
    import copy

    clone = copy.deepcopy(model)
    assert clone.net.final_layer is not net.final_layer and clone.final_layer is clone.net.final_layer


# ------------------------------------------------------------------------------------------------ objective API
def test_per_row_weight_of_shape_b1_is_refused():
    x, e, t, r = draws()
    for field in ("interval_weight", "velocity_weight"):
        loss = mfl.MeanFlowLoss(**{field: lambda t_, r_, s: torch.ones(t_.shape[0], 1)})
        with pytest.raises(ValueError, match=r"\(B, B\)"):
            call(loss, MLP(), x, e, t, r)
        loss = mfl.MeanFlowLoss(**{field: lambda t_, r_, s: -torch.ones(t_.shape[0])})
        with pytest.raises(ValueError, match="negative"):
            call(loss, MLP(), x, e, t, r)
        loss = mfl.MeanFlowLoss(**{field: lambda t_, r_, s: torch.full((t_.shape[0],), float("nan"))})
        with pytest.raises(mfl.NonFiniteError, match="weights"):
            call(loss, MLP(), x, e, t, r)


def test_weighting_of_the_wrong_type_fails_at_construction():
    for bad in ("adaptive", 1.0, None):
        with pytest.raises(TypeError, match="weighting"):
            mfl.MeanFlowLoss(weighting=bad)
    with pytest.raises(ValueError, match=r"\(B, B\)"):
        x, e, t, r = draws()
        call(mfl.MeanFlowLoss(weighting=lambda sq: sq[:, None]), MLP(), x, e, t, r)


def test_drop_mask_without_null_condition_is_refused():
    x, e, t, r = draws()
    g = mfl.TrainingGuidance(omega=1.0, kappa=0.0, drop_prob=0.0)
    with pytest.raises(ValueError, match="no null_condition"):
        call(mfl.MeanFlowLoss(guidance=g), MLP(), x, e, t, r, drop_mask=torch.ones(16, dtype=torch.bool))
    with pytest.raises(ValueError, match="guidance is None"):
        call(mfl.MeanFlowLoss(), MLP(), x, e, t, r, drop_mask=torch.ones(16, dtype=torch.bool))


@pytest.mark.parametrize("name", ["meanflow", "alphaflow_consistency", "alphaflow_meanflow", "splitmeanflow", "kim"])
def test_t_without_r_is_refused_for_pair_objectives(name):
    x, e, t, _ = draws()
    with pytest.raises(ValueError, match="t was given without r"):
        build(name, "nograd" if name in JVP_OBJECTIVES else None)(MLP(), x, t=t, noise=e, step=1)
    mfl.FlowMatchingLoss()(MLP(), x, t=t, noise=e)  # flow matching: r = t, as documented


def test_decompose_with_aux_velocity_is_exact():
    torch.manual_seed(0)
    model = MLP().double()
    x, e, t, r = draws(dtype=F64)
    out = mfl.MeanFlowLoss(decompose=True, aux_velocity_weight=0.7, tangent="model")(model, x, t=t, r=r, noise=e)
    total = sum(out.decomposition[k] for k in ("tfm", "tcc", "aux"))
    assert rel(flat_grad(total, model, retain=True), flat_grad(out.loss, model)) < 1e-10


def test_dtype_mismatches_are_named():
    x, e, t, r = draws()
    with pytest.raises(TypeError, match="noise must have the dtype of x"):
        mfl.MeanFlowLoss()(MLP(), x, t=t, r=r, noise=e.double())
    with pytest.raises(TypeError, match="v_target must have the dtype of x"):
        mfl.FlowMatchingLoss()(MLP(), x, v_target=e.double())


@pytest.mark.parametrize(
    ("output", "match"),
    [(lambda z: z.long(), "real floating-point"), (lambda z: z.to(torch.complex64), "real floating-point")],
)
def test_integer_or_complex_outputs_fail_early(output, match):
    x = draws()[0]
    with pytest.raises(TypeError, match=match):
        mfl.FlowMatchingLoss()(lambda z, r_, t_: output(z), x)


@pytest.mark.parametrize(("name", "strategy"), list(objective_cases()))
def test_nan_output_raises_naming_the_output(name, strategy):
    class NaNNet(MLP):
        def forward(self, z, r, t, y=None):
            out = super().forward(z, r, t)
            return torch.where(z[:, :1] > 1.0, torch.full_like(out, float("nan")), out)

    x, e, t, r = draws()
    x[0, 0] = 5.0
    e[0, 0] = 5.0  # z[0, 0] > 1 for any t
    torch.manual_seed(0)
    with pytest.raises(mfl.NonFiniteError, match=r"prediction|target"):
        call(build(name, strategy), NaNNet(), x, e, t, r)
    with mfl.value_checks(False):  # the trainer's choice: no sync, the NaN reaches the loss
        assert not bool(torch.isfinite(call(build(name, strategy), NaNNet(), x, e, t, r).loss))


@pytest.mark.parametrize(
    ("make", "exc"),
    [
        (lambda: mfl.TimePairSampler(equal_fraction="0.5"), TypeError),
        (lambda: mfl.TimePairSampler(equal_fraction=True), TypeError),
        (lambda: mfl.AlphaFlowLoss(alpha="0.5"), TypeError),
        (lambda: mfl.null_class(2.5), TypeError),
        (lambda: mfl.null_class(True), TypeError),
        (lambda: mfl.AdaptiveWeight(p="1"), TypeError),
        (lambda: mfl.TrainingGuidance(omega="1", kappa=0.0, drop_prob=0.0), TypeError),
        (lambda: mfl.TrainingGuidance(drop_prob=True, null_condition=NULL), TypeError),
        (lambda: mfl.MeanFlowLoss(compound=1), TypeError),
        (lambda: mfl.MeanFlowLoss(fd_eps="1e-3"), TypeError),
        (lambda: mfl.MeanFlowLoss(times=mfl.TimeSampler()), TypeError),
        (lambda: mfl.MeanFlowLoss(guidance={"omega": 1.0}), TypeError),
        (lambda: mfl.SplitMeanFlowLoss(lam="0.5"), TypeError),
        (lambda: mfl.schedules.Sigmoid(0, 10, gamma="25"), TypeError),
        (lambda: mfl.ProgressiveIntervalWeight(100, k="1"), TypeError),
    ],
)
def test_options_are_type_checked_at_construction(make, exc):
    with pytest.raises(exc):
        make()


def test_conflict_tracker_history_stays_aligned_when_pairs_change():
    from meanflow_losses.diagnostics import ConflictTracker, GradientCosines

    tr = ConflictTracker(every=1)
    tr.record(GradientCosines({("a", "b"): 0.1}, {"a": 1.0, "b": 1.0}), step=0)
    tr.record(GradientCosines({("a", "b"): 0.2, ("a", "c"): -0.5}, {"a": 1.0, "b": 1.0, "c": 1.0}), step=10)
    tr.record(GradientCosines({("a", "c"): -0.6}, {"a": 1.0, "c": 1.0}), step=20)
    steps, values = tr.history("a", "c")
    assert steps.tolist() == [10, 20] and values.tolist() == [-0.5, -0.6]
    steps, values = tr.history("b", "a")
    assert steps.tolist() == [0, 10] and values.tolist() == [0.1, 0.2]


def test_gradient_cosines_counts_a_shared_parameter_once():
    from meanflow_losses.diagnostics import gradient_cosines

    shared = nn.Linear(3, 1)
    a, b = nn.Sequential(shared), nn.Sequential(shared)
    x = torch.randn(5, 3)
    l1, l2 = shared(x).sum(), (shared(x) ** 2).sum()
    once = gradient_cosines(list(shared.parameters()), {"l1": l1, "l2": l2})
    twice = gradient_cosines([*a.parameters(), *b.parameters()], {"l1": l1, "l2": l2})
    assert once.norms == pytest.approx(twice.norms)
    assert once[("l1", "l2")] == pytest.approx(twice[("l1", "l2")])


# --------------------------------------------------------------------------------- found by the independent review
def test_half_module_with_default_runtime_checks_runs():
    torch.manual_seed(0)
    net = zoo.ExpScaleNet().half()
    x = torch.randn(16, 2).half()
    for objective in (mfl.MeanFlowLoss(), mfl.AlphaFlowLoss(alpha=0.0)):
        out = objective(net, x, generator=torch.Generator().manual_seed(0))
        assert bool(torch.isfinite(out.loss))
    assert "non_finite_output" not in mfl.check_model(net, x).codes()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_finite_differences_in_half_precision_on_a_plain_function_warn(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2)).to(dtype)

    def model(z, r, t):
        return net(torch.cat([z, t[:, None].to(z.dtype), (t - r)[:, None].to(z.dtype)], 1))

    with pytest.warns(MeanFlowWarning, match="difference quotient loses most digits"):
        mfl.MeanFlowLoss(jvp="finite_difference")(model, torch.randn(16, 2).to(dtype))


class ReLUNet(nn.Module):
    """A toy-tutorial ReLU MLP on raw (z, r, t): kinks, but an exact forward-mode derivative."""

    def __init__(self, width=16, depth=2):
        super().__init__()
        layers = [nn.Linear(4, width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        self.m = nn.Sequential(*layers, nn.Linear(width, 2))

    def forward(self, z, r, t):
        return self.m(torch.cat([z, r[:, None], t[:, None]], 1))


def test_relu_networks_raise_no_false_alarm():
    for seed in range(6):
        torch.manual_seed(seed)
        model = ReLUNet(width=(8, 16, 32)[seed % 3], depth=2 + seed % 2)
        with warnings.catch_warnings():
            warnings.simplefilter("error", MeanFlowWarning)
            _train_steps(model, mfl.MeanFlowLoss(times=mfl.TimePairSampler("uniform", equal_fraction=0.75)), 10, (2,))


def test_spectral_norm_fd_halves_see_the_same_buffers():
    """A layer whose forward updates a buffer it uses (spectral norm's power iteration): both halves, one function."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.utils.spectral_norm(nn.Linear(4, 64))
            self.c = nn.Linear(64, 2)

        def forward(self, z, r, t):
            return self.c(torch.tanh(self.a(torch.cat([z, r[:, None], t[:, None]], 1))))

    torch.manual_seed(0)
    net = Net().train()
    x, e, t, r = draws(batch=4, equal=0.0)
    z = (1 - t[:, None]) * x + t[:, None] * e
    ad = time_derivative(net, z, r, t, e - x, strategy="nograd").dudt
    fd = time_derivative(net, z, r, t, e - x, strategy="finite_difference").dudt
    assert rel(fd, ad) < 1e-3


@pytest.mark.parametrize(
    "make",
    [
        lambda g: mfl.AlphaFlowLoss(alpha=0.5),
        lambda g: mfl.SplitMeanFlowLoss(),
        lambda g: mfl.ShortcutLoss(),
        lambda g: mfl.FlowMatchingLoss(guidance=g),
    ],
    ids=["alphaflow_consistency", "splitmeanflow", "shortcut", "fm_guided"],
)
def test_batch_statistics_warned_for_every_objective_with_sub_batch_passes(make):
    torch.manual_seed(0)
    net = zoo.EmbMLP(batchnorm=True, n_classes=3).train()
    guidance = mfl.TrainingGuidance(omega=0.5, kappa=0.3, drop_prob=0.0, null_condition=NULL)
    x, e, t, r = draws()
    with pytest.warns(MeanFlowWarning, match="batch statistics"):
        call(make(guidance), net, x, e, t, r, model_kwargs={"y": torch.zeros(16, dtype=torch.long)})


def test_edm_signature_is_refused_and_a_time_blind_network_warns():
    class SongUNetLike(nn.Module):  # NVlabs/edm: forward(x, noise_labels, class_labels, augment_labels=None)
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x, noise_labels, class_labels, augment_labels=None):
            return self.lin(torch.cat([x, noise_labels[:, None]], 1))

    with pytest.raises(ValueError, match="noise_labels"):
        mfl.MeanFlowLoss()(SongUNetLike(), torch.randn(8, 2))

    class TimeBlind(nn.Module):  # takes (z, r, t) but uses only r, e.g. a wrong hand-written wrapper
        def __init__(self):
            super().__init__()
            self.net = SongUNetLike()

        def forward(self, z, r, t):
            return self.net(z, r, None)

    loss = mfl.MeanFlowLoss()
    with pytest.warns(MeanFlowWarning, match="does not change with t"):
        for _ in range(4):
            loss(TimeBlind(), torch.randn(32, 2), generator=torch.Generator().manual_seed(0))


def test_sampler_unwraps_shared_markers():
    net = zoo.SharedContextMLP()
    ctx = mfl.shared(torch.randn(4, 3))
    out = mfl.sample(net, torch.randn(4, 2), steps=2, model_kwargs={"ctx": ctx})
    assert out.shape == (4, 2)


def test_network_behind_a_lambda_keeps_its_buffers_and_batchnorm_checks():
    import copy

    torch.manual_seed(0)
    net = zoo.EmbMLP(batchnorm=True).train()
    ref = copy.deepcopy(net)
    x, e, t, r = draws()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MeanFlowWarning)
        call(mfl.MeanFlowLoss(), lambda z, r_, t_: net(z, r_, t_), x, e, t, r)
    z = (1 - t[:, None]) * x + t[:, None] * e
    with torch.no_grad():
        ref(z, r, t)
    torch.testing.assert_close(net.norm.running_mean, ref.norm.running_mean, rtol=0, atol=0)
    assert int(net.norm.num_batches_tracked) == 1
    with pytest.raises(ValueError, match="batch statistics"):
        call(mfl.MeanFlowLoss(jvp="joint"), lambda z, r_, t_: net(z, r_, t_), x, e, t, r)


@pytest.mark.slow
def test_compiled_network_with_dropout_raises_no_false_alarm(compiled_pair):
    torch.manual_seed(0)
    compiled = torch.compile(zoo.EmbMLP(dropout=0.1).train())
    for strategy in ("nograd", "finite_difference"):
        loss = mfl.MeanFlowLoss(jvp=strategy)
        with warnings.catch_warnings():
            warnings.simplefilter("error", MeanFlowWarning)
            for _ in range(5):
                loss(compiled, torch.randn(32, 2))


def test_adapter_runs_the_networks_state_dict_hooks():
    class Net(nn.Module):
        meanflow_inputs = "t_h"

        def __init__(self):
            super().__init__()
            self.lin, self.frozen = nn.Linear(4, 2), nn.Linear(8, 8)
            self.register_state_dict_post_hook(
                lambda m, sd, prefix, meta: [sd.pop(k) for k in list(sd) if k.startswith(prefix + "frozen.")] and None
            )
            self.loaded = 0
            self.register_load_state_dict_post_hook(lambda m, keys: setattr(m, "loaded", m.loaded + 1))

        def forward(self, z, t, h):
            return self.lin(torch.cat([z, t[:, None], h[:, None]], 1))

    net = Net()
    adapter = mfl.adapters.from_interval_net(net)
    assert list(adapter.state_dict()) == list(net.state_dict()) == ["lin.weight", "lin.bias"]
    adapter.load_state_dict(adapter.state_dict(), strict=False)
    assert net.loaded == 1
    # a partial 0.1-era state dict with net.-prefixed keys loads with strict=False too
    with pytest.warns(FutureWarning):
        missing = adapter.load_state_dict({"net.lin.bias": torch.ones(2)}, strict=False)
    assert bool((net.lin.bias == 1).all()) and "lin.weight" in missing.missing_keys


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_per_row_tensors_inside_lists_and_tuples(strategy):
    class ListCond(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = zoo.EmbMLP()
            self.proj = nn.Linear(3, 2)

        def forward(self, z, r, t, extras):
            emb, (scale, _) = extras
            return self.net(z, r, t) * scale[:, None] + self.proj(emb)

    torch.manual_seed(0)
    net = ListCond()
    x, e, t, r = draws()
    emb, scale = torch.randn(16, 3), torch.rand(16) + 0.5
    extras = [emb, (scale, "shared-string")]
    got = call(mfl.MeanFlowLoss(jvp=strategy), net, x, e, t, r, model_kwargs={"extras": extras})
    j = r != t
    z = (1 - t[:, None]) * x + t[:, None] * e
    ref = time_derivative(
        lambda z_, r_, t_: net(z_, r_, t_, [emb[j], (scale[j], "shared-string")]),
        z[j],
        r[j],
        t[j],
        (e - x)[j],
        strategy=strategy,
    )
    torch.testing.assert_close(got.extras["dudt"][j], ref.dudt, rtol=1e-5, atol=1e-6)


def test_inference_mode_gets_a_clear_error():
    x, e, t, r = draws()
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        call(mfl.MeanFlowLoss(), MLP(), x, e, t, r)


def test_probe_leaves_the_random_state_alone():
    torch.manual_seed(0)
    net = zoo.EmbMLP(dropout=0.2).train()
    x, e, t, r = draws()
    before = torch.get_rng_state()
    loss = mfl.MeanFlowLoss(jvp="finite_difference")
    with torch.random.fork_rng():
        call(loss, net.eval(), x, e, t, r)  # deterministic network: no draw outside the probe
    torch.set_rng_state(before)
    state = torch.get_rng_state()
    call(mfl.MeanFlowLoss(jvp="finite_difference"), net.eval(), x, e, t, r)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.slow
def test_check_model_looks_past_a_zero_initialised_modulation():
    """A DiT whose adaLN modulation is zero but whose output head is not: r and t are hidden, not ignored."""
    model = _dit(1.0)
    torch.nn.init.normal_(model.net.final_layer.linear.weight, std=0.02)
    report = mfl.check_model(model, torch.randn(8, 4, 8, 8), model_kwargs={"y": torch.zeros(8, dtype=torch.long)})
    assert "ignores_r" not in report.codes() and "zero_init_perturbed" in report.codes()


def test_numpy_and_tensor_scalars_are_accepted_as_options():
    import numpy as np

    assert mfl.AlphaFlowLoss(alpha=np.float32(0.3)).alpha_at(None) == pytest.approx(0.3)
    assert mfl.TimePairSampler(equal_fraction=np.float32(0.5)).num_equal(10) == 5
    assert mfl.TimePairSampler(equal_fraction=torch.tensor(0.25)).num_equal(8) == 2
