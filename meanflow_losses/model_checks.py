r"""Checks that a network's :math:`du/dt` is what MeanFlow-type objectives need, once and during the first steps.

MeanFlow's target contains :math:`du/dt = \partial_z u\,\tilde v + \partial_t u`, so everything that breaks or
distorts the network's derivative in ``t`` silently changes the objective: a DDPM-style ``t * 1000`` time embedding
(frequencies of ~1000 rad per unit time), a time path cut by ``t.long()``, rounding or ``.detach()``, in-network
label dropout, BatchNorm in train mode. Two tools catch them:

* :func:`check_model` (also ``mfl.diagnostics.check_model``): run once on a new network; it returns a
  :class:`ModelReport` of findings with the measured figures, and can raise on problems.
* :class:`RuntimeChecks`: every JVP objective probes its ``target_model`` on a few ``r != t`` rows during its first
  calls and warns (:class:`MeanFlowWarning`, once per objective and cause) when the derivative looks broken.

The probe measures, on a few rows, in float32 at least, every pass from the same random state:

* **time oscillation**: how much the forward-mode :math:`\partial_t u` changes between :math:`t \pm 10^{-3}`
  (rounding-free, AD only). A smooth network changes by about :math:`\omega \cdot 10^{-3}` for its highest time
  frequency :math:`\omega` (3% at :math:`\omega = 30`); a ``t * 1000`` embedding (:math:`\omega \approx 1000`)
  decorrelates completely. Above :data:`OSCILLATION` the probe reports a high-frequency time dependence.
* **cut derivative**: forward AD against a finite difference at :math:`h = 10^{-2}` (inside the domain). Where the
  output changes with ``t`` well above the rounding floor but AD sees almost nothing, the time path is cut.
* **randomness**: two identical calls differ (dropout), on some rows only (in-network label dropout).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from meanflow_losses._dtypes import compute_dtype, is_half, upcast
from meanflow_losses._validate import check_batch, check_model_kwargs, check_real, compiling
from meanflow_losses.adapters import check_protocol
from meanflow_losses.conditioning import Conditioning
from meanflow_losses.forward_ad import _eager_stance
from meanflow_losses.jvp import (
    JVPStrategy,
    _has_half_weights,
    check_strategy,
    finite_difference_points,
    float32_view,
    half_plain_function,
    time_derivative,
)
from meanflow_losses.passes import batch_stat_layers, call, preserve_buffers, reseed, same_randomness

__all__ = [
    "Finding",
    "MeanFlowWarning",
    "ModelReport",
    "ProbeResult",
    "RuntimeChecks",
    "check_model",
    "probe_time_derivative",
]

#: Relative disagreement between AD and the coarse finite difference above which du/dt is reported as broken.
MISMATCH = 0.3
#: Coarse finite-difference step of the probe.
PROBE_STEP = 1e-2
#: Half-distance of the two times at which the AD time derivative is compared (the oscillation test).
OSCILLATION_STEP = 1e-3
#: Relative change of the AD time derivative over ``2 * OSCILLATION_STEP`` reported as high-frequency.
OSCILLATION = 0.25
#: A finite difference is trusted only above this fraction of ``||u|| / h`` (float32 rounding floor, with margin).
FD_FLOOR = 1e-4


class MeanFlowWarning(UserWarning):
    """A setup the objectives handle, but probably not as the user intends (the message names cause and fix)."""


Severity = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Finding:
    """One result of a check.

    Attributes:
        code: Stable identifier, e.g. ``"time_derivative_mismatch"``.
        severity: ``"error"`` (the objective would train something wrong), ``"warning"`` or ``"info"``.
        message: What was measured, the likely cause and the fix.
    """

    code: str
    severity: Severity
    message: str


@dataclass
class ProbeResult:
    r"""Measurements of one probe (all on the probe rows, float32 or better).

    Attributes:
        rows: Number of probe rows.
        ad_error: Why forward-mode AD failed, or ``None``.
        rel_mismatch: :math:`\|AD - FD_{h/4}\| / \max(\|AD\|, \|FD_{h/4}\|)` of the total derivative (NaN if AD
            failed).
        rel_mismatch_t: The same for :math:`\partial_t u` alone.
        ad_over_fd_t: :math:`\|\partial_t u\|_{AD} / \|\partial_t u\|_{FD}`, the larger over the steps ``h`` and
            ``h/4``.
        time_oscillation: :math:`\|\partial_t u(t_+) - \partial_t u(t_-)\| / (\|\partial_t u(t_+)\| +
            \|\partial_t u(t_-)\|)` by AD, :math:`t_\pm = t \pm 10^{-3}` (NaN if AD failed or was inconclusive).
        dudt_over_v: RMS of :math:`du/dt` over the RMS of the tangent.
        fd_rel_error: For the finite-difference strategy: its error (in the engine's own dtype) against AD
            (NaN otherwise).
        dtype: The dtype the engine computes in (the probe's references run in float32 at least).
        stochastic_rel: Relative change of ``u`` between two calls on the same input (dropout etc.).
        rowwise_random: Some rows changed between the two calls and others not at all (label dropout).
        conclusive: The derivative is large enough against the float rounding floor to judge.
    """

    rows: int
    ad_error: str | None
    rel_mismatch: float
    rel_mismatch_t: float
    ad_over_fd_t: float
    time_oscillation: float
    dudt_over_v: float
    fd_rel_error: float
    stochastic_rel: float
    rowwise_random: bool
    conclusive: bool
    fd_conclusive: bool
    dtype: torch.dtype = torch.float32
    fd_converged: bool = False
    time_independent: bool = False


def _norm(x: Tensor) -> float:
    return float(x.detach().double().norm())


def _rel(a: Tensor, b: Tensor) -> float:
    """Relative difference ``|a - b| / max(|a|, |b|)``; NaN when either is not finite (never a false agreement)."""
    na, nb = _norm(a), _norm(b)
    if not (math.isfinite(na) and math.isfinite(nb)):
        return math.nan
    den = max(na, nb)
    return _norm(a - b) / den if den > 0 else 0.0


def probe_time_derivative(
    model: Callable[..., Tensor],
    z: Tensor,
    r: Tensor,
    t: Tensor,
    tangent: Tensor,
    cond: Conditioning | Mapping[str, Any] | None = None,
    *,
    strategy: str = "nograd",
    fd_eps: float | None = None,
    step: float = PROBE_STEP,
) -> ProbeResult:
    r"""Measure how trustworthy ``model``'s :math:`du/dt` is on the given rows (no gradient, buffers untouched).

    Every pass starts from the same random state, so a stochastic network is compared with itself; the random
    state of the caller is left as it was. The references run in float32 at least (half-precision inputs are cast;
    if the network cannot take float32 inputs the probe is inconclusive).

    Args:
        model: ``model(z, r, t, **kw)`` (the ``target_model`` of an objective).
        z: Inputs, shape ``(n, *D)``; a few rows suffice.
        r: End times ``(n,)``, ``r < t``.
        t: Start times ``(n,)``.
        tangent: JVP tangent :math:`\tilde v`, shape ``(n, *D)``.
        cond: Conditioning with ``n`` rows.
        strategy: The objective's JVP strategy (the finite-difference one is also measured against AD).
        fd_eps: The objective's finite-difference step.
        step: Coarse step :math:`h` of the reference difference.

    Returns:
        :class:`ProbeResult`.
    """
    cond = cond if isinstance(cond, Conditioning) else Conditioning.from_kwargs(cond, z.shape[0])
    dev, engine_dtype = z.device, z.dtype
    z32, r32, t32, tan32 = (upcast(a) for a in (z, r, t, tangent))
    zero = torch.zeros_like(tan32)
    plain = float32_view(model) if _has_half_weights(model) else model  # the network as the JVP evaluates it

    def derivative(
        zz: Tensor, tan: Tensor, how: JVPStrategy, eps: float | None = None, at: Tensor | None = None
    ) -> Tensor:
        rr, tt = (r32, t32) if zz.dtype == z32.dtype else (r, t)
        with same_randomness(dev):
            res = time_derivative(model, zz, rr, tt if at is None else at, tan, cond, strategy=how, fd_eps=eps)
        return res.dudt.double()

    nan = math.nan
    # eagerly (compiled code draws other dropout masks than the eager AD pass), from one random state, buffers kept
    with _eager_stance(), same_randomness(dev), torch.no_grad(), preserve_buffers(model):
        try:
            fd, fd_t = (derivative(z32, tan, "finite_difference", step) for tan in (tan32, zero))
            fd4, fd4_t = (derivative(z32, tan, "finite_difference", step / 4) for tan in (tan32, zero))
            with same_randomness(dev):
                u1 = call(plain, z32, r32, t32, cond, who="target_model").double()
        except RuntimeError as err:
            if z32.dtype == engine_dtype or "dtype" not in str(err).lower():
                raise
            # the network cannot run in float32: no trustworthy reference
            return ProbeResult(z.shape[0], None, nan, nan, nan, nan, nan, nan, 0.0, False, False, False, engine_dtype)
        ad_error = None
        ad = ad_t = ad_hi = ad_lo = None
        try:
            ad, ad_t = derivative(z32, tan32, "nograd"), derivative(z32, zero, "nograd")
            t_hi, t_lo = finite_difference_points(r32, t32, OSCILLATION_STEP)
            ad_hi, ad_lo = derivative(z32, zero, "nograd", at=t_hi), derivative(z32, zero, "nograd", at=t_lo)
        except (RuntimeError, NotImplementedError, TypeError) as err:
            ad_error = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        fd_rel_error = nan
        if strategy == "finite_difference" and ad is not None:
            fd_rel_error = _rel(derivative(z, tangent, "finite_difference", fd_eps), ad)
        # an unrelated random state for the second call (restored when the probe ends); a small advance of the same
        # stream can repeat parts of a dropout mask
        reseed(dev, int(torch.randint(0, 2**62, (1,))))
        u2 = call(plain, z32, r32, t32, cond, who="target_model").double()

    diff_rows = (u1 - u2).reshape(u1.shape[0], -1).abs().amax(dim=1)
    changed = diff_rows > 0
    stochastic_rel = _rel(u1, u2) if bool(changed.any()) else 0.0
    rowwise = bool(changed.any()) and not bool(changed.all())
    ref = ad if ad is not None else fd
    u_norm = _norm(u1)
    fd_floor = FD_FLOOR * u_norm / (step / 4) + 1e-30  # the floor of the finer difference
    fd_conclusive = min(_norm(fd_t), _norm(fd4_t)) > fd_floor
    fd_converged = _rel(fd, fd4) < 0.1 and _rel(fd_t, fd4_t) < 0.1
    oscillation = nan
    conclusive = False
    if ad_hi is not None and ad_lo is not None:
        den = _norm(ad_hi) + _norm(ad_lo)
        conclusive = den > 1e-7 * (u_norm + _norm(tan32)) and den > 0
        oscillation = _norm(ad_hi - ad_lo) / den if conclusive else nan

    def ratio(a: Tensor | None, b: Tensor) -> float:
        if a is None:
            return nan
        return _norm(a) / _norm(b) if _norm(b) > 0 else math.inf

    time_independent = u_norm > 0 and ad_t is not None and not bool(ad_t.any()) and not bool(fd_t.any())
    return ProbeResult(
        rows=int(z.shape[0]),
        ad_error=ad_error,
        rel_mismatch=_rel(ad, fd4) if ad is not None else nan,
        rel_mismatch_t=_rel(ad_t, fd4_t) if ad_t is not None else nan,
        ad_over_fd_t=max(ratio(ad_t, fd_t), ratio(ad_t, fd4_t)),
        time_oscillation=oscillation,
        dudt_over_v=_norm(ref) / max(_norm(tan32), 1e-30),
        fd_rel_error=fd_rel_error,
        stochastic_rel=stochastic_rel,
        rowwise_random=rowwise,
        conclusive=conclusive,
        fd_conclusive=fd_conclusive,
        dtype=engine_dtype,
        fd_converged=fd_converged,
        time_independent=time_independent,
    )


def findings_from_probe(res: ProbeResult, strategy: str) -> list[Finding]:
    """Turn a probe into findings (cause and fix in each message)."""
    out: list[Finding] = []
    if res.ad_error is not None:
        sev: Severity = "info" if strategy == "finite_difference" else "error"
        out.append(
            Finding(
                "forward_ad_failed",
                sev,
                f"forward-mode AD fails on this network ({res.ad_error}); jvp={strategy!r} "
                + ("does not need it." if sev == "info" else "cannot run: use jvp='finite_difference'."),
            )
        )
    if res.rowwise_random:
        out.append(
            Finding(
                "rowwise_randomness",
                "warning",
                "the network's output changes between two identical calls on some rows only: in-network condition "
                "dropout (e.g. DiT's class_dropout_prob / diffusers' LabelEmbedding in train mode). Every no-grad "
                "pass (JVP, guidance, targets) then drops other rows than the gradient forward. Set the network's "
                "dropout off at call time and use TrainingGuidance(drop_prob=..., null_condition=...) instead; for a "
                "facebookresearch DiT set net.y_embedder.dropout_prob = 0.0 after building it, which keeps the "
                "embedding's null-class row (building it with class_dropout_prob=0 would remove that row).",
            )
        )
    elif res.stochastic_rel > 0:
        shared = "shares its masks with the prediction" if strategy == "joint" else "draws its own masks"
        out.append(
            Finding(
                "stochastic",
                "info",
                f"the network is stochastic in its current mode (dropout: output changes by {res.stochastic_rel:.2g} "
                f"relative between identical calls). jvp={strategy!r} {shared}; the finite-difference halves always "
                "share masks. See docs/conventions.md (supported setups).",
            )
        )
    if res.ad_error is None and res.conclusive and res.time_oscillation > OSCILLATION:
        out.append(
            Finding(
                "high_frequency_time",
                "error",
                f"the network's time derivative d_t u changes by {res.time_oscillation:.2f} (relative) between t - "
                f"{OSCILLATION_STEP:g} and t + {OSCILLATION_STEP:g}: it varies on time scales of about 1e-3, the mark "
                "of a high-frequency time embedding such as the DDPM-style t * 1000 into sinusoids. du/dt is then "
                "dominated by the embedding's oscillation and MeanFlow-type objectives do not learn (the docs' "
                "measurement: 1-step quality no better than untrained). Embed the raw t in [0, 1] with angular "
                "frequencies up to about 5 to 30, as the MeanFlow/alpha-Flow DiTs do",
            )
        )
    elif res.ad_error is None and res.fd_conclusive and res.ad_over_fd_t < 0.3:  # at both steps h and h/4
        out.append(
            Finding(
                "cut_time_derivative",
                "error",
                f"the output changes with t (finite difference at step {PROBE_STEP}) but forward AD sees only "
                f"{res.ad_over_fd_t:.2g} of it: the time path is cut (t.long() or bucketed lookups, rounding, "
                ".detach() / .item() of t, a custom autograd.Function without a forward-AD rule). du/dt misses the "
                "time derivative. Keep t a float tensor through the embedding, or use jvp='finite_difference'",
            )
        )
    elif res.ad_error is None and res.fd_conclusive and res.fd_converged and res.rel_mismatch > MISMATCH:
        out.append(
            Finding(
                "time_derivative_mismatch",
                "error",
                f"du/dt by forward AD and by finite differences (steps {PROBE_STEP} and {PROBE_STEP / 4}, which agree "
                "with each other) disagree by "
                f"{res.rel_mismatch:.2f} relative (time part: {res.rel_mismatch_t:.2f}): the derivative in z or t is "
                "distorted (a custom autograd.Function with a wrong jvp rule, a partly cut path). terms['dudt_rms'] "
                "shows the size of du/dt",
            )
        )
    if strategy == "finite_difference" and math.isfinite(res.fd_rel_error) and res.fd_rel_error > MISMATCH:
        if is_half(res.dtype):
            why = (
                f"it runs in {res.dtype} (no autocast, a network that is not an nn.Module with half weights), where "
                "a difference quotient loses most digits. Train under torch.autocast (the JVP then runs in float32) "
                "or pass an nn.Module, whose half weights jvp_fp32 evaluates in float32"
            )
        else:
            why = (
                "its step is too coarse for this network's time dependence (a t * 1000 embedding?). Fix the "
                "embedding, pass a smaller fd_eps, or use jvp='nograd'"
            )
        out.append(
            Finding(
                "finite_difference_inaccurate",
                "error",
                f"jvp='finite_difference' is off by {res.fd_rel_error:.2f} relative against forward AD: {why}.",
            )
        )
    if res.time_independent:
        out.append(
            Finding(
                "ignores_time",
                "warning",
                "the output does not change with t at all (forward AD and finite differences both exactly zero): "
                "the network may receive r where it expects its time, e.g. an unwrapped forward(x, noise_labels, "
                "...). Check the signature and wrap it with meanflow_losses.adapters",
            )
        )
    if res.dudt_over_v > 1e3:
        out.append(
            Finding(
                "dudt_large",
                "warning",
                f"du/dt is {res.dudt_over_v:.3g} times the velocity: the target is dominated by the derivative; "
                "a high-frequency time embedding (t * 1000) is the usual cause.",
            )
        )
    return out


@dataclass
class ModelReport:
    """What :func:`check_model` found.

    Attributes:
        findings: Every finding, errors first.
        measurements: Named figures (``rel_mismatch``, ``dudt_over_v``, ``stochastic_rel``, ...).
    """

    findings: list[Finding]
    measurements: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """No error and no warning."""
        return not any(f.severity in ("error", "warning") for f in self.findings)

    def codes(self, severity: Severity | None = None) -> list[str]:
        """Codes of the findings (of one severity, or all)."""
        return [f.code for f in self.findings if severity is None or f.severity == severity]

    def raise_for_problems(self) -> None:
        """Raise ``ValueError`` listing the errors and warnings, if any."""
        bad = [f for f in self.findings if f.severity in ("error", "warning")]
        if bad:
            raise ValueError("check_model found problems:\n" + "\n".join(f"- [{f.code}] {f.message}" for f in bad))

    def __str__(self) -> str:
        lines = [f"{f.severity.upper():7s} [{f.code}] {f.message}" for f in self.findings] or ["OK: no findings"]
        lines.append("measurements: " + ", ".join(f"{k}={v:.3g}" for k, v in self.measurements.items()))
        return "\n".join(lines)


_ORDER = {"error": 0, "warning": 1, "info": 2}


def _has_zero_parameters(model: nn.Module) -> bool:
    return any(p.is_floating_point() and p.numel() > 1 and not bool(p.any()) for p in model.parameters())


def _perturbed_copy(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """A copy of ``model`` whose all-zero floating parameters are drawn from N(0, 0.02^2) (adaLN-zero heads)."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in clone.parameters():
            if p.is_floating_point() and p.numel() > 0 and not bool(p.any()):
                p.copy_(0.02 * torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p))
    return clone


def check_model(
    model: Callable[..., Tensor],
    x: Tensor,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    strategy: str = "nograd",
    fd_eps: float | None = None,
    rows: int = 8,
    perturb_zero_init: bool = True,
    generator: torch.Generator | None = None,
    raise_on_problems: bool = False,
) -> ModelReport:
    """Check once that a network works with MeanFlow-type objectives: protocol, du/dt, randomness, batch statistics.

    Runs the network on a few rows of ``x`` at random ``(r, t)`` pairs (``t`` in ``[0.1, 0.9]``, ``r < t``), in the
    mode it is in (call it in train mode to check what training sees). Nothing of ``model`` is changed: buffers are
    restored, and the zero-initialised-output check runs on a copy.

    Checks: the call protocol (signature, output shape and dtype, finite output); the forward-mode du/dt against a
    coarse finite difference (a ``t * 1000`` embedding or a cut time path is an error); whether the output depends
    on ``t`` and on ``r``; stochastic layers (dropout, in-network label dropout); batch-statistic layers; the
    accuracy of ``jvp="finite_difference"`` when that strategy is named.

    Args:
        model: ``model(z, r, t, **model_kwargs)`` (wrap other signatures with :mod:`meanflow_losses.adapters`).
        x: A data batch ``(B, *D)``; the first ``rows`` rows are used.
        model_kwargs: Conditioning for ``x`` (per-row entries with ``B`` rows).
        strategy: The JVP strategy you will train with.
        fd_eps: Its finite-difference step, for ``strategy="finite_difference"``.
        rows: Number of rows to probe.
        perturb_zero_init: If the output is identically zero (zero-initialised output layer, as DiT's adaLN-Zero),
            rerun the derivative checks on a copy whose all-zero parameters are drawn from N(0, 0.02^2).
        generator: Random generator for the probe inputs.
        raise_on_problems: Raise ``ValueError`` when there are errors or warnings.

    Returns:
        :class:`ModelReport`.
    """
    check_strategy(strategy)
    check_protocol(model)
    x = check_batch("x", x)
    rows = int(check_real("rows", rows, lo=1))
    kw = check_model_kwargs(model_kwargs)
    n = min(rows, x.shape[0])
    cond = Conditioning.from_kwargs(kw, x.shape[0]).select(torch.arange(n, device=x.device))
    dev = generator.device if generator is not None else x.device
    tdtype = compute_dtype(x.dtype)
    t = (0.1 + 0.8 * torch.rand(n, generator=generator, device=dev, dtype=torch.float64)).to(x.device, tdtype)
    r = t * (0.2 + 0.6 * torch.rand(n, generator=generator, device=dev, dtype=torch.float64)).to(x.device, tdtype)
    noise = torch.randn(x[:n].shape, generator=generator, device=dev, dtype=x.dtype).to(x.device)
    xt = x[:n]
    z = (1 - t.to(x.dtype)).reshape(n, *([1] * (x.ndim - 1))) * xt + t.to(x.dtype).reshape(
        n, *([1] * (x.ndim - 1))
    ) * noise
    v = noise - xt
    findings: list[Finding] = []
    meas: dict[str, float] = {}

    with torch.no_grad(), preserve_buffers(model):
        u = call(model, z, r, t, cond)
        u_r0 = call(model, z, torch.zeros_like(r), t, cond)
    if not bool(torch.isfinite(u).all()):
        findings.append(Finding("non_finite_output", "error", "the network returns NaN or inf on ordinary inputs"))
    bn = batch_stat_layers(model)
    if bn:
        findings.append(
            Finding(
                "batch_statistics",
                "warning",
                f"layers normalise with batch statistics ({', '.join(bn[:4])}{', ...' if len(bn) > 4 else ''}): the "
                "JVP and target passes run on sub-batches (the r != t rows), so their statistics differ from the "
                "gradient forward's and du/dt is the derivative of another function. The passes leave running "
                "statistics untouched. Prefer GroupNorm/LayerNorm, or BatchNorm in eval mode; jvp='joint' and "
                "aux_velocity_weight > 0 refuse such layers.",
            )
        )
    zero_output = not bool(u.any())
    flat_in_r = not bool((u - u_r0).any())
    meas["u_rms"] = float(u.double().square().mean().sqrt())
    probe_model: Callable[..., Tensor] = model
    perturbable = perturb_zero_init and isinstance(model, nn.Module) and _has_zero_parameters(model)
    if (zero_output or flat_in_r) and perturbable and isinstance(model, nn.Module):  # (isinstance: for mypy)
        # zero-initialised layers (DiT's adaLN-Zero modulation or output head) hide the dependence on r and t
        g = generator if generator is not None and generator.device.type == "cpu" else torch.Generator()
        probe_model = _perturbed_copy(model, g)
        with torch.no_grad(), preserve_buffers(probe_model):
            flat_in_r = not bool((call(probe_model, z, r, t, cond) - call(probe_model, z, 0 * r, t, cond)).any())
        findings.append(
            Finding(
                "zero_init_perturbed",
                "info",
                "the output is identically zero or does not move with r at initialisation (zero-initialised layers "
                "such as DiT's adaLN-Zero); the checks ran on a copy whose all-zero parameters were drawn from "
                "N(0, 0.02^2).",
            )
        )
    elif zero_output:
        findings.append(
            Finding(
                "zero_output",
                "warning",
                "the output is identically zero, so the derivative checks are inconclusive; run check_model again "
                "after a few training steps (or with perturb_zero_init=True on an nn.Module).",
            )
        )
        flat_in_r = False
    if flat_in_r:
        findings.append(
            Finding(
                "ignores_r",
                "error",
                "the output does not change with r: an average-velocity network must take both r and t (e.g. an "
                "embedding of t - r); a flow-matching network wrapped by from_velocity_net is for flow matching only.",
            )
        )
    res = probe_time_derivative(probe_model, z, r, t, v, cond, strategy=strategy, fd_eps=fd_eps)
    meas.update(
        time_oscillation=res.time_oscillation,
        rel_mismatch=res.rel_mismatch,
        rel_mismatch_t=res.rel_mismatch_t,
        ad_over_fd_t=res.ad_over_fd_t,
        dudt_over_v=res.dudt_over_v,
        stochastic_rel=res.stochastic_rel,
    )
    if math.isfinite(res.fd_rel_error):
        meas["fd_rel_error"] = res.fd_rel_error
    findings.extend(findings_from_probe(res, strategy))
    if not (res.conclusive or res.fd_conclusive or res.time_independent) and not zero_output:
        findings.append(
            Finding(
                "dudt_inconclusive",
                "warning",
                "du/dt on the probe rows is too small against float32 rounding to judge the time dependence; run "
                "check_model again after a few training steps.",
            )
        )
    findings.sort(key=lambda f: _ORDER[f.severity])
    report = ModelReport(findings, meas)
    if raise_on_problems:
        report.raise_for_problems()
    return report


class RuntimeChecks:
    """Probe the first calls of an objective and warn once per cause (:class:`MeanFlowWarning`).

    * Batch statistics (every objective whose no-grad passes run on sub-batches: JVP, guidance, teacher and
      splitting passes): warned at the first call.
    * A finite-difference JVP that runs in half precision (a plain function given half inputs without autocast):
      warned at the first call.
    * The du/dt probe (JVP objectives): up to ``rows`` of the interior ``r != t`` rows of each of the first
      ``calls`` conclusive JVP calls (calls whose derivative is still exactly zero, as a zero-initialised output
      layer before its first update, do not count, up to ``max_calls``). A finding is warned once it was seen in
      at least two probes and in most of the conclusive probes so far, so one unlucky probe (a ReLU kink) does not
      raise an alarm. The cost is a few no-grad passes on those rows, on those calls only.

    Disable with ``runtime_checks=False`` on the objective. The state lives in the objective: build the objective
    once and reuse it (a new objective every step probes every step).

    Args:
        calls: Number of conclusive probes to run.
        max_calls: Give up after this many JVP calls.
        rows: Probe rows per call.
    """

    def __init__(self, calls: int = 10, max_calls: int = 100, rows: int = 4) -> None:
        self.calls = calls
        self.max_calls = max_calls
        self.rows = rows
        self.seen = 0
        self.conclusive = 0
        self.warned: set[str] = set()
        self.counts: dict[str, int] = {}
        self.messages: dict[str, str] = {}
        self.checked_setups: set[str | None] = set()

    @property
    def active(self) -> bool:
        """Whether the next JVP call is probed (never inside ``torch.compile``-d code: run one eager step first)."""
        return self.conclusive < self.calls and self.seen < self.max_calls and not compiling()

    def setup(
        self, model: Callable[..., Tensor], x: Tensor, *, sub_batches: bool, strategy: str | None, objective: str
    ) -> None:
        """The first-call checks that need no probe (batch statistics, a half-precision difference quotient).

        Args:
            model: The ``target_model``.
            x: The data batch.
            sub_batches: Whether the objective runs no-grad passes on sub-batches.
            strategy: The JVP strategy, or ``None`` for an objective without JVP.
            objective: Name used in the messages.
        """
        if strategy in self.checked_setups or compiling():
            return
        self.checked_setups.add(strategy)
        bn = batch_stat_layers(model) if sub_batches else []
        if bn:
            self._warn(
                "batch_statistics",
                f"{objective}: target_model normalises with batch statistics ({', '.join(bn[:3])}): its no-grad "
                "passes (JVP, guidance, teacher or splitting passes) run on sub-batches, so their outputs use those "
                "rows' statistics, not the gradient batch's. Running statistics are left untouched by every no-grad "
                "pass. Prefer GroupNorm/LayerNorm or BatchNorm in eval mode.",
            )
        if strategy == "finite_difference" and half_plain_function(model, x):
            self._warn(
                "finite_difference_inaccurate",
                f"{objective}: jvp='finite_difference' runs in {x.dtype} (half-precision inputs, no autocast, a "
                "network that is not an nn.Module with half weights), where a difference quotient loses most digits "
                "(10% to 40% error measured). Train under torch.autocast (the JVP then runs in float32) or pass the "
                "nn.Module itself, whose half weights jvp_fp32 evaluates in float32.",
            )

    def __call__(
        self,
        model: Callable[..., Tensor],
        z: Tensor,
        r: Tensor,
        t: Tensor,
        tangent: Tensor,
        cond: Conditioning,
        *,
        strategy: str,
        fd_eps: float | None,
        objective: str,
    ) -> None:
        """Probe one call (``z`` ... are the ``r != t`` rows) and warn about findings that keep coming back."""
        if not self.active or z.shape[0] == 0:
            return
        self.seen += 1
        # rows whose coarse stencil is central: near t = 1 or r the reference difference would be one-sided
        interior = ((t - r) > 2 * PROBE_STEP) & (t < 1 - PROBE_STEP)
        idx = interior.nonzero().squeeze(1)[: self.rows]
        n = int(idx.numel())
        if n == 0 or (n < 2 and batch_stat_layers(model)):
            return  # one row cannot be normalised with batch statistics in train mode
        res = probe_time_derivative(
            model,
            z.index_select(0, idx),
            r.index_select(0, idx),
            t.index_select(0, idx),
            tangent.index_select(0, idx),
            cond.select(idx),
            strategy=strategy,
            fd_eps=fd_eps,
        )
        if res.conclusive or res.fd_conclusive:
            self.conclusive += 1
        for f in findings_from_probe(res, strategy):
            if f.severity == "info":
                continue
            self.counts[f.code] = self.counts.get(f.code, 0) + 1
            self.messages.setdefault(f.code, f.message)
        for code, count in self.counts.items():
            # randomness is judged per probe whatever the derivative; the derivative findings by majority
            needed = 2 if code == "rowwise_randomness" else max(2, self.conclusive // 2 + 1)
            if count >= needed:
                self._warn(code, f"{objective}: {self.messages[code]} (runtime check; see mfl.diagnostics.check_model)")

    def _warn(self, code: str, message: str) -> None:
        if code in self.warned:
            return
        self.warned.add(code)
        warnings.warn(message, MeanFlowWarning, stacklevel=4)
