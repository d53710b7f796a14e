"""The DiT of examples/imagenet_dit: sizes, adaLN-Zero, raw-time embeddings, precision, attention kernels."""

import pytest
import torch

import meanflow_losses as mfl
from examples.imagenet_dit.dit import DIT_SIZES, DiT, build_dit, make_dit_config

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw):
    torch.manual_seed(0)
    return build_dit("DiT-S/2", depth=2, hidden_size=32, num_heads=2, input_size=8, num_classes=3, **kw)


def randomize(net):
    """Non-zero adaLN / output layers, so that every parameter matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net


def batch(n=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 4, 8, 8, generator=g, dtype=dtype)
    t = torch.rand(n, generator=g, dtype=dtype)
    r = t * torch.rand(n, generator=g, dtype=dtype)
    y = torch.arange(n) % 4  # includes the null class 3
    return x, r, t, y


def test_sizes_match_the_papers():
    expected = {
        "DiT-B/2": (12, 768, 12, 2),
        "DiT-L/2": (24, 1024, 16, 2),
        "DiT-XL/2": (28, 1152, 16, 2),
        "DiT-S/2": (12, 384, 6, 2),
        "DiT-B/4": (12, 768, 12, 4),
    }
    assert DIT_SIZES == expected
    with torch.device("meta"):
        counts = {name: sum(p.numel() for p in build_dit(name).parameters()) for name in ("DiT-B/2", "DiT-XL/2")}
    assert 128e6 < counts["DiT-B/2"] < 134e6  # DiT-B/2 (130M) + the h embedder
    assert 672e6 < counts["DiT-XL/2"] < 680e6  # DiT-XL/2 (675M) + the h embedder
    with pytest.raises(ValueError, match="unknown model"):
        make_dit_config("DiT-H/2")
    with pytest.raises(ValueError, match="unknown DiT option"):
        make_dit_config("DiT-B/2", dept=3)


def test_adaln_zero_output_is_zero_at_init_and_shapes():
    net = tiny()
    x, r, t, y = batch()
    out = net(x, t, t - r, y)
    assert out.shape == x.shape and out.abs().max() == 0
    with pytest.raises(ValueError, match="x must have shape"):
        net(torch.randn(2, 4, 6, 6), t[:2], t[:2], y[:2])


def test_conditioning_uses_t_h_and_label_including_null_class():
    net = randomize(tiny())
    x, r, t, y = batch()
    base = net(x, t, t - r, y)
    assert not torch.allclose(base, net(x, t, t - r + 0.1, y))  # h matters
    assert not torch.allclose(base, net(x, t + 0.1, t - r, y))  # t matters
    y_null = torch.full_like(y, 3)
    assert not torch.allclose(base, net(x, t, t - r, y_null))  # the null class is its own embedding


def test_time_embedding_is_low_frequency():
    net = tiny()
    for emb in (net.t_embedder, net.h_embedder):
        assert emb.time_scale == 1.0
        assert float(emb.freqs.max()) * emb.time_scale <= 1.0  # raw t in [0, 1], no x1000


def test_protocol_guard_and_adapter():
    net = tiny()
    x, r, t, y = batch()
    with pytest.raises(ValueError, match="from_interval_net"):
        mfl.FlowMatchingLoss()(net, x, model_kwargs={"y": y})
    model = mfl.adapters.from_interval_net(net)
    assert torch.equal(model(x, r, t, y=y), net(x, t, t - r, y))


def test_bf16_autocast_keeps_norms_and_modulation_in_float32():
    net = randomize(tiny())
    x, r, t, y = batch()
    seen = {}

    def hook(name):
        def fn(module, args, out):
            seen[name] = out.dtype

        return fn

    blk = net.blocks[0]
    blk.adaLN_modulation.register_forward_hook(hook("modulation"))
    blk.norm1.register_forward_hook(hook("norm"))
    blk.attn.qkv.register_forward_hook(hook("qkv"))
    net.t_embedder.register_forward_hook(hook("t_embed"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, t - r, y)
    assert seen == {"modulation": torch.float32, "norm": torch.float32, "qkv": torch.bfloat16, "t_embed": torch.float32}
    assert out.dtype == torch.float32
    ref = net(x, t, t - r, y)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


def test_gradient_forward_runs_on_the_fused_sdpa_kernel():
    """Restricting SDPA to the flash kernel (CPU flash here, CUDA flash on GPUs) must not break the DiT."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    net = randomize(tiny())
    x, r, t, y = batch()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        out = net(x, t, t - r, y)
        out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_jvp_matches_finite_difference_float64(checkpointing):
    """du/dt through the package's no-grad JVP (math SDPA) vs a float64 central difference."""
    net = randomize(tiny(grad_checkpointing=checkpointing)).double()
    model = mfl.adapters.from_interval_net(net)
    x, r, t, y = batch(dtype=torch.float64)
    tangent = torch.randn_like(x)
    a = mfl.time_derivative(model, x, r, t, tangent, {"y": y}, strategy="nograd").dudt
    b = mfl.time_derivative(model, x, r, t, tangent, {"y": y}, strategy="finite_difference").dudt
    assert (a - b).abs().max() <= 1e-6 * a.abs().max()


def test_gradient_checkpointing_gives_the_same_gradients():
    x, r, t, y = batch()
    grads = []
    for flag in (False, True):
        net = randomize(tiny(grad_checkpointing=flag))
        net(x, t, t - r, y).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_config_roundtrip():
    net = tiny()
    assert (
        DiT(
            make_dit_config(
                **{
                    "name": "DiT-S/2",
                    **{
                        k: v
                        for k, v in net.config.as_dict().items()
                        if k in ("depth", "hidden_size", "num_heads", "input_size", "num_classes")
                    },
                }
            )
        ).config
        == net.config
    )
