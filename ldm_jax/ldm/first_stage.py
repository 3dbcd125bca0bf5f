"""First stages: pixels <-> what the U-Net sees, all NHWC, images in [-1, 1].

Adapters (one per autoencoder family, uniform interface):

* :class:`KLFirstStage` - ``AutoencoderKL`` (Stable Diffusion's VAE);
* :class:`VQFirstStage` - ``VQModel`` (LDM's VQ-f4/f8; decoding quantises);
* :class:`PixelSpace` - the identity, for pixel-space diffusion.

Each has ``encode(variables, images, noise) -> latents`` (diffusion scale:
``scale_factor * (z - shift_factor)``; ``noise`` None takes the posterior mean),
``decode(variables, latents) -> images`` and, for training, ``encode_raw`` (what a latent
cache stores: KL ``[mean, std]``, VQ pre-quantisation latents, pixels), ``unscaled_latents``
(raw -> z, a posterior sample for KL) and ``to_diffusion`` (z -> diffusion scale).

Building and loading (the one place for each): :func:`build_autoencoder` (a
``config.autoencoder`` section -> module), :func:`load_autoencoder_folder` (a diffusers
``AutoencoderKL`` / ``VQModel`` folder), :func:`load_autoencoder_run` (the EMA autoencoder of
a first-stage training run) and :func:`load_first_stage` (``config.first_stage``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.interop.diffusers_vae import load_diffusers_autoencoder_kl, load_diffusers_vq_model
from ldm_jax.ldm.sections import (
    AUTOENCODER_KINDS,
    FIRST_STAGE_SOURCES,
    autoencoder_defaults,
    choice,
    compute_dtype,
    merge_section,
)
from ldm_jax.models.autoencoder import AutoencoderKL, VQModel
from ldm_jax.training import workdir as runs  # read-only access to a training run directory

# Placeholder scale factor of a freshly built / exported autoencoder: the diffusion stage
# estimates the real one (1 / std of the latents) and stores its own.
SCALE_FACTOR_PLACEHOLDER = 1.0

# ----------------------------------------------------------------------------- adapters


class _Autoencoder:
    """What KL and VQ adapters share (``module`` is the autoencoder, carrying ``scale_factor``)."""

    module: Any

    @property
    def factor(self) -> int:
        return self.module.downsample_factor

    @property
    def image_channels(self) -> int:
        return self.module.in_channels

    @property
    def scale_factor(self) -> float:
        return float(self.module.scale_factor)

    def with_scale(self, scale_factor: float):
        """The same adapter whose module carries ``scale_factor``."""
        return type(self)(self.module.clone(scale_factor=float(scale_factor)))

    def decode(self, variables, latents):
        """diffusion latents [B, h, w, latent_channels] -> images [B, h*f, w*f, C], ~[-1, 1]."""
        return self.module.apply(variables, latents, method=lambda m, z: m.decode(m.latents_from_diffusion(z)))

    def to_diffusion(self, z):
        """z -> ``scale_factor * (z - shift_factor)`` (the module's own formula)."""
        return self.module.latents_for_diffusion(z)


@dataclasses.dataclass(frozen=True, eq=False)
class KLFirstStage(_Autoencoder):
    """``AutoencoderKL``; ``encode`` samples the posterior with the given standard-normal
    ``noise`` (or takes its mean when ``noise`` is None)."""

    module: AutoencoderKL
    kind = "kl"

    @property
    def latent_channels(self) -> int:
        return self.module.latent_channels

    @property
    def raw_channels(self) -> int:
        """Channels of ``encode_raw``: the posterior's mean and std."""
        return 2 * self.latent_channels

    def encode(self, variables, images, noise=None):
        """images [B, H, W, C] in [-1, 1] -> diffusion latents [B, H/f, W/f, latent_channels]."""

        def fn(m, x):
            posterior = m.encode(x)
            z = posterior.mean if noise is None else posterior.mean + posterior.std * noise
            return m.latents_for_diffusion(z)

        return self.module.apply(variables, images, method=fn)

    def encode_raw(self, variables, images):
        """images -> ``[mean, std]`` of the posterior (channels concatenated), float32."""

        def moments(m, x):
            posterior = m.encode(x)
            return jnp.concatenate([posterior.mean, posterior.std], axis=-1)

        return self.module.apply(variables, images, method=moments).astype(jnp.float32)

    def unscaled_latents(self, raw, key, sample_posterior: bool):
        """``encode_raw`` output -> z: a posterior sample (``sample_posterior``) or the mean."""
        mean, std = jnp.split(raw, 2, axis=-1)
        if not sample_posterior:
            return mean
        return mean + std * jax.random.normal(key, mean.shape, mean.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class VQFirstStage(_Autoencoder):
    """``VQModel``: the diffusion model works on ``scale_factor * h`` with ``h`` the
    pre-quantisation latents; decoding quantises (as LDM). ``noise`` is ignored."""

    module: VQModel
    kind = "vq"

    @property
    def latent_channels(self) -> int:
        return self.module.embed_dim

    @property
    def raw_channels(self) -> int:
        return self.latent_channels

    def encode(self, variables, images, noise=None):
        return self.module.apply(variables, images, method=lambda m, x: m.latents_for_diffusion(m.encode(x)))

    def encode_raw(self, variables, images):
        """images -> pre-quantisation latents, float32."""
        return self.module.apply(variables, images, method=lambda m, x: m.encode(x)).astype(jnp.float32)

    def unscaled_latents(self, raw, key, sample_posterior: bool):
        return raw


@dataclasses.dataclass(frozen=True)
class PixelSpace:
    """The identity first stage of a pixel-space diffusion model (``channels`` image channels)."""

    channels: int = 3
    kind = "identity"
    factor = 1
    scale_factor = 1.0

    @property
    def latent_channels(self) -> int:
        return self.channels

    @property
    def image_channels(self) -> int:
        return self.channels

    @property
    def raw_channels(self) -> int:
        return self.channels

    def with_scale(self, scale_factor: float) -> "PixelSpace":
        return self

    def encode(self, variables, images, noise=None):
        return images.astype(jnp.float32)

    def decode(self, variables, latents):
        return latents

    def encode_raw(self, variables, images):
        return images.astype(jnp.float32)

    def unscaled_latents(self, raw, key, sample_posterior: bool):
        return raw

    def to_diffusion(self, z):
        return z


FirstStage = Any  # KLFirstStage | VQFirstStage | PixelSpace


@dataclasses.dataclass(frozen=True)
class LoadedFirstStage:
    """A first stage with its (logically boxed) variables and a JSON ``description`` of where
    it came from (stored with checkpoints and exported models)."""

    adapter: FirstStage
    variables: Any
    description: Mapping[str, Any]

    @property
    def kind(self) -> str:
        return self.adapter.kind

    @property
    def scale_factor(self) -> float:
        return float(self.adapter.scale_factor)

    def with_scale(self, scale_factor: float) -> "LoadedFirstStage":
        return dataclasses.replace(self, adapter=self.adapter.with_scale(scale_factor))


def adapter_for(module: Any) -> FirstStage:
    """The adapter of an autoencoder module."""
    return KLFirstStage(module) if isinstance(module, AutoencoderKL) else VQFirstStage(module)


# ----------------------------------------------------------------------------- building and loading


def build_autoencoder(ae: Any, channels: int, allow_vq_ema: bool = False):
    """The ``AutoencoderKL`` / ``VQModel`` of a completed ``config.autoencoder`` section for
    ``channels``-channel images (``scale_factor`` is the placeholder 1.0). Raises ValueError
    for unknown kinds/dtypes, widths not divisible by the group count, and ``vq_use_ema=True``
    unless ``allow_vq_ema`` (the autoencoder training stage, which keeps the EMA codebook in
    the train state's ``model_state``; a run's checkpoints hold it there, not in its EMA params,
    so a trained run is loaded from its export)."""
    kind = choice("config.autoencoder.kind", ae.kind, AUTOENCODER_KINDS)
    common = dict(
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(int(c) for c in ae.block_out_channels),
        layers_per_block=int(ae.layers_per_block),
        latent_channels=int(ae.latent_channels),
        norm_num_groups=int(ae.norm_num_groups),
        mid_block_add_attention=bool(ae.mid_block_add_attention),
        scale_factor=SCALE_FACTOR_PLACEHOLDER,
        dtype=compute_dtype(ae.dtype, "config.autoencoder.dtype"),
    )
    for c in common["block_out_channels"]:
        if c <= 0 or c % common["norm_num_groups"]:
            raise ValueError(
                f"config.autoencoder.block_out_channels entry {c} is not a positive multiple of "
                f"norm_num_groups={common['norm_num_groups']}"
            )
    if kind == "kl":
        return AutoencoderKL(**common)
    if ae.vq_use_ema and not allow_vq_ema:
        raise ValueError(
            "an autoencoder trained with config.autoencoder.vq_use_ema=True keeps its codebook outside the EMA "
            "params: load its export (first_stage.source='diffusers', first_stage.path=<its workdir>/model)"
        )
    return VQModel(
        use_ema=bool(ae.vq_use_ema),
        num_vq_embeddings=int(ae.num_vq_embeddings),
        vq_embed_dim=int(ae.vq_embed_dim) or None,
        beta=float(ae.vq_beta),
        legacy_beta=False,
        **common,
    )


def load_autoencoder_folder(path: str, dtype=jnp.float32) -> tuple[FirstStage, Any]:
    """``(adapter, variables)`` of a diffusers ``AutoencoderKL`` / ``VQModel`` folder."""
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"missing {config_path}")
    with open(config_path, encoding="utf-8") as f:
        try:
            class_name = json.load(f).get("_class_name", "AutoencoderKL")
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    if class_name == "AutoencoderKL":
        module, params = load_diffusers_autoencoder_kl(path, dtype=dtype)
        return KLFirstStage(module), {"params": params}
    if class_name == "VQModel":
        module, variables = load_diffusers_vq_model(path, dtype=dtype)
        return VQFirstStage(module), variables
    raise ValueError(f"unsupported autoencoder class {class_name!r} in {path} (AutoencoderKL or VQModel)")


def box_like(abstract_boxed: Any, values: Any) -> Any:
    """``values`` (a plain tree) with the logical-axis boxes of ``abstract_boxed`` (e.g.
    ``jax.eval_shape(module.init, ...)``), so frozen params shard like trained ones."""

    def one(box, value):
        if isinstance(box, nn.LogicallyPartitioned):
            if tuple(box.value.shape) != tuple(np.shape(value)):
                raise ValueError(f"restored shape {np.shape(value)} does not match the model's {box.value.shape}")
            return box.replace_boxed(value)
        return value

    return jax.tree.map(one, abstract_boxed, values, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def load_autoencoder_run(workdir: str | os.PathLike, step: int | None = None, *, dtype: Any = jnp.float32):
    """The EMA autoencoder of an autoencoder training run (checkpoint ``step`` or the latest)
    as a :class:`LoadedFirstStage` (scale factor 1, boxed variables)."""
    config = runs.read_config(workdir)
    if config.get("stage") != "autoencoder":
        raise ValueError(f"{workdir} is a {config.get('stage')!r} run, not an autoencoder run")
    ema, step = runs.restore_ema_params(workdir, step)
    params = ema["autoencoder"]
    channels = int(np.shape(params["encoder"]["conv_in"]["kernel"])[2])
    section = merge_section(autoencoder_defaults(), config.get("autoencoder"), "autoencoder")
    module = build_autoencoder(section, channels).clone(dtype=dtype)
    resolution = int(config.get("data", {}).get("resolution", 8 * module.downsample_factor))
    image = jax.ShapeDtypeStruct((1, resolution, resolution, channels), jnp.float32)
    abstract = jax.eval_shape(module.init, jax.random.key(0), image)
    variables = box_like({"params": abstract["params"]}, {"params": params})
    description = {"source": "workdir", "workdir": os.path.abspath(os.fspath(workdir)), "step": int(step)}
    return LoadedFirstStage(adapter_for(module), variables, description)


def load_first_stage(fs_config: Any, channels: int) -> LoadedFirstStage:
    """The frozen first stage described by a completed ``config.first_stage`` for
    ``channels``-channel data (scale factor 1 for now)."""
    source = choice("config.first_stage.source", fs_config.source, FIRST_STAGE_SOURCES)
    dtype = compute_dtype(fs_config.dtype, "config.first_stage.dtype")
    if source == "identity":
        return LoadedFirstStage(PixelSpace(int(channels)), {}, {"source": "identity", "channels": int(channels)})
    if source == "workdir":
        if not fs_config.workdir:
            raise ValueError("config.first_stage.source='workdir' needs config.first_stage.workdir")
        loaded = load_autoencoder_run(fs_config.workdir, fs_config.get("step"), dtype=dtype)
    else:
        path = str(fs_config.path or "")
        if not path:
            raise ValueError("config.first_stage.source='diffusers' needs config.first_stage.path")
        if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(
            os.path.join(path, "vae", "config.json")
        ):
            path = os.path.join(path, "vae")  # a Stable Diffusion folder
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"config.first_stage.path {fs_config.path!r} holds no diffusers autoencoder config.json")
        adapter, variables = load_autoencoder_folder(path, dtype)
        loaded = LoadedFirstStage(adapter, variables, {"source": "diffusers", "path": os.path.abspath(path)})
    if loaded.adapter.image_channels != channels:
        raise ValueError(
            f"the first stage takes {loaded.adapter.image_channels}-channel images but the data has {channels} "
            f"channels (set config.data.channels={loaded.adapter.image_channels})"
        )
    return loaded.with_scale(1.0)
