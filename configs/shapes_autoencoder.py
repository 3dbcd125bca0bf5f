"""First stage for the shapes dataset: a KL autoencoder, 32x32x3 -> 8x8x4 latents (f=4).

    python train.py --config configs/shapes_autoencoder.py --workdir runs/shapes_ae
    python train.py --config configs/shapes_autoencoder.py:runlocal --workdir /tmp/ae   # seconds

Shapes have hard, anti-aliased edges and eight colours on four backgrounds, so the model is a
little wider than the digits one and trains longer (2000 steps: ~25 min on 2 busy CPU cores).
GAN off by default; ``--config.loss.disc_weight=0.5 --config.loss.disc_start=N`` turns the
PatchGAN on from step N. Set ``--config.loss.lpips_path=...`` (local LPIPS weights, lpips
package layout) to add the perceptual loss. The exported folder (<workdir>/model) is the first
stage of a shapes latent-diffusion config.
"""

from __future__ import annotations

from configs import base
from ldm_jax.training.stages.sections import add_autoencoder_sections


def get_config(arg: str | None = None):
    local = base.is_local(arg)
    c = add_autoencoder_sections(base.get_base_config("autoencoder"))
    c.data = base.data_config("shapes", 32)
    c.data.channels = 3
    c.data.shapes_num_examples = 100_000

    c.autoencoder.kind = "kl"
    c.autoencoder.block_out_channels = (32, 32, 64)  # f = 4: 32x32 -> 8x8
    c.autoencoder.layers_per_block = 1
    c.autoencoder.latent_channels = 4
    c.autoencoder.norm_num_groups = 16

    # L2, not L1: a shape covers ~7% of the pixels; with L1 every pixel pulls equally and the
    # model sits for a long time on "background colour + a blob", while L2's gradient grows with
    # the (large) errors on the shape. kl_weight 1e-4 (LDM: 1e-6): with 1e-6 a few latent
    # elements drifted to posterior std > 1000 and the decoder learned to depend on them.
    c.loss.pixel_loss = "l2"
    c.loss.kl_weight = 1e-4
    c.loss.disc_weight = 0.0  # GAN off by default (see module docstring)
    c.loss.disc_start = 2000  # when turned on
    c.loss.disc_layers = 2  # 32 px: 2 stride-2 layers -> 6x6 patch logits
    c.loss.disc_channels = 64

    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 50
    c.optimizer.schedule = "cosine"
    c.optimizer.end_lr_ratio = 0.05
    c.optimizer.weight_decay = 0.0
    c.optimizer.grad_clip_norm = 0.0
    c.ema.decay = 0.999

    c.train.global_batch_size = 32
    c.train.num_steps = 2000
    c.train.log_every = 100
    c.checkpoint.every_steps = 500
    c.preview.every_steps = 500
    c.preview.num_images = 16
    c.preview.columns = 4  # each preview image is an (original | reconstruction) pair

    if local:
        base.shrink_for_local(c, 10, checkpoint_every=10)
        c.data.shapes_num_examples = 256
    return c
