"""Model-agnostic training: mesh and sharding rules, sharded train state, AdamW with
warmup+cosine, a jitted step with gradient accumulation and EMA, orbax checkpoints,
multi-process start-up, SIGTERM handling, and the loop that ties them together; the
training stages (``ldm_jax.training.stages``) plug models into it.

A model enters through ``Task(init_params, loss_fn)``; see ``loop.train``.

Names are imported on first use (PEP 562), so ``import ldm_jax.training.defaults`` (what
configs do) does not import JAX, and reading a workdir does not import the optimizer.
"""

from __future__ import annotations

import importlib

# public name -> defining module
_EXPORTS = {
    "Checkpointer": "checkpointing",
    "write_config_json": "checkpointing",
    "resolve_config": "config",
    "training_defaults": "defaults",
    "RunContext": "context",
    "start_run": "context",
    "initialize_distributed": "distributed",
    "process_batch_rows": "distributed",
    "Task": "loop",
    "TrainResult": "loop",
    "create_initial_state": "loop",
    "train": "loop",
    "BATCH_AXES": "mesh",
    "MESH_AXES": "mesh",
    "PRESET_RULES": "mesh",
    "batch_sharding": "mesh",
    "logical_axis_rules": "mesh",
    "make_mesh": "mesh",
    "param_shardings": "mesh",
    "place_frozen": "mesh",
    "make_lr_schedule": "optimizer",
    "make_optimizer": "optimizer",
    "PreemptionGuard": "preemption",
    "compile_train_step": "step",
    "make_train_step": "step",
    "train_step": "step",
    "TrainState": "train_state",
    "abstract_with_shardings": "train_state",
    "create_sharded_state": "train_state",
    "state_shardings": "train_state",
    "step_key": "train_state",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"ldm_jax.training.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'ldm_jax.training' has no attribute {name!r}")


def __dir__():
    return __all__
