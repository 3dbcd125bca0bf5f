"""A ControlNet for Stable Diffusion 1.5 (or any diffusers SD 1.x/2.x folder), trained on the
frozen U-Net, VAE and CLIP text encoder, sharded like full training.

    python train.py --config configs/controlnet_sd15.py --workdir gs://bucket/runs/sd15_cn \
        --config.controlnet.base=/models/sd15 --config.distributed.auto=True

The ControlNet (361M parameters for SD 1.5) is initialised from the U-Net's encoder as
diffusers' ``ControlNetModel.from_unet`` (or from a diffusers ControlNet folder:
``--config.controlnet.init=DIR``); only its params are in the optimizer and the EMA. The frozen
860M U-Net carries its logical axis names and is FSDP-sharded over the ``fsdp`` axis like the
trained params; the VAE and CLIP encoder are replicated. The export is a diffusers
``ControlNetModel`` folder. Data: the shapes data at 512 px with the mask as the control image
(offline); a folder of images with control images beside them is not wired yet.
``:runlocal`` keeps the structure at 64 px on a tiny diffusers-format folder given as base.
"""

from __future__ import annotations

from configs import base
from ldm_jax.training.stages.sections import add_controlnet_sections


def get_config(arg: str | None = None):
    local = base.is_local(arg)
    c = add_controlnet_sections(base.get_base_config("controlnet"))
    c.data = base.data_config("shapes", 512)
    c.data.shapes_control = "mask"
    c.data.num_threads = 16

    c.controlnet.base = ""  # a diffusers Stable Diffusion folder (model_index.json) or an ldm_jax model folder
    c.controlnet.drop_prob = 0.5  # diffusers' train_controlnet --proportion_empty_prompts is often 0.5 for SD
    c.controlnet.weighting = "simple"

    c.mesh.shape = {"data": -1, "fsdp": 8, "tensor": 1}
    c.sharding.preset = "fsdp"
    c.optimizer.learning_rate = 1e-5  # the ControlNet paper's
    c.optimizer.warmup_steps = 500
    c.optimizer.weight_decay = 1e-2
    c.optimizer.grad_clip_norm = 1.0
    c.ema.decay = 0.9999
    c.train.global_batch_size = 256
    c.train.num_steps = 50_000
    c.train.log_every = 50
    c.checkpoint.every_steps = 2000
    c.checkpoint.max_to_keep = 3
    c.preview.every_steps = 5000
    c.preview.num_images = 8
    c.preview.columns = 4
    c.preview.num_steps = 25
    c.preview.sampler = "dpmpp_2m"
    c.preview.guidance_scale = 7.5

    if local:
        base.shrink_for_local(c, 4, resolution=64)
        c.mesh.shape = {"data": -1, "fsdp": 2, "tensor": 1}
        c.data.shapes_num_examples = 64
        c.data.num_threads = 1
        c.preview.num_images = 2
        c.preview.num_steps = 2
    return c
