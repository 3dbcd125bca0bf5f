"""Inference: :class:`LatentDiffusionPipeline` (text / class / unconditional sampling, img2img,
inpainting, low-res-conditioned super-resolution; one jitted program per shape, sharded over
all devices, images reproducible per (seed, image index)), request validation, model folders
(read / write) and pipelines from training runs.

The components (first stages, conditioners, concat conditions) live in the shared model layer
``ldm_jax.ldm`` and are re-exported here for convenience.
"""

from ldm_jax.ldm.conditioning import (
    ClassConditioner,
    TextConditioner,
    Unconditional,
    latent_mask,
    low_res_condition,
    masked_image,
)
from ldm_jax.ldm.first_stage import KLFirstStage, PixelSpace, VQFirstStage
from ldm_jax.ldm.model import params_fingerprint
from ldm_jax.pipeline.from_training import from_workdir, pipeline_from_model
from ldm_jax.pipeline.loading import read_model_folder, read_scheduler_config, save_model_folder
from ldm_jax.pipeline.pipeline import LatentDiffusionPipeline, enable_compilation_cache, load_model_folder

__all__ = [
    "ClassConditioner",
    "KLFirstStage",
    "LatentDiffusionPipeline",
    "PixelSpace",
    "TextConditioner",
    "Unconditional",
    "VQFirstStage",
    "enable_compilation_cache",
    "from_workdir",
    "latent_mask",
    "load_model_folder",
    "low_res_condition",
    "masked_image",
    "params_fingerprint",
    "pipeline_from_model",
    "read_model_folder",
    "read_scheduler_config",
    "save_model_folder",
]
