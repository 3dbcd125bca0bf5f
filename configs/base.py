"""The shared skeleton of every experiment config (``configs/<name>.py``).

An experiment file defines ``get_config(arg=None)`` that starts from
``get_base_config(stage)`` and overrides fields. ``arg`` is the string after the colon in
``--config configs/<name>.py:<arg>``; ``is_local(arg)`` is True for ``runlocal`` / ``small``
/ ``tiny`` and experiment files then call :func:`shrink_for_local` (plus the few overrides
their model needs) for a quick local run (big_vision style). Config files import this module
as ``configs.base``, so run ``train.py`` from the repository root (its directory is on
``sys.path``). Configs import only JAX-free modules (``ldm_jax.training.defaults``,
``ldm_jax.training.stages.sections``): loading a config never imports JAX.

Sections (stage-specific sections are added by the experiment file):

    stage        "autoencoder" | "diffusion"   (ldm_jax.training.stages.STAGES)
    data         ldm_jax.data.build_dataset keys (unknown keys are rejected there)
    train, optimizer, ema, mesh, sharding, checkpoint, distributed, seed
                 ldm_jax.training.defaults.training_defaults()
    logging      tensorboard / progress bar switches
    preview      every_steps: write a sample (or reconstruction) grid this often (and after
                 the last step); 0 disables. columns: images per grid row (0: square-ish)
    export       at the end of training write the EMA model folder to <workdir>/<export.dirname>
"""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

from ldm_jax.training.defaults import training_defaults

LOCAL_ARGS = ("runlocal", "local", "small", "tiny")


def parse_arg(arg: str | None) -> set[str]:
    """Comma-separated words of the config argument, e.g. ``"runlocal,bf16"`` -> {...}."""
    if not arg:
        return set()
    return {word.strip().lower() for word in str(arg).split(",") if word.strip()}


def is_local(arg: str | None) -> bool:
    """True when the config argument asks for a shrunken local run."""
    return bool(parse_arg(arg) & set(LOCAL_ARGS))


# Every ``build_dataset`` key of every source, so any dataset can be picked from the command
# line (``--config.data.name=folder --config.data.path=/images``); None means the source's
# default (``ldm_jax.data.build``). Not ``label_key``: None there means "no labels", its
# default is "auto" (pass it as an extra key to change it).
_SOURCE_KEYS = {
    "num_threads": int, "data_dir": str, "image_key": str, "caption_key": str,
    "path": str, "folder_labels": bool, "folder_verify": bool, "folder_random_crop": bool,
    "shapes_num_examples": int, "shapes_seed": int, "shapes_label_mode": str, "interpolation": str,
}  # fmt: skip


def data_config(name: str, resolution: int = 32, **extra: Any) -> ml_collections.ConfigDict:
    """A ``config.data`` section with every ``build_dataset`` key (unset ones None: the
    source's default); ``extra`` sets some (data_dir, path, ...)."""
    d = ml_collections.ConfigDict()
    d.name = name
    d.resolution = resolution
    d.channels = placeholder(int)  # None: the source's natural channel count
    d.split = "train"
    d.seed = 0
    d.shuffle = True
    for key, kind in _SOURCE_KEYS.items():
        d[key] = placeholder(kind)
    for key, value in extra.items():
        d[key] = value
    return d


def get_base_config(stage: str) -> ml_collections.ConfigDict:
    """training_defaults() plus the sections every stage understands."""
    c = training_defaults()
    c.stage = stage
    c.data = data_config("digits", 32)
    c.logging = ml_collections.ConfigDict(
        {
            "tensorboard": True,  # event files in <workdir>/tensorboard
            "progress_bar": True,  # tqdm on process 0
        }
    )
    c.preview = ml_collections.ConfigDict({"every_steps": 1000, "seed": 0, "columns": 0})
    c.export = ml_collections.ConfigDict({"enabled": True, "dirname": "model"})
    return c


def shrink_for_local(
    c: ml_collections.ConfigDict,
    num_steps: int,
    *,
    resolution: int = 16,
    checkpoint_every: int | None = None,
    log_every: int | None = None,
    sample_steps: int = 3,
) -> ml_collections.ConfigDict:
    """Shrink a config for a quick local run (``:runlocal``), in place: batch 8, ``num_steps``
    steps (logs and checkpoints twice unless told otherwise, one preview at the end), two
    warm-up steps, ``resolution`` pixels, a tiny model (the autoencoder ``(8, 16)`` wide, or a
    two-level convolutional U-Net ``(32, 32)``), a one-batch scale-factor estimate and
    ``sample_steps`` preview sampling steps. Experiment files then override what their model
    needs (attention blocks, text-encoder widths, ...)."""
    c.data.resolution = resolution
    c.train.global_batch_size = 8
    c.train.num_steps = num_steps
    c.train.log_every = log_every or max(1, num_steps // 2)
    c.optimizer.warmup_steps = 2
    c.checkpoint.every_steps = checkpoint_every or max(1, num_steps // 2)
    c.preview.every_steps = num_steps
    c.preview.columns = 2
    if "autoencoder" in c:
        c.autoencoder.block_out_channels = (8, 16)
        c.autoencoder.norm_num_groups = 8
        c.autoencoder.mid_block_add_attention = False
        c.preview.num_images = 4
    if "unet" in c:
        c.unet.block_out_channels = (32, 32)
        c.unet.layers_per_block = 1
        c.unet.down_block_types = ("DownBlock2D",) * 2
        c.unet.up_block_types = ("UpBlock2D",) * 2
        c.unet.norm_num_groups = 8
        c.unet.dropout = 0.0
        c.first_stage.scale_batches = 1
        c.preview.num_steps = sample_steps
    return c
