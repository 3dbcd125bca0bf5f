"""The training loop: the part that is the same for every model.

``train(config, task, batches, checkpoint_dir)`` resolves the config against the devices,
builds the mesh, creates the state sharded (or restores the latest checkpoint into the same
shardings), and runs the compiled step with periodic async checkpoints.

Resumption is exact: the data position is the step (``batches(position, rows)`` must yield
the same batches for the same position) and the step key is ``fold_in(base_key, step)``, so a
run killed at any moment and restarted reproduces the uninterrupted run bit for bit on CPU.
SIGTERM saves at the next step boundary and returns normally. A non-finite loss or
gradient stops the run with ``FloatingPointError`` without saving the bad state.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np

from ldm_jax.training import mesh as mesh_lib
from ldm_jax.training.checkpointing import Checkpointer, write_config_json
from ldm_jax.training.config import resolve_config
from ldm_jax.training.distributed import global_batch_from_local, initialize_distributed, process_batch_rows
from ldm_jax.training.optimizer import make_optimizer
from ldm_jax.training.preemption import PreemptionGuard
from ldm_jax.training.step import LossFn, compile_train_step, make_train_step
from ldm_jax.training.train_state import (
    InitParamsFn,
    TrainState,
    abstract_with_shardings,
    create_sharded_state,
    state_shardings,
    step_key,
)

log = logging.getLogger(__name__)

# (data position, rows) -> iterator of this process's batches from that position on: trees
# of numpy arrays holding rows ``rows`` (a slice of the global batch, from
# ``distributed.process_batch_rows``; all rows in a single-process run) of global batches
# number position, position + 1, ... One batch per step, so position == step. Leaves must be
# arrays (tokenize captions before); global jax.Arrays (e.g. from
# ``ldm_jax.data.DataLoader.iterate(sharding=...)``) are passed through unchanged.
BatchSource = Callable[[int, slice], Iterator[Any]]
MetricsCallback = Callable[[int, dict[str, float]], None]


@dataclasses.dataclass(frozen=True)
class Task:
    """What differs between models: how to create params and what to minimise.

    ``init_params(key)`` returns the (logically boxed) param tree, e.g.
    ``lambda key: model.init(key, *dummy_inputs)["params"]``; ``loss_fn(params, batch, key)``
    returns ``(scalar loss, dict of scalar aux metrics)``, both means over ``batch``. With
    ``loss_takes_step`` it is called as ``loss_fn(params, batch, key, step)`` where ``step`` is
    the number of updates already applied (a traced int32 scalar).
    """

    init_params: InitParamsFn
    loss_fn: LossFn
    loss_takes_step: bool = False


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    step: int
    preempted: bool
    last_metrics: dict[str, float]
    resumed_from: int | None


def _log_metrics(step: int, metrics: dict[str, float]) -> None:
    if jax.process_index() == 0:
        log.info("step %d: %s", step, " ".join(f"{k}={v:.6g}" for k, v in sorted(metrics.items())))


def train(
    config: Any,
    task: Task,
    batches: BatchSource,
    checkpoint_dir: str | os.PathLike,
    *,
    on_metrics: MetricsCallback = _log_metrics,
    checkpoint_metadata: Callable[[int], Mapping[str, Any]] | None = None,
    guard: PreemptionGuard | None = None,
) -> TrainResult:
    """Train ``task`` for ``config.train.num_steps`` updates, resuming from ``checkpoint_dir``.

    ``checkpoint_metadata(step)`` adds JSON-able entries to each checkpoint's metadata
    (beside ``step`` and ``data_position``). ``guard`` replaces the default SIGTERM guard.
    """
    initialize_distributed(config)
    config = resolve_config(config, jax.device_count(), jax.process_count())
    # Installed before the (possibly long) restore and compile, so a SIGTERM during start-up
    # still ends in a clean save-and-exit at the first step boundary.
    with (guard if guard is not None else PreemptionGuard()) as active_guard:
        with Checkpointer(
            checkpoint_dir, max_to_keep=config.checkpoint.max_to_keep, async_save=config.checkpoint.async_save
        ) as checkpointer:
            return _train(config, task, batches, checkpointer, on_metrics, checkpoint_metadata, active_guard)


def _train(config, task, batches, checkpointer, on_metrics, checkpoint_metadata, guard) -> TrainResult:
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = mesh_lib.logical_axis_rules(config.sharding)
    tx, lr_schedule = make_optimizer(config.optimizer)
    abstract_state, shardings = state_shardings(task.init_params, tx, mesh, rules, config.seed)

    write_config_json(checkpointer.directory, config)
    resumed_from = checkpointer.latest_step()
    if resumed_from is not None:
        state, metadata = checkpointer.restore(abstract_with_shardings(abstract_state, shardings), resumed_from)
        position = int(metadata.get("data_position", resumed_from))
    else:
        state = create_sharded_state(task.init_params, tx, shardings, config.seed)
        position = 0
    step = int(jax.device_get(state.step))

    train_step = compile_train_step(
        make_train_step(
            task.loss_fn,
            tx,
            lr_schedule,
            config.train,
            config.ema,
            mesh=mesh,
            state_shardings=shardings,
            loss_takes_step=task.loss_takes_step,
        ),
        shardings,
        mesh,
    )
    key_fn = jax.jit(step_key, out_shardings=mesh_lib.replicated(mesh))
    b_sharding = mesh_lib.batch_sharding(mesh)
    global_batch = int(config.train.global_batch_size)
    num_steps = int(config.train.num_steps)
    every = int(config.checkpoint.every_steps)
    log_every = int(config.train.log_every)

    def save(at_step: int) -> None:
        meta = {"data_position": at_step}
        if checkpoint_metadata is not None:
            meta.update(checkpoint_metadata(at_step))
        checkpointer.save(at_step, state, meta)

    # Metrics of a step are checked after the next step is dispatched, so the host does not
    # stall the device every step; a save or log forces the check first.
    unchecked: tuple[int, dict] | None = None
    last_metrics: dict[str, float] = {}

    def check(pending: tuple[int, dict] | None) -> dict[str, float]:
        if pending is None:
            return last_metrics
        at_step, metrics = pending
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if host["finite"] != 1.0 or not np.isfinite(host["loss"]):
            checkpointer.wait_until_finished()
            raise FloatingPointError(
                f"non-finite loss={host['loss']} grad_norm={host['grad_norm']} at step {at_step}; "
                f"stopped without saving, last checkpoint is step {checkpointer.latest_step()} "
                f"in {checkpointer.directory}"
            )
        return host

    preempted = False
    data = iter(batches(position, process_batch_rows(b_sharding, global_batch)))
    while step < num_steps:
        if guard.should_stop():
            last_metrics = check(unchecked)
            unchecked = None
            if checkpointer.latest_step() != step:
                save(step)
            preempted = True
            log.warning("stop requested: saved step %d, exiting", step)
            break
        batch = global_batch_from_local(next(data), b_sharding, global_batch)
        key = key_fn(state.rng, step)
        state, metrics = train_step(state, batch, key)
        step += 1
        last_metrics = check(unchecked)
        unchecked = (step, metrics)
        if step % every == 0 or step == num_steps or step % log_every == 0:
            last_metrics = check(unchecked)
            unchecked = None
            if step % log_every == 0 or step == num_steps:
                on_metrics(step, last_metrics)
            if step % every == 0 or step == num_steps:
                save(step)
    last_metrics = check(unchecked)
    checkpointer.wait_until_finished()
    return TrainResult(state, step, preempted, last_metrics, resumed_from)
