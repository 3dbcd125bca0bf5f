"""Class-conditional pixel-space diffusion on CIFAR-10 from TensorFlow Datasets: a DDPM-sized
U-Net (35M parameters) with self/cross-attention at 16x16 and 8x8; the class enters as a
one-token cross-attention context (``ClassEmbedder``) so the attention blocks have something
to attend to. The dataset must be prepared locally (``--config.data.data_dir``).

    python train.py --config configs/cifar10_ldm.py --workdir runs/cifar10 --config.data.data_dir=~/tfds
    # 8 accelerators, params/optimizer sharded:
    python train.py --config configs/cifar10_ldm.py --workdir runs/cifar10 \
        --config.mesh.shape.fsdp=8 --config.mesh.shape.data=1 --config.sharding.preset=fsdp
"""

from __future__ import annotations

from ml_collections.config_dict import placeholder

from configs import base
from ldm_jax.training.stages.sections import add_diffusion_sections


def get_config(arg: str | None = None):
    local = base.is_local(arg)
    c = add_diffusion_sections(base.get_base_config("diffusion"))
    c.data = base.data_config("tfds:cifar10", 32, data_dir=placeholder(str))
    c.data.num_threads = 8

    c.first_stage.source = "identity"

    c.unet.block_out_channels = (128, 256, 256, 256)
    c.unet.layers_per_block = 2
    c.unet.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    c.unet.up_block_types = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    c.unet.mid_block_type = "UNetMidBlock2DCrossAttn"
    c.unet.attention_head_dim = 4
    c.unet.dropout = 0.1

    c.conditioning.kind = "class"
    c.conditioning.class_as_context = True
    c.conditioning.class_embed_dim = 256
    c.conditioning.drop_prob = 0.1
    c.diffusion.schedule = "cosine"
    c.diffusion.prediction = "v"
    c.diffusion.weighting = "min_snr"

    c.optimizer.learning_rate = 2e-4
    c.optimizer.warmup_steps = 5000
    c.optimizer.weight_decay = 0.0
    c.ema.decay = 0.9999
    c.train.global_batch_size = 128
    c.train.num_steps = 400_000
    c.preview.every_steps = 10_000

    if local:
        base.shrink_for_local(c, 4)
        c.unet.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
        c.unet.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
        c.unet.attention_head_dim = 2
        c.conditioning.class_embed_dim = 32
        c.data.num_threads = 1
        c.preview.max_rows = 2
    return c
