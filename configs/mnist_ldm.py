"""Class-conditional pixel-space diffusion on MNIST from TensorFlow Datasets (a DDPM-style
baseline; the data must already be prepared locally: nothing is downloaded at train time).

    python -c "import tensorflow_datasets as tfds; tfds.builder('mnist', data_dir='~/tfds').download_and_prepare()"
    python train.py --config configs/mnist_ldm.py --workdir runs/mnist --config.data.data_dir=~/tfds

Latent variant: train an autoencoder on ``tfds:mnist`` first and set
``--config.first_stage.source=workdir --config.first_stage.workdir=<its workdir>``.
"""

from __future__ import annotations

from ml_collections.config_dict import placeholder

from configs import base
from ldm_jax.training.stages.sections import add_diffusion_sections


def get_config(arg: str | None = None):
    local = base.is_local(arg)
    c = add_diffusion_sections(base.get_base_config("diffusion"))
    c.data = base.data_config("tfds:mnist", 32, data_dir=placeholder(str))  # 28x28 resized to 32x32
    c.data.channels = 1
    c.data.num_threads = 4

    c.first_stage.source = "identity"

    c.unet.block_out_channels = (64, 128, 256)
    c.unet.layers_per_block = 2
    c.unet.down_block_types = ("DownBlock2D",) * 3
    c.unet.up_block_types = ("UpBlock2D",) * 3
    c.unet.mid_block_type = "UNetMidBlock2D"

    c.conditioning.kind = "class"
    c.conditioning.drop_prob = 0.1
    c.diffusion.schedule = "linear"
    c.diffusion.prediction = "eps"

    c.optimizer.learning_rate = 2e-4
    c.optimizer.warmup_steps = 1000
    c.optimizer.weight_decay = 0.0
    c.ema.decay = 0.9999
    c.train.global_batch_size = 128
    c.train.num_steps = 50_000
    c.preview.every_steps = 5000

    if local:
        base.shrink_for_local(c, 4)
        c.data.num_threads = 1
        c.preview.max_rows = 2
    return c
