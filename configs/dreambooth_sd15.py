"""DreamBooth on Stable Diffusion 1.x from a local diffusers folder (Ruiz et al. 2023; the
settings of diffusers' ``train_dreambooth.py`` / ``train_dreambooth_lora.py``): a few instance
images of one subject captioned "a photo of sks dog", prior preservation with 200 images the
base model generates for "a photo of dog" before training (kept in ``<workdir>/class_images``),
``loss = instance loss + prior_loss_weight * prior loss``.

    python train.py --config configs/dreambooth_sd15.py --workdir runs/db_dog \
        --config.finetune.base=/models/stable-diffusion-v1-5 --config.data.path=/data/dog
    python train.py --config configs/dreambooth_sd15.py:full ...      # full fine-tuning (lr 5e-6)

``data.path``: a folder of instance images (no captions needed). Default: LoRA (rank 4, lr
1e-4); ``:full`` trains every U-Net weight (the base is kept as the frozen step argument and the
U-Net trains as a residual on it, see ``ldm_jax.training.stages.finetune``); ``:text_encoder``
also adapts/trains the text encoder. Sharded like full training (``fsdp`` 8-way).
"""

from __future__ import annotations

from ml_collections.config_dict import placeholder

from configs import base
from ldm_jax.training.stages.finetune_sections import add_finetune_sections


def get_config(arg: str | None = None):
    words = base.parse_arg(arg)
    full = "full" in words
    c = add_finetune_sections(base.get_base_config("finetune"))
    c.data = base.data_config("folder", 512, path=placeholder(str))
    c.data.channels = 3
    c.data.num_threads = 4

    c.finetune.base = placeholder(str)  # a diffusers SD 1.x folder (model_index.json)
    c.finetune.method = "full" if full else "lora"
    c.finetune.dtype = "bfloat16"
    c.finetune.train_conditioner = "text_encoder" in words
    c.finetune.export_merged = False
    c.lora.rank = 4
    c.lora.alpha = 4.0

    c.dreambooth.enabled = True
    c.dreambooth.instance_prompt = "a photo of sks dog"
    c.dreambooth.class_prompt = "a photo of dog"
    c.dreambooth.prior_loss_weight = 1.0
    c.dreambooth.num_class_images = 200
    c.dreambooth.class_sampler = "dpmpp_2m"
    c.dreambooth.class_num_steps = 25
    c.dreambooth.class_guidance_scale = 7.5
    c.dreambooth.class_batch_size = 8

    c.mesh.shape = {"data": -1, "fsdp": 8, "tensor": 1}
    c.sharding.preset = "fsdp"
    c.optimizer.learning_rate = 5e-6 if full else 1e-4
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.optimizer.weight_decay = 1e-2
    c.optimizer.grad_clip_norm = 1.0
    c.ema.decay = 0.0
    c.ema.warmup = False
    c.train.global_batch_size = 8  # 8 instance + 8 class images per step
    c.train.num_steps = 800 if full else 500
    c.train.log_every = 25
    c.checkpoint.every_steps = 250
    c.checkpoint.max_to_keep = 2
    c.preview.every_steps = 250
    c.preview.columns = 4
    c.preview.num_steps = 25
    c.preview.sampler = "dpmpp_2m"
    c.preview.guidance_scale = 7.5
    c.preview.prompts = ["a photo of sks dog", "a photo of sks dog on the beach", "a photo of dog"]

    if base.is_local(arg):
        base.shrink_for_local(c, 4, resolution=64, sample_steps=2)
        c.finetune.dtype = "float32"
        c.data.num_threads = 2
        c.dreambooth.num_class_images = 4
        c.dreambooth.class_num_steps = 2
        c.dreambooth.class_batch_size = 4
        c.mesh.shape = {"data": -1, "fsdp": 1, "tensor": 1}
    return c
