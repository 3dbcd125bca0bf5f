"""Tiny base models for the fine-tuning tests (tests/test_lora_training.py, tests/test_dreambooth.py)."""

from __future__ import annotations

import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from configs import shapes_ldm
from ldm_jax.ldm.model import build_model
from ldm_jax.pipeline import pipeline_from_model, save_model_folder


def tiny_text_config():
    """shapes_ldm:runlocal in pixel space at 8x8: a text-conditioned U-Net with cross-attention
    and a from-scratch TextTransformer."""
    c = shapes_ldm.get_config("runlocal")
    c.first_stage.source = "identity"
    c.data.resolution = 8
    c.unet.block_out_channels = (8, 8)
    c.unet.norm_num_groups = 4
    c.conditioning.text_width = 16
    c.conditioning.text_max_length = 8
    return c


def random_params(boxed_abstract, seed: int):
    """NumPy random values for an abstract param tree (no compiled init program)."""
    rng = np.random.default_rng(seed)

    def one(s):
        fan_in = math.prod(s.shape[:-1]) or 1
        return jnp.asarray(rng.standard_normal(s.shape, np.float32) / math.sqrt(fan_in))

    return jax.tree.map(one, nn.meta.unbox(boxed_abstract))


def save_tiny_base(folder: str, seed: int = 0) -> str:
    """A random tiny text-conditioned model written as an ldm_jax model folder."""
    config = tiny_text_config()
    info = {"num_classes": None, "has_captions": True, "resolution": 8, "channels": 3}
    model = build_model(config, info)
    params = random_params(jax.eval_shape(model.init_params, jax.random.key(0)), seed)
    save_model_folder(pipeline_from_model(model, params), folder, overwrite=True)
    return folder


def write_image_folder(root: str, images: np.ndarray, labels=None) -> str:
    """uint8 [N, H, W, C] images as PNGs (in subfolders named by ``labels`` when given)."""
    for i, image in enumerate(images):
        sub = root if labels is None else os.path.join(root, str(labels[i]))
        os.makedirs(sub, exist_ok=True)
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(os.path.join(sub, f"{i:04d}.png"))
    return root
