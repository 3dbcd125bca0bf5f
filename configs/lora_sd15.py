"""LoRA fine-tuning of Stable Diffusion 1.x from a local diffusers folder (the recipe of
diffusers' ``train_text_to_image_lora.py``: rank 4 on the U-Net's attention projections,
lr 1e-4, AdamW, no EMA), sharded like full training: the frozen base U-Net, VAE and CLIP text
encoder are FSDP-sharded over the ``fsdp`` axis with the trained factors.

    python train.py --config configs/lora_sd15.py --workdir runs/lora_sd15 \
        --config.finetune.base=/models/stable-diffusion-v1-5 --config.data.path=/data/captioned
    python sample.py --model_dir /models/stable-diffusion-v1-5 \
        --lora runs/lora_sd15/model/pytorch_lora_weights.safetensors:0.8 --prompt "..." --out out/

``data.path``: an image folder with a caption ``.txt`` beside each image. The export
(``<workdir>/model/pytorch_lora_weights.safetensors``) loads in diffusers with
``pipe.load_lora_weights(folder)``. ``:text_encoder`` also adapts the CLIP text encoder's
attention; ``:runlocal`` shrinks batch, steps and resolution for a smoke run on a tiny SD folder.
"""

from __future__ import annotations

from ml_collections.config_dict import placeholder

from configs import base
from ldm_jax.training.stages.finetune_sections import add_finetune_sections


def get_config(arg: str | None = None):
    words = base.parse_arg(arg)
    c = add_finetune_sections(base.get_base_config("finetune"))
    c.data = base.data_config("folder", 512, path=placeholder(str))
    c.data.channels = 3
    c.data.num_threads = 16

    c.finetune.base = placeholder(str)  # a diffusers SD 1.x folder (model_index.json)
    c.finetune.method = "lora"
    c.finetune.dtype = "bfloat16"
    c.finetune.train_conditioner = "text_encoder" in words
    c.finetune.export_merged = False  # the LoRA file is the product; merging doubles the disk use
    c.lora.rank = 4
    c.lora.alpha = 4.0

    c.mesh.shape = {"data": -1, "fsdp": 8, "tensor": 1}
    c.sharding.preset = "fsdp"
    c.optimizer.learning_rate = 1e-4
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.optimizer.weight_decay = 1e-2
    c.optimizer.grad_clip_norm = 1.0
    c.ema.decay = 0.0  # no EMA (diffusers' LoRA script): the exported factors are the trained ones
    c.ema.warmup = False
    c.train.global_batch_size = 64
    c.train.num_steps = 15_000
    c.train.log_every = 50
    c.checkpoint.every_steps = 500
    c.checkpoint.max_to_keep = 3
    c.preview.every_steps = 1000
    c.preview.columns = 4
    c.preview.num_steps = 25
    c.preview.sampler = "dpmpp_2m"
    c.preview.guidance_scale = 7.5
    c.preview.prompts = ["a photograph of an astronaut riding a horse", "a watercolor painting of a lighthouse"]

    if base.is_local(arg):
        base.shrink_for_local(c, 4, resolution=64, sample_steps=2)
        c.finetune.dtype = "float32"
        c.data.num_threads = 2
        c.mesh.shape = {"data": -1, "fsdp": 1, "tensor": 1}
    return c
