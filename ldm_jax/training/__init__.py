"""Model-agnostic training: mesh and sharding rules, sharded train state, AdamW with
warmup+cosine, a jitted step with gradient accumulation and EMA, orbax checkpoints,
multi-process start-up, SIGTERM handling, and the loop that ties them together.

A model enters through ``Task(init_params, loss_fn)``; see ``loop.train``.
"""

from ldm_jax.training.checkpointing import Checkpointer, write_config_json
from ldm_jax.training.config import resolve_config, training_defaults
from ldm_jax.training.distributed import global_batch_from_local, initialize_distributed, process_batch_rows
from ldm_jax.training.loop import Task, TrainResult, train
from ldm_jax.training.mesh import (
    BATCH_AXES,
    MESH_AXES,
    PRESET_RULES,
    batch_sharding,
    logical_axis_rules,
    make_mesh,
    param_shardings,
)
from ldm_jax.training.optimizer import make_lr_schedule, make_optimizer
from ldm_jax.training.preemption import PreemptionGuard
from ldm_jax.training.step import compile_train_step, make_train_step, train_step
from ldm_jax.training.train_state import (
    TrainState,
    abstract_with_shardings,
    create_sharded_state,
    state_shardings,
    step_key,
)

__all__ = [
    "BATCH_AXES",
    "MESH_AXES",
    "PRESET_RULES",
    "Checkpointer",
    "PreemptionGuard",
    "Task",
    "TrainResult",
    "TrainState",
    "abstract_with_shardings",
    "batch_sharding",
    "compile_train_step",
    "create_sharded_state",
    "global_batch_from_local",
    "initialize_distributed",
    "logical_axis_rules",
    "make_lr_schedule",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "param_shardings",
    "process_batch_rows",
    "resolve_config",
    "state_shardings",
    "step_key",
    "train",
    "train_step",
    "training_defaults",
    "write_config_json",
]
