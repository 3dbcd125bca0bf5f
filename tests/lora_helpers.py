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


def save_tiny_sd_folder(folder: str) -> str:
    """A random-weight diffusers Stable Diffusion folder (UNet2DConditionModel, AutoencoderKL,
    CLIPTextModel, CLIPTokenizer, DDIMScheduler, model_index.json), tiny: 16-pixel images,
    8x8x4 latents."""
    import json
    import shutil

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    torch.manual_seed(0)
    os.makedirs(folder, exist_ok=True)
    chars = [chr(b) for b in range(33, 127)]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab_dir = os.path.join(folder, "_vocab")
    os.makedirs(vocab_dir, exist_ok=True)
    with open(os.path.join(vocab_dir, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(vocab_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = HFCLIPTokenizer(os.path.join(vocab_dir, "vocab.json"), os.path.join(vocab_dir, "merges.txt"),
                                model_max_length=8)
    n = len(tokenizer)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=n, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1,
    )).eval()
    vae = AutoencoderKL(block_out_channels=(8, 8), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2,
    ).eval()
    vae.save_pretrained(os.path.join(folder, "vae"))
    text.save_pretrained(os.path.join(folder, "text_encoder"))
    unet.save_pretrained(os.path.join(folder, "unet"))
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(os.path.join(vocab_dir, name), os.path.join(folder, "tokenizer", name))
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
        os.path.join(folder, "scheduler"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump({
            "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
            "safety_checker": [None, None], "feature_extractor": [None, None],
        }, f)
    return folder
