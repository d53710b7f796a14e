"""examples/imagenet_dit: MeanFlow fine-tuning from a flow-matching DiT, Decoupled MeanFlow blocks, distillation."""

import json

import pytest
import torch

import meanflow_losses as mfl
from examples.imagenet_dit import dit_runtime, train
from examples.imagenet_dit.dit import DiT, DiTConfig, build_dit, flow_matching_init_
from examples.imagenet_dit.dit_config import ConfigError, build_objective, load_config
from examples.imagenet_dit.dit_runtime import DistInfo
from examples.imagenet_dit.dit_smoke import TINY_OVERRIDES, build_tiny_latents, torchrun

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw):
    torch.manual_seed(0)
    return build_dit("DiT-S/2", depth=3, hidden_size=32, num_heads=2, input_size=8, num_classes=3, **kw)


def randomize(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.1)
    return net


def batch(n=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 4, 8, 8, generator=g, dtype=dtype)
    t = torch.rand(n, generator=g, dtype=dtype) * 0.9 + 0.05
    r = t * torch.rand(n, generator=g, dtype=dtype)
    y = torch.arange(n) % 3
    return x, r, t, y


# ------------------------------------------------------------------------------------------ the model parts
def test_decoupled_first_blocks_ignore_r_and_r_equal_t_is_the_plain_dit():
    plain = randomize(tiny())
    dec = tiny(decoupled_last_blocks=2)
    dec.load_state_dict(plain.state_dict())
    seen = []
    handles = [b.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone())) for b in dec.blocks]
    x, r, t, y = batch()
    out_r = dec(x, t, t - r, y)
    out_0 = dec(x, t, t - torch.zeros_like(r), y)  # r = 0
    for h in handles:
        h.remove()
    first_r, first_0 = seen[:3], seen[3:]
    assert torch.equal(first_r[0], first_0[0])  # block 0 of 3 is an encoder block: r does not reach it
    assert not torch.allclose(first_r[1], first_0[1]) and not torch.allclose(out_r, out_0)  # decoder blocks see r
    # at r = t the decoupled DiT is the plain DiT (a flow-matching DiT is a valid start for every k)
    assert torch.equal(dec(x, t, torch.zeros_like(t), y), plain(x, t, torch.zeros_like(t), y))
    with pytest.raises(ValueError, match=r"decoupled_last_blocks must lie in \[0, depth = 3\]"):
        tiny(decoupled_last_blocks=4)


def test_decoupled_jvp_matches_finite_difference_float64():
    net = randomize(tiny(decoupled_last_blocks=2)).double()
    model = mfl.adapters.from_interval_net(net)
    x, r, t, y = batch(dtype=F64)
    tangent = torch.randn_like(x)
    a = mfl.time_derivative(model, x, r, t, tangent, {"y": y}, strategy="nograd").dudt
    b = mfl.time_derivative(model, x, r, t, tangent, {"y": y}, strategy="finite_difference").dudt
    assert (a - b).abs().max() <= 1e-6 * a.abs().max()


@pytest.mark.parametrize("k", [0, 2])
def test_flow_matching_init_keeps_the_fm_network_and_trains_the_interval_embedding(k):
    fm = randomize(tiny())
    net = tiny(decoupled_last_blocks=k)
    net.load_state_dict(fm.state_dict())
    flow_matching_init_(net)
    x, r, t, y = batch()
    zero = torch.zeros_like(t)
    assert (net(x, t, zero, y) - fm(x, t, zero, y)).abs().max() <= 1e-6  # u(z, t, t) = the FM network
    if k == 0:  # and for every r when no block is decoupled
        assert (net(x, t, t - r, y) - fm(x, t, zero, y)).abs().max() <= 1e-6
    assert net.h_embedder.mlp[2].weight.abs().max() == 0
    model = mfl.adapters.from_interval_net(net)
    mfl.MeanFlowLoss(times=mfl.TimePairSampler(equal_fraction=0.5))(model, x, model_kwargs={"y": y}).loss.backward()
    assert net.h_embedder.mlp[2].weight.grad.abs().max() > 0


# ------------------------------------------------------------------------------------------ train.py
@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    return build_tiny_latents(tmp_path_factory.mktemp("dit_ft"))["latents"]


def tiny_sets(*extra):
    return [x for o in [*TINY_OVERRIDES, *extra] for x in ("--set", o)]


@pytest.fixture(scope="module")
def fm_run(latents, tmp_path_factory):
    """A 2-step flow-matching run (one process): the checkpoint fine-tuning and distillation start from."""
    run_dir = tmp_path_factory.mktemp("fm_run")
    args = ["--config", "flow_matching_b2", "--data", str(latents), "--run-dir", str(run_dir), "--device", "cpu"]
    train.main([*args, *tiny_sets("train.steps=2", "optim.lr=1e-2", "ema.decay=0.5")])
    return run_dir


def fm_networks(run_dir):
    ckpt = dit_runtime.load_checkpoint(run_dir)
    nets = {}
    for key in ("ema", "model"):
        net = DiT(DiTConfig(**ckpt["model_config"]))
        net.load_state_dict(ckpt[key])
        nets[key] = net.eval()
    return nets


def tiny_trainer(config, latents, *extra):
    from examples.imagenet_dit.latent_data import LatentShards

    cfg = load_config(config, [*TINY_OVERRIDES, *extra])
    data = LatentShards(str(latents))
    dit_cfg = train.dit_config_for(cfg, data.latent_shape, data.num_classes)
    return train.Trainer(cfg, DistInfo(), dit_cfg), data


@pytest.mark.parametrize("k", [0, 1])
def test_init_from_fm_equals_the_fm_network_at_r_equal_t_at_step_0(fm_run, latents, k):
    trainer, _ = tiny_trainer("meanflow_finetune_b2", latents, f"model.decoupled_last_blocks={k}")
    fm = fm_networks(fm_run)
    assert not torch.equal(fm["ema"].final_layer.linear.weight, fm["model"].final_layer.linear.weight)
    trainer.init_from_fm(fm_run)
    x, _, t, y = batch()
    for model in (trainer.module, trainer.ema.module):
        with torch.no_grad():
            got = model(x, t, t, y=y)
            want = fm["ema"](x, t, torch.zeros_like(t), y)
        assert (got - want).abs().max() <= 1e-6 * max(1.0, float(want.abs().max()))
        assert want.abs().max() > 0  # the FM run trained: not the zero output of adaLN-Zero
    assert trainer.step == 0 and int(trainer.ema.n_averaged) == 0
    trainer.init_from_fm(fm_run, "model")
    with torch.no_grad():
        want = fm["model"](x, t, torch.zeros_like(t), y)
        assert (trainer.module(x, t, t, y=y) - want).abs().max() <= 1e-6 * max(1.0, float(want.abs().max()))


def test_init_from_fm_refuses_another_model_size_and_conflicting_keys(fm_run, latents):
    trainer, _ = tiny_trainer("meanflow_finetune_b2", latents, "model.decoupled_last_blocks=1", "model.depth=3")
    with pytest.raises(ConfigError, match="differing: depth"):
        trainer.init_from_fm(fm_run)
    with pytest.raises(ConfigError, match="exclusive"):
        load_config("meanflow_finetune_b2", ["train.init_from=a", "train.init_from_fm=b"])
    with pytest.raises(ConfigError, match=r"train\.teacher_guidance_interval"):
        load_config("meanflow_distill_b2", ["train.teacher_guidance_interval=[0.8, 0.2]"])
    with pytest.raises(ConfigError, match="'ema' or 'model'"):
        load_config("meanflow_distill_b2", ["train.teacher_weights=best"])


def test_teacher_is_frozen_in_eval_mode_outside_ddp_and_changes_the_target(fm_run, latents):
    # plain squared error (p = 0): the adaptive weight would normalise both losses to about 1
    trainer, _ = tiny_trainer("meanflow_distill_b2", latents, "objective.weighting.p=0.0")
    teacher = trainer.set_teacher(fm_run, "ema", 2.0, (0.0, 0.7))
    fm = fm_networks(fm_run)["ema"]
    net = teacher.model.net
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert teacher.guidance_scale == 2.0 and teacher.interval == (0.0, 0.7)
    assert teacher.null_condition({"y": torch.tensor([0, 1])})["y"].tolist() == [2, 2]  # the null class
    x, r, t, y = batch()
    assert torch.equal(teacher.model(x, t, t, y=y), fm(x, t, torch.zeros_like(t), y))
    assert all(p is not q for p in net.parameters() for q in trainer.module.parameters())
    draws = {"t": t, "r": r, "noise": torch.randn_like(x)}
    with_teacher = trainer.loss_and_backward(x, y, torch.Generator().manual_seed(0), **draws)
    assert all(p.grad is None for p in net.parameters())
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.teacher = None
    without = trainer.loss_and_backward(x, y, torch.Generator().manual_seed(0), **draws)
    assert float(with_teacher.loss.detach()) != pytest.approx(float(without.loss.detach()), rel=1e-3)
    # an objective without teacher= at call time is refused with the reason
    trainer._call_kwargs = {"target_model"}
    with pytest.raises(ConfigError, match="takes no teacher="):
        trainer.set_teacher(fm_run)


def test_configs_state_the_recipes():
    ft, dist = load_config("meanflow_finetune_b2"), load_config("meanflow_distill_b2")
    assert ft.model.decoupled_last_blocks == 4 and ft.train.init_from_fm_weights == "ema"
    obj = build_objective(ft.objective, 1000)
    g = obj.guidance
    assert (g.omega, g.kappa, tuple(g.interval), g.drop_prob) == (1.0, 0.6, (0.0, 0.7), 0.1)
    assert obj.times.mean == 0.4 and obj.times.r_times.mean == -1.2 and obj.times.equal_fraction == 0.5
    assert (ft.optim.lr, ft.optim.grad_clip, ft.ema.decay, ft.data.global_batch) == (1e-4, 1.0, 0.9999, 256)
    obj = build_objective(dist.objective, 1000)
    assert obj.jvp == "finite_difference" and obj.fd_eps == 5e-3 and obj.times.equal_fraction == 0.75
    assert obj.times.name == "uniform" and obj.weighting == mfl.AdaptiveWeight(p=1.0, c=1e-3)
    assert dist.train.teacher_guidance_scale == 1.0 and "teacher" in train.Trainer._objective_kwargs(obj)


# ------------------------------------------------------------------------------------------ 2-process runs
def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_finetune_config_two_processes_from_the_fm_run(fm_run, latents, tmp_path):
    run_dir = tmp_path / "ft"
    args = ["--config", "meanflow_finetune_b2", "--data", str(latents), "--run-dir", str(run_dir), "--device", "cpu"]
    log = torchrun(
        "examples.imagenet_dit.train",
        [*args, "--init-from-fm", str(fm_run), *tiny_sets("model.decoupled_last_blocks=1", "optim.lr=1e-3")],
    )
    assert "2 x 4 = 8 per step" in log and "from the flow-matching checkpoint" in log, log[-3000:]
    state = torch.load(dit_runtime.find_latest_checkpoint(run_dir), weights_only=True)
    assert state["step"] == 4 and state["model_config"]["decoupled_last_blocks"] == 1
    assert state["config"]["train"]["init_from_fm"] == str(fm_run)
    assert state["model"]["h_embedder.mlp.2.weight"].abs().max() > 0  # the interval embedding trained
    fm = fm_networks(fm_run)["ema"].state_dict()
    assert not torch.equal(state["model"]["final_layer.linear.weight"], fm["final_layer.linear.weight"])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_log(run_dir) if "loss" in r)


@pytest.mark.slow
def test_distill_config_two_processes_with_a_guided_teacher(fm_run, latents, tmp_path):
    run_dir = tmp_path / "distill"
    args = ["--config", "meanflow_distill_b2", "--data", str(latents), "--run-dir", str(run_dir), "--device", "cpu"]
    sets = tiny_sets(
        f"train.init_from_fm={json.dumps(str(fm_run))}",
        "train.teacher_guidance_scale=1.5",
        "train.teacher_guidance_interval=[0.0, 0.7]",
    )
    log = torchrun("examples.imagenet_dit.train", [*args, "--teacher", str(fm_run), *sets])
    assert "distilling from the frozen teacher" in log and "guidance scale 1.5 on t in [0, 0.7]" in log, log[-3000:]
    state = torch.load(dit_runtime.find_latest_checkpoint(run_dir), weights_only=True)
    assert state["step"] == 4 and state["config"]["train"]["teacher_checkpoint"] == str(fm_run)
    assert not any(k.startswith("teacher") for k in state["model"])  # the teacher is not part of the student
    records = [r for r in read_log(run_dir) if "loss" in r]
    assert records and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    # resuming rebuilds the teacher from the config and continues
    resume = [*sets[:-4], "--set", "train.steps=5"]
    log = torchrun("examples.imagenet_dit.train", [*args, "--teacher", str(fm_run), "--resume", *resume])
    assert "resumed from" in log and "distilling from the frozen teacher" in log and "guidance scale 1 on" in log
    assert torch.load(dit_runtime.find_latest_checkpoint(run_dir), weights_only=True)["step"] == 5


@pytest.mark.parametrize(
    ("config", "key", "flag"),
    [
        ("meanflow_finetune_b2", "init_from_fm", "--init-from-fm"),
        ("meanflow_distill_b2", "teacher_checkpoint", "--teacher"),
    ],
)
def test_configs_refuse_to_start_without_their_required_checkpoint(latents, tmp_path, config, key, flag):
    assert key in load_config(config).train.requires
    args = ["--config", config, "--data", str(latents), "--run-dir", str(tmp_path), "--device", "cpu"]
    with pytest.raises(ConfigError, match=rf"needs train\.{key}: set it \(or pass {flag}\)"):
        train.main([*args, *tiny_sets("train.steps=1")])
    with pytest.raises(ConfigError, match="not a key of"):
        load_config(config, ["train.requires=['nope']"])
