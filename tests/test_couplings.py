"""Couplings: exact minibatch OT against brute force and scipy, reflow pairs against the Gaussian oracle."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import meanflow_losses as mfl
from meanflow_losses import couplings
from meanflow_losses.couplings import linear_assignment, minibatch_ot, ot_permutation, reflow_pairs
from tests.oracles import MU, SIGMA, ExactAverageVelocity

SOLVERS = [
    "numpy",
    pytest.param("scipy", marks=pytest.mark.skipif(couplings._scipy_lsa() is None, reason="scipy not installed")),
]


def _brute_force(cost: np.ndarray) -> float:
    n = cost.shape[0]
    perms = np.array(list(itertools.permutations(range(n))))
    return float(cost[np.arange(n), perms].sum(axis=1).min())


def _sq_cost(x: torch.Tensor, e: torch.Tensor) -> np.ndarray:
    return torch.cdist(x.flatten(1).double(), e.flatten(1).double()).square().numpy()


def _total(x: torch.Tensor, e: torch.Tensor) -> float:
    return float((x.flatten(1).double() - e.flatten(1).double()).square().sum())


def _rows(t: torch.Tensor) -> list[tuple[float, ...]]:
    return sorted(map(tuple, t.flatten(1).tolist()))


# --- the exact assignment ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
def test_linear_assignment_equals_the_brute_force_optimum(solver):
    rng = np.random.default_rng(0)
    for n in range(1, 8):
        for kind in ("normal", "ties", "negative"):
            if kind == "normal":
                cost = rng.random((n, n))
            elif kind == "ties":  # many optimal assignments
                cost = rng.integers(0, 3, (n, n)).astype(float)
            else:
                cost = rng.standard_normal((n, n)) * 100
            col = linear_assignment(cost, solver=solver)
            assert col.dtype == np.int64 and sorted(col.tolist()) == list(range(n))
            assert cost[np.arange(n), col].sum() == pytest.approx(_brute_force(cost), rel=1e-12, abs=1e-12)


def test_numpy_solver_equals_scipy_on_a_random_64x64_cost():
    pytest.importorskip("scipy")
    rng = np.random.default_rng(1)
    for cost in (rng.random((64, 64)), rng.standard_normal((64, 64)) ** 2 * 10):
        ours, ref = linear_assignment(cost, solver="numpy"), linear_assignment(cost, solver="scipy")
        assert np.array_equal(ours, ref)  # a random cost has a unique optimum
        assert cost[np.arange(64), ours].sum() == pytest.approx(cost[np.arange(64), ref].sum(), rel=1e-14)


def test_linear_assignment_accepts_tensors_and_refuses_bad_costs():
    cost = torch.tensor([[4.0, 1.0], [1.0, 4.0]])
    assert linear_assignment(cost).tolist() == [1, 0]
    with pytest.raises(ValueError, match="solver must be one of"):
        linear_assignment(cost, solver="sinkhorn")
    with pytest.raises(ValueError, match="square"):
        linear_assignment(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        linear_assignment(np.array([[0.0, np.nan], [1.0, 0.0]]))


def test_without_scipy_auto_falls_back_and_scipy_is_an_error(monkeypatch):
    g = torch.Generator().manual_seed(2)
    x, noise = torch.randn(20, 3, generator=g), torch.randn(20, 3, generator=g)
    expected = minibatch_ot(x, noise, solver="numpy")
    monkeypatch.setattr(couplings, "_scipy_lsa", lambda: None)
    assert torch.equal(minibatch_ot(x, noise), expected)
    with pytest.raises(ImportError, match="needs scipy"):
        minibatch_ot(x, noise, solver="scipy")


# --- minibatch OT ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", SOLVERS)
def test_minibatch_ot_is_the_brute_force_optimum_within_each_block(solver):
    g = torch.Generator().manual_seed(0)
    x, noise = torch.randn(20, 3, generator=g), torch.randn(20, 3, generator=g)
    paired = minibatch_ot(x, noise, block=7, solver=solver)  # blocks of rows 0-6, 7-13, 14-19
    for lo in (0, 7, 14):
        xb, nb, pb = x[lo : lo + 7], noise[lo : lo + 7], paired[lo : lo + 7]
        assert _rows(pb) == _rows(nb)  # no mixing across blocks
        assert _total(xb, pb) == pytest.approx(_brute_force(_sq_cost(xb, nb)), rel=1e-10)
    assert _total(x, paired) < _total(x, noise)
    whole = minibatch_ot(x[:7], noise[:7], solver=solver)  # block=None: the whole batch is one problem
    assert torch.equal(whole, paired[:7])


def test_output_is_a_permutation_of_the_given_rows_of_any_shape_device_and_dtype():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(9, 1, 2, 3, generator=g, dtype=torch.float64)
    noise = torch.randn(9, 1, 2, 3, generator=g, dtype=torch.float32)
    perm = ot_permutation(x, noise, block=4)
    assert perm.dtype == torch.int64 and sorted(perm.tolist()) == list(range(9))
    paired = minibatch_ot(x, noise, block=4)
    assert paired.shape == noise.shape and paired.dtype == torch.float32 and paired.device == noise.device
    assert torch.equal(paired, noise[perm])  # rows unchanged, only reordered
    assert _rows(paired) == _rows(noise)
    assert _total(x[:4], paired[:4]) == pytest.approx(_brute_force(_sq_cost(x[:4], noise[:4])), rel=1e-6)


def test_the_assignment_carries_no_gradient():
    x = torch.randn(6, 2, requires_grad=True)
    noise = torch.randn(6, 2)
    paired = minibatch_ot(x, noise)
    assert not paired.requires_grad and x.grad is None


@pytest.mark.parametrize("block", [None, 3])
@pytest.mark.parametrize("generator", [False, True])
def test_pairs_only_within_labels(block, generator):
    g = torch.Generator().manual_seed(3)
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 2, 1, 0, 1, 2, 5])
    x, noise = torch.randn(12, 2, generator=g), torch.randn(12, 2, generator=g)
    gen = torch.Generator().manual_seed(7) if generator else None
    perm = ot_permutation(x, noise, labels=labels, block=block, generator=gen)
    assert torch.equal(labels[perm], labels)  # each row's noise came from a row of the same label
    paired = minibatch_ot(
        x, noise, labels=labels, block=block, generator=torch.Generator().manual_seed(7) if generator else None
    )
    assert torch.equal(paired, noise[perm])
    for c in labels.unique():
        rows = labels == c
        assert _rows(paired[rows]) == _rows(noise[rows])
        if block is None:  # one exact problem per class
            brute = _brute_force(_sq_cost(x[rows], noise[rows]))
            assert _total(x[rows], paired[rows]) == pytest.approx(brute, rel=1e-10)
    assert not torch.equal(minibatch_ot(x, noise), minibatch_ot(x, noise, labels=labels))
    bools = torch.tensor([True, False] * 6)
    assert torch.equal(bools[ot_permutation(x, noise, labels=bools)], bools)


def test_deterministic_with_a_generator_and_block():
    data = torch.Generator().manual_seed(5)
    x, noise = torch.randn(32, 2, generator=data), torch.randn(32, 2, generator=data)
    labels = torch.randint(0, 2, (32,), generator=data)

    def run(seed, **kw):
        return minibatch_ot(x, noise, block=4, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(run(0), run(0)) and torch.equal(run(0, labels=labels), run(0, labels=labels))
    assert not torch.equal(run(0), run(1))  # another random split into blocks
    assert torch.equal(minibatch_ot(x, noise, block=4), minibatch_ot(x, noise, block=4))
    # a random split pairs within blocks of 4 rows: the permutation's cycles stay inside some 4-row set
    gen = torch.Generator().manual_seed(0)
    perm = ot_permutation(x, noise, block=4, generator=gen)
    blocks = torch.randperm(32, generator=torch.Generator().manual_seed(0)).reshape(8, 4)
    for b in blocks:
        assert set(perm[b].tolist()) == set(b.tolist())
        assert _total(x[b], noise[perm[b]]) == pytest.approx(_brute_force(_sq_cost(x[b], noise[b])), rel=1e-10)


def test_minibatch_ot_refuses_bad_arguments_naming_them():
    x = torch.randn(8, 2)
    noise = torch.randn(8, 2)
    with pytest.raises(ValueError, match="noise must have the shape of x"):
        minibatch_ot(x, torch.randn(8, 3))
    with pytest.raises(ValueError, match="block must be >= 1"):
        minibatch_ot(x, noise, block=0)
    for bad in (2.5, True, "4"):
        with pytest.raises(TypeError, match="block must be an integer"):
            minibatch_ot(x, noise, block=bad)
    with pytest.raises(ValueError, match=r"labels must have shape \(8,\)"):
        minibatch_ot(x, noise, labels=torch.zeros(7, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must have shape"):
        minibatch_ot(x, noise, labels=torch.zeros(8, 1, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be an integer or bool tensor"):
        minibatch_ot(x, noise, labels=torch.zeros(8))
    with pytest.raises(TypeError, match=r"labels must be a torch\.Tensor"):
        minibatch_ot(x, noise, labels=[0] * 8)
    with pytest.raises(ValueError, match="solver must be one of"):
        minibatch_ot(x, noise, solver="hungarian")
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        minibatch_ot(torch.zeros(8, 2, dtype=torch.long), noise)
    with pytest.raises(TypeError, match=r"noise must be a torch\.Tensor"):
        minibatch_ot(x, noise.numpy())
    with pytest.raises(TypeError, match=r"generator must be a torch\.Generator"):
        minibatch_ot(x, noise, generator=0)


# --- reflow pairs ------------------------------------------------------------------------------------------------


def _errors(teacher, noise, target, solver, steps):
    return [float((reflow_pairs(teacher, noise, steps=n, solver=solver) - target).abs().max()) for n in steps]


@pytest.mark.parametrize("solver,ratio", [("euler", 2.0), ("heun", 4.0), ("midpoint", 8.0)])
def test_reflow_with_the_exact_gaussian_teacher_converges_at_the_solver_order(solver, ratio):
    teacher = ExactAverageVelocity().eval()  # called at r = t: the exact marginal velocity
    e = torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = MU + SIGMA * e  # the analytic map of the probability-flow ODE
    errs = _errors(teacher, e, target, solver, (16, 32, 64, 128))
    ratios = [a / b for a, b in itertools.pairwise(errs)]
    # Heun approaches 4 from below; midpoint's h^2 error term vanishes on this linear-Gaussian flow (order 3)
    assert ratio * 0.9 < ratios[-1] < ratio * 1.1, (errs, ratios)
    assert all(r > ratio * 0.85 for r in ratios[1:]), (errs, ratios)


@pytest.mark.parametrize("solver,ratio", [("euler", 2.0), ("heun", 4.0), ("midpoint", 4.0)])
def test_reflow_order_on_a_generic_linear_ode(solver, ratio):
    def teacher(z, r, t):  # dz/dt = t (z + 1): z(0) = (z(1) + 1) exp(-1/2) - 1
        return t[:, None] * (z + 1)

    e = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    target = (e + 1) * math.exp(-0.5) - 1
    errs = _errors(teacher, e, target, solver, (16, 32, 64))
    assert ratio * 0.9 < errs[-2] / errs[-1] < ratio * 1.1, errs


def test_reflow_grid_steps_and_chunks_agree():
    teacher = ExactAverageVelocity().eval()
    e = torch.randn(10, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = reflow_pairs(teacher, e, steps=3, solver="heun")
    assert torch.equal(reflow_pairs(teacher, e, grid=mfl.sampling.make_grid(3), solver="heun"), ref)
    by_grid = reflow_pairs(teacher, e, grid=torch.tensor([1.0, 2 / 3, 1 / 3, 0.0]), solver="heun")
    assert torch.allclose(by_grid, ref, rtol=0, atol=1e-7)  # a float32 grid: the same steps up to rounding
    for chunk in (1, 3, 10, 64):
        assert torch.allclose(
            reflow_pairs(teacher, e, steps=3, solver="heun", chunk_size=chunk), ref, rtol=0, atol=1e-14
        )
    assert torch.equal(reflow_pairs(teacher, e, steps=3, solver="heun"), ref)  # deterministic
    one = reflow_pairs(teacher, e, steps=1)
    assert torch.allclose(one, e - teacher(e, torch.ones(10), torch.ones(10)), rtol=0, atol=1e-15)


class _LabelledLinear(torch.nn.Module):
    """u(z, t | y) = a[y] * z + b[y] + scale * t: per-class linear velocities (class 3 is the null class)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("a", torch.tensor([-0.5, 0.3, 1.0, 0.1], dtype=torch.float64))
        self.register_buffer("b", torch.tensor([[1.0, -2.0], [0.5, 0.5], [-1.0, 3.0], [0.2, 0.1]], dtype=torch.float64))
        self.calls: list[int] = []

    def forward(self, z, r, t, y, table=None, bias=None, scale=0.0):
        self.calls.append(z.shape[0])
        assert torch.equal(r, t)
        out = self.a[y][:, None] * z + self.b[y] + scale * t[:, None]
        if table is not None:  # a shared lookup table, indexed by class: it must reach every chunk whole
            out = out + table[y]
        return out if bias is None else out + bias


def test_reflow_chunks_per_row_conditioning_with_the_rows_and_passes_shared_entries_whole():
    net = _LabelledLinear().eval()
    e = torch.randn(7, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    table = torch.randn(7, 2, dtype=torch.float64)  # first dimension B, yet shared by every row
    bias = torch.randn(1, 2, dtype=torch.float64)  # shared: another first dimension
    kw = {"y": y, "table": mfl.shared(table), "bias": bias, "scale": 0.25}
    ref = reflow_pairs(net, e, steps=4, solver="midpoint", model_kwargs=kw)
    net.calls.clear()
    chunked = reflow_pairs(net, e, steps=4, solver="midpoint", model_kwargs=kw, chunk_size=3)
    assert net.calls == [3] * 8 + [3] * 8 + [1] * 8  # 2 calls per midpoint step, 4 steps, chunks of 3, 3, 1
    assert torch.allclose(chunked, ref, rtol=0, atol=1e-14)
    for i in range(7):  # each row alone, with its own label: the same endpoint
        row_kw = {"y": y[i : i + 1], "table": mfl.shared(table), "bias": bias, "scale": 0.25}
        alone = reflow_pairs(net, e[i : i + 1], steps=4, solver="midpoint", model_kwargs=row_kw)
        assert torch.allclose(alone, ref[i : i + 1], rtol=0, atol=1e-14)


def test_guided_teacher_endpoint_follows_the_cfg_formula():
    net = _LabelledLinear().eval()
    net.a.zero_()  # u(z, t | y) = b[y]: constant velocities, so Euler is exact
    e = torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    s = 2.5
    teacher = mfl.Teacher(net, guidance_scale=s, interval=(0.0, 0.5), null_condition=mfl.null_class(3))
    out = reflow_pairs(teacher, e, steps=4, model_kwargs={"y": y}, chunk_size=4)
    b_c, b_u = net.b[y], net.b[3]
    guided = b_u + s * (b_c - b_u)
    # steps start at t = 1, 0.75 (outside the interval: conditional) and 0.5, 0.25 (inside: guided)
    assert torch.allclose(out, e - 0.5 * b_c - 0.5 * guided, rtol=0, atol=1e-14)
    unguided = reflow_pairs(net, e, steps=4, model_kwargs={"y": y})
    assert torch.allclose(unguided, e - b_c, rtol=0, atol=1e-14)

    net.a.copy_(torch.tensor([-0.5, 0.3, 1.0, 0.1], dtype=torch.float64))  # linear in z: against the formula

    def by_hand(z, r, t, y):
        u_c = net(z, r, t, y=y)
        u_u = net(z, r, t, y=torch.full_like(y, 3))
        inside = ((t >= 0.0) & (t <= 0.5))[:, None]
        return torch.where(inside, u_u + s * (u_c - u_u), u_c)

    for solver in couplings.REFLOW_SOLVERS:
        got = reflow_pairs(teacher, e, steps=8, solver=solver, model_kwargs={"y": y}, chunk_size=5)
        want = reflow_pairs(by_hand, e, steps=8, solver=solver, model_kwargs={"y": y})
        assert torch.allclose(got, want, rtol=0, atol=1e-13)
        assert not torch.allclose(got, reflow_pairs(net, e, steps=8, solver=solver, model_kwargs={"y": y}))


def test_reflow_records_no_gradient_and_keeps_device_and_dtype():
    net = torch.nn.Linear(2, 2).eval()

    def teacher(z, r, t):
        return net(z)

    e = torch.randn(5, 2, requires_grad=True)
    out = reflow_pairs(teacher, e, steps=2, solver="heun")
    assert not out.requires_grad and out.dtype == e.dtype and out.device == e.device and out.shape == e.shape


def test_reflow_refuses_bad_arguments_naming_them():
    teacher = ExactAverageVelocity().eval()
    e = torch.randn(4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        reflow_pairs(teacher, e, steps=0)
    with pytest.raises(TypeError, match="steps must be an integer"):
        reflow_pairs(teacher, e, steps=2.5)
    with pytest.raises(ValueError, match="needs steps="):
        reflow_pairs(teacher, e)
    with pytest.raises(ValueError, match="steps=3 disagrees with the grid"):
        reflow_pairs(teacher, e, steps=3, grid=[1.0, 0.0])
    with pytest.raises(ValueError, match="grid must be strictly decreasing"):
        reflow_pairs(teacher, e, grid=[0.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="solver must be one of"):
        reflow_pairs(teacher, e, steps=2, solver="rk4")
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        reflow_pairs(teacher, e, steps=2, chunk_size=0)
    with pytest.raises(TypeError, match="teacher must be"):
        reflow_pairs(None, e, steps=2)
    with pytest.raises(TypeError, match="noise must be a floating-point tensor"):
        reflow_pairs(teacher, torch.zeros(4, 2, dtype=torch.long), steps=2)
    with pytest.raises(TypeError, match="model_kwargs must be a dict"):
        reflow_pairs(teacher, e, steps=2, model_kwargs=[1])
