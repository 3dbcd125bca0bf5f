"""Config sections of a diffusion model and the one way a section is merged over its defaults.

JAX-free on purpose: experiment configs (``configs/<name>.py``) import these defaults, and a
config must load without importing JAX (quick ``--help``, config tooling, tests of configs).

``config.unet`` holds :class:`ldm_jax.models.unet.UNet` fields under their own names (plus
``dtype`` as a string and ``cross_attention_dim`` 0 for "the conditioning's width"): the
U-Net is built in one hop as ``UNet(**derived, **config.unet)`` (``ldm_jax.ldm.model``), so
any U-Net field, including ones added later, can be set from the config.
"""

from __future__ import annotations

from typing import Any, Sequence

import ml_collections
from ml_collections.config_dict import placeholder

# Compute dtypes by config name (params stay float32); the JAX dtype is looked up in
# ``compute_dtype`` so that this module does not import JAX.
DTYPE_NAMES = ("float32", "bfloat16")
FIRST_STAGE_SOURCES = ("identity", "workdir", "diffusers")
CONDITIONING_KINDS = ("none", "class", "text", "clip", "sdxl")
SCHEDULES = ("linear", "scaled_linear", "cosine")
PREDICTIONS = ("eps", "v", "x0")
WEIGHTINGS = ("simple", "min_snr")
OBJECTIVES = ("ddpm", "flow")
# Flow objective (ldm_jax.diffusion.flow): what the network regresses, the loss weighting and
# the training-time t density (names as in ldm_jax.diffusion.flow; checked there too).
FLOW_PREDICTIONS = ("velocity", "eps", "x0")
FLOW_WEIGHTINGS = ("simple", "min_snr", "sigma_sqrt", "cosmap")
FLOW_TIME_DENSITIES = ("uniform", "logit_normal", "mode", "cosmap")
AUTOENCODER_KINDS = ("kl", "vq")


def choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    """``value`` if it is one of ``choices``; ValueError naming ``name`` and the choices otherwise."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, choices))}")
    return value


def compute_dtype(name: str, what: str):
    """The JAX dtype of a config dtype name (``what`` names the config key in the error)."""
    import jax.numpy as jnp  # here, not at module level: this module must import without JAX

    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[choice(what, name, DTYPE_NAMES)]


def merge_section(
    defaults: ml_collections.ConfigDict, section: Any, name: str, allow_extra: Sequence[str] = ()
) -> ml_collections.ConfigDict:
    """``section`` (``config.<name>``, may be None) over a copy of ``defaults``; a key that is
    neither a default nor in ``allow_extra`` is a ValueError naming it and the known keys.
    Keys in ``allow_extra`` are accepted and dropped (sections shared by stages)."""
    out = ml_collections.ConfigDict(defaults.to_dict())
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
    """``config.unet``: ``ldm_jax.models.unet.UNet`` fields (diffusers' vocabulary). Input and
    output channels, ``sample_size``, the class table and (with ``cross_attention_dim`` 0) the
    cross-attention width are derived from the first stage and the conditioning; any other
    ``UNet`` field may be added to the section."""
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
    """``config.conditioning`` (see ``ldm_jax.ldm.conditioning.CONDITIONER_BUILDERS``)."""
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
            "clip_path": "",  # kind="clip": CLIPTextModel folder or an SD folder; kind="sdxl": an SDXL folder
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
            "denoiser": "unet",  # network family (DENOISER_DEFAULTS); its section is config.<denoiser>
            # Fine-tuning: a fresh run starts the denoiser from this local folder's weights (a
            # diffusers pipeline folder's unet/, a UNet2DConditionModel folder or an ldm_jax model
            # folder; they must match config.unet); None: random init. A resumed run uses its
            # checkpoint and never reads it (ldm_jax.training.resume_guard allows changing it).
            "init_from": placeholder(str),
            "prediction": "eps",  # "eps" | "v" | "x0"
            "weighting": "simple",  # "simple" | "min_snr"
            "min_snr_gamma": 5.0,
            # "ddpm": noise schedule above, diffusion_loss; "flow": rectified flow
            # x_t = (1 - t) x0 + t eps (ldm_jax.diffusion.flow), the model sees num_timesteps * t;
            # the flow_* keys below apply, prediction / schedule / beta_* do not.
            "objective": "ddpm",
            "flow_prediction": "velocity",  # "velocity" | "eps" | "x0"
            "flow_shift": 1.0,  # SD3 time shift s (t' = s t / (1 + (s - 1) t)); training and sampling
            "flow_time_density": "logit_normal",  # "uniform" | "logit_normal" | "mode" | "cosmap"
            "flow_logit_mean": 0.0,
            "flow_logit_std": 1.0,
            "flow_mode_scale": 1.29,
        }
    )


def dit_defaults() -> ml_collections.ConfigDict:
    """``config.dit``: ``ldm_jax.models.dit.DiT`` fields (class labels), or
    ``ldm_jax.models.pixart.PixArtDiT`` fields when the conditioner gives a cross-attention
    context (text, or ``class_as_context``). ``sample_size``, ``in_channels``,
    ``out_channels``, ``num_classes`` and ``cross_attention_dim`` are derived from the first
    stage and the conditioning; any other field of the built module may be added."""
    return ml_collections.ConfigDict(
        {
            "patch_size": 2,
            "num_layers": 6,
            "num_attention_heads": 4,
            "attention_head_dim": 32,  # width = heads x head_dim
            "dropout": 0.0,
            "attention": "xla",  # ldm_jax.kernels backend
            "remat": False,
            "dtype": "float32",  # compute dtype; params stay float32
        }
    )


# Denoiser families by ``config.diffusion.denoiser`` -> the defaults of their config section
# (named like the family: ``config.unet``, ``config.dit``). A new family (MMDiT, ...) adds its
# defaults here and its builder to ``ldm_jax.ldm.model.DENOISER_BUILDERS``.
DENOISER_DEFAULTS = {"unet": unet_defaults, "dit": dit_defaults}


def autoencoder_defaults() -> ml_collections.ConfigDict:
    """``config.autoencoder``: the first-stage model. A small KL-f4 by default."""
    return ml_collections.ConfigDict(
        {
            "kind": "kl",  # "kl" | "vq"
            "block_out_channels": (64, 128, 128),  # downsampling factor 2**(len - 1)
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 32,
            "mid_block_add_attention": True,
            "dtype": "float32",  # compute dtype: "float32" | "bfloat16" (params stay float32)
            # VQ only
            "num_vq_embeddings": 256,
            "vq_embed_dim": 0,  # 0: latent_channels
            "vq_beta": 0.25,
            "vq_use_ema": False,  # not supported by the shared loop (see training.stages.autoencoder)
        }
    )


def schedule_kwargs(diffusion: Any) -> dict:
    """``make_schedule`` keyword arguments of ``config.diffusion`` (also the exported schedule);
    ``make_flow_schedule`` ones for ``objective="flow"``."""
    if diffusion.get("objective", "ddpm") == "flow":
        return {"shift": float(diffusion.flow_shift), "num_train_timesteps": int(diffusion.num_timesteps)}
    out = {"kind": diffusion.schedule, "num_timesteps": int(diffusion.num_timesteps)}
    if diffusion.get("beta_start") is not None:
        out["beta_start"] = float(diffusion.beta_start)
    if diffusion.get("beta_end") is not None:
        out["beta_end"] = float(diffusion.beta_end)
    if diffusion.get("rescale_zero_terminal_snr"):
        out["rescale_to_zero_terminal_snr"] = True
    return out
