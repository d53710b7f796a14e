"""Smoke and unit tests of the toy 2-D example (tiny sizes, CPU, a few seconds in all)."""

from __future__ import annotations

import dataclasses
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


@pytest.mark.slow
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
    cfg = TrainConfig(
        method="meanflow", dataset="mixture", kappa=0.5, coupling=coupling, out=None, figures=False, **TINY
    )
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
    cfg = TrainConfig(
        method="meanflow", tangent="model", aux_weight=0.5, equal_draw="single", out=None, figures=False, **TINY
    )
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
        (dict(method="fm", tangent="model"), r"tangent='model' has no effect with --method fm: .*JVP objective"),
        (dict(method="splitmeanflow", tangent="model"), "tangent='model' has no effect .*JVP objective"),
        (dict(method="meanflow", tangent="teacher"), "tangent must be"),
        (dict(method="alphaflow", aux_weight=1.0), "aux_weight=1.0 has no effect .* needs --method kim or meanflow"),
        (dict(method="meanflow", aux_weight=-1.0), "aux_weight must be a number >= 0"),
        (dict(method="meanflow", equal_draw="fresh"), "equal_draw must be"),
        (dict(method="fm", equal_draw="single"), r"equal_draw='single' has no effect .*\(r = t rows\)"),
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
        xb, nb, pb = x[lo : lo + 6], noise[lo : lo + 6], paired[lo : lo + 6]
        # the block's rows are a permutation of the same block's noise rows (no mixing across blocks)
        assert sorted(map(tuple, pb.tolist())) == sorted(map(tuple, nb.tolist()))
        brute = min(
            sum(float((xb[i] - nb[p[i]]).square().sum()) for i in range(6)) for p in itertools.permutations(range(6))
        )
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
        assert all(_no_improving_swap(x[i : i + 16], noise[i : i + 16]) for i in range(0, len(x), 16))
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


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(coupling="sinkhorn"), "coupling must be"),
        (dict(ot_block=0), "ot_block must be an integer >= 1"),
        (dict(act="tanh"), "act must be one of"),
        (dict(arch="unet"), "arch must be one of"),
    ],
)
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
    cfg = TrainConfig(
        method="meanflow",
        coupling="ot",
        ot_block=16,
        conflict_every=1,
        conflict_batch=32,
        out=None,
        figures=False,
        **TINY,
    )
    rec = train(cfg)
    assert len(rec["conflict"]["steps"]) == len(seen) == TINY["steps"]
    for x, noise in seen:  # the probe's batches are paired like the training batches
        assert noise is not None and x.shape[0] == 32
        assert all(_no_improving_swap(x[i : i + 16], noise[i : i + 16]) for i in (0, 16))
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
    train(
        TrainConfig(method="meanflow", dataset="mixture", coupling="ot", drop_prob=0.0, out=None, figures=False, **TINY)
    )
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


def test_ot_pair_is_the_package_coupling_in_consecutive_blocks():
    from examples.toy2d.train import ot_pair
    from meanflow_losses.couplings import linear_assignment, minibatch_ot

    g = torch.Generator().manual_seed(5)
    x, noise = torch.randn(70, 2, generator=g), torch.randn(70, 2, generator=g)
    labels = torch.randint(0, 3, (70,), generator=g)
    for lab in (None, labels):
        paired = ot_pair(x, noise, block=16, labels=lab)
        assert torch.equal(paired, minibatch_ot(x, noise, labels=lab, block=16))
        # the historical pairing: per class (sorted labels), consecutive blocks, each solved on cdist(...)^2
        groups = [torch.arange(70)] if lab is None else [(lab == c).nonzero().flatten() for c in lab.unique()]
        order = torch.arange(70)
        for rows in groups:
            for i in range(0, rows.numel(), 16):
                idx = rows[i : i + 16]
                cost = torch.cdist(x[idx].double(), noise[idx].double()).square()
                order[idx] = idx[torch.from_numpy(linear_assignment(cost.numpy()))]
        assert torch.equal(paired, noise[order])


# --- command line: ranges, choices, options without effect, config conflicts --------------------------------------

SMALL_ARGV = [
    "--batch",
    "64",
    "--width",
    "32",
    "--depth",
    "2",
    "--emb-dim",
    "8",
    "--eval-points",
    "256",
    "--energy-points",
    "128",
    "--eval-steps",
    "1",
    "2",
    "--log-every",
    "1",
    "--no-progress",
    "--no-figures",
]


def _usage_error(argv, capsys) -> str:
    from examples.toy2d.train import config_from_argv

    with pytest.raises(SystemExit) as exc:
        config_from_argv(argv)
    assert exc.value.code == 2  # argparse's usage error, not a traceback
    err = capsys.readouterr().err
    assert err.startswith("usage: ")
    return err


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--lr-final", "-1"], "argument --lr-final: must be a number in [0, 1], got -1"),
        (["--width", "0"], "argument --width: must be an integer >= 1, got 0"),
        (["--grad-clip", "-1"], "argument --grad-clip: must be a number >= 0, got -1"),
        (["--alpha-end", "2", "--method", "alphaflow"], "argument --alpha-end: must be a number in [0, 1], got 2"),
        (["--energy-points", "1"], "argument --energy-points: must be an integer >= 2, got 1"),
        (["--lr", "nan"], "argument --lr: must be a number > 0, got nan"),
        (["--time-mean", "inf", "--time-dist", "logit_normal"], "argument --time-mean: must be a finite number"),
        (["--steps", "1.5"], "argument --steps: must be an integer >= 1, got '1.5'"),
        (["--seed", "-1"], "argument --seed: must be an integer in [0, 4294967295]"),
        (["--ema", "1"], "argument --ema: must be a number in [0, 1), got 1"),
        (["--beta2", "1"], "argument --beta2: must be a number in [0, 1)"),
        (["--emb-dim", "7"], "argument --emb-dim: must be an even integer >= 2, got 7"),
        (["--max-freq", "0.5"], "argument --max-freq: must be a number >= 1"),
        (["--eval-steps", "1", "0"], "argument --eval-steps: must be an integer >= 1, got 0"),
        (
            ["--guidance-interval", "0", "2", "--dataset", "mixture"],
            "argument --guidance-interval: must be a number in",
        ),
        (["--kappa", "1", "--dataset", "mixture"], "argument --kappa: must be a number < 1"),
        (["--eta", "0.5", "--method", "alphaflow"], "argument --eta: must be a number in [0, 0.5)"),
        (["--checkpoint-every", "-1"], "argument --checkpoint-every: must be an integer >= 0"),
        (["--lr-schedule", "step"], "argument --lr-schedule: invalid choice: 'step'"),
        (["--jvp", "forward"], "argument --jvp: invalid choice: 'forward'"),
        (["--time-dist", "beta"], "argument --time-dist: invalid choice"),
        (["--reduction", "max"], "argument --reduction: invalid choice"),
    ],
)
def test_cli_values_out_of_range_are_usage_errors_naming_the_option(argv, expected, capsys):
    assert expected in _usage_error(argv, capsys)


@pytest.mark.parametrize(
    "argv,flag,needs",
    [
        (["--method", "fm", "--jvp", "joint"], "--jvp", "a JVP objective"),
        (["--method", "splitmeanflow", "--jvp", "nograd"], "--jvp", "a JVP objective"),  # the default, given explicitly
        (["--method", "fm", "--tangent", "conditional"], "--tangent", "a JVP objective"),
        (["--method", "alphaflow", "--aux-weight", "0"], "--aux-weight", "--method kim or meanflow"),
        (["--method", "fm", "--equal-fraction", "0.5"], "--equal-fraction", "r = t rows"),
        (["--method", "fm", "--equal-draw", "pair"], "--equal-draw", "r = t rows"),
        (["--method", "meanflow", "--alpha-end", "0.5"], "--alpha-end", "--method alphaflow"),
        (["--method", "kim", "--eta", "0.01"], "--eta", "--method alphaflow"),
        (["--method", "meanflow", "--kim-k", "2"], "--kim-k", "--method kim"),
        (["--omega", "2"], "--omega", "class-conditional run"),
        (["--dataset", "mixture", "--no-conditional", "--drop-prob", "0.2"], "--drop-prob", "class-conditional run"),
        (["--ot-block", "16"], "--ot-block", "--coupling ot"),
        (["--conflict-batch", "64"], "--conflict-batch", "--conflict-every > 0"),
        (["--time-std", "2"], "--time-std", "--time-dist logit_normal"),
        (["--lr-schedule", "constant", "--lr-final", "0.1"], "--lr-final", "--lr-schedule cosine or linear"),
        (["--weight-c", "0.01"], "--weight-c", "--weight-p > 0"),
        (["--no-checkpoint", "--checkpoint-every", "10"], "--checkpoint-every", "--checkpoint"),
    ],
)
def test_cli_options_without_effect_are_usage_errors(argv, flag, needs, capsys):
    err = _usage_error(argv, capsys)
    assert f"argument {flag}: has no effect with" in err and needs in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--method", "fm", "--jvp", "joint", "--conflict-every", "2"],  # the conflict probe is a JVP objective
        ["--method", "fm", "--equal-fraction", "0.5", "--conflict-every", "2"],
        [
            "--method",
            "meanflow",
            "--jvp",
            "finite_difference",
            "--tangent",
            "model",
            "--aux-weight",
            "0.5",
            "--equal-draw",
            "single",
        ],
        [
            "--method",
            "alphaflow",
            "--alpha-start",
            "0.1",
            "--alpha-end",
            "0.25",
            "--eta",
            "0.01",
            "--alpha-gamma",
            "10",
        ],
        ["--method", "kim", "--kim-k", "2", "--min-snr-gamma", "3"],
        [
            "--dataset",
            "mixture",
            "--omega",
            "2",
            "--kappa",
            "0.5",
            "--drop-prob",
            "0.2",
            "--guidance-interval",
            "0",
            "1",
        ],
        ["--conditional", "--omega", "1.5"],
        ["--coupling", "ot", "--ot-block", "16"],
        ["--time-dist", "logit_normal", "--time-mean", "0", "--time-std", "2"],
        ["--weight-p", "1", "--weight-c", "0.01"],
        ["--lr-schedule", "linear", "--lr-final", "0.1", "--warmup", "10"],
    ],
)
def test_cli_accepts_options_where_they_have_an_effect(argv):
    from examples.toy2d.train import config_from_argv

    cfg, resume = config_from_argv(argv)
    assert not resume and cfg.out == f"runs/toy2d/{cfg.method}_{cfg.dataset}_s0"


@pytest.mark.parametrize(
    "argv,expected",
    [
        (
            ["--method", "alphaflow", "--alpha-start", "0.6", "--alpha-end", "0.5"],
            "argument --alpha-start/--alpha-end: need alpha_start <= alpha_end",
        ),
        (
            ["--dataset", "mixture", "--guidance-interval", "0.5", "0.2"],
            "argument --guidance-interval: guidance_interval",
        ),
        (["--eval-steps", "1", "1"], "argument --eval-steps: eval_steps must not repeat"),
    ],
)
def test_cli_conflicting_options_are_usage_errors(argv, expected, capsys):
    assert expected in _usage_error(argv, capsys)


def test_cli_objective_errors_are_usage_errors(monkeypatch, capsys):
    def refuse(cfg):
        raise ValueError("the objective refuses these options")

    monkeypatch.setitem(registry.METHODS, "meanflow", replace(registry.METHODS["meanflow"], build=refuse))
    assert "error: the objective refuses these options" in _usage_error(["--method", "meanflow"], capsys)


def test_every_cli_option_has_help_and_a_range_or_choices(capsys):
    import argparse

    from examples.cli import Range
    from examples.toy2d.train import RANGES, _parser

    parser = _parser()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, action.option_strings
        takes_value = not isinstance(action, argparse.BooleanOptionalAction | argparse._StoreTrueAction)
        if takes_value and action.dest not in ("out", "init_from", "teacher", "reflow_from"):  # paths
            assert action.choices or isinstance(action.type, Range), action.option_strings
    numeric = {
        f.name
        for f in dataclasses.fields(TrainConfig)
        if str(f.type).split("[")[0].split(" ")[0] in ("int", "float", "tuple")
    }
    assert numeric == set(RANGES)
    text = " ".join(parser.format_help().split())  # unwrapped
    assert "(default: None)" not in text  # a None default is explained by the help text itself
    assert text.count("(default: 4000)") == 1 and "(default: the method's, 0.5)" in text


def test_config_range_errors_name_the_field():
    from examples.cli import ConfigError

    for kwargs, match in [
        (dict(lr_final=-1.0), r"lr_final must be a number in \[0, 1\], got -1.0"),
        (dict(width=0), "width must be an integer >= 1"),
        (dict(alpha_end=2.0), "alpha_end must be"),
        (dict(energy_points=1), "energy_points must"),
        (dict(lr=math.nan), "lr must be a number > 0, got nan"),
        (dict(steps=2.5), "steps must be an integer"),
        (dict(eval_steps=(1, 0)), "every entry of eval_steps must be an integer >= 1"),
    ]:
        with pytest.raises(ConfigError, match=match) as exc:
            TrainConfig(**kwargs)
        assert exc.value.options == tuple(kwargs)


def test_range_type():
    import argparse

    from examples.cli import Range

    unit = Range(float, 0, 1, hi_open=True)
    assert unit("0.5") == 0.5 and unit.describe() == "a number in [0, 1)"
    for bad in ("1", "-0.1", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match=r"must be a number in \[0, 1\)"):
            unit(bad)
    assert not Range(int, 1).contains(True) and not Range(int, 1).contains(1.0) and Range(int, 1).contains(3)
    assert Range(int, 0, multiple_of=4).describe() == "a multiple of 4 >= 0"
    assert not Range(int, multiple_of=4).contains(6)


# --- resume ----------------------------------------------------------------------------------------------------------


class _Stop(Exception):
    """Stands for an interrupted run."""


def _interrupt_at(monkeypatch, stop_step: int) -> None:
    """Make every objective built from now on raise _Stop when called for step ``stop_step``."""
    import examples.toy2d.train as toy_train

    build = toy_train.build_objective

    def spy(cfg):
        obj = build(cfg)

        def call(model, x, step, **kw):
            if step == stop_step:
                raise _Stop
            return obj(model, x, step=step, **kw)

        return call

    monkeypatch.setattr(toy_train, "build_objective", spy)


def _same_run(a_dir, b_dir, a, b) -> None:
    sa, sb = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (a_dir, b_dir))
    for key in ("model", "ema"):
        assert (sa[key] is None) == (sb[key] is None)
        for name in sa[key] or {}:
            assert torch.equal(sa[key][name], sb[key][name]), (key, name)
    for key in ("optimizer", "scheduler", "ema_n_averaged", "step"):
        assert json.dumps(sa["train"][key], default=str) == json.dumps(sb["train"][key], default=str), key
    assert json.dumps(a["history"]) == json.dumps(b["history"])  # NaN-safe comparison
    assert a["metrics"] == b["metrics"] and a.get("conflict") == b.get("conflict")


@pytest.mark.parametrize(
    "method,extra",
    [
        # EMA, warm-up and cosine decay, conditional data with label dropout, OT pairs, the conflict probe's generator
        (
            "meanflow",
            dict(ema=0.9, warmup=2, dataset="mixture", coupling="ot", ot_block=32, conflict_every=2, conflict_batch=32),
        ),
        ("alphaflow", dict(alpha_end=0.5, lr_schedule="linear", lr_final=0.1)),  # alpha depends on the step
    ],
)
@pytest.mark.slow
def test_resume_continues_exactly_like_the_uninterrupted_run(tmp_path, monkeypatch, method, extra):
    opts = {**TINY, "steps": 6, "checkpoint_every": 3, "figures": False, **extra}
    straight = train(TrainConfig(method=method, out=str(tmp_path / "a"), **opts))
    cfg = TrainConfig(method=method, out=str(tmp_path / "b"), **opts)
    with monkeypatch.context() as m:
        _interrupt_at(m, 4)  # dies during step 4; the last checkpoint is the one after step 3 (3 steps done)
        with pytest.raises(_Stop):
            train(cfg)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["train"]["step"] == 3
    resumed = train(cfg, resume=True)
    assert resumed["resumed_at"] == [3] and "resumed_at" not in straight
    _same_run(tmp_path / "a", tmp_path / "b", straight, resumed)
    again = train(cfg, resume=True)  # a finished run: nothing left to train, evaluated again
    assert again["resumed_at"] == [3, 6] and again["metrics"] == straight["metrics"]


def test_resume_refuses_other_training_options_and_missing_state(tmp_path):
    from examples.toy2d.train import ResumeError

    cfg = TrainConfig(method="meanflow", out=str(tmp_path), figures=False, **TINY)
    with pytest.raises(ResumeError, match="no checkpoint to resume"):
        train(cfg, resume=True)
    train(cfg)
    with pytest.raises(ResumeError, match=r"--lr 0.002 there, 0.001 here"):
        train(replace(cfg, lr=1e-3), resume=True)
    assert train(replace(cfg, eval_points=300, threads=2), resume=True)["resumed_at"] == [TINY["steps"]]
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    del state["train"]  # a checkpoint written before resuming existed
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(ResumeError, match="no training state"):
        train(cfg, resume=True)


def test_cli_resume_takes_the_checkpoint_options(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = [
        *SMALL_ARGV,
        "--steps",
        "6",
        "--checkpoint-every",
        "2",
        "--method",
        "alphaflow",
        "--alpha-end",
        "0.5",
        "--out",
        str(out),
    ]
    with monkeypatch.context() as m:
        _interrupt_at(m, 5)
        with pytest.raises(_Stop):
            main(argv)
    # only --out (and an evaluation option): every training option comes from the checkpoint
    rec = main(["--resume", "--out", str(out), "--eval-points", "300"])
    assert rec["resumed_at"] == [4] and rec["config"]["method"] == "alphaflow" and rec["config"]["steps"] == 6
    assert "resumed at step 4" in capsys.readouterr().out
    straight = main([*argv[:-1], str(tmp_path / "straight"), "--eval-points", "300"])
    _same_run(tmp_path / "straight", out, straight, rec)
    err = _usage_error(["--resume", "--out", str(out), "--lr", "0.01"], capsys)
    assert "argument --resume:" in err and "--lr 0.002 there, 0.01 here" in err
    err = _usage_error(["--resume", "--out", str(out), "--method", "meanflow"], capsys)
    assert "--method 'alphaflow' there, 'meanflow' here" in err
    err = _usage_error(["--resume", "--out", str(tmp_path / "nothing")], capsys)
    assert "argument --resume: no checkpoint to resume" in err


def test_reuse_skips_a_checkpoint_of_an_interrupted_rerun(tmp_path, monkeypatch):
    cfg = TrainConfig(method="meanflow", out=str(tmp_path), figures=False, checkpoint_every=2, **TINY)
    train(cfg)
    with monkeypatch.context() as m:  # a second run into the same folder dies after its first checkpoint
        _interrupt_at(m, 2)
        with pytest.raises(_Stop):
            train(cfg)
    assert not train(cfg, reuse=True).get("reevaluated")  # metrics.json is the old run's, the checkpoint is not
