"""The official codes' time pairs, dropout rows and guidance interval, reproduced by options.

Each official rule is transcribed here from its code (py-meanflow ``meanflow/models/time_sampler.py``, MeanFlow JAX
``meanflow.py``: ``sample_tr`` and ``cond_drop``, alpha-Flow ``src/training/loss.py``: ``sample_traj_params`` and
``_compute_velocity_cfg``) and compared with the package's draws: in distribution (two-sample Kolmogorov-Smirnov
statistic on ``t``, ``r`` and ``t - r`` below 0.01 on 10^6 draws), in the count rule (exactly, per batch size),
and on hand-built batches for the dropout rows and the strict interval.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import meanflow_losses as mfl
from meanflow_losses.guidance import apply_guidance, draw_drop_mask
from tests.nets import MLP

N = 1_000_000
KS_MAX = 0.01


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic ``sup |F_a - F_b|`` (atoms such as ``t - r = 0`` included).

    Both empirical CDFs are evaluated at every pooled point (right-continuous), as ``scipy.stats.ks_2samp`` does.
    """
    xa = np.sort(a.double().flatten().numpy())
    xb = np.sort(b.double().flatten().numpy())
    x = np.concatenate([xa, xb])
    fa = np.searchsorted(xa, x, side="right") / xa.size
    fb = np.searchsorted(xb, x, side="right") / xb.size
    return float(np.abs(fa - fb).max())


def assert_same_distribution(pair: mfl.TimePair, t: torch.Tensor, r: torch.Tensor) -> None:
    stats = {
        "t": ks_statistic(pair.t, t),
        "r": ks_statistic(pair.r, r),
        "t - r": ks_statistic(pair.t - pair.r, t - r),
    }
    assert max(stats.values()) < KS_MAX, stats


# --- transcriptions of the official samplers (float32, as the official codes draw) -----------------------------------


def _logit_normal(n: int, mean: float, std: float, g: torch.Generator) -> torch.Tensor:
    return torch.sigmoid(torch.randn(n, generator=g) * std + mean).clip(0.0, 1.0)


def py_meanflow_v0(n: int, ratio: float, mt: float, st: float, mr: float, sr: float, g: torch.Generator):
    t, r = _logit_normal(n, mt, st, g), _logit_normal(n, mr, sr, g)
    t, r = torch.maximum(t, r), torch.minimum(t, r)
    same = torch.rand(n, generator=g) < 1 - ratio  # ratio: probability of r != t
    return t, torch.where(same, t, r)


def py_meanflow_v1(n: int, ratio: float, mt: float, st: float, mr: float, sr: float, g: torch.Generator):
    t, r = _logit_normal(n, mt, st, g), _logit_normal(n, mr, sr, g)
    same = torch.rand(n, generator=g) < 1 - ratio
    r = torch.where(same, t, r)
    return t, torch.minimum(t, r)  # no sorting: t keeps its own distribution


def meanflow_jax(bz: int, data_proportion: float, dist: str, g: torch.Generator):
    def draw() -> torch.Tensor:
        return torch.rand(bz, generator=g) if dist == "uniform" else torch.sigmoid(torch.randn(bz, generator=g) - 0.4)

    t, r = draw(), draw()
    t, r = torch.maximum(t, r), torch.minimum(t, r)
    data_size = int(bz * data_proportion)
    first = torch.arange(bz) < data_size
    return t, torch.where(first, t, r)


def alphaflow_official(bz: int, ratio_fm: float, g: torch.Generator):
    n_fm = int(bz * ratio_fm)
    t_fm = torch.sigmoid(torch.randn(n_fm, generator=g) - 0.4)
    a = torch.sigmoid(torch.randn(bz - n_fm, generator=g) - 0.4)
    b = torch.sigmoid(torch.randn(bz - n_fm, generator=g) - 0.4)
    t = torch.cat([t_fm, torch.maximum(a, b)])
    r = torch.cat([t_fm, torch.minimum(a, b)])
    return t, r


# --- distributions ---------------------------------------------------------------------------------------------------

PY_MEANFLOW = {  # (ratio, P_mean_t, P_std_t, P_mean_r, P_std_r): the scripts' CIFAR-10 settings
    "v0": (0.75, -2.0, 2.0, -2.0, 2.0),
    "v1": (0.75, -0.6, 1.6, -4.0, 1.6),
}


@pytest.mark.parametrize("version", ["v0", "v1"])
def test_py_meanflow_samplers(version):
    ratio, mt, st, mr, sr = PY_MEANFLOW[version]
    sampler = mfl.TimePairSampler(
        "logit_normal",
        mt,
        st,
        equal_fraction=1 - ratio,
        equal_count="coin",
        order="sort" if version == "v0" else "min",
        r_times=mfl.TimeSampler("logit_normal", mr, sr),
    )
    pair = sampler.sample(N, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fn = py_meanflow_v0 if version == "v0" else py_meanflow_v1
    t, r = fn(N, ratio, mt, st, mr, sr, torch.Generator().manual_seed(1))
    assert_same_distribution(pair, t, r)
    assert pair.interval_rows is None  # a data-dependent count: the objectives find the rows with r != t
    assert bool((pair.r <= pair.t).all())


def test_py_meanflow_v1_keeps_t_unsorted_and_has_more_equal_rows():
    ratio, mt, st, mr, sr = PY_MEANFLOW["v1"]
    sampler = mfl.TimePairSampler(
        "logit_normal",
        mt,
        st,
        1 - ratio,
        equal_count="coin",
        order="min",
        r_times=mfl.TimeSampler("logit_normal", mr, sr),
    )
    pair = sampler.sample(N, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    base = mfl.TimeSampler("logit_normal", mt, st).sample(N, generator=torch.Generator().manual_seed(3))
    assert ks_statistic(pair.t, base) < KS_MAX  # t is the t draw itself, not a maximum
    t, r = py_meanflow_v1(N, ratio, mt, st, mr, sr, torch.Generator().manual_seed(4))
    share_official = float((t == r).double().mean())
    share = float((pair.t == pair.r).double().mean())
    assert share == pytest.approx(share_official, abs=3e-3)
    assert share > 1 - ratio + 0.01  # pairs with b >= t end with r = t as well


def test_the_ks_check_tells_the_samplers_apart():
    """Negative control: sorting instead of py-meanflow v1's min, or a fixed count, fails the 0.01 bound."""
    ratio, mt, st, mr, sr = PY_MEANFLOW["v1"]
    n = N // 5  # the differences are far above the sampling noise (about 0.003 at this size)
    t, r = py_meanflow_v1(n, ratio, mt, st, mr, sr, torch.Generator().manual_seed(11))
    for sampler in (
        mfl.TimePairSampler(
            "logit_normal", mt, st, 1 - ratio, equal_count="coin", r_times=mfl.TimeSampler("logit_normal", mr, sr)
        ),
        mfl.TimePairSampler("logit_normal", mt, st, 1 - ratio),
    ):
        pair = sampler.sample(n, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
        worst = max(ks_statistic(pair.t, t), ks_statistic(pair.r, r), ks_statistic(pair.t - pair.r, t - r))
        assert worst > 3 * KS_MAX


@pytest.mark.parametrize("dist", ["logit_normal", "uniform"])
def test_meanflow_jax_sampler(dist):
    sampler = mfl.TimePairSampler(dist, -0.4, 1.0, 0.75, equal_count="truncate", equal_rows="first")
    pair = sampler.sample(N, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    t, r = meanflow_jax(N, 0.75, dist, torch.Generator().manual_seed(6))
    assert_same_distribution(pair, t, r)


def test_alphaflow_sampler():
    sampler = mfl.TimePairSampler(
        "logit_normal", -0.4, 1.0, 0.5, equal_draw="single", equal_count="truncate", equal_rows="first"
    )
    pair = sampler.sample(N, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    t, r = alphaflow_official(N, 0.5, torch.Generator().manual_seed(8))
    assert_same_distribution(pair, t, r)


def test_separate_r_distribution_sorted():
    """``r_times`` with ``order="sort"``: two draws of different distributions, sorted (FastGen-style)."""
    sampler = mfl.TimePairSampler("uniform", equal_fraction=0.0, r_times=mfl.TimeSampler("logit_normal", -2.0, 1.0))
    pair = sampler.sample(N, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    g = torch.Generator().manual_seed(10)
    a, b = torch.rand(N, generator=g), _logit_normal(N, -2.0, 1.0, g)
    assert_same_distribution(pair, torch.maximum(a, b), torch.minimum(a, b))
    assert pair.interval_rows is not None and pair.interval_rows.numel() == N


# --- count rules -----------------------------------------------------------------------------------------------------

FRACTIONS = [0.0, 0.1, 0.25, 0.29, 0.3, 0.57, 0.58, 0.7, 0.75, 1 / 3, 0.9, 1.0]


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_truncate_count_is_the_official_int(fraction):
    sampler = mfl.TimePairSampler("uniform", equal_fraction=fraction, equal_count="truncate", equal_rows="first")
    g = torch.Generator().manual_seed(0)
    for batch in range(1, 257):
        want = int(batch * fraction)  # MeanFlow JAX data_size, alpha-Flow batch_size_fm
        pair = sampler.sample(batch, generator=g, dtype=torch.float64)
        assert sampler.num_equal(batch) == want
        assert torch.equal(pair.interval_rows, torch.arange(want, batch))
        assert torch.equal(pair.r[:want], pair.t[:want])
        assert bool((pair.r[want:] < pair.t[want:]).all())


def test_floor_and_truncate_differ_where_official():
    floor = mfl.TimePairSampler("uniform", equal_fraction=0.29)
    trunc = mfl.TimePairSampler("uniform", equal_fraction=0.29, equal_count="truncate")
    assert (floor.num_equal(100), trunc.num_equal(100), int(100 * 0.29)) == (29, 28, 28)
    diffs = [
        b
        for b in range(1, 1001)
        for f in FRACTIONS
        if mfl.TimePairSampler(equal_fraction=f, equal_count="truncate").num_equal(b) != int(b * f)
    ]
    assert diffs == []


def test_coin_count_varies_per_batch():
    sampler = mfl.TimePairSampler("uniform", equal_fraction=0.25, equal_count="coin")
    g = torch.Generator().manual_seed(0)
    counts = [int((p.t == p.r).sum()) for p in (sampler.sample(64, generator=g) for _ in range(200))]
    assert len(set(counts)) > 5
    assert sum(counts) / (200 * 64) == pytest.approx(0.25, abs=0.02)
    with pytest.raises(ValueError, match="no fixed count"):
        sampler.num_equal(64)


def test_defaults_are_unchanged():
    s = mfl.TimePairSampler()
    assert (s.equal_count, s.equal_rows, s.order, s.r_times) == ("floor", "random", "sort", None)
    g = mfl.TrainingGuidance(null_condition=mfl.null_class(3))
    assert (g.drop_rows, g.interval_test) == ("per_row", "inclusive")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"equal_count": "per_row"}, "equal_count"),
        ({"equal_rows": "last"}, "equal_rows"),
        ({"order": "max"}, "order"),
        ({"equal_count": "coin", "equal_rows": "first"}, "equal_rows"),
    ],
)
def test_sampler_option_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mfl.TimePairSampler(**kwargs)


def test_r_times_type_error():
    with pytest.raises(TypeError, match="r_times"):
        mfl.TimePairSampler(r_times=0.5)


# --- objectives with a data-dependent count ---------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["sort", "min"])
@pytest.mark.parametrize("objective", ["meanflow", "alphaflow", "splitmeanflow"])
def test_objectives_train_eagerly_with_a_coin_per_row(objective, order):
    times = mfl.TimePairSampler("uniform", equal_fraction=0.5, equal_count="coin", order=order)
    extra = {"alpha": 0.5} if objective == "alphaflow" else {}
    loss_fn = mfl.make_objective(objective, times=times, **extra)
    torch.manual_seed(0)
    model = MLP(n_classes=3)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x, y = torch.randn(32, 2, generator=g), torch.randint(0, 3, (32,), generator=g)
        out = loss_fn(model, x, model_kwargs={"y": y}, generator=g)
        out.loss.backward()
        assert torch.isfinite(out.loss)
        assert float(out.terms["frac_equal"]) == pytest.approx(float((out.t == out.r).float().mean()))


def test_coin_sampler_refuses_torch_compile():
    sampler = mfl.TimePairSampler("uniform", equal_fraction=0.5, equal_count="coin")
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="data-dependent"):
        torch.compile(lambda n: sampler.sample(n).t.sum(), backend="eager")(8)
    torch._dynamo.reset()


# --- which rows lose their condition ----------------------------------------------------------------------------------


def official_jax_drop(batch: int, p: float, g: torch.Generator) -> torch.Tensor:
    """MeanFlow JAX ``cond_drop``: as many rows as coins below p, taken from the start of the batch."""
    num_drop = int((torch.rand(batch, generator=g) < p).sum())
    return torch.arange(batch) < num_drop


def test_first_rows_dropout_reproduces_the_jax_rule():
    guidance = mfl.TrainingGuidance(drop_prob=0.3, null_condition=mfl.null_class(3), drop_rows="first")
    t = torch.rand(64, generator=torch.Generator().manual_seed(0))
    for seed in range(20):
        got = draw_drop_mask(guidance, t, 64, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(got, official_jax_drop(64, 0.3, torch.Generator().manual_seed(seed)))


def test_first_rows_dropout_only_hits_flow_matching_rows():
    """With the JAX sampler's layout (r = t rows first) only r = t rows are unconditional, as in the official code."""
    times = mfl.TimePairSampler(equal_fraction=0.75, equal_count="truncate", equal_rows="first")
    guidance = mfl.TrainingGuidance(
        omega=1.0, kappa=0.5, drop_prob=0.1, null_condition=mfl.null_class(3), drop_rows="first"
    )
    per_row = mfl.TrainingGuidance(omega=1.0, kappa=0.5, drop_prob=0.1, null_condition=mfl.null_class(3))
    g = torch.Generator().manual_seed(0)
    hits_interval_rows = 0
    for _ in range(200):
        pair = times.sample(32, generator=g)
        drop = draw_drop_mask(guidance, pair.t, 32, generator=g)
        assert bool((pair.r[drop] == pair.t[drop]).all())
        hits_interval_rows += int((draw_drop_mask(per_row, pair.t, 32, generator=g) & (pair.r < pair.t)).sum())
    assert hits_interval_rows > 0  # the per-row policy drops r != t rows too


def test_first_rows_dropout_in_guidance_on_a_hand_built_batch():
    torch.manual_seed(0)
    model = MLP(n_classes=3).double()
    guidance = mfl.TrainingGuidance(
        omega=1.0, kappa=0.5, drop_prob=0.5, null_condition=mfl.null_class(3), drop_rows="first"
    )
    b = 8
    g = torch.Generator().manual_seed(1)
    z, v = torch.randn(b, 2, generator=g, dtype=torch.float64), torch.randn(b, 2, generator=g, dtype=torch.float64)
    t, y = torch.full((b,), 0.5, dtype=torch.float64), torch.randint(0, 3, (b,), generator=g)
    res = apply_guidance(guidance, model, z, t, v, {"y": y}, generator=torch.Generator().manual_seed(3))
    want_drop = official_jax_drop(b, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(res.drop_mask, want_drop)
    labels = res.model_kwargs.kwargs["y"]
    assert torch.equal(labels[want_drop], torch.full_like(labels[want_drop], 3))
    assert torch.equal(labels[~want_drop], y[~want_drop])
    torch.testing.assert_close(res.v_tilde[want_drop], v[want_drop])  # dropped rows: v~ = v
    with torch.no_grad():
        u_c, u_u = model(z, t, t, y=y), model(z, t, t, y=torch.full_like(y, 3))
    want = v + 0.5 * u_c - 0.5 * u_u
    torch.testing.assert_close(res.v_tilde[~want_drop], want[~want_drop])


def test_drop_rows_error():
    with pytest.raises(ValueError, match="drop_rows"):
        mfl.TrainingGuidance(null_condition=mfl.null_class(3), drop_rows="last")
    with pytest.raises(ValueError, match="interval_test"):
        mfl.TrainingGuidance(null_condition=mfl.null_class(3), interval_test="open")


# --- the strict guidance interval -------------------------------------------------------------------------------------

BOUNDARY_T = torch.tensor([0.0, 1e-6, 0.2, 0.5, 0.75, 0.75 + 1e-6, 0.9, 1.0], dtype=torch.float64)


@pytest.mark.parametrize("interval", [(0.0, 0.75), (0.0, 1.0), (0.2, 0.9)])
def test_strict_interval_is_the_alphaflow_rule(interval):
    lo, hi = interval
    strict = mfl.TrainingGuidance(interval=interval, drop_prob=0.0, interval_test="strict")
    inclusive = mfl.TrainingGuidance(interval=interval, drop_prob=0.0)
    assert torch.equal(strict.in_interval(BOUNDARY_T), (BOUNDARY_T > lo) & (BOUNDARY_T < hi))  # alpha-Flow
    assert torch.equal(inclusive.in_interval(BOUNDARY_T), (BOUNDARY_T >= lo) & (BOUNDARY_T <= hi))  # MeanFlow JAX


def test_alphaflow_presets_use_the_official_interval_and_count():
    for name in ("B/2-cfg", "XL/2-cfg"):
        loss = mfl.presets.alphaflow_preset(name, null_condition=mfl.null_class(3))
        assert loss.guidance.interval_test == "strict"
        assert loss.times.equal_count == "truncate"


def test_strict_interval_on_a_hand_built_batch():
    """XL/2-cfg (interval [0, 0.75]): rows at t = 0 and t = 0.75 are neither guided nor dropped (official code)."""
    torch.manual_seed(0)
    model = MLP(n_classes=3).double()
    loss = mfl.presets.alphaflow_preset("XL/2-cfg", null_condition=mfl.null_class(3))
    guidance = loss.guidance
    b = BOUNDARY_T.numel()
    g = torch.Generator().manual_seed(0)
    z, v = torch.randn(b, 2, generator=g, dtype=torch.float64), torch.randn(b, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (b,), generator=g)
    res = apply_guidance(guidance, model, z, BOUNDARY_T, v, {"y": y})
    inside = (BOUNDARY_T > 0.0) & (BOUNDARY_T < 0.75)
    assert torch.equal(res.guided_mask, inside)
    torch.testing.assert_close(res.v_tilde[~inside], v[~inside])
    mask = draw_drop_mask(
        mfl.TrainingGuidance(
            drop_prob=0.999,
            null_condition=mfl.null_class(3),
            drop_only_in_interval=True,
            interval=(0.0, 0.75),
            interval_test="strict",
        ),
        BOUNDARY_T,
        b,
        generator=torch.Generator().manual_seed(0),
    )
    assert not bool((mask & ~inside).any())  # drop_prob near 1: only the rows strictly inside may be dropped


# --- named recipes ----------------------------------------------------------------------------------------------------


def test_recipes_by_name_in_the_registry():
    small = mfl.make_objective("meanflow", recipe="small_data")
    assert (small.times.name, small.times.equal_fraction, small.weighting.p, small.reduction) == (
        "uniform",
        0.5,
        0.0,
        "mean",
    )
    imagenet = mfl.make_objective("meanflow", recipe="imagenet")
    default = mfl.MeanFlowLoss()
    assert (imagenet.times, imagenet.weighting, imagenet.reduction) == (
        default.times,
        default.weighting,
        default.reduction,
    )  # the papers' defaults are MeanFlowLoss's own
    af = mfl.make_objective("alphaflow", recipe="imagenet", alpha=0.5)
    assert (af.times.equal_fraction, af.times.equal_draw, af.reduction, af.target_clip) == (0.5, "single", "mean", 4.0)
    fm = mfl.make_objective("fm", recipe="small_data")
    assert isinstance(fm.times, mfl.TimeSampler) and fm.times.name == "uniform"
    assert mfl.make_objective("shortcut", recipe="small_data").times == mfl.ShortcutLoss().times
    override = mfl.make_objective("meanflow", recipe="small_data", reduction="sum", jvp="finite_difference")
    assert (override.reduction, override.jvp, override.times.name) == ("sum", "finite_difference", "uniform")
    assert mfl.presets.recipe("small_data", "splitmeanflow").weighting.p == 0.0
    assert tuple(sorted(mfl.presets.RECIPES)) == mfl.registry.RECIPE_NAMES


def test_unknown_recipe_names_the_argument():
    with pytest.raises(ValueError, match="recipe must be one of"):
        mfl.make_objective("meanflow", recipe="cifar")


def test_example_clis_take_a_recipe():
    from examples.digits.train import config_from_argv as digits_config
    from examples.toy2d.train import config_from_argv as toy_config

    cfg, _ = toy_config(["--recipe", "imagenet"])
    assert (cfg.time_dist, cfg.equal_fraction, cfg.weight_p, cfg.reduction) == ("logit_normal", 0.75, 1.0, "sum")
    cfg, _ = toy_config(["--recipe", "imagenet", "--method", "alphaflow", "--weight-p", "0"])
    assert (cfg.equal_fraction, cfg.equal_draw, cfg.weight_p, cfg.reduction) == (0.5, "single", 0.0, "mean")
    cfg = digits_config(["--recipe", "small_data"])
    assert (cfg.time_dist, cfg.equal_fraction, cfg.weight_p) == ("uniform", 0.5, 0.0)


def test_small_data_recipe_is_the_toy_studys_meanflow_run():
    # The toy study's MeanFlow row (docs/toy2d_study.md: 1-step SW2 0.044 +- 0.002 over 3 seeds) is a deterministic
    # run of its TrainConfig; the recipe reproduces that figure exactly when it yields the same training options
    # and the same objective, which is what this checks (the run itself takes minutes).
    from dataclasses import replace

    from examples.toy2d.registry import build_objective
    from examples.toy2d.study import ENTRIES
    from examples.toy2d.train import EVAL_ONLY, TrainConfig, config_from_argv

    entry = next(e for e in ENTRIES if e.label == "MeanFlow")
    study = replace(TrainConfig(), method=entry.method, **entry.options)
    cfg, _ = config_from_argv(["--method", "meanflow", "--recipe", "small_data"])
    ignore = {*EVAL_ONLY, "out", "resolved"}
    a, b = study.to_dict(), cfg.to_dict()
    assert {k: v for k, v in a.items() if k not in ignore} == {k: v for k, v in b.items() if k not in ignore}
    assert build_objective(cfg) == build_objective(study)
    small = mfl.make_objective("meanflow", recipe="small_data")
    toy = build_objective(study)
    assert (small.times, small.weighting, small.reduction) == (toy.times, toy.weighting, toy.reduction)


@pytest.mark.parametrize(
    "kw",
    [
        dict(r_times=mfl.TimeSampler("logit_normal", -4.0, 1.6)),
        dict(name="uniform", r_times=mfl.TimeSampler("logit_normal", -1.0, 1.0)),
        dict(order="min", mean=-0.6, std=1.6, r_times=mfl.TimeSampler("logit_normal", -4.0, 1.6)),
        dict(order="min"),
    ],
)
def test_progressive_interval_weight_has_mean_one_at_step_0_for_every_pair_construction(kw):
    # lambda = 1 / E[1 - (t - r)] over the r != t rows of the sampler actually used (Monte Carlo, 10^6 draws)
    s = mfl.TimePairSampler(**{"equal_fraction": 0.0, **kw})
    p = s.sample(1_000_000, generator=torch.Generator().manual_seed(0))
    m = p.r < p.t
    w = mfl.ProgressiveIntervalWeight(100, times=s)(p.t[m], p.r[m], 0).double().mean()
    assert abs(float(w) - 1.0) < 2e-3


def test_registry_recipe_names_are_the_presets_recipes():
    assert set(mfl.registry.RECIPE_NAMES) == set(mfl.presets.RECIPES)
