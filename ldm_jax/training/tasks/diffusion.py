"""The second training stage: latent diffusion on a frozen first stage, or pixel-space diffusion.

``build_stage(config, data_stats, source=None) -> DiffusionStage`` is what ``train.py`` calls
for ``config.stage == "diffusion"``.

First stage (``config.first_stage``), frozen
--------------------------------------------
* ``source="workdir"``: the EMA autoencoder of a first-stage training run
  (``first_stage.workdir``, checkpoint ``first_stage.step`` or the latest);
* ``source="diffusers"``: a diffusers ``AutoencoderKL`` / ``VQModel`` folder (``first_stage.path``;
  a Stable Diffusion folder's ``vae/`` works);
* ``source="identity"``: pixel-space diffusion (the U-Net sees the images).

The frozen parameters never become constants of a compiled program: they are ``Task.frozen_params``
and ``Task.prepare_batch`` encodes each device batch in its own jitted, sharded function that
takes them as an argument (``ldm_jax.training.loop``), before the train step. The U-Net is
trained on ``scale_factor * (z - shift)`` with ``z`` a posterior sample (KL; the mean when
``sample_posterior=False``) or the pre-quantisation latents (VQ). ``scale_factor`` is
``first_stage.scale_factor`` when > 0, else estimated at the start as 1 / std of ``z`` over
``first_stage.scale_batches`` training batches (LDM's ``scale_by_std``), stored in every
checkpoint's metadata (a resumed run reuses it) and written into the exported model.

Cached latents (``first_stage.cache_latents``): the dataset is encoded once (posterior mean and
std for KL, so training still samples the posterior) into ``<cache_dir>/latents.npy`` with
labels and captions beside it, and the loader reads those instead of images.

Conditioning (``config.conditioning.kind``)
-------------------------------------------
* ``"class"``: labels through the U-Net's class embedding (``UNet.num_classes``, label
  ``num_classes`` is the null class), or with ``class_as_context`` a ``ClassEmbedder`` giving a
  one-token cross-attention context (for U-Nets with attention blocks);
* ``"text"``: captions -> ``ByteTokenizer`` -> a from-scratch ``TextTransformer`` trained jointly
  (its params are ``params["text_encoder"]``);
* ``"clip"``: captions -> a frozen CLIP text encoder (``clip_path``: a transformers
  ``CLIPTextModel`` folder or a Stable Diffusion folder with ``text_encoder/`` and ``tokenizer/``),
  encoded in ``prepare_batch`` like the first stage;
* ``"none"``.
A fraction ``drop_prob`` of the examples get the null condition (null label, or the tokens of
the empty caption) so the model can be sampled with classifier-free guidance.

Params: ``{"unet": ..., "text_encoder"?: ..., "class_embedder"?: ...}``; the EMA copy of that
tree is what previews use and what ``export`` writes as an ``ldm_jax.pipeline`` model folder.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections.config_dict import placeholder

from ldm_jax.data import DataLoader, build_dataset
from ldm_jax.diffusion import cfg_model_fn, diffusion_loss, drop_conditioning, make_schedule, sample
from ldm_jax.models.autoencoder import AutoencoderKL, VQModel
from ldm_jax.models.conditioning import ClassEmbedder, TextTransformer
from ldm_jax.models.tokenizers import ByteTokenizer
from ldm_jax.models.unet import UNet
from ldm_jax.training import mesh as mesh_lib
from ldm_jax.training.config import resolve_config
from ldm_jax.training.distributed import global_batch_from_local, initialize_distributed
from ldm_jax.training.loop import Task, place_frozen
from ldm_jax.training.tasks.base import Stage

log = logging.getLogger(__name__)

FIRST_STAGE_SOURCES = ("identity", "workdir", "diffusers")
CONDITIONING_KINDS = ("none", "class", "text", "clip")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PREDICTIONS = ("eps", "v", "x0")
WEIGHTINGS = ("simple", "min_snr")
CACHE_FORMAT = 1

# ----------------------------------------------------------------------------- config sections


def first_stage_defaults() -> ml_collections.ConfigDict:
    """``config.first_stage``: where the frozen autoencoder comes from and how latents are made."""
    return ml_collections.ConfigDict(
        {
            "source": "identity",  # "identity" (pixel space) | "workdir" | "diffusers"
            "workdir": "",  # first-stage training run (source="workdir")
            "step": placeholder(int),  # its checkpoint; None: the latest
            "path": "",  # diffusers AutoencoderKL / VQModel folder (source="diffusers")
            "scale_factor": -1.0,  # > 0: use as is; otherwise 1/std of latents estimated from data
            "scale_batches": 4,  # training batches used for the estimate
            "sample_posterior": True,  # KL: train on posterior samples (LDM) or the mean
            "dtype": "float32",  # compute dtype of the frozen encoder/decoder
            "cache_latents": False,  # encode the dataset once and train on the stored latents
            "cache_dir": "",  # "": <workdir>/latent_cache
        }
    )


def unet_defaults() -> ml_collections.ConfigDict:
    """``config.unet``: ``ldm_jax.models.unet.UNet`` options in diffusers' vocabulary. Input and
    output channels, the class table and (by default) the cross-attention width are derived
    from the first stage and the conditioning."""
    return ml_collections.ConfigDict(
        {
            "block_out_channels": (64, 128, 128),
            "layers_per_block": 1,
            "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
            "mid_block_type": "UNetMidBlock2D",
            "attention_head_dim": 4,  # heads per attention block (diffusers semantics)
            "cross_attention_dim": 0,  # 0: the conditioning's width
            "transformer_layers_per_block": 1,
            "use_linear_projection": False,
            "norm_num_groups": 32,
            "dropout": 0.0,
            "resnet_time_scale_shift": "default",
            "remat": False,
            "dtype": "float32",  # compute dtype; params stay float32
        }
    )


def conditioning_defaults() -> ml_collections.ConfigDict:
    """``config.conditioning``."""
    return ml_collections.ConfigDict(
        {
            "kind": "class",  # "none" | "class" | "text" | "clip"
            "drop_prob": 0.1,  # probability of the null condition in training (for CFG)
            "class_as_context": False,  # class: ClassEmbedder -> one-token cross-attention context
            "class_embed_dim": 128,
            "text_max_length": 32,  # from-scratch text encoder (kind="text")
            "text_width": 128,
            "text_depth": 2,
            "text_heads": 4,
            "clip_path": "",  # kind="clip": CLIPTextModel folder or an SD folder
            "clip_context_layer": "last",  # "last" (SD 1.x) | "penultimate" (SD 2.x)
        }
    )


def diffusion_defaults() -> ml_collections.ConfigDict:
    """``config.diffusion``: noise schedule and objective."""
    return ml_collections.ConfigDict(
        {
            "schedule": "linear",  # "linear" | "scaled_linear" | "cosine"
            "num_timesteps": 1000,
            "beta_start": placeholder(float),
            "beta_end": placeholder(float),
            "rescale_zero_terminal_snr": False,
            "prediction": "eps",  # "eps" | "v" | "x0"
            "weighting": "simple",  # "simple" | "min_snr"
            "min_snr_gamma": 5.0,
        }
    )


def preview_defaults() -> ml_collections.ConfigDict:
    """``config.preview`` keys this stage reads (beside ``every_steps`` / ``seed``)."""
    return ml_collections.ConfigDict(
        {
            "every_steps": 1000,
            "seed": 0,
            "columns": 8,  # samples per class / prompt (one grid row each)
            "max_rows": 10,  # classes (or prompts) shown
            "prompts": [],  # text models: [] takes the first distinct training captions
            "num_images": 16,  # unconditional models
            "sampler": "ddim",
            "num_steps": 50,
            "guidance_scale": 3.0,
        }
    )


def add_stage_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add this stage's default sections to a ``configs.base.get_base_config`` config (in place)."""
    with config.unlocked():
        config.first_stage = first_stage_defaults()
        config.unet = unet_defaults()
        config.conditioning = conditioning_defaults()
        config.diffusion = diffusion_defaults()
        preview = preview_defaults()
        for key, value in (config.get("preview") or {}).items():
            if key in ("every_steps", "seed"):
                preview[key] = value
        config.preview = preview
    return config


def _section(config: Any, name: str, defaults: ml_collections.ConfigDict, allow_extra: Sequence[str] = ()) -> Any:
    """``config.<name>`` over its defaults; unknown keys are an error naming them."""
    out = ml_collections.ConfigDict(defaults.to_dict())
    section = config.get(name)
    if section is None:
        return out
    items = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    unknown = sorted(set(items) - set(out.keys()) - set(allow_extra))
    if unknown:
        raise ValueError(f"unknown config.{name} keys {unknown}; known keys: {sorted(out.keys())}")
    with out.unlocked():
        for key, value in items.items():
            if key in out:
                out[key] = value
    return out


def _choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, choices))}")
    return value


def schedule_kwargs(diffusion: Any) -> dict:
    """``make_schedule`` keyword arguments of ``config.diffusion`` (also the exported schedule)."""
    out = {"kind": diffusion.schedule, "num_timesteps": int(diffusion.num_timesteps)}
    if diffusion.get("beta_start") is not None:
        out["beta_start"] = float(diffusion.beta_start)
    if diffusion.get("beta_end") is not None:
        out["beta_end"] = float(diffusion.beta_end)
    if diffusion.get("rescale_zero_terminal_snr"):
        out["rescale_to_zero_terminal_snr"] = True
    return out


# ----------------------------------------------------------------------------- first stage


@dataclasses.dataclass(frozen=True)
class FrozenFirstStage:
    """A frozen autoencoder (or the identity) with the latent scaling of this diffusion run.

    ``adapter`` is an ``ldm_jax.pipeline`` first stage (``KLFirstStage`` / ``VQFirstStage`` /
    ``PixelSpace``) whose module carries ``scale_factor``; ``variables`` its (boxed) variables.
    ``description`` is JSON naming where it came from (stored with checkpoints).
    """

    adapter: Any
    variables: Any
    description: Mapping[str, Any]

    @property
    def kind(self) -> str:
        return self.adapter.kind

    @property
    def scale_factor(self) -> float:
        return 1.0 if self.kind == "identity" else float(self.adapter.module.scale_factor)

    def with_scale(self, scale_factor: float) -> "FrozenFirstStage":
        if self.kind == "identity":
            return self
        adapter = type(self.adapter)(self.adapter.module.clone(scale_factor=float(scale_factor)))
        return dataclasses.replace(self, adapter=adapter)

    def raw_channels(self) -> int:
        """Channels of ``encode_raw``: KL stores mean and std, so twice the latent channels."""
        return 2 * self.adapter.latent_channels if self.kind == "kl" else self.adapter.latent_channels

    def encode_raw(self, variables, images):
        """images [B, H, W, C] in [-1, 1] -> what a latent cache stores: KL ``[mean, std]``
        (channels concatenated), VQ pre-quantisation latents, identity the images. float32."""
        if self.kind == "identity":
            return images.astype(jnp.float32)
        if self.kind == "kl":

            def moments(m, x):
                posterior = m.encode(x)
                return jnp.concatenate([posterior.mean, posterior.std], axis=-1)

            return self.adapter.module.apply(variables, images, method=moments).astype(jnp.float32)
        return self.adapter.module.apply(variables, images, method=lambda m, x: m.encode(x)).astype(jnp.float32)

    def unscaled_latents(self, raw, key, sample_posterior: bool):
        """``encode_raw`` output -> z (a posterior sample for KL when ``sample_posterior``)."""
        if self.kind != "kl":
            return raw
        mean, std = jnp.split(raw, 2, axis=-1)
        if not sample_posterior:
            return mean
        return mean + std * jax.random.normal(key, mean.shape, mean.dtype)

    def to_diffusion(self, z):
        """z -> ``scale_factor * (z - shift_factor)`` (the module's own formula)."""
        if self.kind == "identity":
            return z
        return self.adapter.module.latents_for_diffusion(z)


def _dtype(name: str, what: str):
    return DTYPES[_choice(what, name, tuple(DTYPES))]


def load_first_stage(fs_config: Any, channels: int) -> FrozenFirstStage:
    """The frozen first stage described by ``config.first_stage`` (scale factor 1 for now)."""
    from ldm_jax.pipeline.components import KLFirstStage, PixelSpace, VQFirstStage

    source = _choice("config.first_stage.source", fs_config.source, FIRST_STAGE_SOURCES)
    dtype = _dtype(fs_config.dtype, "config.first_stage.dtype")
    if source == "identity":
        return FrozenFirstStage(PixelSpace(int(channels)), {}, {"source": "identity", "channels": int(channels)})
    if source == "workdir":
        from ldm_jax.training.workdir import load_first_stage_from_workdir

        if not fs_config.workdir:
            raise ValueError("config.first_stage.source='workdir' needs config.first_stage.workdir")
        loaded = load_first_stage_from_workdir(fs_config.workdir, fs_config.get("step"), dtype=dtype)
        module, variables, description = loaded.module, loaded.variables, loaded.description
    else:
        from ldm_jax.interop.diffusers_vae import load_diffusers_autoencoder_kl, load_diffusers_vq_model

        path = str(fs_config.path or "")
        if not path:
            raise ValueError("config.first_stage.source='diffusers' needs config.first_stage.path")
        if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(
            os.path.join(path, "vae", "config.json")
        ):
            path = os.path.join(path, "vae")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"config.first_stage.path {fs_config.path!r} holds no diffusers autoencoder config.json")
        with open(os.path.join(path, "config.json")) as f:
            class_name = json.load(f).get("_class_name", "AutoencoderKL")
        if class_name == "AutoencoderKL":
            module, params = load_diffusers_autoencoder_kl(path, dtype=dtype)
            variables = {"params": params}
        elif class_name == "VQModel":
            module, variables = load_diffusers_vq_model(path, dtype=dtype)
        else:
            raise ValueError(f"config.first_stage.path {path!r} holds a {class_name}, not an AutoencoderKL/VQModel")
        description = {"source": "diffusers", "path": os.path.abspath(path)}
    if module.in_channels != channels:
        raise ValueError(
            f"the first stage takes {module.in_channels}-channel images but the data has {channels} channels "
            f"(set config.data.channels={module.in_channels})"
        )
    module = module.clone(scale_factor=1.0)
    adapter = KLFirstStage(module) if isinstance(module, AutoencoderKL) else VQFirstStage(module)
    return FrozenFirstStage(adapter, variables, description)


# ----------------------------------------------------------------------------- conditioning


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """How conditions reach the U-Net, in training and sampling alike.

    kind: "none" | "class" | "text" | "clip". ``tokenizer`` (text/clip) runs on the host;
    ``encoder`` is the TextTransformer (trained, ``params["text_encoder"]``), the frozen
    CLIPTextEncoder (``frozen["text_encoder"]``) or the ClassEmbedder (``params["class_embedder"]``).
    """

    kind: str
    num_classes: int | None = None
    tokenizer: Any = None
    encoder: Any = None
    encoder_params: Any = None  # frozen CLIP params (boxed), else None
    drop_prob: float = 0.0

    @property
    def is_conditional(self) -> bool:
        return self.kind != "none"

    @property
    def trainable_key(self) -> str | None:
        if self.kind == "text":
            return "text_encoder"
        if self.kind == "class" and self.encoder is not None:
            return "class_embedder"
        return None

    def host_inputs(self, labels=None, captions=None) -> dict[str, np.ndarray]:
        """Host-side condition arrays: ``{"labels"}`` or ``{"ids", "mask"}`` (or nothing)."""
        if self.kind == "class":
            return {"labels": np.asarray(labels, np.int32)}
        if self.kind in ("text", "clip"):
            tokens = self.tokenizer([str(c) for c in captions])
            return {"ids": np.asarray(tokens.ids, np.int32), "mask": np.asarray(tokens.mask, bool)}
        return {}

    def null_inputs(self, count: int) -> dict[str, np.ndarray]:
        """The null condition: label ``num_classes`` or the empty caption's tokens."""
        if self.kind == "class":
            return {"labels": np.full((count,), self.num_classes, np.int32)}
        if self.kind in ("text", "clip"):
            return self.host_inputs(captions=[""] * count)
        return {}

    def drop(self, inputs: Mapping[str, Any], key) -> dict:
        """Replace each example's condition by the null one with probability ``drop_prob``."""
        if not self.is_conditional or self.drop_prob <= 0:
            return dict(inputs)
        null = {k: jnp.asarray(v) for k, v in self.null_inputs(1).items()}
        return drop_conditioning(key, dict(inputs), null, self.drop_prob)

    def unet_kwargs(self, params: Mapping[str, Any], frozen: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict:
        """Condition inputs -> U-Net keyword arguments (``class_labels`` or ``context``)."""
        if self.kind == "class":
            if self.encoder is None:
                return {"class_labels": inputs["labels"]}
            context = self.encoder.apply({"params": params["class_embedder"]}, inputs["labels"], as_context=True)
            return {"context": context.astype(jnp.float32)}
        if self.kind == "text":
            context = self.encoder.apply({"params": params["text_encoder"]}, inputs["ids"], inputs["mask"])
            return {"context": context.astype(jnp.float32)}
        if self.kind == "clip":
            if "context" in inputs:  # encoded in prepare_batch
                return {"context": inputs["context"]}
            context = self.encoder.apply({"params": frozen["text_encoder"]}, inputs["ids"]).context
            return {"context": context.astype(jnp.float32)}
        return {}

    def pipeline_conditioner(self):
        """The ``ldm_jax.pipeline`` conditioner that samples exactly as training conditioned."""
        from ldm_jax.pipeline.components import ClassConditioner, TextConditioner, Unconditional

        if self.kind == "class":
            return ClassConditioner(int(self.num_classes), self.encoder)
        if self.kind in ("text", "clip"):
            return TextConditioner(self.tokenizer, self.encoder)
        return Unconditional()


def build_conditioning(cond: Any, num_classes: int | None, has_captions: bool) -> Conditioning:
    kind = _choice("config.conditioning.kind", cond.kind, CONDITIONING_KINDS)
    drop_prob = float(cond.drop_prob)
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"config.conditioning.drop_prob must be in [0, 1], got {drop_prob}")
    if kind == "class":
        if not num_classes:
            raise ValueError("config.conditioning.kind='class' but the dataset has no labels")
        encoder = None
        if cond.class_as_context:
            encoder = ClassEmbedder(num_classes=int(num_classes), embed_dim=int(cond.class_embed_dim))
        return Conditioning("class", num_classes=int(num_classes), encoder=encoder, drop_prob=drop_prob)
    if kind in ("text", "clip") and not has_captions:
        raise ValueError(f"config.conditioning.kind={kind!r} but the dataset has no captions")
    if kind == "text":
        length = int(cond.text_max_length)
        encoder = TextTransformer(
            max_length=length, width=int(cond.text_width), depth=int(cond.text_depth), num_heads=int(cond.text_heads)
        )
        return Conditioning("text", tokenizer=ByteTokenizer(length), encoder=encoder, drop_prob=drop_prob)
    if kind == "clip":
        from ldm_jax.interop.transformers_clip import load_clip_text_encoder
        from ldm_jax.models.tokenizers import CLIPTokenizer

        path = str(cond.clip_path or "")
        if not path or not os.path.isdir(path):
            raise ValueError(f"config.conditioning.clip_path {path!r} is not a directory")
        encoder, params = load_clip_text_encoder(path, context_layer=cond.clip_context_layer)
        tokenizer_dir = os.path.join(path, "tokenizer") if os.path.isdir(os.path.join(path, "tokenizer")) else path
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        return Conditioning("clip", tokenizer=tokenizer, encoder=encoder, encoder_params=params, drop_prob=drop_prob)
    return Conditioning("none")


def context_dim(conditioning: Conditioning) -> int | None:
    """Width of the cross-attention context the conditioning produces (None: no context)."""
    if conditioning.kind == "text":
        return int(conditioning.encoder.width)
    if conditioning.kind == "clip":
        return int(conditioning.encoder.config.hidden_size)
    if conditioning.kind == "class" and conditioning.encoder is not None:
        return int(conditioning.encoder.embed_dim)
    return None


def build_unet(unet_config: Any, latent_channels: int, latent_size: int, conditioning: Conditioning) -> UNet:
    """The U-Net of ``config.unet`` for this first stage and conditioning."""
    u = unet_config
    ctx = context_dim(conditioning)
    cross = int(u.cross_attention_dim) or ctx
    kwargs = dict(
        sample_size=int(latent_size),
        in_channels=int(latent_channels),
        out_channels=int(latent_channels),
        block_out_channels=tuple(int(c) for c in u.block_out_channels),
        layers_per_block=u.layers_per_block if isinstance(u.layers_per_block, int) else tuple(u.layers_per_block),
        down_block_types=tuple(u.down_block_types),
        up_block_types=tuple(u.up_block_types),
        mid_block_type=u.mid_block_type,
        attention_head_dim=u.attention_head_dim
        if isinstance(u.attention_head_dim, int)
        else tuple(u.attention_head_dim),
        cross_attention_dim=cross,
        transformer_layers_per_block=u.transformer_layers_per_block,
        use_linear_projection=bool(u.use_linear_projection),
        norm_num_groups=int(u.norm_num_groups),
        dropout=float(u.dropout),
        resnet_time_scale_shift=u.resnet_time_scale_shift,
        num_classes=conditioning.num_classes if conditioning.kind == "class" and conditioning.encoder is None else None,
        remat=bool(u.remat),
        dtype=_dtype(u.dtype, "config.unet.dtype"),
    )
    try:
        unet = UNet(**kwargs)
    except ValueError as error:
        raise ValueError(f"config.unet: {error}") from None
    if unet.uses_cross_attention and ctx is None:
        raise ValueError(
            f"config.unet has cross-attention blocks but conditioning kind {conditioning.kind!r} gives no context; "
            "use DownBlock2D/UpBlock2D/UNetMidBlock2D blocks"
            + (" or conditioning.class_as_context=True" if conditioning.kind == "class" else "")
        )
    if not unet.uses_cross_attention and ctx is not None:
        raise ValueError(
            f"conditioning kind {conditioning.kind!r} produces a cross-attention context but config.unet has no "
            "cross-attention blocks (CrossAttnDownBlock2D / CrossAttnUpBlock2D / UNetMidBlock2DCrossAttn)"
        )
    if ctx is not None and cross != ctx:
        raise ValueError(f"config.unet.cross_attention_dim={cross} does not match the context width {ctx}")
    if latent_size % unet.downsample_factor:
        raise ValueError(
            f"latent size {latent_size} is not divisible by the U-Net's downsampling factor {unet.downsample_factor} "
            f"(block_out_channels={tuple(u.block_out_channels)})"
        )
    return unet


# ----------------------------------------------------------------------------- the model


@dataclasses.dataclass(frozen=True)
class DiffusionModel:
    """Everything needed to train and sample: U-Net, conditioning, frozen first stage, schedule,
    objective. Built from a config by :func:`build_model`; shared by the stage and
    ``ldm_jax.training.workdir.from_workdir``."""

    unet: UNet
    conditioning: Conditioning
    first_stage: FrozenFirstStage
    schedule_config: Mapping[str, Any]
    prediction: str
    weighting: str
    min_snr_gamma: float
    sample_posterior: bool
    latent_size: int

    @property
    def schedule(self):
        return make_schedule(**self.schedule_config)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_size, self.latent_size, self.unet.in_channels)

    def frozen_params(self) -> dict:
        """The frozen (possibly boxed) trees ``prepare_batch`` and sampling take as arguments."""
        frozen = {"first_stage": self.first_stage.variables}
        if self.conditioning.kind == "clip":
            frozen["text_encoder"] = self.conditioning.encoder_params
        return frozen

    def init_params(self, key):
        """``{"unet": ..., "text_encoder"?: ..., "class_embedder"?: ...}`` (logically boxed)."""
        unet_key, cond_key = jax.random.split(key)
        dummy = self.unet.dummy_inputs(1)
        params = {"unet": self.unet.init(unet_key, **dummy)["params"]}
        c = self.conditioning
        if c.trainable_key == "text_encoder":
            tokens = c.tokenizer([""])
            ids, mask = jnp.asarray(tokens.ids), jnp.asarray(tokens.mask)
            params["text_encoder"] = c.encoder.init(cond_key, ids, mask)["params"]
        elif c.trainable_key == "class_embedder":
            params["class_embedder"] = c.encoder.init(cond_key, jnp.zeros((1,), jnp.int32), as_context=True)["params"]
        return params

    # -- training

    def prepare_batch(self, frozen, batch, key):
        """Device batch -> loss batch: ``latents`` [B, h, w, c] (diffusion scale) + conditions.

        ``batch`` holds ``image`` (or ``raw``: cached ``encode_raw`` output) and the host
        condition arrays. Runs jitted with ``frozen`` as an argument (``Task.prepare_batch``).
        """
        fs = self.first_stage
        noise_key, drop_key = jax.random.split(key)
        raw = batch["raw"] if "raw" in batch else fs.encode_raw(frozen["first_stage"], batch["image"])
        z = fs.unscaled_latents(raw, noise_key, self.sample_posterior)
        out = {"latents": fs.to_diffusion(z).astype(jnp.float32)}
        cond = {k: batch[k] for k in ("labels", "ids", "mask") if k in batch}
        if self.conditioning.kind == "clip":
            # Frozen text encoder: drop to the empty caption at the token level, then encode.
            cond = self.conditioning.drop(cond, drop_key)
            out.update(self.conditioning.unet_kwargs({}, frozen, cond))
        else:
            out.update(cond)
        return out

    def loss_fn(self, params, batch, key):
        """The denoising loss of one (prepared) batch and its aux metrics."""
        drop_key, loss_key, dropout_key = jax.random.split(key, 3)
        latents = batch["latents"]
        c = self.conditioning
        if c.kind == "clip":
            cond_kwargs = {"context": batch["context"]}
        else:
            inputs = c.drop({k: batch[k] for k in ("labels", "ids", "mask") if k in batch}, drop_key)
            cond_kwargs = c.unet_kwargs(params, {}, inputs)

        def model_fn(x, t):
            return self.unet.apply(
                {"params": params["unet"]}, x, t, train=True, rngs={"dropout": dropout_key}, **cond_kwargs
            )

        loss = diffusion_loss(
            self.schedule,
            model_fn,
            latents,
            loss_key,
            prediction=self.prediction,
            weighting=self.weighting,
            min_snr_gamma=self.min_snr_gamma,
        )
        return loss, {"latent_std": jnp.std(latents)}

    # -- sampling

    def generate(self, params, frozen, cond, uncond, key, *, num_images, sampler, num_steps, guidance_scale):
        """Samples [N, H, W, C] in [0, 1] (float32) with classifier-free guidance (when
        ``uncond`` is given and ``guidance_scale != 1``); image i's noise is stream
        ``i`` of ``key``, as in ``LatentDiffusionPipeline`` with ``seed`` -> ``PRNGKey(seed)``."""
        c = self.conditioning
        cond_kwargs = c.unet_kwargs(params, frozen, cond)

        def model_fn(x, t, kwargs):
            return self.unet.apply({"params": params["unet"]}, x, t, **kwargs)

        if c.is_conditional and uncond is not None and guidance_scale != 1.0:
            uncond_kwargs = c.unet_kwargs(params, frozen, uncond)
            model = cfg_model_fn(model_fn, cond_kwargs, uncond_kwargs, guidance_scale)
        else:
            model = lambda x, t: model_fn(x, t, cond_kwargs)  # noqa: E731
        latents = sample(
            model,
            self.schedule,
            (num_images, *self.latent_shape),
            key,
            sampler=sampler,
            num_steps=num_steps,
            prediction=self.prediction,
            example_indices=jnp.arange(num_images),
        )
        images = self.first_stage.adapter.decode(frozen["first_stage"], latents).astype(jnp.float32)
        return jnp.clip((images + 1.0) / 2.0, 0.0, 1.0)

    # -- inference model

    def pipeline(self, params, **kwargs):
        """An ``ldm_jax.pipeline.LatentDiffusionPipeline`` with these (EMA) params."""
        from ldm_jax.pipeline import LatentDiffusionPipeline

        c = self.conditioning
        params = nn.meta.unbox(jax.device_get(params))
        conditioner_params = None
        if c.trainable_key is not None:
            conditioner_params = params[c.trainable_key]
        elif c.kind == "clip":
            conditioner_params = nn.meta.unbox(c.encoder_params)
        fs = self.first_stage
        return LatentDiffusionPipeline.from_components(
            unet=self.unet,
            unet_params=params["unet"],
            first_stage=fs.adapter,
            first_stage_variables=None if fs.kind == "identity" else nn.meta.unbox(fs.variables),
            conditioner=c.pipeline_conditioner(),
            conditioner_params=conditioner_params,
            schedule=dict(self.schedule_config),
            prediction=self.prediction,
            **kwargs,
        )


def build_model(config: Any, info: Mapping[str, Any], first_stage: FrozenFirstStage | None = None) -> DiffusionModel:
    """The model of ``config`` for a dataset described by ``info`` (``num_classes``,
    ``has_captions``, ``resolution``, ``channels``) and an already loaded ``first_stage``
    (loaded from ``config.first_stage`` when None; its scale factor is left as loaded)."""
    fs_config = _section(config, "first_stage", first_stage_defaults())
    diffusion = _section(config, "diffusion", diffusion_defaults())
    cond_config = _section(config, "conditioning", conditioning_defaults())
    unet_config = _section(config, "unet", unet_defaults())
    _choice("config.diffusion.schedule", diffusion.schedule, ("linear", "scaled_linear", "cosine"))
    prediction = _choice("config.diffusion.prediction", diffusion.prediction, PREDICTIONS)
    weighting = _choice("config.diffusion.weighting", diffusion.weighting, WEIGHTINGS)
    schedule = schedule_kwargs(diffusion)
    make_schedule(**schedule)  # fail at start-up on bad numbers
    if first_stage is None:
        first_stage = load_first_stage(fs_config, int(info["channels"]))
    resolution = int(info["resolution"])
    if resolution % first_stage.adapter.factor:
        raise ValueError(
            f"data resolution {resolution} is not divisible by the first stage's downsampling factor "
            f"{first_stage.adapter.factor}"
        )
    conditioning = build_conditioning(cond_config, info.get("num_classes"), bool(info.get("has_captions")))
    latent_size = resolution // first_stage.adapter.factor
    unet = build_unet(unet_config, first_stage.adapter.latent_channels, latent_size, conditioning)
    return DiffusionModel(
        unet=unet,
        conditioning=conditioning,
        first_stage=first_stage,
        schedule_config=schedule,
        prediction=prediction,
        weighting=weighting,
        min_snr_gamma=float(diffusion.min_snr_gamma),
        sample_posterior=bool(fs_config.sample_posterior),
        latent_size=latent_size,
    )


# ----------------------------------------------------------------------------- scale factor and cache


def _data_dict(config: Any) -> dict:
    data = config.get("data")
    return dict(data.to_dict() if hasattr(data, "to_dict") else (data or {}))


class _Placement:
    """The training mesh (built from the config exactly as the loop builds it) and helpers to
    put frozen params and host batches on it, for work done before the loop starts."""

    def __init__(self, config: Any):
        initialize_distributed(config)
        resolved = resolve_config(config, jax.device_count(), jax.process_count())
        self.mesh = mesh_lib.make_mesh(resolved.mesh)
        self.rules = mesh_lib.logical_axis_rules(resolved.sharding)
        self.batch_sharding = mesh_lib.batch_sharding(self.mesh)
        self.replicated = mesh_lib.replicated(self.mesh)
        self.global_batch = int(resolved.train.global_batch_size)

    def place(self, tree: Any) -> tuple[Any, Any]:
        return place_frozen(tree, self.mesh, self.rules)

    def batch(self, local: Any) -> Any:
        return global_batch_from_local(local, self.batch_sharding, self.global_batch)


class _Encoder:
    """The frozen first stage on the training mesh with a jitted, sharded ``encode_raw``."""

    def __init__(self, placement: _Placement, model: DiffusionModel):
        self.placement = placement
        fs = model.first_stage
        self.variables, shardings = placement.place({"first_stage": fs.variables})
        self.encode = jax.jit(
            lambda frozen, images: fs.encode_raw(frozen["first_stage"], images),
            in_shardings=(shardings, placement.batch_sharding),
            out_shardings=placement.batch_sharding,
        )

    def __call__(self, local_images: np.ndarray) -> jax.Array:
        """This process's rows of a global image batch -> the global ``encode_raw`` batch."""
        return self.encode(self.variables, self.placement.batch(np.asarray(local_images, np.float32)))


def estimate_scale_factor(
    model: DiffusionModel, batches: Callable[[int], jax.Array], num_batches: int, seed: int = 0
) -> float:
    """1 / std of the unscaled latents z over ``num_batches`` batches (LDM's ``scale_by_std``,
    with the mean and second moment pooled over the batches). ``batches(i)`` returns global
    batch i as ``encode_raw`` output (a global array). Posterior samples use ``seed``."""
    fs = model.first_stage

    @jax.jit
    def moments(raw, key):
        z = fs.unscaled_latents(raw, key, model.sample_posterior).astype(jnp.float32)
        return jnp.stack([jnp.sum(z), jnp.sum(z * z), jnp.asarray(z.size, jnp.float32)])

    total = np.zeros(3, np.float64)
    for i in range(max(1, int(num_batches))):
        raw = batches(i)
        key = jax.random.fold_in(jax.random.key(seed), i)
        total += np.asarray(jax.device_get(moments(raw, key)), np.float64)
    mean = total[0] / total[2]
    var = max(total[1] / total[2] - mean * mean, 0.0)
    std = float(np.sqrt(var))
    if not np.isfinite(std) or std <= 0:
        raise FloatingPointError(f"cannot estimate scale_factor: latent std is {std}")
    return 1.0 / std


class LatentCacheSource:
    """A data source over an encoded dataset: ``{"raw": float32 [h, w, k], "label"?, "caption"?}``
    with ``raw`` the first stage's ``encode_raw`` output (see :class:`FrozenFirstStage`)."""

    def __init__(self, directory: str):
        with open(os.path.join(directory, "info.json")) as f:
            self.info = json.load(f)
        self.raw = np.load(os.path.join(directory, "latents.npy"), mmap_mode="r")
        labels_path = os.path.join(directory, "labels.npy")
        self.labels = np.load(labels_path) if os.path.isfile(labels_path) else None
        captions_path = os.path.join(directory, "captions.json")
        self.captions = None
        if os.path.isfile(captions_path):
            with open(captions_path) as f:
                self.captions = json.load(f)
        self.name = f"latent_cache:{directory}"
        self.resolution = int(self.info["resolution"])
        self.channels = int(self.info["channels"])
        self.num_classes = self.info.get("num_classes")
        self.has_captions = self.captions is not None
        self.num_skipped = int(self.info.get("num_skipped", 0))

    def __len__(self) -> int:
        return int(self.raw.shape[0])

    def __getitem__(self, index: int) -> dict:
        example = {"raw": np.asarray(self.raw[int(index)], np.float32)}
        if self.labels is not None:
            example["label"] = self.labels[int(index)]
        if self.captions is not None:
            example["caption"] = self.captions[int(index)]
        return example


def _cache_key(config: Any, model: DiffusionModel, num_examples: int) -> dict:
    return {
        "format": CACHE_FORMAT,
        "data": _data_dict(config),
        "first_stage": dict(model.first_stage.description),
        "num_examples": int(num_examples),
        "raw_shape": [model.latent_size, model.latent_size, model.first_stage.raw_channels()],
    }


def build_latent_cache(
    config: Any, model: DiffusionModel, source: Any, encoder: _Encoder, directory: str
) -> LatentCacheSource:
    """Encode ``source`` once (in index order, global batches over all processes) into
    ``directory`` and return the cached source; an existing complete cache for the same data
    and first stage is reused."""
    from jax.experimental import multihost_utils

    key = _cache_key(config, model, len(source))
    info_path = os.path.join(directory, "info.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            found = json.load(f)
        if {k: found.get(k) for k in key} == json.loads(json.dumps(key)):
            log.info("using the latent cache in %s (%d examples)", directory, len(source))
            return LatentCacheSource(directory)
        raise ValueError(
            f"latent cache {directory} was built for other data or another first stage; "
            "delete it or set config.first_stage.cache_dir elsewhere"
        )
    n = len(source)
    batch = encoder.placement.global_batch
    loader = DataLoader(source, batch, shuffle=False)  # stream 0..N-1, 0.. in index order
    num_batches = -(-n // batch)
    main = jax.process_index() == 0
    tmp = f"{directory}.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        raw_out = np.lib.format.open_memmap(
            os.path.join(tmp, "latents.npy"), mode="w+", dtype=np.float32, shape=(n, *key["raw_shape"])
        )
    labels = np.zeros((n,), np.int32) if source.num_classes else None
    captions = [""] * n if source.has_captions else None
    multi = jax.process_count() > 1
    log.info("encoding %d examples into the latent cache %s", n, directory)
    for b in range(num_batches):
        local = loader.get_batch(b)
        raw = encoder(local["image"])
        raw = np.asarray(multihost_utils.process_allgather(raw, tiled=True)) if multi else np.asarray(raw)
        batch_labels = None
        if labels is not None:
            batch_labels = local["label"]
            if multi:
                batch_labels = np.asarray(multihost_utils.process_allgather(np.asarray(batch_labels), tiled=True))
        indices = loader.sampler.global_batch_indices(b)
        keep = np.arange(b * batch, (b + 1) * batch) < n  # the last batch wraps around
        if main:
            raw_out[indices[keep]] = raw[keep]
            if batch_labels is not None:
                labels[indices[keep]] = np.asarray(batch_labels)[keep]
            if captions is not None:
                # Other processes' captions are host strings: process 0 reads them again.
                batch_captions = local["caption"] if not multi else [source[int(i)]["caption"] for i in indices]
                for i, caption, kept in zip(indices, batch_captions, keep):
                    if kept:
                        captions[int(i)] = caption
    if main:
        raw_out.flush()
        del raw_out
        if labels is not None:
            np.save(os.path.join(tmp, "labels.npy"), labels)
        if captions is not None:
            with open(os.path.join(tmp, "captions.json"), "w") as f:
                json.dump(captions, f)
        with open(os.path.join(tmp, "info.json"), "w") as f:
            json.dump(
                {
                    **key,
                    "resolution": int(source.resolution),
                    "channels": int(source.channels),
                    "num_classes": source.num_classes,
                    "num_skipped": int(getattr(source, "num_skipped", 0)),
                },
                f,
                indent=2,
            )
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("ldm_jax latent cache written")
    loader.close()
    return LatentCacheSource(directory)


# ----------------------------------------------------------------------------- preview


def preview_conditions(model: DiffusionModel, preview: Any, source: Any = None) -> tuple[dict, dict | None, int, list]:
    """The preview's host inputs: ``(cond, uncond or None, num_images, row_names)``; rows are
    classes 0.. (class models) or prompts, each repeated ``preview.columns`` times."""
    c = model.conditioning
    columns = max(1, int(preview.columns))
    if c.kind == "class":
        rows = list(range(min(int(c.num_classes), int(preview.max_rows))))
        labels = np.repeat(np.asarray(rows, np.int32), columns)
        n = len(labels)
        return c.host_inputs(labels=labels), c.null_inputs(n), n, [str(r) for r in rows]
    if c.kind in ("text", "clip"):
        prompts = [str(p) for p in (preview.prompts or [])]
        if not prompts and source is not None:
            seen = []
            for i in range(min(len(source), 500)):
                caption = source[i].get("caption", "")
                if caption and caption not in seen:
                    seen.append(caption)
                if len(seen) >= int(preview.max_rows):
                    break
            prompts = seen
        if not prompts:
            raise ValueError("config.preview.prompts is empty and no captions were found for the preview")
        prompts = prompts[: int(preview.max_rows)]
        captions = [p for p in prompts for _ in range(columns)]
        n = len(captions)
        return c.host_inputs(captions=captions), c.null_inputs(n), n, prompts
    n = int(preview.num_images)
    return {}, None, n, []


def make_preview_fn(
    model: DiffusionModel, preview: Any, frozen_placed: Any, cond: dict, uncond: dict | None, n: int,
    out_sharding: Any = None,
):
    """``preview(ema_params, key) -> uint8 [N, H, W, C]``: one jitted sampling program whose
    arguments are the EMA params, the frozen params and the conditions (nothing large is
    a compile-time constant). ``out_sharding``: replicated, so every process can read it."""
    guidance = float(preview.guidance_scale)

    @functools.partial(jax.jit, out_shardings=out_sharding)
    def run(params, frozen, cond, uncond, key):
        return model.generate(
            params, frozen, cond, uncond, key,
            num_images=n, sampler=preview.sampler, num_steps=int(preview.num_steps), guidance_scale=guidance,
        )

    cond_j = jax.tree.map(jnp.asarray, cond)
    uncond_j = None if uncond is None else jax.tree.map(jnp.asarray, uncond)

    def preview_fn(params, key):
        images = run(params, frozen_placed, cond_j, uncond_j, key)
        return np.round(np.asarray(jax.device_get(images)) * 255.0).astype(np.uint8)

    return preview_fn


# ----------------------------------------------------------------------------- stage


@dataclasses.dataclass(frozen=True)
class DiffusionStage(Stage):
    """A :class:`Stage` plus what ``train.py`` needs beyond the protocol: the data source to
    train on when it differs from the configured one (the latent cache), the preview grid's
    columns, and the model (for ``from_workdir`` and tests)."""

    data_source: Any = None
    preview_columns: int = 0
    model: DiffusionModel | None = None
    preview_rows: Sequence[str] = ()


def dataset_info(data_stats: Any) -> dict:
    """The JSON facts about the data that ``build_model`` needs (stored in checkpoint metadata)."""
    return {
        "num_classes": None if data_stats.num_classes is None else int(data_stats.num_classes),
        "has_captions": bool(data_stats.has_captions),
        "resolution": int(data_stats.resolution),
        "channels": int(data_stats.channels),
        "class_names": None if data_stats.class_names is None else [str(n) for n in data_stats.class_names],
    }


def _resumed_scale_factor(config: Any) -> float | None:
    workdir = config.get("workdir")
    if not workdir:
        return None
    from ldm_jax.training.workdir import latest_metadata

    meta = latest_metadata(workdir)
    if meta is None or meta.get("scale_factor") is None:
        return None
    return float(meta["scale_factor"])


def _params_hash(tree: Any) -> str:
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(nn.meta.unbox(tree)):
        array = np.asarray(leaf)
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def build_stage(config: Any, data_stats: Any, source: Any = None) -> DiffusionStage:
    """The diffusion stage for ``config`` and the dataset (``data_stats``; ``source`` is the
    dataset itself, built from ``config.data`` when None, used for the scale-factor estimate,
    the latent cache and default preview prompts). ``config.workdir`` (set by ``train.py``)
    locates a previous run's checkpoints to resume the scale factor from."""
    fs_config = _section(config, "first_stage", first_stage_defaults())
    preview_config = _section(config, "preview", preview_defaults())
    info = dataset_info(data_stats)
    model = build_model(config, info)
    fs = model.first_stage
    if source is None and (fs.kind != "identity" or model.conditioning.kind in ("text", "clip")):
        source = build_dataset(config.data)

    placement = _Placement(config)
    encoder = None
    data_source = None
    if fs.kind != "identity":
        encoder = _Encoder(placement, model)
        if fs_config.cache_latents:
            cache_dir = fs_config.cache_dir or os.path.join(str(config.get("workdir") or "."), "latent_cache")
            data_source = build_latent_cache(config, model, source, encoder, os.path.abspath(cache_dir))

    # scale factor: explicit > stored in this run's checkpoints > estimated from data
    if fs.kind == "identity":
        scale, how = 1.0, "identity"
    elif float(fs_config.scale_factor) > 0:
        scale, how = float(fs_config.scale_factor), "config"
    else:
        scale, how = _resumed_scale_factor(config), "checkpoint"
        if scale is None:
            loader = DataLoader(
                source, placement.global_batch, seed=int(_data_dict(config).get("seed", 0)),
                shuffle=bool(_data_dict(config).get("shuffle", True)),
            )
            if data_source is not None:
                cached = DataLoader(
                    data_source, placement.global_batch, seed=loader.sampler.seed, shuffle=loader.sampler.shuffle
                )

                def batches(i):
                    return placement.batch(cached.get_batch(i)["raw"])
            else:

                def batches(i):
                    return encoder(loader.get_batch(i)["image"])

            scale = estimate_scale_factor(model, batches, int(fs_config.scale_batches), int(config.seed))
            how = f"estimated over {int(fs_config.scale_batches)} batches"
    log.info("diffusion stage: first stage %s, scale_factor %.6g (%s)", fs.kind, scale, how)
    model = dataclasses.replace(model, first_stage=fs.with_scale(scale))
    c = model.conditioning

    train_source = data_source if data_source is not None else source

    def host_batch(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        out = {}
        if "raw" in batch:
            out["raw"] = np.asarray(batch["raw"], np.float32)
        else:
            out["image"] = np.asarray(batch["image"], np.float32)
        if c.kind == "class":
            out.update(c.host_inputs(labels=batch["label"]))
        elif c.kind in ("text", "clip"):
            out.update(c.host_inputs(captions=batch["caption"]))
        return out

    task = Task(
        init_params=model.init_params,
        loss_fn=model.loss_fn,
        frozen_params=model.frozen_params(),
        prepare_batch=model.prepare_batch,
    )

    # Compiled on first use; the frozen params are placed (replicated) once, as arguments.
    cond, uncond, n, rows = preview_conditions(model, preview_config, source)
    frozen_placed, _ = place_frozen(model.frozen_params(), placement.mesh, ())
    preview_fn = make_preview_fn(model, preview_config, frozen_placed, cond, uncond, n, placement.replicated)

    def export(params, directory):
        pipe = model.pipeline(params)
        from ldm_jax.pipeline import save_model_folder

        save_model_folder(
            pipe, directory, overwrite=True,
            provenance={"workdir": str(config.get("workdir") or ""), "scale_factor": float(scale),
                        "first_stage": dict(fs.description)},
        )

    metadata = {
        "stage": "diffusion",
        "scale_factor": float(scale),
        "scale_factor_source": how,
        "data": info,
        "first_stage": dict(fs.description),
    }
    if fs.kind != "identity":
        metadata["first_stage_params_hash"] = _params_hash(fs.variables)
    return DiffusionStage(
        task=task,
        host_batch=host_batch,
        preview=preview_fn,
        export=export,
        metadata=metadata,
        data_source=train_source if data_source is not None else None,
        preview_columns=max(1, int(preview_config.columns)) if c.is_conditional else 0,
        model=model,
        preview_rows=tuple(rows),
    )
