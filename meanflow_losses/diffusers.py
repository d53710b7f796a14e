r"""Adapters for diffusers models: flow-matching ``UNet2DModel``, ``DiTTransformer2DModel`` and SD3 transformers.

One line turns a diffusers model into a network of the package protocol ``model(z, r, t, **model_kwargs) -> u``::

    model = mfl.diffusers.from_diffusers(unet)                  # velocity network, teacher or starting point
    teacher = mfl.Teacher(mfl.diffusers.from_diffusers(sd3.transformer).eval())

**Time.** diffusers' flow-matching models (SD3, and ``UNet2DModel`` / ``DiTTransformer2DModel`` trained with
``FlowMatchEulerDiscreteScheduler``) take ``timestep = sigma * num_train_timesteps`` with ``sigma`` the noise level
of :math:`z = (1 - \sigma) x + \sigma e` and predict :math:`v = e - x`: this package's convention exactly, with
``sigma = t``. The adapter computes ``timestep = timestep_scale * t`` inside ``forward`` (default 1000), so forward
AD sees :math:`\dot{\text{timestep}} = \text{timestep\_scale}`. A scheduler's ``shift`` only changes which sigmas a
sampler visits, not the network's parametrisation, and needs nothing here.

**Not supported.** A DDPM / DDIM / VP model (``prediction_type`` ``"epsilon"``, ``"v_prediction"`` or ``"sample"``:
SD 1.x/2.x, the DiT-XL/2 checkpoints, ``google/ddpm-*``) is not a velocity network of the linear path: its inputs
are :math:`\sqrt{\bar\alpha} x + \sqrt{1 - \bar\alpha} e` on a discrete schedule. Reading it as one would be a silent
error, so ``prediction`` other than ``"velocity"`` and non-flow-matching schedulers are refused. Also refused:
``UNet2DModel`` with ``time_embedding_type="fourier"`` (a score-SDE model: its output is divided by ``timestep``) or
``"learned"`` (an ``nn.Embedding`` of integer timesteps: no time derivative), and every other model class.

**The interval** :math:`h = t - r`. ``UNet2DModel(class_embed_type="timestep")`` embeds ``class_labels`` with its
own sinusoidal time projection and a second MLP, added to the time embedding: ``interval="auto"`` (or
``"class_embedding"``) feeds ``class_labels = interval_scale * h`` there (``interval_scale`` defaults to
``timestep_scale``). At ``r = t`` the model is then called with ``class_labels = 0``. :func:`with_interval_embedding`
adds such an embedding, zero-initialised, to a pretrained flow-matching ``UNet2DModel``, so that the converted model
equals the pretrained one exactly at initialisation (a starting point for MeanFlow fine-tuning). The DiT and SD3
transformers have no spare embedding: ``interval="auto"`` gives a velocity-only adapter (``ignores_r = True``: flow
matching, teachers, samplers at ``r = t``; MeanFlow-type objectives refuse it on ``r != t`` rows), and
``interval="class_embedding"`` is an error. :func:`with_interval_embedding` gives a copy of such a transformer an
interval embedding :math:`E_h` (the model's own sinusoidal projection and a copy of its timestep MLP, last layer
zero) added to the output of every timestep embedding (``CombinedTimestepLabelEmbeddings`` of each DiT block,
``CombinedTimestepTextProjEmbeddings`` of SD3); ``interval="auto"`` then routes ``h`` there
(``"added_embedding"``), and the copy called directly, as diffusers does, is the model at ``r = t``.

**Conditioning** travels in ``model_kwargs`` under the model's own argument names (``class_labels``,
``encoder_hidden_states``, ``pooled_projections``, ``joint_attention_kwargs``, ``cross_attention_kwargs``);
``y`` is accepted as an alias of ``class_labels`` (the package's ``mfl.null_class`` default key).

**Output.** A model whose ``out_channels`` is twice ``in_channels`` (DiT's learned variance, ``learn_sigma``)
returns the first half (``output="auto"``); any other channel mismatch is an error.

The adapters share the model's parameters, buffers and submodules under its own names
(:class:`~meanflow_losses.adapters._SharedNamesAdapter`): ``state_dict()`` is the diffusers model's, so
``save_pretrained`` checkpoints, EMA and optimizers work on either. diffusers is imported only when an adapter is
built; importing ``meanflow_losses`` never imports it.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import Tensor, nn

from meanflow_losses._validate import check_model_output
from meanflow_losses.adapters import _check_net, _SharedNamesAdapter

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import UNet2DModel

__all__ = ["DiffusersAdapter", "from_diffusers", "with_interval_embedding"]

Interval = Literal["auto", "class_embedding", "added_embedding"]
Output = Literal["auto", "all", "first_half"]

_KINDS = ("UNet2DModel", "DiTTransformer2DModel", "SD3Transformer2DModel")
_NOT_VELOCITY = ("epsilon", "v_prediction", "sample")
_ALIASES = {"y": "class_labels"}
_RESERVED = frozenset({"timestep", "return_dict", "sample", "hidden_states"})
#: The modules of the transformers that embed the timestep (with the labels / the pooled text): the interval
#: embedding added by :func:`with_interval_embedding` is added to their output.
_TIME_EMBEDDINGS = {
    "DiTTransformer2DModel": "CombinedTimestepLabelEmbeddings",
    "SD3Transformer2DModel": "CombinedTimestepTextProjEmbeddings",
}
_INTERVAL_ATTR = "mfl_interval_embedder"  # the added module's name inside a transformer copy


class _IntervalEmbedding(nn.Module):
    """:math:`E_h`: the model's own sinusoidal projection and a copy of its timestep MLP, last layer zero."""

    time_proj: nn.Module
    timestep_embedder: nn.Module

    def __init__(self, time_proj: nn.Module, timestep_embedder: nn.Module) -> None:
        super().__init__()
        self.time_proj = copy.deepcopy(time_proj)
        self.timestep_embedder = copy.deepcopy(timestep_embedder)
        with torch.no_grad():
            last = cast(nn.Linear, self.timestep_embedder.linear_2)  # diffusers' TimestepEmbedding
            last.weight.zero_()
            if last.bias is not None:
                last.bias.zero_()

    def forward(self, h: Tensor, dtype: torch.dtype) -> Tensor:
        """Embed the (scaled) intervals ``h`` ``(B,)`` into ``(B, D)``."""
        return self.timestep_embedder(self.time_proj(h).to(dtype))


class _AddIntervalEmbedding:
    """Forward hook on a transformer's timestep embedding: adds :math:`E_h(h)` of the call in progress.

    A callable object (not a closure), so that a deep copy of the model (EMA) hooks the copy's embedder. Outside an
    adapter call (the model called directly, as diffusers does) ``h = 0``: the model at ``r = t``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, module: nn.Module, args: Any, output: Tensor) -> Tensor:
        h = self.model.__dict__.get("_mfl_h")
        if h is None:
            h = torch.zeros(output.shape[0], device=output.device)
        embedder = getattr(self.model, _INTERVAL_ATTR)
        return output + embedder(h, output.dtype).to(output.dtype)


def _kind(net: Any) -> str:
    """Which supported diffusers class ``net`` is (``"UNet2DModel"``, ...), or a ``TypeError`` listing them."""
    try:
        import diffusers
    except ImportError as err:  # pragma: no cover - a diffusers model cannot exist without diffusers
        raise ImportError("from_diffusers needs the diffusers package (pip install diffusers)") from err
    for name in _KINDS:
        cls = getattr(diffusers, name, None)
        if cls is not None and isinstance(net, cls):
            return name
    hint = ""
    if type(net).__name__ == "UNet2DConditionModel":
        hint = (
            " UNet2DConditionModel checkpoints (SD 1.x / 2.x) are DDPM models predicting epsilon or v on a VP path,"
            " not velocity networks of the linear path."
        )
    raise TypeError(
        f"from_diffusers supports {', '.join(_KINDS)}, got {type(net).__name__}.{hint} For another flow-matching "
        "model, write a function net(z, t) returning its velocity e - x (timestep = 1000 t) and use "
        "meanflow_losses.adapters.from_velocity_net."
    )


def _check_prediction(prediction: str, scheduler: Any) -> None:
    if prediction in _NOT_VELOCITY:
        raise ValueError(
            f"prediction={prediction!r} is a DDPM/VP parametrisation: such a model is not a velocity network of the "
            "linear path z_t = (1 - t) x + t e, and from_diffusers does not convert it; only flow-matching models "
            "(prediction='velocity': timestep = 1000 sigma, output e - x, as SD3) are supported"
        )
    if prediction != "velocity":
        raise ValueError(f"prediction must be 'velocity' (e - x, diffusers' flow matching), got {prediction!r}")
    if scheduler is None:
        return
    config = getattr(scheduler, "config", {})
    ptype = config.get("prediction_type") if isinstance(config, Mapping) else None
    name = type(scheduler).__name__
    if "FlowMatch" not in name or ptype in _NOT_VELOCITY:
        raise ValueError(
            f"scheduler {name} (prediction_type={ptype!r}) is not a flow-matching scheduler: the model was trained "
            "on a DDPM/VP path, not on z_t = (1 - t) x + t e; from_diffusers supports flow-matching models only"
        )


def _scheduler_scale(scheduler: Any, timestep_scale: float | None) -> float:
    if scheduler is None:
        return 1000.0 if timestep_scale is None else float(timestep_scale)
    n = float(scheduler.config.get("num_train_timesteps", 1000))
    if timestep_scale is not None and float(timestep_scale) != n:
        raise ValueError(
            f"timestep_scale={timestep_scale} disagrees with the scheduler's num_train_timesteps={n:g} (the model "
            "was trained on timestep = num_train_timesteps * sigma); pass one of them"
        )
    return n


def _config(net: nn.Module) -> Mapping[str, Any]:
    """A diffusers model's ``config`` (a ``FrozenDict``)."""
    return cast("Mapping[str, Any]", net.config)


def _channels(net: nn.Module) -> tuple[int, int]:
    cfg = _config(net)
    c_in = int(cfg["in_channels"])
    c_out = int(cfg.get("out_channels") or c_in)
    return c_in, c_out


class DiffusersAdapter(_SharedNamesAdapter):
    r"""A diffusers flow-matching model as ``model(z, r, t, **model_kwargs) -> u`` (see the module docstring).

    .. math::
        u(z, r, t) = \mathrm{net}\big(z,\ \text{timestep} = s\,t,\ [\text{class\_labels} = s_h (t - r)]\big)

    with :math:`s` = ``timestep_scale``, :math:`s_h` = ``interval_scale``; the bracket only with the interval routed
    to a ``UNet2DModel``'s ``class_embed_type="timestep"`` embedding. Without it, ``r`` is ignored
    (``ignores_r = True``).

    Shapes: ``z`` ``(B, C, H, W)``, ``r`` and ``t`` ``(B,)``, output ``(B, C, H, W)``.

    Attributes:
        net: The wrapped diffusers model (its parameters, buffers and submodules are the adapter's, same names).
        kind: ``"UNet2DModel"``, ``"DiTTransformer2DModel"`` or ``"SD3Transformer2DModel"``.
        timestep_scale: :math:`s`.
        interval: ``"class_embedding"`` or ``None``.
        interval_scale: :math:`s_h` (``None`` without an interval route).
        output: ``"all"`` or ``"first_half"`` (resolved).
        ignores_r: Whether ``r`` is ignored.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        timestep_scale: float | None = None,
        prediction: str = "velocity",
        interval: Interval | None = "auto",
        interval_scale: float | None = None,
        output: Output = "auto",
        scheduler: Any = None,
        label_dropout: bool = True,
    ) -> None:
        _check_net(net, "from_diffusers")
        kind = _kind(net)
        _check_prediction(prediction, scheduler)
        scale = _scheduler_scale(scheduler, timestep_scale)
        if not (scale > 0 and scale == scale and scale != float("inf")):
            raise ValueError(f"timestep_scale must be a positive finite number, got {timestep_scale!r}")
        super().__init__(net, "data_at_0", "from_diffusers")
        cfg = _config(net)
        if kind == "UNet2DModel":
            emb_type = cfg.get("time_embedding_type", "positional")
            if emb_type != "positional":
                why = {
                    "fourier": "a score-SDE (VE) parametrisation: it takes log(sigma) and divides its output by sigma",
                    "learned": "an nn.Embedding of integer timesteps, which has no derivative in t",
                }.get(emb_type, "not a sinusoidal embedding of a continuous timestep")
                raise ValueError(f"UNet2DModel with time_embedding_type={emb_type!r} is not supported: {why}")
        has_spare = kind == "UNet2DModel" and cfg.get("class_embed_type") == "timestep"
        has_added = hasattr(net, _INTERVAL_ATTR)
        if interval == "auto":
            interval = "class_embedding" if has_spare else "added_embedding" if has_added else None
        if interval == "added_embedding" and not has_added:
            raise ValueError(
                f"interval='added_embedding' needs a model made by with_interval_embedding({kind}); this one has no "
                "interval embedding"
            )
        if interval == "class_embedding" and not has_spare:
            where = (
                f"its class_embed_type is {cfg.get('class_embed_type')!r}"
                if kind == "UNet2DModel"
                else "it has no spare embedding (timestep and labels / text are both in use)"
            )
            raise ValueError(
                f"interval='class_embedding' needs a UNet2DModel with class_embed_type='timestep'; {kind}: {where}. "
                "Use interval=None for a velocity-only adapter (flow matching, teachers); for a UNet2DModel, "
                "with_interval_embedding(unet) adds a zero-initialised interval embedding; for a transformer, add a "
                "zero-initialised interval embedding beside its time embedding"
            )
        if interval not in ("class_embedding", "added_embedding", None):
            raise ValueError(f"interval must be 'auto', 'class_embedding', 'added_embedding' or None, got {interval!r}")
        c_in, c_out = _channels(net)
        if output == "auto":
            if c_out == c_in:
                output = "all"
            elif c_out == 2 * c_in:
                output = "first_half"
            else:
                raise ValueError(
                    f"{kind} has in_channels={c_in} and out_channels={c_out}: the velocity must have the input's "
                    "channels (out_channels = 2 in_channels is read as velocity + learned variance)"
                )
        if output not in ("all", "first_half"):
            raise ValueError(f"output must be 'auto', 'all' or 'first_half', got {output!r}")
        if output == "first_half" and c_out != 2 * c_in:
            raise ValueError(f"output='first_half' needs out_channels = 2 in_channels, got {c_out} and {c_in}")
        if output == "all" and c_out != c_in:
            raise ValueError(f"output='all' needs out_channels = in_channels, got {c_out} and {c_in}")
        if not label_dropout:
            for module in net.modules():
                if type(module).__name__ == "LabelEmbedding" and hasattr(module, "dropout_prob"):
                    cast(Any, module).dropout_prob = 0.0  # diffusers' LabelEmbedding
        self.kind = kind
        self.timestep_scale = scale
        self.interval = interval
        self.interval_scale = None if interval is None else float(scale if interval_scale is None else interval_scale)
        self.output = output
        self.ignores_r = interval is None

    def _model_kwargs(self, model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        for key, value in model_kwargs.items():
            name = _ALIASES.get(key, key)
            if name in _RESERVED:
                raise ValueError(f"model_kwargs may not hold {key!r}: the adapter computes it from (z, r, t)")
            if name in kw:
                raise ValueError(f"model_kwargs holds both 'y' and 'class_labels' for {self.kind}: pass one")
            kw[name] = value
        if self.interval == "class_embedding" and "class_labels" in kw:
            raise ValueError(
                "model_kwargs holds class_labels, but this adapter feeds the interval t - r through the UNet2DModel's "
                "class embedding (class_embed_type='timestep'); use interval=None to pass class_labels yourself"
            )
        if self.kind == "DiTTransformer2DModel" and "class_labels" not in kw:
            raise ValueError("DiTTransformer2DModel needs class labels: model_kwargs={'class_labels': labels} (or 'y')")
        if self.kind == "SD3Transformer2DModel":
            missing = [k for k in ("encoder_hidden_states", "pooled_projections") if k not in kw]
            if missing:
                raise ValueError(f"SD3Transformer2DModel needs model_kwargs {missing} (text embeddings)")
        return kw

    def forward(self, z: Tensor, r: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor:
        """Return the model's velocity at ``timestep = timestep_scale * t`` (interval routed), shape of ``z``."""
        if r.shape != t.shape:
            raise ValueError(f"r and t must have the same shape, got {tuple(r.shape)} and {tuple(t.shape)}")
        kw = self._model_kwargs(model_kwargs)
        if self.interval == "class_embedding":
            assert self.interval_scale is not None
            kw["class_labels"] = (t - r) * self.interval_scale
        if self.interval == "added_embedding":  # read by the hooks of with_interval_embedding (h from r, t here)
            assert self.interval_scale is not None
            outer = self.net.__dict__.get("_mfl_h")
            self.net.__dict__["_mfl_h"] = (t - r) * self.interval_scale
            try:
                out = self.net(z, timestep=t * self.timestep_scale, return_dict=False, **kw)[0]
            finally:
                self.net.__dict__["_mfl_h"] = outer
        else:
            out = self.net(z, timestep=t * self.timestep_scale, return_dict=False, **kw)[0]
        if self.output == "first_half":
            out = out[:, : z.shape[1]]
        return check_model_output(out, z, who=f"from_diffusers({self.kind})")

    def extra_repr(self) -> str:
        """The model class and the conversion settings."""
        return (
            f"net={self.kind}, timestep_scale={self.timestep_scale:g}, interval={self.interval!r}, "
            f"interval_scale={self.interval_scale}, output={self.output!r}"
        )


def from_diffusers(
    net: nn.Module,
    *,
    timestep_scale: float | None = None,
    prediction: str = "velocity",
    interval: Interval | None = "auto",
    interval_scale: float | None = None,
    output: Output = "auto",
    scheduler: Any = None,
    label_dropout: bool = True,
) -> DiffusersAdapter:
    r"""Wrap a diffusers flow-matching model as ``model(z, r, t, **model_kwargs) -> u``.

    ``u = net(z, timestep=timestep_scale * t, [class_labels=interval_scale * (t - r)], **model_kwargs)``, first
    half of the channels for a learned-variance head. Supported: ``UNet2DModel`` (``time_embedding_type=
    "positional"``), ``DiTTransformer2DModel``, ``SD3Transformer2DModel``, trained by flow matching (output
    :math:`e - x` at ``timestep = 1000 sigma``).

    Args:
        net: The diffusers model.
        timestep_scale: ``timestep = timestep_scale * t`` (default 1000, or the scheduler's
            ``num_train_timesteps``). A model trained from scratch for MeanFlow can use 1 (low-frequency embedding).
        prediction: ``"velocity"`` (:math:`e - x`). DDPM parametrisations (``"epsilon"``, ``"v_prediction"``,
            ``"sample"``) are refused with the reason.
        interval: ``"auto"``: route ``h = t - r`` to ``class_labels`` of a ``UNet2DModel`` with
            ``class_embed_type="timestep"``, or to the interval embedding of a transformer made by
            :func:`with_interval_embedding` (``"added_embedding"``), else velocity-only; ``"class_embedding"`` /
            ``"added_embedding"``: require that route;
            ``None``: velocity-only (``ignores_r = True``; flow matching, teachers).
        interval_scale: ``class_labels = interval_scale * h`` (default ``timestep_scale``).
        output: ``"auto"``, ``"all"`` or ``"first_half"`` (velocity + learned variance heads).
        scheduler: Optional diffusers scheduler the model was trained with: a non-flow-matching one is refused, and
            its ``num_train_timesteps`` sets ``timestep_scale``.
        label_dropout: If false, set the ``dropout_prob`` of the model's ``LabelEmbedding`` s to 0 in place (DiT
            drops 10% of labels in train mode; move it into ``TrainingGuidance(drop_prob=...)``, with
            ``mfl.null_class(num_classes, "class_labels")`` as null condition).

    Returns:
        :class:`DiffusersAdapter`, sharing the model's parameter names.

    Raises:
        TypeError: an unsupported model class.
        ValueError: an unsupported setting (DDPM prediction or scheduler, fourier / learned time embedding,
            ``interval="class_embedding"`` without a spare embedding, output channels).
    """
    return DiffusersAdapter(
        net,
        timestep_scale=timestep_scale,
        prediction=prediction,
        interval=interval,
        interval_scale=interval_scale,
        output=output,
        scheduler=scheduler,
        label_dropout=label_dropout,
    )


def with_interval_embedding(unet: UNet2DModel) -> UNet2DModel:
    r"""A copy of a flow-matching diffusers model with a zero-initialised interval embedding (MeanFlow fine-tuning).

    ``DiTTransformer2DModel`` and ``SD3Transformer2DModel``: the copy gets a module ``mfl_interval_embedder``
    (:math:`E_h`: the model's sinusoidal projection and a copy of its timestep MLP with the last linear layer zero)
    whose output :math:`E_h(s_h\,h)` forward hooks add to every timestep embedding of the model, so the copy equals
    the original for every ``(r, t)`` at initialisation; its ``state_dict()`` holds the new keys under
    ``mfl_interval_embedder.`` (save it with ``torch.save(model.state_dict())``: diffusers' ``from_pretrained``
    does not know the module). Wrapped by :func:`from_diffusers`, ``h = t - r`` reaches the hooks; called
    directly, the copy uses ``h = 0``. ``UNet2DModel``:

    The copy has ``class_embed_type="timestep"``: a new ``TimestepEmbedding`` MLP of ``class_labels`` whose last
    linear layer is zero, so :math:`\mathrm{emb} = \mathrm{emb}_t + 0` and, wrapped by :func:`from_diffusers`, the
    copy equals the original for every ``(r, t)`` at initialisation (same parameters, same names, plus
    ``class_embedding.*``). Gradients reach the new layer from the first step (its input is non-zero).

    Args:
        unet: A ``UNet2DModel`` without class embedding (``class_embed_type=None``, ``num_class_embeds=None``), or a
            ``DiTTransformer2DModel`` / ``SD3Transformer2DModel`` without an added interval embedding.

    Returns:
        A new model on ``unet``'s device and dtype, in ``unet``'s train/eval mode.
    """
    kind = _kind(unet)
    if kind in _TIME_EMBEDDINGS:
        return _transformer_with_interval_embedding(unet, kind)
    if kind != "UNet2DModel":
        raise TypeError(f"with_interval_embedding needs a UNet2DModel or a transformer, got {type(unet).__name__}")
    cfg = dict(unet.config)
    if cfg.get("class_embed_type") is not None or cfg.get("num_class_embeds") is not None:
        raise ValueError(
            "with_interval_embedding needs a UNet2DModel without class embedding; this one has class_embed_type="
            f"{cfg.get('class_embed_type')!r}, num_class_embeds={cfg.get('num_class_embeds')!r}"
        )
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["class_embed_type"] = "timestep"
    param = next(unet.parameters())
    new = type(unet).from_config(cfg).to(device=param.device, dtype=param.dtype)
    missing, unexpected = new.load_state_dict(copy.deepcopy(unet.state_dict()), strict=False)
    if unexpected or not all(k.startswith("class_embedding.") for k in missing):
        raise RuntimeError(f"unexpected state dict mismatch: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        last = new.class_embedding.linear_2
        last.weight.zero_()
        if last.bias is not None:
            last.bias.zero_()
    return new.train(unet.training)


def _transformer_with_interval_embedding(net: nn.Module, kind: str) -> nn.Module:
    """A copy of a DiT / SD3 transformer whose timestep embeddings get :math:`E_h(h)` added (zero at init)."""
    if hasattr(net, _INTERVAL_ATTR):
        raise ValueError(f"this {kind} already has an interval embedding (with_interval_embedding was applied)")
    new = copy.deepcopy(net)
    targets = [m for m in new.modules() if type(m).__name__ == _TIME_EMBEDDINGS[kind]]
    if not targets:
        raise ValueError(f"{kind} has no {_TIME_EMBEDDINGS[kind]} module to add the interval embedding to")
    first: Any = targets[0]  # diffusers' CombinedTimestep...Embeddings
    new.add_module(_INTERVAL_ATTR, _IntervalEmbedding(first.time_proj, first.timestep_embedder))
    hook = _AddIntervalEmbedding(new)
    for m in targets:
        m.register_forward_hook(hook)
    return new
