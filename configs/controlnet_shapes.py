"""A ControlNet on the frozen shapes LDM: the shape's mask as the control image.

    python train.py --config configs/shapes_autoencoder.py --workdir runs/shapes_ae
    python train.py --config configs/shapes_ldm.py --workdir runs/shapes_ldm \
        --config.first_stage.workdir=runs/shapes_ae
    python train.py --config configs/controlnet_shapes.py --workdir runs/shapes_cn \
        --config.controlnet.base=runs/shapes_ldm/model
    python sample.py --model runs/shapes_ldm/model --controlnet runs/shapes_cn/model \
        --control_image mask.png --prompt "a large red circle in the center on a black background"

The U-Net, autoencoder and text encoder of the base are frozen; only the ControlNet (a copy of
the U-Net's encoder plus zero convolutions, ``ldm_jax.models.controlnet``) is trained, on the
shapes data with ``data.shapes_control="mask"`` (the shape's pixel coverage, [H, W, 1] in
[0, 1]; ``"edges"`` for its outline). The control image is at the image size: the
conditioning embedding downsamples by the first stage's factor (4 here: widths (16, 32, 96)).
``scripts/controlnet_demo.sh`` trains a small version of all three and measures how well the
generated shapes follow the masks. ``:runlocal``: a few steps at 16 px for smoke tests.
"""

from __future__ import annotations

from configs import base
from ldm_jax.training.stages.sections import add_controlnet_sections


def get_config(arg: str | None = None):
    local = base.is_local(arg)
    c = add_controlnet_sections(base.get_base_config("controlnet"))
    c.data = base.data_config("shapes", 32)
    c.data.shapes_num_examples = 50_000
    c.data.shapes_control = "mask"

    c.controlnet.base = "runs/shapes_ldm/model"
    c.controlnet.drop_prob = 0.1  # as the base LDM, so guidance keeps working
    c.controlnet.weighting = "min_snr"

    c.optimizer.learning_rate = 1e-4  # the ControlNet paper's 1e-5 is for SD-sized copies
    c.optimizer.warmup_steps = 100
    c.optimizer.weight_decay = 0.0
    c.ema.decay = 0.999

    c.train.global_batch_size = 64
    c.train.num_steps = 5000
    c.train.log_every = 100
    c.checkpoint.every_steps = 1000
    c.preview.every_steps = 1000
    c.preview.num_images = 16
    c.preview.columns = 4
    c.preview.sampler = "ddim"
    c.preview.num_steps = 50
    c.preview.guidance_scale = 3.0

    if local:
        base.shrink_for_local(c, 4)
        c.data.shapes_num_examples = 256
        c.preview.num_images = 4
        c.preview.num_steps = 3
    return c
