"""Unconditional diffusion on CelebA faces at 64x64 from TensorFlow Datasets (``celeb_a``, center
crop), in pixel space by default or on a trained autoencoder
(``--config.first_stage.source=workdir --config.first_stage.workdir=<autoencoder run>``).
The dataset must be prepared locally (``--config.data.data_dir``).

    python train.py --config configs/celeba64_ldm.py --workdir runs/celeba64 --config.data.data_dir=~/tfds

Unconditional U-Nets here are convolutional only: the attention blocks of this U-Net are
cross-attention blocks and need a context.
"""

from __future__ import annotations

from ml_collections.config_dict import placeholder

from configs import base
from ldm_jax.training.stages.sections import add_diffusion_sections


def get_config(arg: str | None = None):
    local = base.is_local(arg)
    c = add_diffusion_sections(base.get_base_config("diffusion"))
    c.data = base.data_config("tfds:celeb_a", 64, data_dir=placeholder(str))
    c.data.label_key = None  # unconditional: ignore any label feature
    c.data.num_threads = 8

    c.first_stage.source = "identity"

    c.unet.block_out_channels = (128, 128, 256, 256, 512)
    c.unet.layers_per_block = 2
    c.unet.down_block_types = ("DownBlock2D",) * 5
    c.unet.up_block_types = ("UpBlock2D",) * 5
    c.unet.mid_block_type = "UNetMidBlock2D"
    c.unet.dropout = 0.1

    c.conditioning.kind = "none"
    c.conditioning.drop_prob = 0.0
    c.diffusion.schedule = "linear"
    c.diffusion.prediction = "eps"

    c.optimizer.learning_rate = 2e-4
    c.optimizer.warmup_steps = 5000
    c.optimizer.weight_decay = 0.0
    c.ema.decay = 0.9999
    c.train.global_batch_size = 128
    c.train.num_steps = 500_000
    c.preview.every_steps = 10_000
    c.preview.num_images = 16
    c.preview.columns = 4

    if local:
        base.shrink_for_local(c, 4)
        c.data.num_threads = 1
        c.preview.num_images = 4
    return c
