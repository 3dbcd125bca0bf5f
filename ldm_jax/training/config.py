"""Training defaults and the start-up check of a training config.

Experiment configs (``configs/<name>.py``) start from ``training_defaults()`` and override a
few fields; ``resolve_config`` checks everything that depends on the devices at hand and
fills the derived values, raising one ValueError line that names the offending value.
"""

from __future__ import annotations

from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

from ldm_jax.training import mesh as mesh_lib
from ldm_jax.training.optimizer import make_optimizer


def training_defaults() -> ml_collections.ConfigDict:
    """The model-agnostic part of a training config."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # One axis may be -1: it takes every remaining device.
    c.mesh = ml_collections.ConfigDict({"shape": {"data": -1, "fsdp": 1, "tensor": 1}})
    # preset: "dp" | "fsdp" | "fsdp_tensor" (mesh.PRESET_RULES); a non-empty
    # logical_axis_rules list of (logical name, mesh axis | [mesh axes] | None) replaces it.
    c.sharding = ml_collections.ConfigDict({"preset": "dp", "logical_axis_rules": []})
    c.optimizer = ml_collections.ConfigDict(
        {
            "name": "adamw",
            "learning_rate": 1e-4,
            "schedule": "cosine",  # or "constant" (linear warmup, then flat)
            "warmup_steps": 1000,
            "decay_steps": -1,  # -1: train.num_steps
            "end_lr_ratio": 0.0,
            "b1": 0.9,
            "b2": 0.999,
            "eps": 1e-8,
            "weight_decay": 1e-2,
            "weight_decay_on": "all",  # or "matrices"
            "grad_clip_norm": 1.0,  # <= 0 disables clipping
        }
    )
    c.ema = ml_collections.ConfigDict({"decay": 0.9999, "warmup": True})
    c.train = ml_collections.ConfigDict(
        {"global_batch_size": 64, "num_microbatches": 1, "num_steps": 100_000, "log_every": 100}
    )
    c.checkpoint = ml_collections.ConfigDict({"every_steps": 1000, "max_to_keep": 3, "async_save": True})
    # Empty values fall back to LDM_JAX_* environment variables (see distributed.py).
    c.distributed = ml_collections.ConfigDict(
        {
            "auto": False,  # True: let jax.distributed detect the cluster (TPU pod, SLURM, MPI)
            "coordinator_address": placeholder(str),  # "host:port" of process 0
            "num_processes": placeholder(int),
            "process_id": placeholder(int),
        }
    )
    return c


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
