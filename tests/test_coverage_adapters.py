"""Adapters around networks that are not nn.Modules, and the protocol check's less common inputs."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

import meanflow_losses as mfl
from meanflow_losses.adapters import _signature, check_protocol, ignores_r


def _interval_fn(z, t, h):
    return z * t[:, None] + h[:, None]


def test_adapter_of_a_plain_function_has_an_empty_state_and_loads_one():
    model = mfl.adapters.from_interval_net(_interval_fn)
    assert dict(model.state_dict()) == {}
    result = model.load_state_dict({})
    assert result.missing_keys == [] and result.unexpected_keys == []
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"w\""):
        model.load_state_dict({"w": torch.zeros(1)})
    assert model.train(False) is model and not model.training
    assert repr(model) == "IntervalNetAdapter(net=function, time_convention='data_at_0')"
    z, r, t = torch.ones(2, 3), torch.tensor([0.25, 0.5]), torch.tensor([0.5, 1.0])
    assert torch.equal(model(z, r, t), _interval_fn(z, t, t - r))


def test_interval_adapter_refuses_r_and_t_of_other_shapes():
    model = mfl.adapters.from_interval_net(_interval_fn)
    with pytest.raises(ValueError, match=r"r and t must have the same shape, got \(2,\) and \(3,\)"):
        model(torch.ones(3, 2), torch.zeros(2), torch.ones(3))


def test_velocity_adapter_repr_names_the_network_and_convention():
    model = mfl.adapters.from_velocity_net(nn.Linear(2, 2), time_convention="noise_at_0")
    assert "net=Linear, time_convention='noise_at_0'" in repr(model)


class _Wrapper(nn.Module):
    """A DDP-like wrapper: the wrapped module is ``.module``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def test_unwrapping_looks_through_at_most_sixteen_wrappers():
    inner = mfl.adapters.from_velocity_net(lambda z, t: z)
    model = inner
    for _ in range(16):
        model = _Wrapper(model)
    assert ignores_r(model)  # 16 wrappers: the adapter is reached
    assert not ignores_r(_Wrapper(model))  # 17: the search stops at the 17th level


def test_check_protocol_reads_the_remainder_of_a_partial():
    def fn(scale, z, t):
        return scale * z

    with pytest.raises(ValueError, match=r"its signature \(z, t\) takes fewer than the three positional inputs"):
        check_protocol(functools.partial(fn, 2.0))

    def ok(scale, z, r, t):
        return scale * z

    check_protocol(functools.partial(ok, 2.0))
    assert list(_signature(functools.partial(ok, 2.0)).parameters) == ["z", "r", "t"]


def test_check_protocol_accepts_what_it_cannot_read():
    assert _signature(torch.add) is None  # a builtin without a signature
    check_protocol(torch.add)  # nothing to judge: accepted
    check_protocol(lambda *args: args[0])  # *args: accepted


def test_check_protocol_refuses_a_non_callable_naming_it():
    with pytest.raises(TypeError, match=r"teacher must be callable as teacher\(z, r, t, \*\*model_kwargs\), got int"):
        check_protocol(3, name="teacher")


def test_check_protocol_refuses_a_network_declaring_t_only():
    class FM(nn.Module):
        meanflow_inputs = "t"

        def forward(self, z, r, t):
            return z

    with pytest.raises(ValueError, match=r"model declares inputs \(z, t\); wrap it with .*from_velocity_net"):
        check_protocol(FM())


def test_adapter_inside_a_container_saves_and_loads_under_the_networks_names():
    net = nn.Linear(2, 2)
    box = nn.ModuleDict({"m": mfl.adapters.from_velocity_net(net)})
    state = box.state_dict()
    assert sorted(state) == ["m.bias", "m.weight"]
    assert torch.equal(state["m.weight"], net.weight)
    new = {"m.weight": torch.full((2, 2), 3.0), "m.bias": torch.full((2,), -1.0)}
    box.load_state_dict(new)
    assert net.weight.eq(3.0).all() and net.bias.eq(-1.0).all()

    fn_box = nn.ModuleDict({"m": mfl.adapters.from_velocity_net(lambda z, t: z)})
    assert dict(fn_box.state_dict()) == {}
    assert fn_box.load_state_dict({}).missing_keys == []


def test_adapter_save_hook_writes_the_networks_own_entries():
    """``_save_to_state_dict`` (PyTorch's per-module hook) of a module adapter is the network's own."""
    net = nn.Linear(2, 2)
    dest: dict = {}
    mfl.adapters.from_interval_net(net)._save_to_state_dict(dest, "p.", False)
    assert sorted(dest) == ["p.bias", "p.weight"]
    assert torch.equal(dest["p.weight"], net.weight)
