"""examples/imagenet_dit: improved MeanFlow's guidance as network input (config ``imf_b2``), tiny on the CPU."""

import pytest
import torch

import meanflow_losses as mfl
from examples.imagenet_dit import dit_runtime, sample, train
from examples.imagenet_dit.dit import GUIDANCE_INPUTS, build_dit, guidance_kwargs
from examples.imagenet_dit.dit_config import ConfigError, build_objective, load_config
from examples.imagenet_dit.dit_smoke import TINY_OVERRIDES, build_tiny_latents

pytestmark = pytest.mark.usefixtures("one_thread")


def test_imf_config_is_the_official_recipe():
    cfg = load_config("imf_b2")
    obj = build_objective(cfg.objective, num_classes=1000)
    assert isinstance(obj, mfl.MeanFlowLoss) and isinstance(obj.guidance, mfl.GuidanceAsInput)
    assert obj.tangent == "model" and obj.compound and obj.aux_velocity_weight == 1.0 and obj.reduction == "sum"
    assert obj.weighting == mfl.AdaptiveWeight(p=1.0, c=0.01)
    assert obj.times == mfl.TimePairSampler(
        "logit_normal", -0.4, 1.0, equal_fraction=0.5, equal_count="truncate", equal_rows="first"
    )
    g = obj.guidance
    assert (g.scale_max, g.scale_beta, g.t_min_range, g.t_max_range) == (7.0, 1.0, (0.0, 0.5), (0.5, 1.0))
    assert (g.drop_prob, g.drop_rows, g.interval_test) == (0.1, "first", "inclusive")
    assert (g.scale_key, *g.interval_keys) == GUIDANCE_INPUTS
    assert cfg.model.guidance_inputs and cfg.data.global_batch == 1024 and cfg.train.bf16 is False
    assert (cfg.sampling.guidance_scale, cfg.sampling.guidance_interval) == (7.5, (0.4, 0.65))


def test_guidance_as_input_and_the_model_flag_go_together():
    with pytest.raises(ConfigError, match=r"GuidanceAsInput and model\.guidance_inputs"):
        load_config("imf_b2", ["model.guidance_inputs=false"])
    with pytest.raises(ConfigError, match=r"GuidanceAsInput and model\.guidance_inputs"):
        load_config("meanflow_b2", ["model.guidance_inputs=true"])
    with pytest.raises(ConfigError, match=r"sampling\.guidance_scale"):
        load_config("imf_b2", ["sampling.guidance_scale=0.5"])


def test_guidance_input_dit_needs_its_inputs_and_uses_them():
    torch.manual_seed(0)
    net = build_dit("DiT-S/2", depth=2, hidden_size=32, num_heads=2, input_size=8, num_classes=3, guidance_inputs=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    x, t, h, y = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8]), torch.tensor([0.1, 0.5]), torch.tensor([0, 2])
    with pytest.raises(ValueError, match=r"guidance inputs exactly \['omega', 't_min', 't_max'\]"):
        net(x, t, h, y)
    kw = guidance_kwargs(net.config, 2, 1.0, (0.0, 1.0), "cpu")
    out1 = net(x, t, h, y, **kw)
    out4 = net(x, t, h, y, **guidance_kwargs(net.config, 2, 4.0, (0.0, 1.0), "cpu"))
    out_iv = net(x, t, h, y, **guidance_kwargs(net.config, 2, 1.0, (0.4, 0.65), "cpu"))
    assert not torch.allclose(out1, out4) and not torch.allclose(out1, out_iv)
    plain = build_dit("DiT-S/2", depth=2, hidden_size=32, num_heads=2, input_size=8, num_classes=3)
    assert guidance_kwargs(plain.config, 2, 4.0, (0.0, 1.0), "cpu") == {}
    with pytest.raises(ValueError, match="none \\(guidance_inputs is off\\)"):
        plain(x, t, h, y, **kw)


@pytest.mark.slow
def test_imf_config_trains_tiny_and_samples_at_a_chosen_scale(tmp_path):
    latents = build_tiny_latents(tmp_path / "data")["latents"]
    run_dir = tmp_path / "imf"
    sets = [*TINY_OVERRIDES, "data.global_batch=8", "optim.warmup_steps=0", "optim.lr=1e-3"]
    args = ["--config", "imf_b2", "--data", str(latents), "--run-dir", str(run_dir), "--device", "cpu"]
    train.main([*args, *[x for o in sets for x in ("--set", o)]])
    state = torch.load(dit_runtime.find_latest_checkpoint(run_dir), weights_only=True)
    assert state["step"] == 4 and state["model_config"]["guidance_inputs"] is True
    w = state["model"]["guidance_embedders.omega.mlp.2.weight"]
    assert torch.isfinite(w).all() and w.abs().max() > 0
    model, dit_cfg, _ = sample.load_model(dit_runtime.find_latest_checkpoint(run_dir), "model")
    z1, _ = sample.generate(model, dit_cfg, [0, 1, 2], grid=[1.0, 0.0], guidance_scale=1.0)
    z8, _ = sample.generate(model, dit_cfg, [0, 1, 2], grid=[1.0, 0.0], guidance_scale=8.0)
    assert z1.shape == (3, 4, 8, 8) and torch.isfinite(torch.from_numpy(z8)).all()
    assert not torch.allclose(torch.from_numpy(z1), torch.from_numpy(z8))  # the scale reaches the trained network
