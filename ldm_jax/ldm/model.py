"""``DiffusionModel``: U-Net, conditioner, frozen first stage, schedule and objective, built
from a config by :func:`build_model` and shared by the training stage, training-run
restoring (``ldm_jax.pipeline.from_training``) and tests.

Params: ``{"unet": ..., <conditioner.params_key>?: ...}`` (the conditioner's params when they
are trained: ``text_encoder`` for the from-scratch text encoder, ``class_embedder``); frozen
trees (first stage, a CLIP text encoder) are :meth:`DiffusionModel.frozen_params`, passed to
``prepare_batch`` and sampling as arguments.

The U-Net is built in one hop: ``UNet(**config.unet, **derived)`` where ``derived`` is what
the first stage and conditioning fix (channels, sample size, class table, context width).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion import diffusion_loss, make_schedule
from ldm_jax.diffusion.flow import flow_loss, make_flow_schedule
from ldm_jax.ldm.conditioning import Conditioner, build_conditioner
from ldm_jax.ldm.first_stage import LoadedFirstStage, load_first_stage
from ldm_jax.ldm.sections import (
    DENOISER_DEFAULTS,
    FLOW_PREDICTIONS,
    FLOW_TIME_DENSITIES,
    FLOW_WEIGHTINGS,
    OBJECTIVES,
    PREDICTIONS,
    SCHEDULES,
    WEIGHTINGS,
    choice,
    compute_dtype,
    conditioning_defaults,
    diffusion_defaults,
    first_stage_defaults,
    merge_section,
    schedule_kwargs,
)
from ldm_jax.models.dit import DiT
from ldm_jax.models.pixart import PixArtDiT
from ldm_jax.models.unet import UNet

# UNet fields fixed by the first stage and the conditioning, never read from config.unet.
DERIVED_UNET_FIELDS = ("sample_size", "in_channels", "out_channels", "num_classes")


def params_fingerprint(tree) -> str:
    """sha256 (first 16 hex digits) of a parameter pytree: paths, dtypes, shapes and bytes
    (logical-axis boxes are unboxed first)."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(tree))[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        value = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape};".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()[:16]


def _hashable(value: Any) -> Any:
    """Lists (JSON configs, ConfigDict tuples read back) -> tuples: module fields must hash."""
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


def build_unet(unet_config: Any, latent_channels: int, latent_size: int, conditioner: Conditioner) -> UNet:
    """The U-Net of ``config.unet`` (UNet fields; ``dtype`` a name, ``cross_attention_dim`` 0
    for the conditioner's context width) for this first stage and conditioner."""
    section = dict(unet_config.to_dict() if hasattr(unet_config, "to_dict") else unet_config)
    fields = {f.name for f in dataclasses.fields(UNet)} - {"parent", "name"}
    unknown = sorted(set(section) - fields)
    if unknown:
        raise ValueError(f"unknown config.unet keys {unknown}; config.unet holds UNet fields: {sorted(fields)}")
    derived = sorted(set(section) & set(DERIVED_UNET_FIELDS))
    if derived:
        raise ValueError(f"config.unet keys {derived} are derived from the first stage and the conditioning")
    ctx = conditioner.context_dim
    cross = int(section.pop("cross_attention_dim", 0) or 0) or ctx
    dtype = compute_dtype(section.pop("dtype", "float32"), "config.unet.dtype")
    try:
        unet = UNet(
            **{key: _hashable(value) for key, value in section.items()},
            sample_size=int(latent_size),
            in_channels=int(latent_channels),
            out_channels=int(latent_channels),
            cross_attention_dim=cross,
            num_classes=conditioner.unet_num_classes,
            dtype=dtype,
        )
    except ValueError as error:
        raise ValueError(f"config.unet: {error}") from None
    if unet.uses_cross_attention and ctx is None:
        raise ValueError(
            f"config.unet has cross-attention blocks but conditioning kind {conditioner.kind!r} gives no context; "
            "use DownBlock2D/UpBlock2D/UNetMidBlock2D blocks"
            + (" or conditioning.class_as_context=True" if conditioner.kind == "class" else "")
        )
    if not unet.uses_cross_attention and ctx is not None:
        raise ValueError(
            f"conditioning kind {conditioner.kind!r} produces a cross-attention context but config.unet has no "
            "cross-attention blocks (CrossAttnDownBlock2D / CrossAttnUpBlock2D / UNetMidBlock2DCrossAttn)"
        )
    if ctx is not None and cross != ctx:
        raise ValueError(f"config.unet.cross_attention_dim={cross} does not match the context width {ctx}")
    if latent_size % unet.downsample_factor:
        raise ValueError(
            f"latent size {latent_size} is not divisible by the U-Net's downsampling factor {unet.downsample_factor} "
            f"(block_out_channels={tuple(unet.block_out_channels)})"
        )
    return unet


# DiT fields fixed by the first stage and the conditioning, never read from config.dit.
DERIVED_DIT_FIELDS = ("sample_size", "in_channels", "out_channels", "num_classes", "cross_attention_dim")


def build_dit(dit_config: Any, latent_channels: int, latent_size: int, conditioner: Conditioner) -> DiT | PixArtDiT:
    """The transformer of ``config.dit`` for this first stage and conditioner: a class-label
    :class:`DiT` (adaLN-Zero) when the labels go to the network, the PixArt-alpha
    :class:`PixArtDiT` (cross-attention) when the conditioner gives a context (text, or
    ``class_as_context``). One hop: ``cls(**config.dit, **derived)`` (``dtype`` a name)."""
    section = dict(dit_config.to_dict() if hasattr(dit_config, "to_dict") else dit_config)
    ctx = conditioner.context_dim
    if ctx is None and conditioner.unet_num_classes is None:
        raise ValueError(
            f"config.diffusion.denoiser='dit' needs class labels or a text context; conditioning kind "
            f"{conditioner.kind!r} gives neither"
        )
    cls = DiT if ctx is None else PixArtDiT
    fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
    unknown = sorted(set(section) - fields)
    if unknown:
        raise ValueError(f"unknown config.dit keys {unknown} for {cls.__name__}; known: {sorted(fields)}")
    derived = sorted(set(section) & set(DERIVED_DIT_FIELDS))
    if derived:
        raise ValueError(f"config.dit keys {derived} are derived from the first stage and the conditioning")
    dtype = compute_dtype(section.pop("dtype", "float32"), "config.dit.dtype")
    fixed = dict(sample_size=int(latent_size), in_channels=int(latent_channels), out_channels=int(latent_channels))
    if cls is DiT:
        fixed["num_classes"] = int(conditioner.unet_num_classes)
    else:
        fixed["cross_attention_dim"] = int(ctx)
        section.setdefault("use_additional_conditions", False)  # no PixArt-1024 micro-conditions
    try:
        model = cls(**{key: _hashable(value) for key, value in section.items()}, **fixed, dtype=dtype)
    except (TypeError, ValueError) as error:
        raise ValueError(f"config.dit: {error}") from None
    if latent_size % model.patch_size:
        raise ValueError(f"latent size {latent_size} is not divisible by config.dit.patch_size={model.patch_size}")
    return model


# Denoiser families by ``config.diffusion.denoiser``: builder(section, latent_channels,
# latent_size, conditioner) -> the network, built in one hop from ``config.<denoiser>``
# (defaults: ``ldm_jax.ldm.sections.DENOISER_DEFAULTS``). MMDiT / ControlNet-wrapped U-Nets
# plug in here; the objective (``config.diffusion``) and the conditioner stay shared.
DENOISER_BUILDERS: dict[str, Callable[..., Any]] = {"unet": build_unet, "dit": build_dit}
assert tuple(DENOISER_BUILDERS) == tuple(DENOISER_DEFAULTS)


@dataclasses.dataclass(frozen=True)
class DiffusionModel:
    """Everything needed to train and sample: the denoiser (``unet``: a ``UNet``, ``DiT`` or
    ``PixArtDiT``, see :data:`DENOISER_BUILDERS`; the field keeps its name, and the params
    key ``"unet"``, for every family), conditioner, frozen first stage, schedule, objective.
    ``conditioner_frozen_params``: a frozen text encoder's params.
    ``conditioner_frozen`` overrides whether the conditioner's params are frozen (encoded in
    ``prepare_batch`` from ``frozen_params()``) or in the trained tree (encoded in ``loss_fn``);
    None: frozen unless the conditioner is trainable (fine-tuning a CLIP text encoder sets False).

    ``objective="flow"``: ``schedule_config`` holds ``make_flow_schedule`` keyword arguments,
    ``prediction`` is a flow prediction ("velocity" | "eps" | "x0") and ``flow_options`` the
    remaining :func:`ldm_jax.diffusion.flow.flow_loss` options (t density and its parameters)."""

    unet: Any
    conditioner: Conditioner
    first_stage: LoadedFirstStage
    schedule_config: Mapping[str, Any]
    prediction: str
    weighting: str
    min_snr_gamma: float
    sample_posterior: bool
    latent_size: int
    conditioner_frozen_params: Any = None
    objective: str = "ddpm"
    flow_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    conditioner_frozen: bool | None = None

    @property
    def schedule(self):
        """The :class:`Schedule` (DDPM) or :class:`FlowSchedule` (flow) samplers and the loss use."""
        if self.objective == "flow":
            return make_flow_schedule(**self.schedule_config)
        return make_schedule(**self.schedule_config)

    @property
    def denoiser_family(self) -> str:
        """"unet", "dit" (class labels) or "pixart" (cross-attention): how the folder stores it."""
        return {DiT: "dit", PixArtDiT: "pixart"}.get(type(self.unet), "unet")

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_size, self.latent_size, self.unet.in_channels)

    @property
    def conditioner_is_frozen(self) -> bool:
        c = self.conditioner
        if c.params_key is None:
            return False
        return not c.trainable if self.conditioner_frozen is None else bool(self.conditioner_frozen)

    def with_scale(self, scale_factor: float) -> "DiffusionModel":
        return dataclasses.replace(self, first_stage=self.first_stage.with_scale(scale_factor))

    def frozen_params(self) -> dict:
        """The frozen (possibly boxed) trees ``prepare_batch`` and sampling take as arguments."""
        frozen = {"first_stage": self.first_stage.variables}
        if self.conditioner_is_frozen:
            frozen[self.conditioner.params_key] = self.conditioner_frozen_params
        return frozen

    def conditioner_params(self, params: Mapping[str, Any], frozen: Mapping[str, Any]) -> Any:
        """The conditioner's params: trained (in ``params``), frozen (in ``frozen``) or ``{}``."""
        key = self.conditioner.params_key
        if key is None:
            return {}
        return frozen[key] if self.conditioner_is_frozen else params[key]

    def init_params(self, key):
        """``{"unet": ..., <conditioner.params_key>?: ...}`` (logically boxed)."""
        unet_key, cond_key = jax.random.split(key)
        params = {"unet": self.unet.init(unet_key, **self.unet.dummy_inputs(1))["params"]}
        if self.conditioner.trainable:
            params[self.conditioner.params_key] = self.conditioner.init_params(cond_key)
        return params

    # -- training

    def _conditions(self, batch: Mapping[str, Any]) -> dict:
        return {k: batch[k] for k in self.conditioner.input_keys if k in batch}

    def prepare_batch(self, frozen, batch, key):
        """Device batch -> loss batch: ``latents`` [B, h, w, c] (diffusion scale) + conditions.

        ``batch`` holds ``image`` (or ``raw``: cached ``encode_raw`` output) and the host
        condition arrays. Runs jitted with ``frozen`` as an argument (``Task.prepare_batch``).
        """
        fs = self.first_stage.adapter
        noise_key, drop_key = jax.random.split(key)
        raw = batch["raw"] if "raw" in batch else fs.encode_raw(frozen["first_stage"], batch["image"])
        z = fs.unscaled_latents(raw, noise_key, self.sample_posterior)
        out = {"latents": fs.to_diffusion(z).astype(jnp.float32)}
        cond = self._conditions(batch)
        if self.conditioner_is_frozen:
            # Frozen text encoder: drop to the empty caption at the token level, then encode.
            cond = self.conditioner.drop(cond, drop_key)
            out.update(self.conditioner.encode(frozen[self.conditioner.params_key], cond))
        else:
            out.update(cond)
        return out

    def loss_fn(self, params, batch, key):
        """The denoising loss of one (prepared) batch and its aux metrics. With
        ``batch["loss_weight"]`` [B] the loss is the mean of ``loss_weight_i * loss_i`` over the
        per-example losses (DreamBooth's prior preservation; a mean, so microbatches average
        to the same loss)."""
        drop_key, loss_key, dropout_key = jax.random.split(key, 3)
        latents = batch["latents"]
        c = self.conditioner
        if self.conditioner_is_frozen:
            # what prepare_batch encoded: context (SDXL: also text_embeds and time_ids)
            cond_kwargs = {k: batch[k] for k in ("context", "text_embeds", "time_ids") if k in batch}
        else:
            inputs = c.drop(self._conditions(batch), drop_key)
            cond_kwargs = c.encode(self.conditioner_params(params, {}), inputs)

        def model_fn(x, t):
            return self.unet.apply(
                {"params": params["unet"]}, x, t, train=True, rngs={"dropout": dropout_key}, **cond_kwargs
            )

        loss_fn = flow_loss if self.objective == "flow" else diffusion_loss
        objective = dict(prediction=self.prediction, weighting=self.weighting, min_snr_gamma=self.min_snr_gamma)
        objective.update(self.flow_options)
        if "loss_weight" in batch:
            # Per-example weights (DreamBooth's prior-preservation loss weight).
            per_example = loss_fn(self.schedule, model_fn, latents, loss_key, reduce="none", **objective)
            loss = jnp.mean(per_example * batch["loss_weight"].astype(jnp.float32))
        else:
            loss = loss_fn(self.schedule, model_fn, latents, loss_key, **objective)
        return loss, {"latent_std": jnp.std(latents)}


class ModelSections(NamedTuple):
    """The completed model sections of a config (merged over their defaults once);
    ``denoiser`` is the section of ``diffusion.denoiser``'s family (``config.unet``)."""

    first_stage: Any
    denoiser: dict
    conditioning: Any
    diffusion: Any


def model_sections(config: Any) -> ModelSections:
    """``config.first_stage`` / ``conditioning`` / ``diffusion`` and the denoiser's section
    (``config.unet``) over their defaults (unknown keys raise; the denoiser's section may add
    any field of its module, checked by its builder)."""
    diffusion = merge_section(diffusion_defaults(), config.get("diffusion"), "diffusion")
    family = choice("config.diffusion.denoiser", diffusion.denoiser, tuple(DENOISER_DEFAULTS))
    section = config.get(family)
    section = dict(section.to_dict() if hasattr(section, "to_dict") else (section or {}))
    return ModelSections(
        first_stage=merge_section(first_stage_defaults(), config.get("first_stage"), "first_stage"),
        denoiser={**DENOISER_DEFAULTS[family]().to_dict(), **section},
        conditioning=merge_section(conditioning_defaults(), config.get("conditioning"), "conditioning"),
        diffusion=diffusion,
    )


def build_model(config: Any, info: Mapping[str, Any], first_stage: LoadedFirstStage | None = None) -> DiffusionModel:
    """The model of ``config`` (or its :func:`model_sections`) for a dataset described by
    ``info`` (``num_classes``, ``has_captions``, ``resolution``, ``channels``) and an already
    loaded ``first_stage`` (loaded from ``config.first_stage`` when None; its scale factor is
    left as loaded)."""
    sections = config if isinstance(config, ModelSections) else model_sections(config)
    diffusion = sections.diffusion
    objective = choice("config.diffusion.objective", diffusion.objective, OBJECTIVES)
    flow_options: dict = {}
    if objective == "flow":
        prediction = choice("config.diffusion.flow_prediction", diffusion.flow_prediction, FLOW_PREDICTIONS)
        weighting = choice("config.diffusion.weighting", diffusion.weighting, FLOW_WEIGHTINGS)
        density = choice("config.diffusion.flow_time_density", diffusion.flow_time_density, FLOW_TIME_DENSITIES)
        flow_options = {"time_density": density, "logit_mean": float(diffusion.flow_logit_mean),
                        "logit_std": float(diffusion.flow_logit_std), "mode_scale": float(diffusion.flow_mode_scale)}
        if not float(diffusion.flow_logit_std) > 0:
            raise ValueError(f"config.diffusion.flow_logit_std must be > 0, got {diffusion.flow_logit_std!r}")
    else:
        choice("config.diffusion.schedule", diffusion.schedule, SCHEDULES)
        prediction = choice("config.diffusion.prediction", diffusion.prediction, PREDICTIONS)
        weighting = choice("config.diffusion.weighting", diffusion.weighting, WEIGHTINGS)
    schedule = schedule_kwargs(diffusion)
    try:  # fail at start-up on bad numbers
        (make_flow_schedule if objective == "flow" else make_schedule)(**schedule)
    except ValueError as error:
        raise ValueError(f"config.diffusion: {error}") from None
    if first_stage is None:
        first_stage = load_first_stage(sections.first_stage, int(info["channels"]))
    resolution = int(info["resolution"])
    factor = first_stage.adapter.factor
    if resolution % factor:
        raise ValueError(
            f"data resolution {resolution} is not divisible by the first stage's downsampling factor {factor}"
        )
    conditioner, frozen_params = build_conditioner(
        sections.conditioning, info.get("num_classes"), bool(info.get("has_captions"))
    )
    latent_size = resolution // factor
    build_denoiser = DENOISER_BUILDERS[sections.diffusion.denoiser]
    unet = build_denoiser(sections.denoiser, first_stage.adapter.latent_channels, latent_size, conditioner)
    return DiffusionModel(
        unet=unet,
        conditioner=conditioner,
        first_stage=first_stage,
        schedule_config=schedule,
        prediction=prediction,
        weighting=weighting,
        min_snr_gamma=float(diffusion.min_snr_gamma),
        sample_posterior=bool(sections.first_stage.sample_posterior),
        latent_size=latent_size,
        conditioner_frozen_params=frozen_params,
        objective=objective,
        flow_options=flow_options,
    )
