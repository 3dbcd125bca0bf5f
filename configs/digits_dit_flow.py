"""Class-conditional DiT trained with rectified flow on the digits latents (issue 14).

    python train.py --config configs/digits_autoencoder.py --workdir runs/digits_ae
    python train.py --config configs/digits_dit_flow.py --workdir runs/digits_dit_flow \
        --config.first_stage.workdir=runs/digits_ae
    python train.py --config configs/digits_dit_flow.py:runlocal ...   # seconds, for smoke tests

The transformer counterpart of ``configs/digits_ldm.py`` (same data, autoencoder, batch,
optimizer and EMA): 8x8x4 latents cut into 2x2 patches (16 tokens), a small DiT (4 blocks of
width 128, 1.4M parameters; adaLN-Zero,
the label's embedding added to the timestep's, label 10 the null class for classifier-free
guidance) regressing the velocity eps - x0 of x_t = (1 - t) x0 + t eps, with SD3's
logit-normal t density. Previews integrate the flow ODE with Euler steps.

Budget: measured while both trained side by side on the same (shared) CPU, a step of this DiT
costs 0.51 CPU-s and one of the U-Net demo 0.42 (1.2x), so 900 steps are about 55% of the U-Net
demo's 2000-step compute (its equal-time budget would be ~1600 steps).
"""

from __future__ import annotations

from configs import base
from ldm_jax.ldm.sections import dit_defaults
from ldm_jax.training.stages.sections import add_diffusion_sections


def get_config(arg: str | None = None):
    local = base.is_local(arg)
    c = add_diffusion_sections(base.get_base_config("diffusion"))
    c.data = base.data_config("digits", 32)
    c.data.channels = 1  # the autoencoder's input

    c.first_stage.source = "workdir"
    c.first_stage.workdir = "runs/digits_ae"
    c.first_stage.scale_batches = 8
    c.first_stage.cache_latents = True  # 1797 images: encode once, train on latents

    c.diffusion.denoiser = "dit"
    c.dit = dit_defaults()
    c.dit.patch_size = 2  # 8x8 latents -> 4x4 = 16 tokens
    c.dit.num_layers = 4
    c.dit.num_attention_heads = 4
    c.dit.attention_head_dim = 32  # width 128

    c.conditioning.kind = "class"
    c.conditioning.drop_prob = 0.1

    c.diffusion.objective = "flow"
    c.diffusion.flow_prediction = "velocity"
    c.diffusion.flow_time_density = "logit_normal"
    c.diffusion.flow_shift = 1.0
    c.diffusion.weighting = "simple"

    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.end_lr_ratio = 0.05
    c.optimizer.weight_decay = 0.0
    c.ema.decay = 0.99

    c.train.global_batch_size = 64
    c.train.num_steps = 900
    c.train.log_every = 100
    c.checkpoint.every_steps = 300
    c.preview.every_steps = 900
    c.preview.columns = 8
    c.preview.max_rows = 10
    c.preview.sampler = "flow_euler"
    c.preview.num_steps = 50
    c.preview.guidance_scale = 3.0

    if local:  # 16 pixels, as configs/digits_autoencoder.py:runlocal
        base.shrink_for_local(c, 6, sample_steps=4)
        c.dit.num_layers = 2
        c.dit.num_attention_heads = 2
        c.dit.attention_head_dim = 16
        c.preview.max_rows = 3
        c.preview.num_steps = 4
    return c
