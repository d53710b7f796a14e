"""from_flow_matching: the remaining argument checks, embeddings of other shapes, and the hook's own checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from meanflow_losses import finetune
from tests.test_finetune import FMNet, batch, fm_net


def test_sinusoidal_embedder_refuses_bad_sizes():
    with pytest.raises(ValueError, match=r"need out_dim >= 1 and an even frequency_dim >= 2, got 0, 256"):
        finetune.SinusoidalEmbedder(0)
    with pytest.raises(ValueError, match=r"need out_dim >= 1 and an even frequency_dim >= 2, got 8, 3"):
        finetune.SinusoidalEmbedder(8, 3)


def test_time_embedder_given_as_a_module_and_read_back():
    net = fm_net()
    model = finetune.from_flow_matching(net, net.t_embedder)
    assert model.embedder_name == "t_embedder"
    assert model.time_embedder is net.t_embedder
    assert repr(model).startswith(
        "FlowMatchingFineTune(\n  net=FMNet, time_embedder='t_embedder', interval_input='t_minus_r', "
        "time_convention='data_at_0', time_scale=1"
    )


def test_time_embedder_of_another_type_or_the_network_itself_is_refused():
    net = fm_net()
    with pytest.raises(TypeError, match=r"time_embedder must be an attribute path \(str\) or an nn\.Module, got 3"):
        finetune.from_flow_matching(net, 3)
    with pytest.raises(TypeError, match=r"got ''"):
        finetune.from_flow_matching(net, "")
    net.add_module("me", net)  # a path that leads back to the network
    with pytest.raises(ValueError, match=r"time_embedder must be a submodule of the network, not the network itself"):
        finetune.from_flow_matching(net, "me")


def test_forward_refuses_r_and_t_of_other_shapes():
    model = finetune.from_flow_matching(fm_net())
    z, r, t, y = batch()
    with pytest.raises(ValueError, match=r"r and t must have the same shape, got \(7,\) and \(8,\)"):
        model(z, r[:7], t, y=y)


class _ScalarEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 4)

    def forward(self, t):
        return self.lin(t[:, None]).sum()


def test_an_embedder_without_a_batch_dimension_cannot_be_probed():
    class Net(FMNet):
        def __init__(self):
            super().__init__()
            self.t_embedder = _ScalarEmbed()

    with pytest.raises(ValueError, match=r"on times of shape \(2,\) it returned \(\), not a \(2, \.\.\.\) tensor"):
        finetune.from_flow_matching(Net())


class _TokenTimeEmbed(nn.Module):
    """A time embedding of shape (B, 1, C): one time token."""

    def __init__(self, width=16):
        super().__init__()
        self.lin = nn.Linear(1, width)

    def forward(self, t):
        return self.lin(t[:, None])[:, None, :]


class _TokenNet(FMNet):
    def __init__(self):
        super().__init__()
        self.t_embedder = _TokenTimeEmbed()

    def forward(self, z, t, y):
        c = self.t_embedder(t)[:, 0] + self.y_embedder(y)
        return self.out(torch.tanh(self.inp(z)) * (1 + c))


def test_sinusoidal_interval_embedder_needs_a_two_dimensional_embedding():
    with pytest.raises(
        ValueError,
        match=r"'sinusoidal' needs a \(B, C\) time embedding; 't_embedder' returns shape \(2, 1, 16\)",
    ):
        finetune.from_flow_matching(_TokenNet(), interval_embedder="sinusoidal")


def test_an_interval_embedding_of_another_shape_is_reshaped_to_the_time_embeddings():
    torch.manual_seed(0)
    net = _TokenNet()
    e_h = finetune.SinusoidalEmbedder(16, 8)  # (B, 16) where the time embedder gives (B, 1, 16)
    model = finetune.from_flow_matching(net, interval_embedder=e_h)
    z, r, t, y = batch()
    assert torch.equal(model(z, r, t, y=y), net(z, t, y))  # zero at initialisation
    with torch.no_grad():
        for p in e_h.parameters():
            p.add_(0.1)
    expected = net.out(torch.tanh(net.inp(z)) * (1 + net.t_embedder(t)[:, 0] + e_h(t - r) + net.y_embedder(y)))
    torch.testing.assert_close(model(z, r, t, y=y), expected)


class _Constant(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out
        self.lin = nn.Linear(1, 16)

    def forward(self, t):
        return self.out


def test_the_hook_refuses_an_embedding_that_is_not_a_batch_tensor():
    net = fm_net()
    z, r, t, y = batch()
    net.t_embedder = _Constant(("not", "a tensor"))
    model = finetune.FlowMatchingFineTune(net, "t_embedder", finetune.SinusoidalEmbedder(16))
    with pytest.raises(TypeError, match=r"the time embedder 't_embedder' returned tuple, not a tensor"):
        model(z, r, t, y=y)
    net.t_embedder = _Constant(torch.zeros(1, 16))
    model = finetune.FlowMatchingFineTune(net, "t_embedder", finetune.SinusoidalEmbedder(16))
    with pytest.raises(ValueError, match=r"returned shape \(1, 16\), whose first dimension is not the batch size 8"):
        model(z, r, t, y=y)
