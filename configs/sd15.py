"""Stable-Diffusion-1.5-sized text-to-image training, meant for a TPU pod / multi-GPU hosts.

The U-Net is SD 1.5's (860M parameters: 320-640-1280-1280 channels, cross-attention to
768-wide CLIP ViT-L/14 text states), trained from scratch (or fine-tuned: load weights is
not part of this config) on 512x512 captioned images, on SD's frozen VAE (f=8, 64x64x4
latents, scale factor 0.18215) and frozen CLIP text encoder, both read from a local
diffusers Stable Diffusion folder. Parameters, gradients and AdamW moments are sharded over
the ``fsdp`` mesh axis (8-way), batches over ``data`` x ``fsdp``; bf16 compute with float32
params; every U-Net block rematerialised.

    python train.py --config configs/sd15.py --workdir gs://bucket/runs/sd15 \
        --config.data.path=/data/laion_subset --config.first_stage.path=/models/sd15 \
        --config.conditioning.clip_path=/models/sd15 \
        --config.distributed.auto=True          # on every host of a TPU pod

``data.path`` is an image folder with a caption ``.txt`` beside each image. On this CPU the
config is only checked by shapes and sharding (``tests/test_train.py``). ``:runlocal`` keeps
the structure with a tiny U-Net at 64x64 (still needs the two folders).
"""

from __future__ import annotations

from ml_collections.config_dict import placeholder

from configs import base
from ldm_jax.training.stages.sections import add_diffusion_sections


def get_config(arg: str | None = None):
    local = base.is_local(arg)
    c = add_diffusion_sections(base.get_base_config("diffusion"))
    c.data = base.data_config("folder", 512, path=placeholder(str))
    c.data.channels = 3
    c.data.num_threads = 16

    c.first_stage.source = "diffusers"
    c.first_stage.path = ""  # SD folder (its vae/) or an AutoencoderKL folder
    c.first_stage.scale_factor = 0.18215  # SD 1.x's; <= 0 would estimate 1/std from data
    c.first_stage.dtype = "bfloat16"

    c.unet.block_out_channels = (320, 640, 1280, 1280)
    c.unet.layers_per_block = 2
    c.unet.down_block_types = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    c.unet.up_block_types = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    c.unet.mid_block_type = "UNetMidBlock2DCrossAttn"
    c.unet.attention_head_dim = 8  # heads (diffusers semantics), 40-160 wide
    c.unet.cross_attention_dim = 768
    c.unet.norm_num_groups = 32
    c.unet.dtype = "bfloat16"
    c.unet.remat = True

    c.conditioning.kind = "clip"
    c.conditioning.clip_path = ""  # SD folder (text_encoder/ + tokenizer/)
    c.conditioning.clip_context_layer = "last"
    c.conditioning.drop_prob = 0.1

    c.diffusion.schedule = "scaled_linear"
    c.diffusion.num_timesteps = 1000
    c.diffusion.beta_start = 0.00085
    c.diffusion.beta_end = 0.012
    c.diffusion.prediction = "eps"
    c.diffusion.weighting = "simple"

    c.mesh.shape = {"data": -1, "fsdp": 8, "tensor": 1}
    c.sharding.preset = "fsdp"
    c.optimizer.learning_rate = 1e-4
    c.optimizer.warmup_steps = 10_000
    c.optimizer.weight_decay = 1e-2
    c.optimizer.weight_decay_on = "matrices"
    c.optimizer.grad_clip_norm = 1.0
    c.ema.decay = 0.9999
    c.train.global_batch_size = 2048
    c.train.num_microbatches = 1
    c.train.num_steps = 500_000
    c.train.log_every = 50
    c.checkpoint.every_steps = 2000
    c.checkpoint.max_to_keep = 3
    c.preview.every_steps = 5000
    c.preview.columns = 4
    c.preview.num_steps = 25
    c.preview.sampler = "dpmpp_2m"
    c.preview.guidance_scale = 7.5
    c.preview.prompts = [
        "a photograph of an astronaut riding a horse",
        "a watercolor painting of a lighthouse at dawn",
        "a bowl of ramen, studio lighting",
        "an oil painting of a cat wearing a hat",
    ]

    if local:
        base.shrink_for_local(c, 10, resolution=64, checkpoint_every=5, log_every=50, sample_steps=4)
        c.data.num_threads = 2
        c.unet.block_out_channels = (32, 64)
        c.unet.down_block_types = ("CrossAttnDownBlock2D", "DownBlock2D")
        c.unet.up_block_types = ("UpBlock2D", "CrossAttnUpBlock2D")
        c.unet.norm_num_groups = 32
        c.unet.attention_head_dim = 2
        c.unet.dtype = "float32"
        c.unet.remat = False
        c.mesh.shape = {"data": -1, "fsdp": 1, "tensor": 1}
    return c
