"""Smoke and unit tests of the toy 2-D example (tiny sizes, CPU, a few seconds in all)."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace

import pytest
import torch

from examples.toy2d import datasets, registry
from examples.toy2d.metrics import energy_distance, sliced_w2
from examples.toy2d.nets import SinusoidalEmbedding, VelocityMLP
from examples.toy2d.train import TrainConfig, main, train

TINY = dict(
    steps=3,
    batch=64,
    width=32,
    depth=2,
    emb_dim=8,
    eval_points=256,
    energy_points=128,
    eval_steps=(1, 2),
    progress=False,
    log_every=1,
)


@pytest.mark.parametrize("name", sorted(datasets.DATASETS))
def test_datasets_shapes_labels_and_determinism(name):
    x, y = datasets.sample(name, 500, torch.Generator().manual_seed(0))
    x2, _ = datasets.sample(name, 500, torch.Generator().manual_seed(0))
    assert x.shape == (500, 2) and x.dtype == torch.float32 and y.shape == (500,) and y.dtype == torch.long
    assert torch.isfinite(x).all() and x.abs().max() < 4
    assert 0 <= int(y.min()) and int(y.max()) < max(1, datasets.NUM_CLASSES[name])
    assert torch.equal(x, x2)


def test_checkerboard_precision():
    g = torch.Generator().manual_seed(0)
    x, _ = datasets.sample("checkerboard", 4000, g)
    assert datasets.checkerboard_precision(x) == 1.0
    blur = 4 * torch.rand(4000, 2, generator=g) - 2
    assert datasets.checkerboard_precision(blur) == pytest.approx(0.5, abs=0.03)
    assert datasets.checkerboard_precision(x + 10) == 0.0


def test_dataset_errors_name_the_argument():
    with pytest.raises(ValueError, match="dataset="):
        datasets.sample("nope", 3)
    with pytest.raises(ValueError, match="n must"):
        datasets.sample("checkerboard", 0)


def test_metrics_zero_on_identical_sets_and_known_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2000, 2, generator=g)
    assert sliced_w2(a, a) == pytest.approx(0.0, abs=1e-12)
    b = torch.randn(2000, 2, generator=g)
    assert abs(energy_distance(a, b)) < 0.01  # same law: zero up to sampling noise
    # a shift by s along a unit direction: the projected W2 is |s cos(angle)|, so SW2 = s / sqrt(2) in 2-D
    shift = torch.tensor([1.0, 0.0])
    assert sliced_w2(a, a + shift, projections=2048) == pytest.approx(1 / math.sqrt(2), rel=0.03)
    assert energy_distance(a, a + shift) > 0.3
    assert sliced_w2(a[:1500], a + shift) > 0.5  # unequal sizes are allowed
    with pytest.raises(ValueError, match="same d"):
        sliced_w2(a, torch.zeros(5, 3))


def test_velocity_mlp_protocol_and_low_frequency_embedding():
    emb = SinusoidalEmbedding(16, max_freq=8.0)
    assert float(emb.freqs.max()) == pytest.approx(8.0)
    net = VelocityMLP(hidden=32, depth=2, emb_dim=8, num_classes=3)
    z, t = torch.randn(5, 2), torch.rand(5)
    assert net(z, t * 0.5, t, y=torch.tensor([0, 1, 2, 3, 0])).shape == (5, 2)
    assert net(z, t, t).shape == (5, 2)  # y omitted = the null class


@pytest.mark.parametrize("method", sorted(registry.METHODS))
def test_every_method_trains_end_to_end(method, tmp_path):
    cfg = TrainConfig(method=method, out=str(tmp_path / method), figures=False, **TINY)
    try:
        rec = train(cfg)
    except registry.MethodUnavailable as err:
        pytest.skip(str(err))
    assert set(rec["metrics"]) == {"1", "2"}
    assert all(math.isfinite(m["sw2"]) and math.isfinite(m["energy"]) for m in rec["metrics"].values())
    saved = json.loads((tmp_path / method / "metrics.json").read_text())
    assert saved["metrics"] == rec["metrics"] and len(saved["history"]["loss"]) == 3
    assert (tmp_path / method / "checkpoint.pt").exists()


def test_cli_meanflow_with_ema_schedule_figures_and_conflict(tmp_path, capsys):
    out = tmp_path / "run"
    rec = main(
        [
            "--method",
            "meanflow",
            "--steps",
            "4",
            "--batch",
            "64",
            "--width",
            "32",
            "--depth",
            "2",
            "--eval-points",
            "256",
            "--energy-points",
            "128",
            "--eval-steps",
            "1",
            "2",
            "4",
            "--ema",
            "0.9",
            "--lr-schedule",
            "cosine",
            "--warmup",
            "2",
            "--conflict-every",
            "2",
            "--no-progress",
            "--out",
            str(out),
        ]
    )
    assert "sliced W2" in capsys.readouterr().out
    assert "metrics_online" in rec
    for name in ("samples.png", "trajectories.png", "training.png", "metrics.json", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0, name
    if "conflict" in rec:  # needs meanflow_losses.diagnostics (issue 3)
        assert (out / "conflict.png").exists() and len(rec["conflict"]["steps"]) == 2


@pytest.mark.parametrize("coupling", ["independent", "ot"])
def test_class_mixture_with_training_guidance(tmp_path, coupling):
    cfg = TrainConfig(method="meanflow", dataset="mixture", kappa=0.5, coupling=coupling, out=None, figures=False,
                      **TINY)
    assert cfg.num_classes == 4 and cfg.guidance() is not None
    rec = train(cfg)
    assert math.isfinite(rec["metrics"]["1"]["sw2"])


def test_alpha_schedule_is_logged(tmp_path):
    cfg = TrainConfig(method="alphaflow", alpha_end=0.5, out=None, figures=False, **TINY)
    try:
        rec = train(cfg)
    except registry.MethodUnavailable as err:
        pytest.skip(str(err))
    alpha = rec["history"]["alpha"]
    assert alpha[0] == pytest.approx(1.0, abs=1e-6) and alpha[-1] <= alpha[0]


def test_unknown_or_missing_methods_fail_clearly():
    with pytest.raises(ValueError, match="method="):
        TrainConfig(method="nope")
    with pytest.raises(registry.MethodUnavailable, match=r"meanflow_losses\.NoSuchLoss"):
        registry.need("NoSuchLoss", "demo")
    with pytest.raises(SystemExit):
        main(["--method", "nope"])


def test_reuse_reevaluates_a_finished_run_without_training(tmp_path):
    cfg = TrainConfig(method="meanflow", out=str(tmp_path), figures=False, **TINY)
    first = train(cfg)
    again = train(replace(cfg, eval_points=300), reuse=True)
    assert again.get("reevaluated") and again["history"]["loss"] == first["history"]["loss"]
    assert again["train_seconds"] == first["train_seconds"]
    changed = train(replace(cfg, lr=1e-4), reuse=True)
    assert not changed.get("reevaluated")


def test_reuse_accepts_a_run_saved_before_an_option_existed(tmp_path):
    cfg = TrainConfig(method="meanflow", out=str(tmp_path), figures=False, **TINY)
    train(cfg)
    path = tmp_path / "metrics.json"
    rec = json.loads(path.read_text())
    for key in ("equal_draw", "tangent", "aux_weight"):  # options added later: absent = their default
        del rec["config"][key]
    path.write_text(json.dumps(rec))
    assert train(replace(cfg, eval_points=300), reuse=True).get("reevaluated")
    assert not train(replace(cfg, tangent="model"), reuse=True).get("reevaluated")


def test_improved_meanflow_options_reach_the_objective(tmp_path):
    cfg = TrainConfig(method="meanflow", tangent="model", aux_weight=0.5, equal_draw="single", out=None,
                      figures=False, **TINY)
    obj = registry.build_objective(cfg)
    assert (obj.tangent, obj.aux_velocity_weight, obj.times.equal_draw) == ("model", 0.5, "single")
    rec = train(cfg)
    assert math.isfinite(rec["metrics"]["1"]["sw2"])
    af = registry.build_objective(replace(cfg, method="alphaflow", aux_weight=0.0))
    assert af.tangent == "model" and af.times.equal_draw == "single"
    # defaults leave the plain MeanFlow objective untouched
    plain = registry.build_objective(TrainConfig(method="meanflow", out=None, **TINY))
    assert (plain.tangent, plain.aux_velocity_weight, plain.times.equal_draw) == ("conditional", 0.0, "pair")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="fm", tangent="model"), "tangent='model' needs a JVP objective"),
        (dict(method="splitmeanflow", tangent="model"), "tangent='model' needs a JVP objective"),
        (dict(method="meanflow", tangent="teacher"), "tangent must be"),
        (dict(method="alphaflow", aux_weight=1.0), "aux_weight > 0 needs method"),
        (dict(method="meanflow", aux_weight=-1.0), "aux_weight must be >= 0"),
        (dict(method="meanflow", equal_draw="fresh"), "equal_draw must be"),
        (dict(method="fm", equal_draw="single"), "equal_draw='single' needs a method with r = t rows"),
    ],
)
def test_jvp_option_errors_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        registry.build_objective(TrainConfig(out=None, **{**TINY, **kwargs}))


def _no_improving_swap(x: torch.Tensor, noise: torch.Tensor) -> bool:
    """True when no exchange of two rows' noise lowers the total squared distance (2-opt optimality)."""
    cost = torch.cdist(x.double(), noise.double()).square()
    diag = cost.diagonal()
    swapped = cost + cost.T  # [i, j]: cost of pairing x_i with noise_j and x_j with noise_i
    return bool((swapped >= diag[:, None] + diag[None, :] - 1e-9).all())


def test_ot_pair_is_the_exact_assignment_within_each_block():
    from examples.toy2d.train import ot_pair

    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(12, 2, generator=g), torch.randn(12, 2, generator=g)
    paired = ot_pair(x, noise, block=6)
    for lo in (0, 6):
        xb, nb, pb = x[lo:lo + 6], noise[lo:lo + 6], paired[lo:lo + 6]
        # the block's rows are a permutation of the same block's noise rows (no mixing across blocks)
        assert sorted(map(tuple, pb.tolist())) == sorted(map(tuple, nb.tolist()))
        brute = min(sum(float((xb[i] - nb[p[i]]).square().sum()) for i in range(6))
                    for p in itertools.permutations(range(6)))
        assert float((xb - pb).square().sum()) == pytest.approx(brute, rel=1e-6)
        assert brute < float((xb - nb).square().sum())  # the independent pairing is not already optimal


def test_ot_pair_with_labels_pairs_within_each_class():
    from examples.toy2d.train import ot_pair

    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 2, 1, 0, 1])
    x, noise = torch.randn(10, 2, generator=g), torch.randn(10, 2, generator=g)
    paired = ot_pair(x, noise, block=64, labels=labels)
    for c in range(3):
        rows = labels == c
        xc, nc, pc = x[rows], noise[rows], paired[rows]
        assert sorted(map(tuple, pc.tolist())) == sorted(map(tuple, nc.tolist()))
        brute = min(float((xc - nc[list(p)]).square().sum()) for p in itertools.permutations(range(len(xc))))
        assert float((xc - pc).square().sum()) == pytest.approx(brute, rel=1e-6)
    assert not torch.equal(ot_pair(x, noise, block=64), paired)  # pairing across classes differs


@pytest.mark.parametrize("method", sorted(registry.METHODS))
def test_ot_coupling_reaches_the_objective(monkeypatch, method):
    import examples.toy2d.train as toy_train

    seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    build = toy_train.build_objective

    def spy(cfg):
        obj = build(cfg)

        def call(model, x, **kw):
            seen.append((x, kw.get("noise")))
            return obj(model, x, **kw)
        return call

    monkeypatch.setattr(toy_train, "build_objective", spy)
    try:
        train(TrainConfig(method=method, coupling="ot", ot_block=16, out=None, figures=False, **TINY))
    except registry.MethodUnavailable as err:
        pytest.skip(str(err))
    assert len(seen) == TINY["steps"]
    for x, noise in seen:
        assert noise is not None and noise.shape == x.shape
        assert all(_no_improving_swap(x[i:i + 16], noise[i:i + 16]) for i in range(0, len(x), 16))
        assert not _no_improving_swap(x, noise)  # optimal within blocks, not across the whole batch
    seen.clear()
    train(TrainConfig(method=method, out=None, figures=False, **TINY))
    assert all(noise is None for _, noise in seen)  # independent coupling: the objective draws its own noise


@pytest.mark.parametrize("arch", ["plain", "residual"])
@pytest.mark.parametrize("act", ["silu", "gelu", "relu"])
def test_network_variants_are_differentiable_in_time(arch, act):
    net = VelocityMLP(hidden=16, depth=2, emb_dim=8, act=act, arch=arch).double()
    g = torch.Generator().manual_seed(1)
    z, t = torch.randn(4, 2, generator=g, dtype=torch.float64), torch.rand(4, generator=g, dtype=torch.float64)
    r = 0.5 * t
    dz = torch.randn(4, 2, generator=g, dtype=torch.float64)
    _, jvp = torch.func.jvp(lambda z_, t_: net(z_, r, t_), (z, t), (dz, torch.ones_like(t)))
    eps = 1e-6
    fd = (net(z + eps * dz, r, t + eps) - net(z - eps * dz, r, t - eps)) / (2 * eps)
    assert torch.allclose(jvp, fd, atol=1e-6)
    assert jvp.abs().max() > 0


@pytest.mark.parametrize("kwargs,match", [
    (dict(coupling="sinkhorn"), "coupling must be"),
    (dict(ot_block=0), "ot_block must be >= 1"),
    (dict(act="tanh"), "act must be one of"),
    (dict(arch="unet"), "arch must be one of"),
])
def test_network_and_coupling_option_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(out=None, **{**TINY, **kwargs})


def test_conflict_probe_measures_the_trained_coupling(monkeypatch):
    import examples.toy2d.train as toy_train

    seen: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    init = toy_train.ConflictProbe.__init__

    def spying_init(self, cfg):
        init(self, cfg)
        loss = self.loss

        def call(model, x, **kw):
            seen.append((x, kw.get("noise")))
            return loss(model, x, **kw)
        self.loss = call

    monkeypatch.setattr(toy_train.ConflictProbe, "__init__", spying_init)
    cfg = TrainConfig(method="meanflow", coupling="ot", ot_block=16, conflict_every=1, conflict_batch=32, out=None,
                      figures=False, **TINY)
    rec = train(cfg)
    assert len(rec["conflict"]["steps"]) == len(seen) == TINY["steps"]
    for x, noise in seen:  # the probe's batches are paired like the training batches
        assert noise is not None and x.shape[0] == 32
        assert all(_no_improving_swap(x[i:i + 16], noise[i:i + 16]) for i in (0, 16))
    seen.clear()
    train(replace(cfg, coupling="independent"))
    assert len(seen) == TINY["steps"] and all(noise is None for _, noise in seen)


def test_ot_coupling_pairs_conditional_data_within_classes(monkeypatch):
    import examples.toy2d.train as toy_train

    drawn: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    build, pair = toy_train.build_objective, toy_train.ot_pair

    def spy_pair(x, noise, block, labels=None):
        drawn.append((noise, labels))
        return pair(x, noise, block, labels)

    def spy(cfg):
        obj = build(cfg)

        def call(model, x, **kw):
            seen.append((x, kw["noise"], kw["model_kwargs"]["y"]))
            return obj(model, x, **kw)
        return call

    monkeypatch.setattr(toy_train, "ot_pair", spy_pair)
    monkeypatch.setattr(toy_train, "build_objective", spy)
    train(TrainConfig(method="meanflow", dataset="mixture", coupling="ot", drop_prob=0.0, out=None, figures=False,
                      **TINY))
    assert len(seen) == len(drawn) == TINY["steps"]
    for (x, noise, y), (raw, labels) in zip(seen, drawn, strict=True):
        assert labels is not None and torch.equal(labels, y)
        for c in y.unique():  # each class keeps the noise drawn for its own rows, optimally paired
            rows = y == c
            assert sorted(map(tuple, noise[rows].tolist())) == sorted(map(tuple, raw[rows].tolist()))
            assert _no_improving_swap(x[rows], noise[rows])


def test_ot_pair_errors_name_the_argument():
    from examples.toy2d.train import ot_pair

    x = torch.randn(8, 2)
    with pytest.raises(ValueError, match="noise must have the shape of x"):
        ot_pair(x, torch.randn(8, 3), block=4)
    with pytest.raises(ValueError, match="block must be >= 1"):
        ot_pair(x, torch.randn(8, 2), block=0)
    with pytest.raises(ValueError, match="labels must have shape"):
        ot_pair(x, torch.randn(8, 2), block=4, labels=torch.zeros(7, dtype=torch.long))
    images = torch.randn(6, 1, 2, 2)  # any data shape: rows are flattened for the cost
    assert ot_pair(images, torch.randn(6, 1, 2, 2), block=6).shape == (6, 1, 2, 2)
