r"""Couplings: which noise row trains with which data row.

Every objective takes ``noise=``; a coupling is a way to choose it from the batch instead of drawing it
independently of the data.

* :func:`minibatch_ot` (minibatch optimal transport, Tong et al. 2023, Pooladian et al. 2023) re-orders a batch of
  noise so that row ``i`` pairs with ``x[i]`` under the exact assignment that minimises

  .. math::
      \sum_i \lVert x_i - e_{\pi(i)} \rVert^2 \quad \text{over permutations } \pi,

  within each class when labels are given and within blocks of rows for large batches. Only rows are permuted, so
  the noise stays a standard normal draw (per class, too). The exact solver of the core is a shortest augmenting
  path (Jonker-Volgenant style) implementation in numpy, float64; scipy's ``linear_sum_assignment`` is used when
  scipy is installed.
* :func:`reflow_pairs` integrates a teacher's probability-flow ODE :math:`dz/dt = v_T(z, t)` from noise
  (``t = 1``) to data (``t = 0``): the pairs ``(reflow_pairs(teacher, e), e)`` are a deterministic coupling, the
  training data of Rectified Flow's reflow and of Re-MeanFlow.

.. code-block:: python

    noise = mfl.couplings.minibatch_ot(x, torch.randn_like(x), labels=y, block=256)
    out = mfl.MeanFlowLoss()(model, x, noise=noise, model_kwargs={"y": y})

    e = torch.randn(n, *shape, generator=g)
    x1 = mfl.couplings.reflow_pairs(teacher, e, steps=64, solver="heun", model_kwargs={"y": y}, chunk_size=1024)
    out = mfl.MeanFlowLoss()(model, x1, noise=e, model_kwargs={"y": y})
"""

from __future__ import annotations

import itertools
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from meanflow_losses._dtypes import compute_dtype
from meanflow_losses._validate import check_batch, check_int, check_model_kwargs
from meanflow_losses.conditioning import Conditioning
from meanflow_losses.sampling import make_grid
from meanflow_losses.teachers import as_teacher, teacher_velocity

__all__ = [
    "OT_SOLVERS",
    "REFLOW_SOLVERS",
    "linear_assignment",
    "minibatch_ot",
    "ot_permutation",
    "reflow_pairs",
]

OT_SOLVERS = ("auto", "scipy", "numpy")
REFLOW_SOLVERS = ("euler", "heun", "midpoint")


# --- exact assignment --------------------------------------------------------------------------------------------


def _assignment_numpy(cost: np.ndarray) -> np.ndarray:
    r"""Exact square assignment by shortest augmenting paths with dual potentials (Hungarian / Jonker-Volgenant).

    Rows are inserted one at a time. For row ``i`` a Dijkstra-like search over columns, on the reduced costs
    :math:`c_{ij} - u_i - v_j \ge 0`, finds the cheapest alternating path from ``i`` to a free column; the duals
    are then updated so that every matched edge keeps reduced cost 0 and the path is flipped. After ``n`` rows the
    matching is optimal (complementary slackness). ``O(n^3)`` arithmetic, ``O(n^2)`` vectorised numpy steps.

    Args:
        cost: ``(n, n)`` float64 cost matrix, finite.

    Returns:
        ``col`` of shape ``(n,)``, int64: row ``i`` is assigned column ``col[i]``.
    """
    n = cost.shape[0]
    inf = np.inf
    # Index 0 is a virtual column (the root of each search); real columns are 1..n, rows 1..n.
    u = np.zeros(n + 1)
    v = np.zeros(n + 1)
    owner = np.zeros(n + 1, dtype=np.int64)  # owner[j]: row matched to column j (0 = free)
    prev = np.zeros(n + 1, dtype=np.int64)  # prev[j]: previous column on the shortest path to j
    for i in range(1, n + 1):
        owner[0] = i
        j0 = 0
        dist = np.full(n + 1, inf)  # tentative reduced path length to each column
        done = np.zeros(n + 1, dtype=bool)  # columns whose shortest path is final
        while True:
            done[j0] = True
            i0 = owner[j0]
            reduced = cost[i0 - 1] - u[i0] - v[1:]
            open_ = ~done[1:]
            better = open_ & (reduced < dist[1:])
            dist[1:][better] = reduced[better]
            prev[1:][better] = j0
            candidates = np.where(open_, dist[1:], inf)
            j1 = int(np.argmin(candidates)) + 1
            delta = candidates[j1 - 1]
            u[owner[done]] += delta  # distinct rows: fancy-index increment is safe
            v[done] -= delta
            dist[1:][open_] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:  # flip the alternating path
            j1 = prev[j0]
            owner[j0] = owner[j1]
            j0 = j1
    col = np.empty(n, dtype=np.int64)
    col[owner[1:] - 1] = np.arange(n)
    return col


def _scipy_lsa() -> Callable[..., Any] | None:
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        return None
    return linear_sum_assignment


def linear_assignment(cost: np.ndarray | Tensor, *, solver: str = "auto") -> np.ndarray:
    r"""The exact minimum-cost assignment of a square cost matrix.

    .. math::
        \pi^\star = \arg\min_{\pi} \sum_i C_{i, \pi(i)} \quad \text{over permutations } \pi.

    Args:
        cost: ``(n, n)`` cost matrix (numpy array or tensor), finite; solved in float64 on the CPU.
        solver: ``"auto"`` (scipy's ``linear_sum_assignment`` when scipy is importable, else ``"numpy"``),
            ``"scipy"`` (an error without scipy) or ``"numpy"`` (the package's own exact solver).

    Returns:
        ``col``, int64 array of shape ``(n,)``: row ``i`` is assigned column ``col[i]``. Among several optimal
        assignments the choice is deterministic for a given cost matrix and solver.

    Raises:
        ValueError: on an unknown solver, a cost matrix that is not square or holds non-finite values.
        ImportError: ``solver="scipy"`` without scipy installed.
    """
    if solver not in OT_SOLVERS:
        raise ValueError(f"solver must be one of {OT_SOLVERS}, got {solver!r}")
    c = cost.detach().cpu().double().numpy() if isinstance(cost, Tensor) else np.asarray(cost, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"cost must be a square matrix (n, n), got shape {tuple(c.shape)}")
    if not np.isfinite(c).all():
        raise ValueError("cost contains non-finite values (NaN or inf)")
    n = c.shape[0]
    if n <= 1:
        return np.zeros(n, dtype=np.int64)
    lsa = _scipy_lsa() if solver in ("auto", "scipy") else None
    if solver == "scipy" and lsa is None:
        raise ImportError('solver="scipy" needs scipy (pip install scipy); solver="numpy" needs nothing else')
    if lsa is None:
        return _assignment_numpy(c)
    rows, cols = lsa(c)
    col = np.empty(n, dtype=np.int64)
    col[np.asarray(rows)] = np.asarray(cols)
    return col


# --- minibatch optimal transport ---------------------------------------------------------------------------------


def _check_block(block: Any) -> int | None:
    if block is None:
        return None
    if isinstance(block, bool) or not isinstance(block, numbers.Integral):
        raise TypeError(f"block must be an integer (rows per assignment problem) or None, got {block!r}")
    if block < 1:
        raise ValueError(f"block must be >= 1 (rows per assignment problem) or None, got {block!r}")
    return int(block)


def _check_labels(labels: Any, batch: int) -> Tensor | None:
    if labels is None:
        return None
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of shape ({batch},) or None, got {type(labels).__name__}")
    if tuple(labels.shape) != (batch,):
        raise ValueError(f"labels must have shape ({batch},) (one label per row of x), got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be an integer or bool tensor (class labels), got dtype {labels.dtype}")
    return labels.detach().cpu()


@torch.no_grad()
def ot_permutation(
    x: Tensor,
    noise: Tensor,
    *,
    labels: Tensor | None = None,
    block: int | None = None,
    generator: torch.Generator | None = None,
    solver: str = "auto",
) -> Tensor:
    r"""The row order of minibatch OT: ``noise[ot_permutation(x, noise)]`` pairs row by row with ``x``.

    Rows are split into groups (one per label value, or one group), each group into assignment problems of at most
    ``block`` rows, and each problem is solved exactly on the squared Euclidean cost of the flattened rows,
    :math:`C_{ij} = \lVert x_i - e_j \rVert^2`. Problem rows are consecutive rows of the group (in row order) when
    ``generator`` is ``None``, and a random split of the group drawn from ``generator`` otherwise.

    Args:
        x: Data ``(B, *D)``, any device and floating dtype.
        noise: Noise ``(B, *D)``, the shape of ``x`` (any device and floating dtype).
        labels: Optional class labels ``(B,)``, integer or bool: rows of one class pair only with noise rows at the
            positions of that class.
        block: Maximum rows per assignment problem (``None``: the whole group at once). The cost of one problem is
            ``O(block^3)``; blocks of a few hundred rows keep the pairing cheap for large batches.
        generator: Random generator of the split into blocks (``None``: consecutive rows, no randomness).
        solver: ``"auto"``, ``"scipy"`` or ``"numpy"`` (see :func:`linear_assignment`).

    Returns:
        ``perm``, int64 ``(B,)`` on ``noise``'s device, a permutation of ``range(B)`` that maps every position onto
        a position of its own group (and block).

    Raises:
        TypeError: ``x``, ``noise`` or ``labels`` of the wrong type or dtype, ``block`` not an integer.
        ValueError: ``noise`` or ``labels`` not matching ``x``, ``block < 1``, an unknown solver, non-finite rows.
    """
    x = check_batch("x", x, min_ndim=1)
    noise = check_batch("noise", noise, min_ndim=1)
    if noise.shape != x.shape:
        raise ValueError(f"noise must have the shape of x {tuple(x.shape)}, got {tuple(noise.shape)}")
    if solver not in OT_SOLVERS:
        raise ValueError(f"solver must be one of {OT_SOLVERS}, got {solver!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    block = _check_block(block)
    batch = x.shape[0]
    lab = _check_labels(labels, batch)
    flat_x = x.detach().reshape(batch, -1).cpu().double()
    flat_n = noise.detach().reshape(batch, -1).cpu().double()
    if lab is None:
        groups = [torch.arange(batch)]
    else:
        groups = [(lab == c).nonzero().flatten() for c in lab.unique()]
    order = torch.arange(batch)
    for rows_of_group in groups:
        if generator is not None:
            shuffle = torch.randperm(rows_of_group.numel(), generator=generator, device=generator.device)
            rows_of_group = rows_of_group[shuffle.cpu()]
        step = block or rows_of_group.numel()
        for lo in range(0, rows_of_group.numel(), step):
            idx = rows_of_group[lo : lo + step]
            # Same cost as torch.cdist(...).square() everywhere (the toy example's historical pairing).
            cost = torch.cdist(flat_x[idx], flat_n[idx]).square()
            col = torch.from_numpy(linear_assignment(cost.numpy(), solver=solver))
            order[idx] = idx[col]
    return order.to(noise.device)


def minibatch_ot(
    x: Tensor,
    noise: Tensor,
    *,
    labels: Tensor | None = None,
    block: int | None = None,
    generator: torch.Generator | None = None,
    solver: str = "auto",
) -> Tensor:
    r"""``noise`` with its rows re-ordered to pair, row by row, with ``x`` under exact minibatch optimal transport.

    Within each assignment problem (a group of one label, split into blocks of at most ``block`` rows) the
    returned rows minimise

    .. math::
        \sum_{i} \lVert x_i - \tilde e_i \rVert^2, \qquad \tilde e = (e_{\pi(1)}, \dots, e_{\pi(n)}),

    over permutations :math:`\pi` of the problem's noise rows (Tong et al. 2023, Pooladian et al. 2023). Rows are
    only re-ordered, never changed: with i.i.d. noise every returned row is still :math:`N(0, I)`, and with
    ``labels`` the noise of each class is still standard normal (pairing across classes would hand each class the
    part of the Gaussian nearest to its data, a noise distribution sampling never sees). The assignment is computed
    without gradient, on the CPU in float64, on the flattened rows (any data shape).

    Args:
        x: Data ``(B, *D)``.
        noise: Noise ``(B, *D)``, the shape of ``x``.
        labels: Optional class labels ``(B,)`` (integer or bool): exact assignment within each class.
        block: Maximum rows per assignment problem (``None``: the whole group).
        generator: Random split into blocks (``None``: blocks of consecutive rows of each group). With a
            generator the result is deterministic given the generator's state.
        solver: ``"auto"`` (scipy when installed, else the package's numpy solver), ``"scipy"`` or ``"numpy"``.

    Returns:
        The re-ordered noise ``noise[perm]``, shape ``(B, *D)``, on ``noise``'s device and dtype
        (``perm = ot_permutation(...)``).

    Raises:
        TypeError: ``x``, ``noise`` or ``labels`` of the wrong type or dtype, ``block`` not an integer.
        ValueError: ``noise`` or ``labels`` not matching ``x``, ``block < 1``, an unknown solver.
    """
    perm = ot_permutation(x, noise, labels=labels, block=block, generator=generator, solver=solver)
    return noise[perm]


# --- reflow pairs ------------------------------------------------------------------------------------------------


def _velocity(teacher: Any, z: Tensor, t: float, tdtype: torch.dtype, cond: Conditioning) -> Tensor:
    tt = torch.full((z.shape[0],), t, dtype=tdtype, device=z.device)
    return teacher_velocity(teacher, z, tt, cond, z.dtype)


def _integrate(teacher: Any, z: Tensor, times: list[float], solver: str, cond: Conditioning) -> Tensor:
    tdtype = compute_dtype(z.dtype)
    for t_cur, t_next in itertools.pairwise(times):
        h = t_cur - t_next  # > 0: time runs from noise (1) to data (0), dz = -h v
        k1 = _velocity(teacher, z, t_cur, tdtype, cond)
        if solver == "euler":
            z = z - h * k1
        elif solver == "heun":
            k2 = _velocity(teacher, z - h * k1, t_next, tdtype, cond)
            z = z - (0.5 * h) * (k1 + k2)
        else:  # midpoint
            k2 = _velocity(teacher, z - (0.5 * h) * k1, t_cur - 0.5 * h, tdtype, cond)
            z = z - h * k2
    return z


@torch.no_grad()
def reflow_pairs(
    teacher: Any,
    noise: Tensor,
    *,
    steps: int | None = None,
    grid: Sequence[float] | Tensor | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    solver: str = "euler",
    chunk_size: int | None = None,
) -> Tensor:
    r"""The data endpoint of each noise row under the teacher's probability-flow ODE (reflow / Re-MeanFlow pairs).

    Integrates

    .. math::
        \frac{dz}{dt} = v_T(z, t), \qquad z(1) = e, \qquad \text{returns } z(0),

    backwards in time on the descending grid :math:`1 = t_0 > t_1 > \dots > t_N = 0` of
    :func:`~meanflow_losses.sampling.make_grid` (uniform, :math:`t_n = 1 - n / N`, unless ``grid`` is given), with
    :math:`h_n = t_n - t_{n+1}` and :math:`v = v_T` the teacher's (guided) velocity of
    :func:`~meanflow_losses.teachers.teacher_velocity`:

    * ``"euler"`` (order 1, ``N`` teacher calls): :math:`z_{n+1} = z_n - h_n v(z_n, t_n)`;
    * ``"heun"`` (order 2, ``2N`` calls): :math:`k_1 = v(z_n, t_n)`, :math:`k_2 = v(z_n - h_n k_1, t_{n+1})`,
      :math:`z_{n+1} = z_n - \tfrac{h_n}{2} (k_1 + k_2)`;
    * ``"midpoint"`` (order 2, ``2N`` calls): :math:`k_2 = v(z_n - \tfrac{h_n}{2} k_1, t_n - \tfrac{h_n}{2})`,
      :math:`z_{n+1} = z_n - h_n k_2`.

    With a guided :class:`~meanflow_losses.teachers.Teacher` each call evaluates
    :math:`v_T = u(\cdot \mid \varnothing) + s\,(u(\cdot \mid c) - u(\cdot \mid \varnothing))` inside the teacher's
    interval (the conditional and null passes batched together) and :math:`u(\cdot \mid c)` outside it.

    Rows are integrated in chunks of ``chunk_size`` rows; per-row conditioning entries (decided once against
    ``B`` by :class:`~meanflow_losses.conditioning.Conditioning`, as in every objective) are sliced with the rows,
    shared entries are passed whole. There is no randomness: the result is deterministic and the same chunked or
    not (up to float rounding of batched kernels). No gradient is recorded. The state is integrated in ``noise``'s
    dtype (pass float32 noise for a bf16 teacher under autocast), times are float32 at least.

    Args:
        teacher: A :class:`~meanflow_losses.teachers.Teacher` (with its own guidance scale, interval and null
            condition) or a bare network ``model(z, r, t, **model_kwargs)``, called at ``r = t``.
        noise: Noise ``e``, shape ``(B, *D)``, floating point.
        steps: Number of uniform steps ``N >= 1`` (or omit it and give ``grid``).
        grid: Explicit descending grid from ``t_0 <= 1`` to 0, e.g. ``[1.0, 0.5, 0.2, 0.0]``.
        model_kwargs: Conditioning of the teacher (e.g. ``{"y": labels}`` with one label per noise row).
        solver: ``"euler"``, ``"heun"`` or ``"midpoint"``.
        chunk_size: Maximum rows per teacher call (``None``: all ``B`` rows at once; a guided teacher sees twice
            as many).

    Returns:
        The data endpoints :math:`z(0)`, shape ``(B, *D)``, on ``noise``'s device and dtype, detached. Train on
        the pairs ``(x = reflow_pairs(teacher, e, ...), noise = e)``.

    Raises:
        TypeError: ``teacher`` missing or not callable, ``steps`` / ``chunk_size`` not integers, ``model_kwargs``
            not a mapping, ``noise`` not a floating tensor.
        ValueError: ``steps < 1``, ``chunk_size < 1``, a bad grid, an unknown solver, non-finite noise.
    """
    teach = as_teacher(teacher)
    if teach is None:
        raise TypeError("teacher must be a Teacher or a network model(z, r, t, **model_kwargs), got None")
    if solver not in REFLOW_SOLVERS:
        raise ValueError(f"solver must be one of {REFLOW_SOLVERS}, got {solver!r}")
    noise = check_batch("noise", noise, min_ndim=1)
    if steps is None and grid is None:
        raise ValueError("reflow_pairs needs steps= (uniform steps >= 1) or grid= (a descending grid ending at 0)")
    if steps is not None:
        steps = check_int("steps", steps, lo=1)
    times = make_grid(steps, grid)
    batch = noise.shape[0]
    chunk = batch if chunk_size is None else check_int("chunk_size", chunk_size, lo=1)
    if isinstance(model_kwargs, Conditioning):
        cond = Conditioning.from_kwargs(model_kwargs, batch)
    else:
        cond = Conditioning.from_kwargs(check_model_kwargs(model_kwargs), batch)
    if chunk >= batch:
        return _integrate(teach, noise.detach(), times, solver, cond).detach()
    out = torch.empty_like(noise)
    for lo in range(0, batch, chunk):
        hi = min(lo + chunk, batch)
        rows = torch.arange(lo, hi, device=noise.device)
        out[lo:hi] = _integrate(teach, noise[lo:hi].detach(), times, solver, cond.select(rows))
    return out
