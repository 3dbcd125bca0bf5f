"""Text-conditional DiT (PixArt-alpha style cross-attention) with rectified flow on the shapes.

    python train.py --config configs/shapes_autoencoder.py --workdir runs/shapes_ae
    python train.py --config configs/shapes_dit_flow.py --workdir runs/shapes_dit_flow \
        --config.first_stage.workdir=runs/shapes_ae
    python train.py --config configs/shapes_dit_flow.py:runlocal ...   # seconds, for smoke tests

The transformer counterpart of ``configs/shapes_ldm.py`` (same data, from-scratch text encoder
trained jointly, 10% empty captions for classifier-free guidance): because the conditioner
gives a cross-attention context, ``denoiser="dit"`` builds ``PixArtDiT`` (adaLN-single
timestep modulation, cross-attention to the caption tokens after each self-attention).
Rectified flow with SD3's logit-normal t density; previews integrate the flow ODE with Heun.
"""

from __future__ import annotations

from configs import base
from ldm_jax.ldm.sections import dit_defaults
from ldm_jax.training.stages.sections import add_diffusion_sections


def get_config(arg: str | None = None):
    local = base.is_local(arg)
    c = add_diffusion_sections(base.get_base_config("diffusion"))
    c.data = base.data_config("shapes", 32)
    c.data.shapes_num_examples = 50_000

    c.first_stage.source = "workdir"
    c.first_stage.workdir = "runs/shapes_ae"
    c.first_stage.scale_batches = 8

    c.diffusion.denoiser = "dit"
    c.dit = dit_defaults()
    c.dit.patch_size = 2
    c.dit.num_layers = 8
    c.dit.num_attention_heads = 6
    c.dit.attention_head_dim = 32  # width 192

    c.conditioning.kind = "text"
    c.conditioning.drop_prob = 0.1
    c.conditioning.text_max_length = 64
    c.conditioning.text_width = 128
    c.conditioning.text_depth = 3
    c.conditioning.text_heads = 4

    c.diffusion.objective = "flow"
    c.diffusion.flow_prediction = "velocity"
    c.diffusion.flow_time_density = "logit_normal"
    c.diffusion.weighting = "simple"

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
    c.preview.sampler = "flow_heun"
    c.preview.num_steps = 25
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
        c.dit.num_layers = 2
        c.dit.num_attention_heads = 2
        c.dit.attention_head_dim = 16
        c.conditioning.text_max_length = 16
        c.conditioning.text_width = 32
        c.conditioning.text_depth = 1
        c.conditioning.text_heads = 2
        c.preview.max_rows = 2
        c.preview.prompts = []
        c.preview.num_steps = 3
    return c
