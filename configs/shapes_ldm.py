"""Text-conditional latent diffusion on the generated shapes, with a from-scratch text encoder.

    python train.py --config configs/shapes_autoencoder.py --workdir runs/shapes_ae
    python train.py --config configs/shapes_ldm.py --workdir runs/shapes_ldm \
        --config.first_stage.workdir=runs/shapes_ae
    python train.py --config configs/shapes_ldm.py:runlocal ...   # seconds, for smoke tests

Captions such as "a small red circle at the top left on a black background" are byte-tokenized
and encoded by a small ``TextTransformer`` trained jointly with the U-Net (LDM's text-to-image
recipe); the U-Net reads them through cross-attention at its two coarser levels. 10% of the
captions are replaced by the empty caption for classifier-free guidance. Pixel-space variant:
``--config.first_stage.source=identity``.
"""

from __future__ import annotations

from configs import base
from ldm_jax.training.stages.sections import add_diffusion_sections


def get_config(arg: str | None = None):
    local = base.is_local(arg)
    c = add_diffusion_sections(base.get_base_config("diffusion"))
    c.data = base.data_config("shapes", 32)
    c.data.shapes_num_examples = 50_000

    c.first_stage.source = "workdir"
    c.first_stage.workdir = "runs/shapes_ae"
    c.first_stage.scale_batches = 8

    c.unet.block_out_channels = (64, 128, 256)
    c.unet.layers_per_block = 2
    c.unet.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    c.unet.up_block_types = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    c.unet.mid_block_type = "UNetMidBlock2DCrossAttn"
    c.unet.attention_head_dim = 4

    c.conditioning.kind = "text"
    c.conditioning.drop_prob = 0.1
    c.conditioning.text_max_length = 64
    c.conditioning.text_width = 128
    c.conditioning.text_depth = 3
    c.conditioning.text_heads = 4

    c.diffusion.schedule = "scaled_linear"
    c.diffusion.prediction = "v"
    c.diffusion.weighting = "min_snr"

    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 500
    c.optimizer.weight_decay = 0.0
    c.ema.decay = 0.999

    c.train.global_batch_size = 64
    c.train.num_steps = 20_000
    c.train.log_every = 100
    c.checkpoint.every_steps = 1000
    c.preview.every_steps = 2000
    c.preview.columns = 6
    c.preview.max_rows = 6
    c.preview.prompts = [
        "a large red circle in the center on a black background",
        "a small blue square at the top left on a white background",
        "a medium yellow star at the bottom right on a navy background",
        "a large green triangle on the left on a gray background",
        "a small white diamond at the top on a black background",
        "a medium purple circle on the right on a white background",
    ]

    if local:
        base.shrink_for_local(c, 4)
        c.data.shapes_num_examples = 256
        c.unet.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
        c.unet.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
        c.unet.mid_block_type = "UNetMidBlock2D"
        c.unet.attention_head_dim = 2
        c.conditioning.text_max_length = 16
        c.conditioning.text_width = 32
        c.conditioning.text_depth = 1
        c.conditioning.text_heads = 2
        c.preview.max_rows = 2
        c.preview.prompts = []
    return c
