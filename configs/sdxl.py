"""SDXL-base-shaped text-to-image fine-tuning (resolution 1024, latents 128x128x4), for a TPU
pod / multi-GPU hosts.

The U-Net is SDXL base's (2.57B parameters: 320-640-1280 channels, 1-2-10 transformer layers,
cross-attention to the 2048-wide concatenated CLIP-L + OpenCLIP-bigG penultimate states, the
``text_time`` micro-conditioning), started from the pretrained weights of a local diffusers
SDXL folder's ``unet/`` (``config.diffusion.init_from``; each tensor goes straight into its
FSDP shards, the EMA starts equal to it; a resumed run restores its checkpoint and never reads
the folder), on the same folder's frozen VAE (scale factor 0.13025) and frozen text encoders
(``conditioning.kind = "sdxl"``). The micro-conditioning is computed per image as the SDXL
paper trains: ``original_size`` and ``crop_top_left`` recorded by the image-folder source (the
file's size, and the crop's corner in the image resized to a shorter side of 1024;
``--config.data.folder_random_crop=True`` for SDXL's random crops), ``target_size`` the
training size; text is dropped to zeros with ``drop_prob`` (``force_zeros_for_empty_prompt``),
the size conditioning never. Parameters, gradients, AdamW moments and EMA are sharded over the
``fsdp`` mesh axis (8-way), bf16 compute with float32 params, every U-Net block rematerialised.

    python train.py --config configs/sdxl.py --workdir gs://bucket/runs/sdxl \
        --config.data.path=/data/captioned --config.diffusion.init_from=/models/sdxl \
        --config.first_stage.path=/models/sdxl/vae --config.conditioning.clip_path=/models/sdxl

``init_from`` is required here (empty is an error); ``configs/sdxl.py:scratch`` trains the
U-Net from a random init instead. ``:runlocal`` keeps the structure with a tiny SDXL-shaped
U-Net at 32x32 from a random init (no released folder has its shapes; still needs an SDXL
folder for the VAE and text encoders).
"""

from __future__ import annotations

from ml_collections.config_dict import placeholder

from configs import base
from ldm_jax.training.stages.sections import add_diffusion_sections


def get_config(arg: str | None = None):
    local = base.is_local(arg)
    scratch = "scratch" in base.parse_arg(arg)
    c = add_diffusion_sections(base.get_base_config("diffusion"))
    c.data = base.data_config("folder", 1024, path=placeholder(str))
    c.data.channels = 3
    c.data.num_threads = 16

    c.first_stage.source = "diffusers"
    c.first_stage.path = ""  # the SDXL folder's vae/
    c.first_stage.scale_factor = 0.13025  # SDXL's VAE
    c.first_stage.dtype = "bfloat16"  # force_upcast in the VAE config keeps decoding float32

    c.unet.block_out_channels = (320, 640, 1280)
    c.unet.layers_per_block = 2
    c.unet.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    c.unet.up_block_types = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    c.unet.mid_block_type = "UNetMidBlock2DCrossAttn"
    with c.unet.ignore_type():  # per-level lists where the defaults hold one int
        c.unet.attention_head_dim = (5, 10, 20)  # heads per level (diffusers semantics), 64 wide
        c.unet.transformer_layers_per_block = (1, 2, 10)
    c.unet.use_linear_projection = True
    c.unet.cross_attention_dim = 2048
    c.unet.addition_embed_type = "text_time"
    c.unet.addition_time_embed_dim = 256
    c.unet.projection_class_embeddings_input_dim = 1280 + 6 * 256  # pooled bigG + 6 time ids
    c.unet.norm_num_groups = 32
    c.unet.dtype = "bfloat16"
    c.unet.remat = True

    c.conditioning.kind = "sdxl"
    c.conditioning.clip_path = ""  # SDXL folder (tokenizer/, tokenizer_2/, text_encoder/, text_encoder_2/)
    c.conditioning.drop_prob = 0.05

    c.diffusion.schedule = "scaled_linear"
    c.diffusion.num_timesteps = 1000
    c.diffusion.beta_start = 0.00085
    c.diffusion.beta_end = 0.012
    c.diffusion.prediction = "eps"
    c.diffusion.init_from = None if scratch else ""  # required: the SDXL folder (its unet/ is read)

    c.mesh.shape = {"data": -1, "fsdp": 8, "tensor": 1}
    c.sharding.preset = "fsdp"
    c.optimizer.learning_rate = 1e-5
    c.optimizer.warmup_steps = 500
    c.optimizer.weight_decay = 1e-2
    c.optimizer.weight_decay_on = "matrices"
    c.optimizer.grad_clip_norm = 1.0
    c.ema.decay = 0.9999
    c.train.global_batch_size = 256
    c.train.num_steps = 100_000
    c.checkpoint.every_steps = 1000
    c.preview.every_steps = 2000
    c.preview.columns = 2
    c.preview.num_steps = 25
    c.preview.sampler = "euler"
    c.preview.guidance_scale = 5.0
    c.preview.prompts = ["a photograph of an astronaut riding a horse", "a bowl of ramen, studio lighting"]

    if local:
        base.shrink_for_local(c, 10, resolution=32, checkpoint_every=5, log_every=50, sample_steps=2)
        c.data.num_threads = 2
        c.unet.block_out_channels = (32, 64)
        c.unet.down_block_types = ("DownBlock2D", "CrossAttnDownBlock2D")
        c.unet.up_block_types = ("CrossAttnUpBlock2D", "UpBlock2D")
        with c.unet.ignore_type():
            c.unet.attention_head_dim = (2, 4)
            c.unet.transformer_layers_per_block = (1, 2)
        c.unet.cross_attention_dim = 0  # the conditioner's width
        c.unet.addition_time_embed_dim = 8
        c.unet.projection_class_embeddings_input_dim = placeholder(int)  # pooled width + 6 x 8: set per folder
        c.unet.norm_num_groups = 8
        c.unet.dtype = "float32"
        c.unet.remat = False
        c.diffusion.init_from = None  # the tiny U-Net matches no released folder: random init
        c.mesh.shape = {"data": -1, "fsdp": 1, "tensor": 1}
    return c
