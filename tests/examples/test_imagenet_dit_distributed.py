"""examples/imagenet_dit under torchrun with two Gloo processes: gradient sync and the whole pipeline.

This file is also the worker of the gradient-sync test (run from the repository root):
    python -m torch.distributed.run --nproc_per_node 2 --standalone -m tests.examples.test_imagenet_dit_distributed \
        --worker OUT
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import meanflow_losses as mfl
from examples.imagenet_dit import sample, train
from examples.imagenet_dit.dit import DiT, make_dit_config
from examples.imagenet_dit.dit_config import Config
from examples.imagenet_dit.dit_runtime import DistInfo
from examples.imagenet_dit.dit_smoke import TINY_OVERRIDES, build_tiny_latents, torchrun, torchrun_process
from examples.imagenet_dit.latent_data import EpochBatches

REPO = Path(__file__).resolve().parents[2]

BATCH = 8
DIT = dict(depth=2, hidden_size=32, num_heads=2, input_size=8, num_classes=3)

GUIDANCE = {
    "type": "TrainingGuidance",
    "omega": 1.0,
    "kappa": 0.5,
    "interval": [0.0, 0.9],
    "drop_prob": 0.1,
    "null_condition": "null_class",
}
PAIRS = {"type": "TimePairSampler", "name": "logit_normal", "mean": -0.4, "std": 1.0, "equal_fraction": 0.5}


def cases():
    """Objective tables, as in the configs (tiny runs: 10 steps, the alpha schedule crosses 0.5 at step 5)."""
    out = {
        "flow_matching": {
            "type": "FlowMatchingLoss",
            "reduction": "mean",
            "times": {"type": "TimeSampler", "name": "logit_normal"},
            "weighting": {"type": "AdaptiveWeight", "p": 0.0},
        },
        "meanflow": {
            "type": "MeanFlowLoss",
            "reduction": "sum",
            "jvp": "nograd",
            "times": PAIRS,
            "weighting": {"type": "AdaptiveWeight", "p": 1.0, "c": 1e-3},
            "guidance": GUIDANCE,
        },
    }
    if hasattr(mfl, "AlphaFlowLoss"):
        out["alphaflow"] = {
            "type": "AlphaFlowLoss",
            "reduction": "mean",
            "eta": 5e-3,
            "times": PAIRS,
            "alpha": {"type": "schedules.Sigmoid", "start": 0, "end": 10, "gamma": 25.0},
            "weighting": {"type": "AdaptiveWeight", "p": 1.0, "c": 1e-3},
            "guidance": {**GUIDANCE, "drop_only_in_interval": True},
        }
    return out


def config(objective, distributed="ddp"):
    return Config.from_dict(
        {
            "model": {"name": "DiT-S/2", "depth": 2, "hidden_size": 32, "num_heads": 2},
            "data": {"global_batch": BATCH},
            "optim": {"grad_clip": 0.05},  # small enough to clip: the clip needs the synced global norm
            "train": {"bf16": False, "distributed": distributed, "steps": 10},
            "objective": objective,
        }
    )


def draws():
    """One global batch and every random draw for it, identical in every process."""
    g = torch.Generator().manual_seed(123)
    x = torch.randn(BATCH, 4, 8, 8, generator=g)
    y = torch.randint(0, 3, (BATCH,), generator=g)
    t = torch.rand(BATCH, generator=g) * 0.9 + 0.05
    r = t * torch.rand(BATCH, generator=g)
    r[::2] = t[::2]  # half the rows r = t
    noise = torch.randn(BATCH, 4, 8, 8, generator=g)
    drop = torch.zeros(BATCH, dtype=torch.bool)
    drop[3] = True
    return x, y, {"t": t, "r": r, "noise": noise, "drop_mask": drop}


def one_step(objective, info, rows, distributed="ddp"):
    """Build a Trainer, load fixed random weights, run one training step on ``rows`` of the global batch.

    Returns the full gradients (before the update) and the full parameters after it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    cfg = config(objective, distributed)
    dit_cfg = make_dit_config("DiT-S/2", **DIT)
    trainer = train.Trainer(cfg, info, dit_cfg)
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in DiT(dit_cfg).state_dict().items()}
    set_model_state_dict(trainer.module, weights, options=StateDictOptions(full_state_dict=True))
    trainer.step = 5
    x, y, d = draws()
    accepted = trainer._call_kwargs
    d = {k: v[rows] for k, v in d.items() if k in accepted and (k != "drop_mask" or "guidance" in objective)}
    trainer.loss_and_backward(x[rows], y[rows], torch.Generator().manual_seed(1), **d)

    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    grads = {n: full(p.grad).detach().clone() for n, p in trainer.module.named_parameters()}
    trainer.optimizer_step()
    params = {n: full(p.detach()).clone() for n, p in trainer.module.named_parameters()}
    return grads, params


def worker(out_dir):
    """Each of the two processes takes its half of the global batch."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    info = DistInfo(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"))
    local = BATCH // world
    rows = slice(rank * local, (rank + 1) * local)
    for name, objective in cases().items():
        for strategy in ("ddp", "fsdp2"):
            grads, params = one_step(objective, info, rows, strategy)
            if rank == 0:
                torch.save({"grads": grads, "params": params}, Path(out_dir) / f"{name}_{strategy}.pt")
    dist.barrier()  # rank 0 has written every file before any rank tears gloo down
    dist.destroy_process_group()
    # Skip interpreter shutdown: gloo's background threads occasionally abort in C++ static destructors
    # ("terminate called without an active exception"), a teardown race unrelated to the results above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two_process_updates(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    module = "tests.examples.test_imagenet_dit_distributed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", module]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    res = subprocess.run([*cmd, "--worker", str(out)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-6000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
@pytest.mark.parametrize("name", ["flow_matching", "meanflow", "alphaflow"])
def test_two_processes_update_like_one_process_on_the_whole_batch(name, strategy, two_process_updates):
    if name not in cases():
        pytest.skip("meanflow_losses.AlphaFlowLoss does not exist yet (issue 3)")
    got = torch.load(two_process_updates / f"{name}_{strategy}.pt", weights_only=True)
    single = DistInfo()
    grads, params = one_step(cases()[name], single, slice(0, BATCH))
    assert got["grads"].keys() == grads.keys()
    for k in grads:
        torch.testing.assert_close(got["grads"][k], grads[k], rtol=1e-5, atol=1e-5, msg=f"grad {k}")
        torch.testing.assert_close(got["params"][k], params[k], rtol=1e-5, atol=1e-5, msg=f"param {k}")
    # the test can see a missing sync: half a batch alone gives clearly different gradients
    half, _ = one_step(cases()[name], single, slice(0, BATCH // 2))
    flat = lambda d: torch.cat([v.flatten() for v in d.values()])  # noqa: E731
    assert (flat(half) - flat(grads)).abs().max() > 1e-3 * flat(grads).abs().max()


@pytest.mark.slow
def test_end_to_end_prepare_train_sample_fid(tmp_path):
    """Synthetic ImageFolder -> tiny-VAE latents -> 2-process Gloo training -> 2-process sampling -> FID."""
    paths = build_tiny_latents(tmp_path)
    run_dir = tmp_path / "run"
    sets = [x for o in [*TINY_OVERRIDES, "train.grid_every=4"] for x in ("--set", o)]
    log = torchrun(
        "examples.imagenet_dit.train",
        [
            "--config",
            "meanflow_b2",
            "--data",
            str(paths["latents"]),
            "--run-dir",
            str(run_dir),
            "--device",
            "cpu",
            *sets,
        ],
    )
    assert "2 x 4 = 8 per step" in log and "saved" in log
    assert (run_dir / "checkpoints" / "step_0000004.pt").is_file()
    grids = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert grids == ["step_0000004_1step.png", "step_0000004_2step_ode.png"]

    out = tmp_path / "one_step.npz"
    log = torchrun(
        "examples.imagenet_dit.sample",
        [
            "--ckpt",
            str(run_dir),
            "--num-images",
            "10",
            "--steps",
            "1",
            "--out",
            str(out),
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--fid-ref",
            str(paths["images"]),
            "--fid-feature",
            "examples.imagenet_dit.dit_smoke:tiny_features",
        ],
    )
    fid_two_procs = float(re.search(r"FID ([0-9.eE+-]+)", log).group(1))
    with np.load(out) as f:
        images, labels = f["arr_0"], f["arr_1"]
    assert images.shape == (10, 16, 16, 3) and images.dtype == np.uint8 and labels.shape == (10,)
    assert set(labels.tolist()) <= {0, 1}
    assert not list(tmp_path.glob(".one_step*"))  # the per-rank parts were merged and removed

    # the same images from one process (noise and label of image i do not depend on the process count)
    res = sample.main(
        [
            "--ckpt",
            str(run_dir),
            "--num-images",
            "10",
            "--steps",
            "1",
            "--out",
            str(tmp_path / "single.npz"),
            "--batch-size",
            "3",
            "--device",
            "cpu",
        ]
    )
    with np.load(tmp_path / "single.npz") as f:
        assert np.abs(f["arr_0"].astype(int) - images.astype(int)).max() <= 1
        assert np.array_equal(f["arr_1"], labels)
    # the FID of the two processes (each fed half of the images) is the FID of all of them
    from examples.imagenet_dit.dit_smoke import TinyFeatures

    ref = sample.load_reference_images(paths["images"], 16)
    assert sample.compute_fid(images, ref, feature=TinyFeatures()) == pytest.approx(fid_two_procs, rel=1e-3)
    # two steps (consistency at 0.55) with the in-process FID

    res = sample.main(
        [
            "--ckpt",
            str(run_dir),
            "--num-images",
            "8",
            "--grid",
            "1.0,0.55,0.0",
            "--method",
            "consistency",
            "--out",
            str(tmp_path / "two.npz"),
            "--device",
            "cpu",
            "--fid-ref",
            str(paths["images"]),
            "--fid-feature",
            "examples.imagenet_dit.dit_smoke:tiny_features",
        ]
    )
    assert np.isfinite(res["fid"]) and res["fid"] > 0 and res["grid"] == [1.0, 0.55, 0.0]
    with np.load(tmp_path / "two.npz") as f:
        two = f["arr_0"]
    fid_direct = sample.compute_fid(two, ref, feature=TinyFeatures())
    assert fid_direct == pytest.approx(res["fid"], rel=1e-6)
    assert sample.compute_fid(ref, ref, feature=TinyFeatures()) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.slow
def test_a_corrupt_row_on_one_rank_stops_every_rank(tmp_path):
    """A NaN row that only rank 1 reads, first at step 3: both ranks exit with an error naming shard and row."""
    paths = build_tiny_latents(tmp_path, per_class=16)  # 32 images in shards of 6: 4 steps per epoch
    steps = [EpochBatches(32, BATCH, seed=0).indices(k, 1, 2) for k in range(3)]  # rank 1's rows, steps 1-3
    earlier = np.concatenate(steps[:2])
    # neither the first nor the last row of its shard (those alone used to be probed when the shards were opened)
    image = int(next(i for i in steps[2] if i not in earlier and 0 < i % 6 < 5 and i < 30))
    shard, row = divmod(image, 6)
    mean = paths["latents"] / f"shard_{shard:05d}" / "mean.npy"
    values = np.load(mean)
    values[row, 0, 1, 2, 3] = np.nan
    np.save(mean, values)
    run_dir = tmp_path / "run"
    args = ["--config", "flow_matching_b2", "--data", str(paths["latents"]), "--run-dir", str(run_dir)]
    res = torchrun_process(  # a rank left waiting would end in subprocess.TimeoutExpired
        "examples.imagenet_dit.train",
        [*args, "--device", "cpu", *[x for o in TINY_OVERRIDES for x in ("--set", o)]],
        timeout=120,
    )
    log = res.stdout + res.stderr
    assert res.returncode != 0, log[-4000:]
    where = rf"shard_{shard:05d}' is corrupt: mean\.npy row {row} \(dataset image {image}\) holds non-finite values"
    # rank 1 raised its own error (the traceback names its class by module), rank 0 one that names rank 1's
    assert re.search(rf"examples\.imagenet_dit\.latent_data\.LatentDataError: latent shard .*{where}", log), log
    other = r"RuntimeError: rank 0 stops because another rank failed: rank 1 failed reading its batch of step 3"
    assert re.search(rf"{other}: LatentDataError: latent shard .*{where}", log), log[-4000:]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_0000002.pt"  # written before


if __name__ == "__main__" and "--worker" in sys.argv:
    worker(sys.argv[sys.argv.index("--worker") + 1])
