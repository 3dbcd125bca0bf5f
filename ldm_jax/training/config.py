"""The start-up check of a training config.

Experiment configs (``configs/<name>.py``) start from ``training_defaults()``
(``ldm_jax.training.defaults``, JAX-free) and override a few fields; ``resolve_config`` checks everything that depends on the devices at hand and
fills the derived values, raising one ValueError line that names the offending value.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from ldm_jax.training import mesh as mesh_lib
from ldm_jax.training.optimizer import make_optimizer


def resolve_config(config: Any, num_devices: int, num_processes: int = 1) -> ml_collections.ConfigDict:
    """A checked copy of ``config`` with derived values filled in: ``mesh.shape`` without the
    wildcard, ``sharding.logical_axis_rules`` spelled out, ``optimizer.decay_steps``.

    Raises ValueError (one line, naming the value) for: unknown mesh axes, a mesh larger or
    smaller than the devices, an unknown preset or a rule naming an unknown mesh axis, a
    batch not divisible by the data-parallel devices x microbatches or by the processes,
    and bad optimizer/EMA/checkpoint numbers.
    """
    config = ml_collections.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    sizes = mesh_lib.resolve_mesh_shape(dict(config.mesh.shape), num_devices)
    rules = mesh_lib.logical_axis_rules(config.sharding)
    dp = sizes["data"] * sizes["fsdp"]

    train = config.train
    batch = int(train.global_batch_size)
    micro = int(train.get("num_microbatches", 1))
    if batch < 1:
        raise ValueError(f"config.train.global_batch_size must be >= 1, got {batch}")
    if micro < 1:
        raise ValueError(f"config.train.num_microbatches must be >= 1, got {micro}")
    if batch % (dp * micro):
        raise ValueError(
            f"config.train.global_batch_size={batch} is not divisible by data-parallel devices x "
            f"microbatches = {dp} x {micro} (mesh data={sizes['data']}, fsdp={sizes['fsdp']})"
        )
    if batch % num_processes:
        raise ValueError(f"config.train.global_batch_size={batch} is not divisible by {num_processes} processes")
    if int(train.num_steps) < 0:
        raise ValueError(f"config.train.num_steps must be >= 0, got {train.num_steps}")
    if int(train.get("log_every", 1)) < 1:
        raise ValueError(f"config.train.log_every must be >= 1, got {train.log_every}")
    if int(config.checkpoint.every_steps) < 1:
        raise ValueError(f"config.checkpoint.every_steps must be >= 1, got {config.checkpoint.every_steps}")
    decay = float(config.ema.decay)
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"config.ema.decay must be in [0, 1), got {decay}")

    with config.unlocked():
        config.mesh.shape = sizes
        config.sharding.logical_axis_rules = [list(rule) for rule in rules]
        if int(config.optimizer.get("decay_steps", -1)) <= 0:
            config.optimizer.decay_steps = int(train.num_steps)
    make_optimizer(config.optimizer)  # checks schedule kind and numbers
    return config
