r"""Gradient-conflict diagnostics: cosines between the gradients of named losses, and a tracker.

alpha-Flow (Zhang et al., arXiv 2510.20771) splits the MeanFlow loss as
:math:`L_{MF} = L_{TFM} + L_{TCc} + C` and reports that :math:`\cos(\nabla L_{TFM}, \nabla L_{TCc})` stays
below -0.4 for most of MeanFlow training. Every JVP objective returns these terms with ``decompose=True``
(``out.decomposition = {"tfm", "fm_border", "tcc"}``); this module measures them::

    mf = mfl.MeanFlowLoss(..., decompose=True)
    tracker = mfl.diagnostics.ConflictTracker(every=100)
    out = mf(model, x, step=k)
    if tracker.due(k):
        tracker.measure(model, out.decomposition, step=k)   # before backward; .grad is left untouched
    out.loss.backward()
    tracker.summary()   # {("tfm", "tcc"): PairStats(mean, p5, p95, ...), ...}

To skip even the small cost of building the decomposition on other steps, set ``mf.decompose =
tracker.due(k)`` before the call.

The model check (:func:`check_model`, from :mod:`meanflow_losses.model_checks`) lives here too: run it once on a
new network to catch what breaks MeanFlow's du/dt (``t * 1000`` embeddings, cut time paths, label dropout)::

    print(mfl.diagnostics.check_model(model, x, model_kwargs={"y": y}))
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from meanflow_losses.model_checks import Finding, MeanFlowWarning, ModelReport, check_model

__all__ = [
    "ConflictTracker",
    "Finding",
    "GradientCosines",
    "MeanFlowWarning",
    "ModelReport",
    "PairStats",
    "check_model",
    "gradient_cosines",
]

Pair = tuple[str, str]
ParamsLike = nn.Module | Iterable[Tensor]


def _params(obj: ParamsLike, name: str) -> list[Tensor]:
    """Trainable parameters of a module or iterable, each once (a parameter shared by two modules counts once)."""
    params = list(obj.parameters()) if isinstance(obj, nn.Module) else list(obj)
    for p in params:
        if not isinstance(p, Tensor):
            raise TypeError(f"{name} must hold tensors (parameters), got {type(p).__name__}")
    seen: set[int] = set()
    unique = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    params = unique
    if not params:
        raise ValueError(f"{name} has no parameters that require grad")
    return params


def _cosine(dot: float, na: float, nb: float) -> float:
    return dot / (na * nb) if na > 0 and nb > 0 else math.nan


@dataclass(frozen=True)
class GradientCosines(Mapping[Pair, float]):
    """Pairwise cosine similarities of loss gradients; a mapping ``(name_a, name_b) -> cosine``.

    Look-ups accept either order of the pair. A cosine is NaN when one of the gradients is zero.

    Attributes:
        cosines: ``{(a, b): cos}`` for every unordered pair, in the order the losses were given.
        norms: ``{name: ||grad||}`` (Euclidean norm over all parameters).
        groups: Per parameter group, the same result restricted to that group's parameters.
    """

    cosines: dict[Pair, float]
    norms: dict[str, float]
    groups: dict[str, GradientCosines] = field(default_factory=dict)

    def __getitem__(self, key: Pair) -> float:
        a, b = key
        if (a, b) in self.cosines:
            return self.cosines[(a, b)]
        return self.cosines[(b, a)]

    def __iter__(self) -> Iterator[Pair]:
        return iter(self.cosines)

    def __len__(self) -> int:
        return len(self.cosines)

    def __contains__(self, key: object) -> bool:
        if not (isinstance(key, tuple) and len(key) == 2):
            return False
        return key in self.cosines or (key[1], key[0]) in self.cosines


def gradient_cosines(
    model: ParamsLike,
    named_losses: Mapping[str, Tensor],
    param_groups: Mapping[str, ParamsLike] | None = None,
) -> GradientCosines:
    r"""Cosine similarities between the parameter gradients of several scalar losses.

    Each loss is differentiated with ``torch.autograd.grad(..., retain_graph=True)``, so ``.grad`` of the
    parameters is never read or written and the graph stays usable: call ``out.loss.backward()`` afterwards
    as usual. Dot products are accumulated per parameter tensor in float64 (no flattened copy of the model).

    .. math::
        \cos(a, b) = \frac{\langle \nabla_\theta L_a, \nabla_\theta L_b\rangle}
            {\|\nabla_\theta L_a\|\,\|\nabla_\theta L_b\|}

    Args:
        model: An ``nn.Module`` or an iterable of parameters; only those with ``requires_grad`` count.
        named_losses: ``{name: scalar loss}`` sharing one forward (e.g. ``out.decomposition``); at least two.
        param_groups: Optional ``{group: module or parameters}``; each group also gets its own cosines/norms.

    Returns:
        :class:`GradientCosines` (a mapping ``(a, b) -> cosine``, with ``.norms`` and ``.groups``).
    """
    if not isinstance(named_losses, Mapping) or len(named_losses) < 2:
        raise ValueError("named_losses must be a mapping of at least two named scalar losses")
    for name, loss in named_losses.items():
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"named_losses[{name!r}] must be a scalar tensor")
        if not loss.requires_grad:
            raise ValueError(f"named_losses[{name!r}] does not require grad (was it detached or built under no_grad?)")
    params = _params(model, "model")
    group_index: dict[str, list[int]] = {}
    if param_groups is not None:
        where = {id(p): i for i, p in enumerate(params)}
        for gname, gparams in param_groups.items():
            ids = [where.get(id(p)) for p in _params(gparams, f"param_groups[{gname!r}]")]
            if any(i is None for i in ids):
                raise ValueError(f"param_groups[{gname!r}] holds parameters that are not trainable parameters of model")
            group_index[gname] = [i for i in ids if i is not None]

    names = list(named_losses)
    grads: dict[str, list[Tensor | None]] = {}
    for name in names:
        grads[name] = list(torch.autograd.grad(named_losses[name], params, retain_graph=True, allow_unused=True))

    dev = params[0].device
    zero = torch.zeros((), dtype=torch.float64, device=dev)

    def inner(ga: Tensor | None, gb: Tensor | None) -> Tensor:
        if ga is None or gb is None:
            return zero
        return (ga.detach().double() * gb.detach().double()).sum().to(dev)

    # per-parameter float64 inner products, one host transfer per loss / pair
    sq = {n: torch.stack([inner(g, g) for g in grads[n]]).cpu() for n in names}
    dots = {
        (a, b): torch.stack([inner(ga, gb) for ga, gb in zip(grads[a], grads[b], strict=True)]).cpu()
        for a, b in itertools.combinations(names, 2)
    }

    def summarize(index: list[int] | None) -> GradientCosines:
        sel = slice(None) if index is None else torch.tensor(index, dtype=torch.long)
        norms = {n: math.sqrt(float(sq[n][sel].sum())) for n in names}
        cos = {(a, b): _cosine(float(d[sel].sum()), norms[a], norms[b]) for (a, b), d in dots.items()}
        return GradientCosines(cosines=cos, norms=norms)

    whole = summarize(None)
    groups = {gname: summarize(idx) for gname, idx in group_index.items()}
    return GradientCosines(cosines=whole.cosines, norms=whole.norms, groups=groups)


@dataclass(frozen=True)
class PairStats:
    """Summary of one pair's cosines over the measured steps.

    Attributes:
        mean: Mean cosine.
        p5: 5th percentile.
        p95: 95th percentile.
        frac_negative: Share of measurements below 0.
        count: Number of measurements.
    """

    mean: float
    p5: float
    p95: float
    frac_negative: float
    count: int


class ConflictTracker:
    """Measure gradient cosines every ``every`` steps and keep their mean and 5th/95th percentiles.

    Nothing is computed unless :meth:`measure` (or :meth:`maybe_measure` on a due step) is called; a
    training loop checks :meth:`due` (an integer modulo) on the other steps.

    Args:
        every: Measure on steps that are multiples of ``every``.
        start: First step eligible for a measurement.
    """

    def __init__(self, every: int = 100, *, start: int = 0) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be a non-negative integer, got {start!r}")
        self.every = every
        self.start = start
        self.steps: list[int] = []
        self.cosines: dict[Pair, list[float]] = {}
        self.norms: dict[str, list[float]] = {}
        self.pair_steps: dict[Pair, list[int]] = {}

    def due(self, step: int) -> bool:
        """Whether ``step`` is a measurement step."""
        return step >= self.start and (step - self.start) % self.every == 0

    def measure(
        self,
        model: ParamsLike,
        named_losses: Mapping[str, Tensor],
        *,
        step: int | None = None,
        param_groups: Mapping[str, ParamsLike] | None = None,
    ) -> GradientCosines:
        """Compute :func:`gradient_cosines` now and record it (``.grad`` untouched)."""
        res = gradient_cosines(model, named_losses, param_groups)
        self.record(res, step=step)
        return res

    def maybe_measure(
        self,
        step: int,
        model: ParamsLike,
        named_losses: Mapping[str, Tensor] | None,
        *,
        param_groups: Mapping[str, ParamsLike] | None = None,
    ) -> GradientCosines | None:
        """Measure and record if :meth:`due` (``step``); otherwise return ``None`` at no cost."""
        if not self.due(step):
            return None
        if named_losses is None:
            raise ValueError(f"step {step} is a measurement step but named_losses is None (set decompose=True)")
        return self.measure(model, named_losses, step=step, param_groups=param_groups)

    def record(self, result: GradientCosines, *, step: int | None = None) -> None:
        """Record an already computed result."""
        k = len(self.steps) if step is None else int(step)
        self.steps.append(k)
        for pair, value in result.cosines.items():
            self.cosines.setdefault(pair, []).append(value)
            self.pair_steps.setdefault(pair, []).append(k)
        for name, value in result.norms.items():
            self.norms.setdefault(name, []).append(value)

    def history(self, a: str, b: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, cosines)`` of one pair, as arrays (for plotting): the steps at which THIS pair was measured."""
        pair = (a, b) if (a, b) in self.cosines else (b, a)
        if pair not in self.cosines:
            raise KeyError(f"no measurements for the pair ({a!r}, {b!r}); known pairs: {sorted(self.cosines)}")
        return np.asarray(self.pair_steps[pair], dtype=np.int64), np.asarray(self.cosines[pair], dtype=np.float64)

    def summary(self) -> dict[Pair, PairStats]:
        """Mean, 5th and 95th percentiles and the negative share of every pair (NaNs ignored)."""
        out: dict[Pair, PairStats] = {}
        for pair, values in self.cosines.items():
            arr = np.asarray(values, dtype=np.float64)
            arr = arr[np.isfinite(arr)]
            if arr.size == 0:
                out[pair] = PairStats(math.nan, math.nan, math.nan, math.nan, 0)
                continue
            out[pair] = PairStats(
                mean=float(arr.mean()),
                p5=float(np.percentile(arr, 5)),
                p95=float(np.percentile(arr, 95)),
                frac_negative=float((arr < 0).mean()),
                count=int(arr.size),
            )
        return out

    def reset(self) -> None:
        """Forget every measurement."""
        self.steps.clear()
        self.cosines.clear()
        self.norms.clear()
        self.pair_steps.clear()
