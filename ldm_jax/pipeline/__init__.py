"""Generation: :class:`LatentDiffusionPipeline` (text / class / unconditional sampling, img2img,
inpainting, low-res-conditioned super-resolution; one jitted program per shape, sharded over
all devices, images reproducible per (seed, image index)), its components, and model folders."""

from ldm_jax.pipeline.components import (
    ClassConditioner,
    KLFirstStage,
    PixelSpace,
    TextConditioner,
    Unconditional,
    VQFirstStage,
    latent_mask,
    low_res_condition,
    masked_image,
)
from ldm_jax.pipeline.loading import load_model_folder, read_scheduler_config, save_model_folder
from ldm_jax.pipeline.pipeline import LatentDiffusionPipeline, enable_compilation_cache, params_fingerprint

__all__ = [
    "ClassConditioner",
    "KLFirstStage",
    "LatentDiffusionPipeline",
    "PixelSpace",
    "TextConditioner",
    "Unconditional",
    "VQFirstStage",
    "enable_compilation_cache",
    "latent_mask",
    "load_model_folder",
    "low_res_condition",
    "masked_image",
    "params_fingerprint",
    "read_scheduler_config",
    "save_model_folder",
]
