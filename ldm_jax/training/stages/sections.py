"""Config sections of the training stages, JAX-free (``configs/<name>.py`` import them; a
config must load without importing JAX).

* autoencoder stage: ``config.autoencoder`` (the model, ``ldm_jax.ldm.sections``) and
  ``config.loss`` (:func:`loss_defaults`);
* diffusion stage: ``config.first_stage`` / ``unet`` / ``conditioning`` / ``diffusion`` (the
  model, ``ldm_jax.ldm.sections``) and ``config.preview`` (:func:`diffusion_preview_defaults`);
* controlnet stage: ``config.controlnet`` (:func:`controlnet_defaults`) and ``config.preview``
  (the diffusion preview keys plus ``controlnet_scale``).
"""

from __future__ import annotations

import ml_collections

from ldm_jax.ldm.sections import (
    autoencoder_defaults,
    conditioning_defaults,
    diffusion_defaults,
    first_stage_defaults,
    unet_defaults,
)


def loss_defaults() -> ml_collections.ConfigDict:
    """``config.loss``: the taming / LDM first-stage loss and its discriminator."""
    return ml_collections.ConfigDict(
        {
            "pixel_loss": "l1",  # "l1" | "l2"
            "perceptual_weight": 1.0,  # used only when lpips_path is set
            "lpips_path": "",  # local LPIPS lin weights (lpips package layout); "" = perceptual OFF
            "lpips_vgg_path": "",  # torchvision vgg16 state dict, if lpips_path holds only lin weights
            "kl_weight": 1e-6,
            "codebook_weight": 1.0,
            "logvar_init": 0.0,
            # GAN: off entirely when disc_weight == 0 or disc_factor == 0 (no discriminator params)
            "disc_weight": 0.5,
            "disc_factor": 1.0,
            "disc_start": 50001,  # first step (updates done) at which the GAN terms are on
            "disc_loss": "hinge",  # "hinge" | "vanilla"
            "adaptive_disc_weight": True,
            "disc_layers": 3,
            "disc_channels": 64,
            "disc_norm": "group",  # "group" | "none"
            "disc_norm_groups": 32,
        }
    )


def diffusion_preview_defaults() -> ml_collections.ConfigDict:
    """``config.preview`` keys the diffusion stage reads (beside ``every_steps`` / ``seed``)."""
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
            # (t_low, t_high): guide only at those timesteps (ldm_jax.diffusion.guidance); (): all
            "guidance_interval": (),
        }
    )


def add_autoencoder_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add the autoencoder stage's default sections to a base config (in place)."""
    with config.unlocked():
        config.autoencoder = autoencoder_defaults()
        config.loss = loss_defaults()
    return config


def add_diffusion_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add the diffusion stage's default sections to a base config (in place); the base
    config's ``preview.every_steps`` / ``seed`` are kept."""
    with config.unlocked():
        config.first_stage = first_stage_defaults()
        config.unet = unet_defaults()
        config.conditioning = conditioning_defaults()
        config.diffusion = diffusion_defaults()
        preview = diffusion_preview_defaults()
        for key, value in (config.get("preview") or {}).items():
            if key in ("every_steps", "seed"):
                preview[key] = value
        config.preview = preview
    return config


def controlnet_defaults() -> ml_collections.ConfigDict:
    """``config.controlnet``: a ControlNet trained on a frozen base model folder."""
    return ml_collections.ConfigDict(
        {
            "base": "",  # the frozen base: an ldm_jax model folder or a diffusers SD folder (required)
            # () = SD's (16, 32, 96, 256) cut to log2(first-stage factor) + 1 entries, so the
            # control image is at the image size (8x the latents for SD, 4x for the shapes LDM).
            "conditioning_embedding_out_channels": (),
            "init": "",  # "" = copy the U-Net's encoder (diffusers from_unet); else a diffusers ControlNet folder
            "drop_prob": 0.1,  # condition -> null (empty caption / null class) for guidance, as the base was trained
            "weighting": "simple",  # loss weighting over timesteps: "simple" | "min_snr"
            "min_snr_gamma": 5.0,
            # ldm_jax.kernels.conv formulation of the frozen U-Net's and the ControlNet's convs
            # while training ("auto": the per-shape fastest on CPU); the parameters and the
            # exported ControlNet are the same whichever runs.
            "conv_impl": "xla",
        }
    )


def controlnet_preview_defaults() -> ml_collections.ConfigDict:
    """``config.preview`` of the controlnet stage: the diffusion keys plus the ControlNet's scale."""
    preview = diffusion_preview_defaults()
    preview.controlnet_scale = 1.0
    return preview


def add_controlnet_sections(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Add the controlnet stage's default sections to a base config (in place); the base
    config's ``preview.every_steps`` / ``seed`` are kept."""
    with config.unlocked():
        config.controlnet = controlnet_defaults()
        preview = controlnet_preview_defaults()
        for key, value in (config.get("preview") or {}).items():
            if key in ("every_steps", "seed"):
                preview[key] = value
        config.preview = preview
    return config
