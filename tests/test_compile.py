"""torch.compile: a compiled network and a compiled training step, with every objective and JVP strategy.

* zero graph breaks inside the loss (``torch._dynamo.explain``), guidance included, on an MLP and on a DiT-like
  network with a patch convolution, LayerNorm and SDPA attention (the operators whose forward-AD formulas the
  compiler cannot trace are routed to primitive forms, :mod:`meanflow_losses.traced_jvp`);
* a compiled network through every affine normalisation, transposed convolutions, masks that depend on t, causal
  and grouped-query attention over several query blocks gets the eager du/dt;
* a compiled step gives the eager step's loss, gradient and du/dt;
* no recompilation from step to step (beyond the one that makes the ``step`` integer dynamic, and one per
  alpha-Flow regime).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import meanflow_losses as mfl
from meanflow_losses import traced_jvp
from meanflow_losses.jvp import time_derivative
from tests.nets import MLP, time_features

NULL = mfl.null_class(3)
GUIDE = mfl.TrainingGuidance(omega=1.0, kappa=0.5, drop_prob=0.1, null_condition=NULL)


class PatchDiT(nn.Module):
    """A small DiT-like network: patch convolution, LayerNorm with adaLN, SDPA attention, labels."""

    def __init__(self, width: int = 16, heads: int = 2, n_classes: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(4, width, 2, 2)
        self.emb_y = nn.Embedding(n_classes + 1, width)
        self.cond = nn.Linear(16, 2 * width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.out = nn.Linear(width, 16)

    def forward(self, z, r, t, y):
        b = z.shape[0]
        c = self.cond(torch.cat([time_features(t), time_features(t - r)], 1)) + self.emb_y(y).repeat(1, 2)
        shift, scale = c.chunk(2, dim=1)
        h = self.patch(z).flatten(2).transpose(1, 2)  # (B, 16, width)
        a = self.norm(h) * (1 + scale[:, None]) + shift[:, None]
        q, k, v = self.qkv(a).view(b, 16, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        h = h + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 16, -1))
        return self.out(h).view(b, 4, 4, 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, 4, 8, 8)


OBJECTIVES = {
    "fm": lambda g: mfl.FlowMatchingLoss(guidance=g),
    "meanflow-nograd": lambda g: mfl.MeanFlowLoss(guidance=g),
    "meanflow-joint": lambda g: mfl.MeanFlowLoss(guidance=g, jvp="joint"),
    "meanflow-fd": lambda g: mfl.MeanFlowLoss(guidance=g, jvp="finite_difference"),
    "alphaflow-schedule": lambda g: mfl.AlphaFlowLoss(alpha=mfl.schedules.Sigmoid(0, 100), guidance=g),
    "alphaflow-meanflow": lambda g: mfl.AlphaFlowLoss(alpha=0.0, guidance=g),
    "splitmeanflow": lambda g: mfl.SplitMeanFlowLoss(guidance=g),
    "shortcut": lambda g: mfl.ShortcutLoss(guidance=g),
    "kim": lambda g: mfl.presets.accelerated_meanflow(100, guidance=g),
}
NETS = {"mlp": (lambda: MLP(n_classes=3), (32, 2)), "patch_dit": (PatchDiT, (8, 4, 8, 8))}


@pytest.mark.slow
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_no_graph_break_inside_the_loss(name, net, guided):
    make, shape = NETS[net]
    torch.manual_seed(0)
    model, loss = make(), OBJECTIVES[name](GUIDE if guided else None)
    x, y = torch.randn(shape), torch.randint(0, 3, (shape[0],))

    def step(x, y, k):
        return loss(model, x, model_kwargs={"y": y}, step=k).loss

    torch._dynamo.reset()
    explained = torch._dynamo.explain(step)(x, y, 50)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    assert explained.graph_count == 1


def _compiled_and_eager(name, net, backend, steps=3, step=None):
    """``steps`` compiled and eager training steps; the step counter is ``k`` unless ``step`` fixes it (a
    counter that changes costs one recompilation, after which none is allowed)."""
    make, shape = NETS[net]
    torch.manual_seed(0)
    base = make()
    m_c, m_e = copy.deepcopy(base), copy.deepcopy(base)
    loss_c, loss_e = OBJECTIVES[name](None), OBJECTIVES[name](None)

    def run(model, loss, x, y, e, t, r, k, extra):
        out = loss(model, x, model_kwargs={"y": y}, t=t, r=r, noise=e, step=k, **extra)
        out.loss.backward()
        return out.loss.detach(), out.extras.get("dudt")

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(run, backend=backend)
    g = torch.Generator().manual_seed(0)
    graphs = []
    for k in range(steps):
        x, e = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        y = torch.randint(0, 3, (shape[0],), generator=g)
        pair = mfl.TimePairSampler().sample(shape[0], generator=g)
        # every draw is passed in: a compiled graph draws from its own random stream
        extra = {"lam": torch.rand(shape[0], generator=g)} if name == "splitmeanflow" else {}
        got = compiled(m_c, loss_c, x, y, e, pair.t, pair.r, k if step is None else step, extra)
        graphs.append(counters["stats"]["unique_graphs"])
        with mfl.value_checks(True):
            ref = run(m_e, loss_e, x, y, e, pair.t, pair.r, k if step is None else step, extra)
        grads_c = torch.cat([p.grad.flatten() for p in m_c.parameters()])
        grads_e = torch.cat([p.grad.flatten() for p in m_e.parameters()])
        yield got, ref, grads_c, grads_e
        for p in [*m_c.parameters(), *m_e.parameters()]:
            p.grad = None
    settled = 0 if step is not None else 1
    assert graphs[-1] == graphs[settled], f"recompiled after step {settled}: unique graphs per step {graphs}"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fm", "meanflow-nograd", "meanflow-joint", "meanflow-fd", "kim", "splitmeanflow"])
@pytest.mark.parametrize("net", sorted(NETS))
def test_compiled_step_equals_eager_and_does_not_recompile(name, net):
    """aot_eager: the whole forward/backward is traced and partitioned; the numbers equal the eager step's."""
    for (loss_c, dudt_c), (loss_e, dudt_e), g_c, g_e in _compiled_and_eager(name, net, "aot_eager"):
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-7)
        assert float((g_c - g_e).norm() / g_e.norm()) < 1e-5
        if dudt_e is not None:
            assert float((dudt_c - dudt_e).norm() / dudt_e.norm()) < 1e-5


@pytest.mark.slow
def test_inductor_compiled_step_matches_eager():
    # a fixed step counter: one compilation (inductor's are the slow ones), two steps on it
    for (loss_c, dudt_c), (loss_e, dudt_e), g_c, g_e in _compiled_and_eager(
        "meanflow-nograd", "patch_dit", "inductor", steps=2, step=1
    ):
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-6)
        assert float((g_c - g_e).norm() / g_e.norm()) < 1e-4
        assert float((dudt_c - dudt_e).norm() / dudt_e.norm()) < 1e-5


@pytest.mark.slow
def test_dynamic_shapes_compiled_step_with_the_pass_equals_eager():
    """``torch.compile(dynamic=True)`` of a whole MeanFlow step with the docs' pass (its shape and stride checks on
    symbolic sizes): loss and gradients equal to eager on two batch sizes. It still compiles once per batch size
    (the interval-row count is a Python integer of the batch size, which the compiler specialises on), as
    docs/performance.md says, so the test does not ask for one graph."""
    torch.manual_seed(0)
    base = MLP(n_classes=3)
    m_c, m_e = copy.deepcopy(base), copy.deepcopy(base)
    loss_fn = mfl.MeanFlowLoss()
    options = {"post_grad_custom_pre_pass": traced_jvp.DropZeroProducts()}

    def run(model, x, y, e, t, r):
        out = loss_fn(model, x, model_kwargs={"y": y}, t=t, r=r, noise=e, step=1)
        out.loss.backward()
        return out.loss.detach()

    torch._dynamo.reset()
    compiled = torch.compile(run, dynamic=True, options=options)
    g = torch.Generator().manual_seed(0)
    for n in (16, 24):
        x, e = torch.randn(n, 2, generator=g), torch.randn(n, 2, generator=g)
        y = torch.randint(0, 3, (n,), generator=g)
        pair = mfl.TimePairSampler().sample(n, generator=g)
        got = compiled(m_c, x, y, e, pair.t, pair.r)
        ref = run(m_e, x, y, e, pair.t, pair.r)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
        g_c = torch.cat([p.grad.flatten() for p in m_c.parameters()])
        g_e = torch.cat([p.grad.flatten() for p in m_e.parameters()])
        assert float((g_c - g_e).norm() / g_e.norm()) < 1e-5
        for p in [*m_c.parameters(), *m_e.parameters()]:
            p.grad = None


@pytest.mark.slow
def test_compiled_network_dudt_equals_eager_through_conv_norm_and_attention():
    """``torch.compile(net)`` in an eager loss: the engine compiles the JVP region too (no eager fallback)."""
    torch.manual_seed(0)
    net = PatchDiT()
    compiled = torch.compile(copy.deepcopy(net))
    z, tan = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    t, r = torch.rand(6) * 0.8 + 0.1, torch.rand(6) * 0.1
    y = torch.randint(0, 3, (6,))
    ref = time_derivative(net, z, r, t, tan, {"y": y}).dudt
    for strategy in mfl.JVP_STRATEGIES:
        got = time_derivative(compiled, z, r, t, tan, {"y": y}, strategy=strategy).dudt
        other = time_derivative(net, z, r, t, tan, {"y": y}, strategy=strategy).dudt
        # the difference quotient divides the compiled forward's rounding (~1e-7) by its step 5e-3: its floor is
        # eps_mach / eps = 2.4e-5 of |u|, so it is held to that; the AD strategies to 1e-5
        tol = 3e-5 if strategy == "finite_difference" else 1e-5
        assert float((got - other).norm() / other.norm()) < tol, strategy
    assert float((got - ref).norm() / ref.norm()) < 5e-3  # finite differences against AD


class NormNet(nn.Module):
    """Every normalisation with affine parameters (GroupNorm, LayerNorm, InstanceNorm, RMSNorm, BatchNorm) and a
    transposed convolution: the layers of U-Nets and DiTs whose fused forward-mode formulas fail under the compiler."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.inp = nn.Conv2d(4, c, 3, padding=1)
        self.gn, self.inorm = nn.GroupNorm(2, c), nn.InstanceNorm2d(c, affine=True)
        self.ln, self.rms = nn.LayerNorm(c), nn.RMSNorm(c)
        self.bn = nn.BatchNorm2d(c)
        self.up, self.down = nn.ConvTranspose2d(c, c, 2, 2), nn.Conv2d(c, 4, 2, 2)

    def forward(self, z, r, t):
        h = self.inp(z) * (1 + t[:, None, None, None]) + (t - r)[:, None, None, None]
        h = self.inorm(F.silu(self.gn(h)))
        h = self.rms(self.ln(h.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.down(self.up(self.bn(h)))


class MaskedAttentionNet(nn.Module):
    """Attention with a mask computed from t, causal attention over more query rows than one block, and GQA."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.q, self.kv = nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, z, r, t):  # z: (B, N, 8)
        b, n, _ = z.shape
        q = self.q(z).view(b, n, 4, 2).transpose(1, 2)
        kv = self.kv(z).view(b, n, 4, 2).transpose(1, 2)[:, :2]
        bias = (t - r)[:, None, None, None] * torch.linspace(-1, 1, n)  # (B, 1, 1, N), differentiated
        a = F.scaled_dot_product_attention(q, kv, kv, attn_mask=bias, enable_gqa=True)
        c = F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return (a + c).transpose(1, 2).reshape(b, n, -1) * t[:, None, None]


class TorchAttentionNet(nn.Module):
    """``nn.MultiheadAttention`` in eval mode (its fast path) and a ``nn.TransformerEncoderLayer``: PyTorch's own
    attention modules, whose inner SDPA call the operator routes do not see."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(c, 2, batch_first=True).eval()
        self.enc = nn.TransformerEncoderLayer(c, 2, 16, dropout=0.0, batch_first=True)

    def forward(self, z, r, t):  # z: (B, N, 8)
        h = z * (1 + t[:, None, None]) + (t - r)[:, None, None]
        return self.enc(self.mha(h, h, h, need_weights=False)[0])


class ScatterNet(nn.Module):
    """Tokens scattered into a learned canvas (``index_copy``), ``addmm`` with ``beta != 1`` and ``addcmul`` with
    ``value != 1`` on tangent-free operands: a wrong du/dt and a crash in torch 2.13's compiler before the zeros
    of those formulas were materialised (:class:`~meanflow_losses.traced_jvp.DropZeroProducts`)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.canvas = nn.Linear(8, 8), nn.Parameter(torch.randn(12, 8))
        self.c, self.w = nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(8, 8))
        self.register_buffer("idx", torch.tensor([0, 3, 5, 6, 9, 11]))

    def forward(self, z, r, t):  # z: (B, 6, 8)
        h = self.lin(z * (1 + t[:, None, None]) + (t - r)[:, None, None])
        full = self.canvas.expand(z.shape[0], 12, 8).index_copy(1, self.idx, h)
        h = (full[:, ::2] + full[:, 1::2]).reshape(-1, 8)
        h = torch.addmm(self.c, h, self.w * (1 + t.mean()), beta=0.5, alpha=2.0)
        return torch.addcmul(self.c, h, h, value=0.5).reshape(z.shape)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (NormNet, (3, 4, 4, 4)),
        (MaskedAttentionNet, (2, 20, 8)),
        (TorchAttentionNet, (2, 5, 8)),
        (ScatterNet, (2, 6, 8)),
    ],
    ids=["norms", "attention", "torch_attention", "scatter"],
)
def test_compiled_dudt_through_affine_norms_masks_and_query_blocks(make, shape, monkeypatch):
    """A compiled network with these layers gets the eager du/dt (these compiles failed with a fake-tensor error)."""
    monkeypatch.setattr(traced_jvp, "QUERY_BLOCK", 8)  # 20 query rows: three blocks in the traced attention
    torch.manual_seed(0)
    net = make()  # train mode: NormNet's BatchNorm counts batches and normalises with the batch's statistics
    z, tan = torch.randn(shape), torch.randn(shape)
    t = torch.rand(shape[0]) * 0.8 + 0.1
    r = t * 0.3
    buffers = {k: b.clone() for k, b in net.named_buffers()}
    ref = time_derivative(net, z, r, t, tan).dudt
    torch._dynamo.reset()
    for _ in range(2):  # the second call runs the cached graph
        got = time_derivative(torch.compile(net), z, r, t, tan).dudt
        assert float((got - ref).norm() / ref.norm()) < 1e-5
    for k, b in net.named_buffers():  # the JVP leaves the running statistics and the batch counter alone
        assert torch.equal(b, buffers[k]), k


@pytest.mark.slow
def test_compiled_step_refuses_counting_batch_norm_with_a_clear_error():
    """A compiled training step cannot run train-mode BatchNorm's in-place counter inside the traced JVP."""
    net, loss = NormNet(), mfl.MeanFlowLoss()
    torch._dynamo.reset()
    step = torch.compile(lambda x: loss(net, x).loss)
    with pytest.raises(RuntimeError, match="BatchNorm layers in train mode"):
        step(torch.randn(8, 4, 4, 4))


def test_traced_rules_equal_pytorchs_forward_ad():
    """The explicit forward-mode rules used under compile equal PyTorch's own (float64), eagerly."""
    from meanflow_losses.forward_ad import ForwardADRoutes

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 5, generator=g, dtype=torch.float64)
    dx = torch.randn(x.shape, generator=g, dtype=torch.float64)
    w = torch.randn(6, 6, 3, 3, generator=g, dtype=torch.float64)
    gamma, beta = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    mean, var = torch.randn(6, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64) + 0.5
    q = torch.randn(2, 2, 7, 4, generator=g, dtype=torch.float64)
    fns = {
        "conv": lambda a: F.conv2d(a, w, beta, padding=1),
        "layer_norm": lambda a: F.layer_norm(a, (5, 5)),
        "layer_norm_affine": lambda a: F.layer_norm(a.transpose(1, 3), (6,), gamma, beta),
        "group_norm": lambda a: F.group_norm(a, 3, gamma, beta),
        "batch_norm_eval": lambda a: F.batch_norm(a, mean, var, gamma, beta, False),
        "batch_norm_train": lambda a: F.batch_norm(a, None, None, gamma, beta, True),
        "attention": lambda a: F.scaled_dot_product_attention(q * a.mean(), q, q, is_causal=True),
    }
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, fn in fns.items():
        with sdpa_kernel(SDPBackend.MATH):
            ref = torch.func.jvp(fn, (x,), (dx,))[1]
        with ForwardADRoutes(traced=True):
            got = torch.func.jvp(fn, (x,), (dx,))[1]
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12, msg=name)
