"""Class-conditional latent diffusion on the digits, on the frozen digits autoencoder.

    python train.py --config configs/digits_autoencoder.py --workdir runs/digits_ae
    python train.py --config configs/digits_ldm.py --workdir runs/digits_ldm \
        --config.first_stage.workdir=runs/digits_ae
    python train.py --config configs/digits_ldm.py:runlocal ...   # seconds, for smoke tests

The second half of ``make demo``: 32x32 digits -> 8x8x4 latents (the autoencoder of
``configs/digits_autoencoder.py``), a small convolutional U-Net whose class embedding is added
to the time embedding (label 10 is the null class for classifier-free guidance), sized to
learn legible digits on a 2-core CPU in a few minutes (2300 steps of 64 latents, ~9 steps/s on
an idle 2-core Xeon; with 1500 steps the 8s and 9s are still ambiguous, at 2000 the in-loop
evaluation sits just short of the quality target, README "The demo"). The demo's grid is the
final evaluation's samples, one row per digit (``config.eval.grid_columns``); the preview is off.
"""

from __future__ import annotations

from configs import base
from ldm_jax.evaluation.settings import add_eval_section
from ldm_jax.training.stages.sections import add_diffusion_sections


def get_config(arg: str | None = None):
    local = base.is_local(arg)
    c = add_eval_section(add_diffusion_sections(base.get_base_config("diffusion")))
    c.data = base.data_config("digits", 32)
    c.data.channels = 1  # the autoencoder's input

    c.first_stage.source = "workdir"
    c.first_stage.workdir = "runs/digits_ae"
    c.first_stage.scale_batches = 8
    c.first_stage.cache_latents = True  # 1797 images: encode once, train on latents

    c.unet.block_out_channels = (32, 64, 64)  # 8x8 -> 4x4 -> 2x2
    c.unet.layers_per_block = 1
    c.unet.down_block_types = ("DownBlock2D",) * 3
    c.unet.up_block_types = ("UpBlock2D",) * 3
    c.unet.mid_block_type = "UNetMidBlock2D"
    c.unet.norm_num_groups = 32
    # On CPU, 1x1 convs and the <= 16-pixel maps of this 8x8 U-Net run as one matmul each
    # (ldm_jax.kernels.conv "auto"; plain lax.conv elsewhere): its train step measured 1.49x
    # faster than with lax.conv everywhere (benchmarks/results/train_step_conv_*.md). Same
    # parameters, so the exported model is unchanged; sampling from it uses lax.conv.
    c.unet.conv_impl = "auto"

    c.conditioning.kind = "class"
    c.conditioning.drop_prob = 0.1

    c.diffusion.schedule = "linear"
    c.diffusion.num_timesteps = 1000
    c.diffusion.prediction = "eps"
    c.diffusion.weighting = "min_snr"

    c.optimizer.learning_rate = 2e-3
    c.optimizer.warmup_steps = 100
    c.optimizer.end_lr_ratio = 0.05
    c.optimizer.weight_decay = 0.0
    c.ema.decay = 0.99

    c.train.global_batch_size = 64
    c.train.num_steps = 2300
    c.train.log_every = 100
    c.checkpoint.every_steps = 500
    # Off (-1: not even at the end): the final evaluation's samples make the demo's grid (below),
    # which saves the preview's own sampling and compilation (~18 s here). The settings stay
    # for --config.preview.every_steps=N.
    c.preview.every_steps = -1
    c.preview.columns = 8
    c.preview.max_rows = 10
    # Ancestral sampling: this briefly trained model's deterministic (DDIM) trajectories
    # still show speckle; DDPM's fresh noise at each step washes it out.
    c.preview.sampler = "ddpm"
    c.preview.num_steps = 100
    c.preview.guidance_scale = 3.0

    # Sample quality during training (ldm_jax.training.eval_hook): 500 samples (50 per digit,
    # the preview's DDPM 100) scored by a classifier trained on the digits' labels (cached):
    # conditional accuracy and the Frechet distance in its features; the best checkpoint by FD
    # is kept. Guidance 2.25 at timesteps >= 300 only, not the preview's 3 everywhere: on the
    # exported 2000-step model guidance 3 gives accuracy 1.000 but FD 7.1x real-vs-real (alike
    # digits); guidance at the low-noise steps costs the most diversity (3 at t <= 500 only:
    # 1.000 / 6.6x; at t >= 500 only: 0.950 / 1.17x), and at equal accuracy the interval gives
    # a lower FD than guiding every step (README; docs/digits_guidance_interval_sweep.jsonl).
    # Twice (half-way and at the end, for the README's curve): each costs ~50 s on 2 cores.
    c.eval.every_steps = 1150
    c.eval.num_samples = 500
    c.eval.guidance_scale = 2.25
    c.eval.guidance_interval = (300.0, 999.0)
    c.eval.best_metric = "fd"
    c.eval.grid_columns = 8  # samples/eval_<step>.png: 8 of the scored samples per digit
    c.eval.grid_rows = 10

    if local:  # 16 pixels, as configs/digits_autoencoder.py:runlocal
        base.shrink_for_local(c, 6, sample_steps=4)
        c.preview.max_rows = 3
        c.eval.every_steps = 0  # tests switch it on with a tiny classifier
        c.eval.num_samples = 16
        c.eval.classifier_steps = 20
        c.eval.grid_columns = 0
    return c
