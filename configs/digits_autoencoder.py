"""First stage for the digits demo: a KL autoencoder, 32x32x1 digits -> 8x8x4 latents (f=4).

    python train.py --config configs/digits_autoencoder.py --workdir runs/digits_ae
    python train.py --config configs/digits_autoencoder.py:runlocal --workdir /tmp/ae   # seconds

Sized to train to clearly legible reconstructions on a 2-core CPU in a few minutes including
compilation (it is the first half of ``make demo``). The GAN is off: the digits are 8x8
scans upsampled to 32x32, i.e. smooth, so the pixel (L1) loss alone reconstructs them well
and a discriminator would only add compute; the perceptual loss is off because LPIPS needs
RGB and downloaded VGG weights. The exported folder (<workdir>/model) is the first stage of
``configs/digits_ldm.py``.
"""

from __future__ import annotations

from configs import base
from ldm_jax.training.stages.sections import add_autoencoder_sections


def get_config(arg: str | None = None):
    local = base.is_local(arg)
    c = add_autoencoder_sections(base.get_base_config("autoencoder"))
    c.data = base.data_config("digits", 32)
    c.data.channels = 1

    c.autoencoder.kind = "kl"
    c.autoencoder.block_out_channels = (16, 32, 64)  # f = 4: 32x32 -> 8x8
    c.autoencoder.layers_per_block = 1
    c.autoencoder.latent_channels = 4
    c.autoencoder.norm_num_groups = 16

    c.loss.pixel_loss = "l1"
    c.loss.kl_weight = 1e-6
    c.loss.disc_weight = 0.0  # GAN off (see module docstring)

    c.optimizer.learning_rate = 1e-3
    c.optimizer.warmup_steps = 50
    c.optimizer.schedule = "cosine"
    c.optimizer.end_lr_ratio = 0.05
    c.optimizer.weight_decay = 0.0  # taming's Adam; also keeps logvar undecayed
    c.optimizer.grad_clip_norm = 0.0  # one global norm would couple AE and discriminator steps
    c.ema.decay = 0.999

    c.train.global_batch_size = 32
    c.train.num_steps = 300
    c.train.log_every = 50
    c.checkpoint.every_steps = 300
    c.preview.every_steps = 300
    c.preview.num_images = 16
    c.preview.columns = 4  # each preview image is an (original | reconstruction) pair

    if local:
        base.shrink_for_local(c, 10, checkpoint_every=10)
    return c
