"""How the package calls a network: error translation, module discovery, buffer protection, random state."""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from torch import nn

from meanflow_losses import passes
from meanflow_losses.passes import call, modules_of, preserve_buffers, reseed, same_randomness


def _zr(n=3):
    return torch.randn(n, 2), torch.zeros(n), torch.ones(n)


def test_call_without_conditioning_passes_no_keywords():
    seen = {}

    def model(z, r, t, **kw):
        seen.update(kw)
        return 2 * z

    z, r, t = _zr()
    assert torch.equal(call(model, z, r, t), 2 * z)
    assert seen == {}


def test_call_reraises_a_type_error_that_is_not_a_binding_error_unchanged():
    def model(z, r, t):
        raise TypeError("unsupported operand inside the network")

    with pytest.raises(TypeError, match=r"^unsupported operand inside the network$"):
        call(model, *_zr())


def test_call_reraises_other_value_errors_unchanged():
    def model(z, r, t):
        raise ValueError("a network's own complaint")

    with pytest.raises(ValueError, match=r"^a network's own complaint$"):
        call(model, *_zr())


class _Labelled(nn.Module):
    """A class-conditional net whose label table has no row for the null class ``n = 3``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin = nn.Embedding(3, 2), nn.Linear(2, 2)

    def forward(self, z, r, t, y):
        return self.lin(z) + self.emb(y) * (t - r)[:, None]


def test_a_missing_null_class_row_is_named_with_its_fix():
    """Condition dropout to ``mfl.null_class(3)`` on a net with ``nn.Embedding(3, dim)``: torch's bare "index out
    of range" is re-raised with the cause and the fix, from the loss call itself."""
    import meanflow_losses as mfl

    torch.manual_seed(0)
    guidance = mfl.TrainingGuidance(drop_prob=0.9, null_condition=mfl.null_class(3))
    loss_fn = mfl.MeanFlowLoss(guidance=guidance)
    message = (
        r"^target_model\(z, r, t, \*\*model_kwargs\) failed: index out of range in self\. "
        r"model_kwargs has integer entries \(\['y'\]\).*nn\.Embedding\(n \+ 1, dim\)"
    )
    with pytest.raises(IndexError, match=message):
        loss_fn(_Labelled(), torch.randn(64, 2), model_kwargs={"y": torch.arange(64) % 3})

    # without integer conditioning (a bool mask is not a label), or with another IndexError, the error is the
    # network's own
    def model(z, r, t, **kw):
        raise IndexError(kw.get("why", "index out of range in self"))

    with pytest.raises(IndexError, match=r"^index out of range in self$"):
        call(model, *_zr())
    with pytest.raises(IndexError, match=r"^index out of range in self$"):
        call(model, *_zr(), {"mask": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(IndexError, match=r"^list index out of range$"):
        call(model, *_zr(), {"y": torch.arange(3), "why": "list index out of range"})


def test_modules_of_finds_modules_behind_partials_bound_methods_and_closures():
    lin, bn = nn.Linear(2, 2), nn.BatchNorm1d(2)

    def fn(z, r, t, net, other=None):
        return net(z)

    part = functools.partial(fn, net=lin, other=bn)
    assert modules_of(part) == [lin, bn]
    assert modules_of(lin.forward) == [lin]  # a bound method: __self__
    assert modules_of(None) == []
    assert modules_of(42) == []


def test_modules_of_skips_an_empty_closure_cell():
    lin = nn.Linear(2, 2)

    def make():
        def f(z, r, t):
            return lin(z) + late  # ``late``: a cell that is never filled

        if False:  # keeps ``late`` a (never filled) cell of f
            late = None
        return f

    f = make()
    assert f.__closure__ is not None and len(f.__closure__) == 2
    assert modules_of(f) == [lin]


def test_modules_of_stops_after_five_levels_of_wrapping():
    lin = nn.Linear(2, 2)

    def wrap(inner):
        return lambda z, r, t: inner(z, r, t)

    shallow = lin
    for _ in range(5):
        shallow = wrap(shallow)
    deep = wrap(shallow)
    assert modules_of(shallow) == [lin]
    assert modules_of(deep) == []


def test_preserve_buffers_puts_back_a_buffer_the_block_reassigned():
    bn = nn.BatchNorm1d(2)
    original = bn.running_mean
    with preserve_buffers(bn):
        bn._buffers["running_mean"] = torch.full((2,), 7.0)
        original.fill_(3.0)
    assert bn.running_mean is original
    assert bn.running_mean.tolist() == [0.0, 0.0]


def test_preserve_buffers_of_a_plain_function_runs_the_block():
    ran = []
    with preserve_buffers(lambda z: z):
        ran.append(1)
    assert ran == [1]


def test_same_randomness_rewinds_eagerly_and_not_while_compiling(monkeypatch):
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    with same_randomness(cpu):
        a = torch.rand(4)
    assert torch.equal(torch.rand(4), a)
    monkeypatch.setattr(passes, "compiling", lambda: True)
    torch.manual_seed(0)
    with same_randomness(cpu):
        a = torch.rand(4)
    assert not torch.equal(torch.rand(4), a)


def test_same_randomness_forks_the_accelerator_of_the_device(monkeypatch):
    seen = {}

    @contextlib.contextmanager
    def fork_rng(**kwargs):
        seen.update(kwargs)
        yield

    monkeypatch.setattr(torch.random, "fork_rng", fork_rng)
    dev = torch.device("cuda", 1)
    with same_randomness(dev):
        pass
    assert seen == {"devices": [dev], "device_type": "cuda"}
    seen.clear()
    with same_randomness(torch.device("meta")):
        pass
    assert seen == {"devices": []}


def test_reseed_seeds_the_cpu_and_only_the_given_accelerator(monkeypatch):
    calls = []

    @contextlib.contextmanager
    def cuda_device(dev):
        calls.append(("device", dev))
        yield

    monkeypatch.setattr(torch.cuda, "device", cuda_device)
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda s: calls.append(("cuda", s)))
    monkeypatch.setattr(torch.xpu, "manual_seed", lambda s: calls.append(("xpu", s)))
    dev = torch.device("cuda", 1)
    reseed(dev, 5)
    assert calls == [("device", dev), ("cuda", 5)]
    expected = torch.Generator().manual_seed(5)
    assert torch.equal(torch.rand(3), torch.rand(3, generator=expected))
    calls.clear()
    reseed(torch.device("xpu"), 9)
    assert calls == [("xpu", 9)]
    expected = torch.Generator().manual_seed(9)
    assert torch.equal(torch.rand(3), torch.rand(3, generator=expected))
    calls.clear()
    reseed(torch.device("meta"), 2)  # no accelerator backend to seed
    assert calls == []
