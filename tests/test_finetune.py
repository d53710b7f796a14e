"""meanflow_losses.finetune: a flow-matching network converted into a mean-flow network that starts as itself."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import meanflow_losses as mfl
from meanflow_losses import finetune

F64 = torch.float64


class TimeEmbed(nn.Module):
    """Low-frequency sinusoids of raw t and a two-layer MLP: (B,) -> (B, C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.exp(-math.log(100.0) * torch.arange(8) / 8), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(16, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        a = t[:, None] * self.freqs.to(t.dtype)
        return self.mlp(torch.cat([a.cos(), a.sin()], dim=-1))


class FMNet(nn.Module):
    """A small class-conditional flow-matching network ``forward(z, t, y)`` with an FiLM-like time path."""

    def __init__(self, dim: int = 6, width: int = 16) -> None:
        super().__init__()
        self.t_embedder = TimeEmbed(width)
        self.y_embedder = nn.Embedding(4, width)
        self.inp = nn.Linear(dim, width)
        self.out = nn.Linear(width, dim)
        self.register_buffer("offset", torch.linspace(-0.1, 0.1, dim))

    def forward(self, z, t, y):
        c = self.t_embedder(t) + self.y_embedder(y)
        return self.out(torch.tanh(self.inp(z)) * (1 + c)) + self.offset


def fm_net(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return FMNet().to(dtype)


def batch(n=8, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 6, generator=g, dtype=dtype)
    t = torch.rand(n, generator=g, dtype=dtype) * 0.9 + 0.05
    r = t * torch.rand(n, generator=g, dtype=dtype)
    r[: n // 2] = t[: n // 2]
    y = torch.randint(0, 4, (n,), generator=g)
    return z, r, t, y


@pytest.mark.parametrize("kind", ["copy", "fresh", "sinusoidal"])
@pytest.mark.parametrize("interval_input", ["t_minus_r", "r"])
def test_converted_net_equals_the_fm_net_at_init_on_every_row(kind, interval_input):
    net = fm_net()
    model = finetune.from_flow_matching(net, "t_embedder", interval_embedder=kind, interval_input=interval_input)
    z, r, t, y = batch()
    ref = net(z, t, y)
    out = model(z, r, t, y=y)
    assert (out - ref).abs().max() <= 1e-6  # r = t rows and r != t rows alike
    assert torch.equal(out[:4], ref[:4])
    # the bare network is untouched by the hook when called on its own
    assert torch.equal(net(z, t, y), ref)
    # once the new embedding is trained, r matters
    with torch.no_grad():
        for p in model.interval_embedder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    moved = model(z, r, t, y=y)
    assert not torch.allclose(moved, model(z, torch.zeros_like(r), t, y=y))


def test_exact_in_float64_and_in_the_noise_at_0_convention():
    net = fm_net(F64)
    z, r, t, y = batch(dtype=F64)
    assert torch.equal(finetune.from_flow_matching(net)(z, r, t, y=y), net(z, t, y))
    flipped = finetune.from_flow_matching(net, time_convention="noise_at_0")
    assert torch.equal(flipped(z, r, t, y=y), mfl.adapters.from_velocity_net(net, "noise_at_0")(z, r, t, y=y))
    scaled = finetune.from_flow_matching(net, time_scale=1000.0)
    assert torch.equal(scaled(z, r, t, y=y), net(z, t * 1000.0, y))


def test_gradients_reach_the_zero_initialised_layer_and_then_the_rest():
    net = fm_net()
    model = finetune.from_flow_matching(net, "t_embedder")
    last = model.interval_embedder.mlp[2]
    assert last.weight.abs().max() == 0 and last.bias.abs().max() == 0
    z, _, _, y = batch(16)
    loss = mfl.MeanFlowLoss(times=mfl.TimePairSampler(equal_fraction=0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    loss(model, z, model_kwargs={"y": y}, generator=gen).loss.backward()
    assert last.weight.grad.abs().max() > 0
    assert model.interval_embedder.mlp[0].weight.grad.abs().max() == 0  # behind the zero layer at step 1
    opt.step()
    opt.zero_grad()
    loss(model, z, model_kwargs={"y": y}, generator=gen).loss.backward()
    assert model.interval_embedder.mlp[0].weight.grad.abs().max() > 0


def test_names_and_a_flow_matching_state_dict_loads():
    net = fm_net()
    model = finetune.from_flow_matching(net)
    names = [n for n, _ in model.named_parameters()]
    own = [n for n, _ in net.named_parameters()]
    assert names[: len(own)] == own
    assert all(n.startswith("interval_embedder.") for n in names[len(own) :]) and len(names) > len(own)
    assert set(model.state_dict()) == set(net.state_dict()) | {
        f"interval_embedder.{k}" for k in model.interval_embedder.state_dict()
    }
    trained = fm_net(seed=5)
    res = model.load_state_dict(trained.state_dict(), strict=False)
    assert not res.unexpected_keys and all(k.startswith("interval_embedder.") for k in res.missing_keys)
    z, r, t, y = batch()
    assert (model(z, r, t, y=y) - trained(z, t, y)).abs().max() <= 1e-6
    fresh = finetune.from_flow_matching(fm_net())
    missing = fresh.load_fm_state_dict(trained.state_dict())
    assert missing and all(k.startswith("interval_embedder.") for k in missing)
    assert (fresh(z, r, t, y=y) - trained(z, t, y)).abs().max() <= 1e-6
    bad = dict(trained.state_dict())
    bad.pop("inp.weight")
    bad["extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"missing \['inp.weight'\].*unexpected \['extra'\]"):
        fresh.load_fm_state_dict(bad)
    # the converted model round-trips its own checkpoint, and moves / copies as one module
    again = finetune.from_flow_matching(fm_net(seed=9))
    again.load_state_dict(model.state_dict())
    assert torch.equal(again(z, r, t, y=y), model(z, r, t, y=y))
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin.interval_embedder.mlp[2].weight.fill_(0.3)
    assert (model(z, r, t, y=y) - trained(z, t, y)).abs().max() <= 1e-6  # the original is unchanged
    assert not torch.allclose(twin(z, r, t, y=y), model(z, r, t, y=y))  # the copy's hook drives the copy
    model.double()
    assert net.offset.dtype == F64 and net.t_embedder.mlp[0].weight.dtype == F64
    model.eval()
    assert not net.training and not model.interval_embedder.training


def test_jvp_through_the_converted_net_matches_finite_differences():
    net = fm_net(F64)
    model = finetune.from_flow_matching(net)
    with torch.no_grad():  # a trained-looking interval embedding: du/dt then has a d/dh part too
        for p in model.interval_embedder.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    z, r, t, y = batch(dtype=F64)
    tangent = torch.randn_like(z)
    ad = mfl.time_derivative(model, z, r, t, tangent, {"y": y}, strategy="nograd").dudt
    eps = 1e-6
    fd = (model(z + eps * tangent, r, t + eps, y=y) - model(z - eps * tangent, r, t - eps, y=y)) / (2 * eps)
    assert (ad - fd).abs().max() <= 1e-7 * max(1.0, float(ad.abs().max()))
    # with interval_input="r" the interval input does not move with t: its tangent is zero
    model_r = finetune.from_flow_matching(net, interval_input="r")
    model_r.interval_embedder.load_state_dict(model.interval_embedder.state_dict())
    ad_r = mfl.time_derivative(model_r, z, r, t, tangent, {"y": y}, strategy="nograd").dudt
    fd_r = (model_r(z + eps * tangent, r, t + eps, y=y) - model_r(z - eps * tangent, r, t - eps, y=y)) / (2 * eps)
    assert (ad_r - fd_r).abs().max() <= 1e-7 * max(1.0, float(ad_r.abs().max()))


def test_meanflow_trains_the_converted_net_and_checks_pass():
    net = fm_net()
    model = finetune.from_flow_matching(net)
    z, _, _, y = batch(16)
    report = mfl.check_model(model, z, model_kwargs={"y": y})
    assert not [f for f in report.findings if f.severity == "error"], report
    out = mfl.MeanFlowLoss()(model, z, model_kwargs={"y": y})
    assert torch.isfinite(out.loss)


def test_bad_paths_and_embedders_raise():
    net = fm_net()
    with pytest.raises(ValueError, match=r"no submodule 'time_embed'.*t_embedder"):
        finetune.from_flow_matching(net, "time_embed")
    with pytest.raises(ValueError, match="not a submodule"):
        finetune.from_flow_matching(net, nn.Linear(2, 2))
    with pytest.raises(ValueError, match="cannot determine the output shape"):
        finetune.from_flow_matching(net, "inp")  # takes (B, 6), not (B,) times
    with pytest.raises(ValueError, match="runs no layer with parameters"):
        finetune.from_flow_matching(net, "t_embedder.mlp.1")  # a SiLU: nothing to zero-initialise
    with pytest.raises(ValueError, match="interval_input must be one of"):
        finetune.from_flow_matching(net, interval_input="h")
    with pytest.raises(ValueError, match="time_convention must be one of"):
        finetune.from_flow_matching(net, time_convention="noise_at_1")
    with pytest.raises(ValueError, match="interval_embedder must be one of"):
        finetune.from_flow_matching(net, interval_embedder="mlp")
    with pytest.raises(ValueError, match="time_scale must be a positive number"):
        finetune.from_flow_matching(net, time_scale=0)
    with pytest.raises(ValueError, match="same shape"):
        finetune.from_flow_matching(net, interval_embedder=finetune.SinusoidalEmbedder(8))

    class Shift(nn.Module):  # a constant after the last layer
        def forward(self, x):
            return x + 1

    with pytest.raises(ValueError, match="does not make its output zero"):
        finetune.from_flow_matching(net, interval_embedder=nn.Sequential(finetune.SinusoidalEmbedder(16), Shift()))
    with pytest.raises(ValueError, match="already an adapter"):
        finetune.from_flow_matching(mfl.adapters.from_velocity_net(net))
    with pytest.raises(TypeError, match=r"nn\.Module"):
        finetune.from_flow_matching(lambda z, t: z)
    model = finetune.from_flow_matching(net)
    with pytest.raises(ValueError, match="already converted"):
        finetune.from_flow_matching(model)

    class Skips(FMNet):  # never calls its time embedder
        def forward(self, z, t, y):
            return self.out(torch.tanh(self.inp(z)))

    with pytest.raises(RuntimeError, match="was not called"):
        finetune.from_flow_matching(Skips())(*batch()[:3], y=batch()[3])


@pytest.mark.slow
def test_torch_compile_of_the_converted_net():
    net = fm_net()
    model = finetune.from_flow_matching(net)
    with torch.no_grad():
        for p in model.interval_embedder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    z, r, t, y = batch()
    compiled = torch.compile(model)
    torch.testing.assert_close(compiled(z, r, t, y=y), model(z, r, t, y=y), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(z, r, t, y=y)
    assert explained.graph_break_count == 0, explained.break_reasons
    out = mfl.MeanFlowLoss()(compiled, z, model_kwargs={"y": y}, target_model=compiled)
    out.loss.backward()
    assert model.interval_embedder.mlp[2].weight.grad.abs().max() > 0


def _perturbed(model):
    with torch.no_grad():
        for p in model.interval_embedder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_an_embedder_called_twice_per_forward_is_refused():
    class TwiceNet(FMNet):
        def forward(self, z, t, y):
            c = self.t_embedder(t) + self.t_embedder(torch.zeros_like(t)) + self.y_embedder(y)
            return self.out(torch.tanh(self.inp(z)) * (1 + c))

    torch.manual_seed(0)
    model = finetune.from_flow_matching(TwiceNet(), "t_embedder")
    z, r, t, y = batch()
    with pytest.raises(RuntimeError, match="called 2 times in one forward"):
        model(z, r, t, y=y)


def test_reentrant_calls_keep_the_outer_interval():
    z, r, t, y = batch()
    model = _perturbed(finetune.from_flow_matching(fm_net(), "t_embedder"))
    with torch.no_grad():
        want = model(z, r, t, y=y)

    net = model.net  # patched below: it calls the converted model itself before its own embedder
    original = type(net).forward

    def forward(self, z, t, y):
        if not getattr(self, "_inside", False):
            self._inside = True
            try:
                model(z, torch.zeros_like(t), t, y=y)  # an inner call with another interval
            finally:
                self._inside = False
        return original(self, z, t, y)

    net.forward = forward.__get__(net)
    with torch.no_grad():
        got = model(z, r, t, y=y)
    assert torch.equal(got, want)


def test_calls_from_two_threads_at_once_are_refused():
    import threading

    model = _perturbed(finetune.from_flow_matching(fm_net(), "t_embedder"))
    z, r, t, y = batch()
    started, release, errors = threading.Event(), threading.Event(), []
    net = model.net
    original = type(net).forward

    def slow(self, z, t, y):
        if threading.current_thread().name == "first":
            started.set()
            release.wait(5)
        return original(self, z, t, y)

    net.forward = slow.__get__(net)

    def first():
        with torch.no_grad():
            model(z, r, t, y=y)

    th = threading.Thread(target=first, name="first")
    th.start()
    started.wait(5)
    try:
        with torch.no_grad():
            model(z, r, t, y=y)
    except RuntimeError as err:
        errors.append(str(err))
    release.set()
    th.join()
    assert errors and "two threads at once" in errors[0]


def test_activation_checkpointing_around_the_embedder_is_refused():
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(FMNet):
        def forward(self, z, t, y):
            c = checkpoint(self.t_embedder, t, use_reentrant=True) + self.y_embedder(y)
            return self.out(torch.tanh(self.inp(z)) * (1 + c))

    torch.manual_seed(0)
    model = finetune.from_flow_matching(Checkpointed(), "t_embedder")
    z, r, t, y = batch()
    out = model(z, r, t.requires_grad_(), y=y)
    with pytest.raises(RuntimeError, match="ran again during backward"):
        out.square().sum().backward()
