"""The model-agnostic sections of a training config.

JAX-free on purpose: experiment configs (``configs/<name>.py``) import these defaults, and a
config must load without importing JAX. ``ldm_jax.training.config.resolve_config`` checks
them against the devices at start-up.
"""

from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder


# The one place the optimizer and EMA defaults are written: the config sections below and the
# code that reads a partial section (optimizer.make_optimizer, step.make_train_step) share them.
OPTIMIZER_DEFAULTS = {
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
EMA_DEFAULTS = {"decay": 0.9999, "warmup": True}


def training_defaults() -> ml_collections.ConfigDict:
    """The model-agnostic part of a training config."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # One axis may be -1: it takes every remaining device.
    c.mesh = ml_collections.ConfigDict({"shape": {"data": -1, "fsdp": 1, "tensor": 1}})
    # preset: "dp" | "fsdp" | "fsdp_tensor" (mesh.PRESET_RULES); a non-empty
    # logical_axis_rules list of (logical name, mesh axis | [mesh axes] | None) replaces it.
    c.sharding = ml_collections.ConfigDict({"preset": "dp", "logical_axis_rules": []})
    c.optimizer = ml_collections.ConfigDict(dict(OPTIMIZER_DEFAULTS))
    c.ema = ml_collections.ConfigDict(dict(EMA_DEFAULTS))
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
