"""The training loop: the part that is the same for every model.

``train(config, task, batches, checkpoint_dir, run=...)`` takes the resolved config and mesh
(``ldm_jax.training.context.RunContext``; resolved here when not given), creates the state sharded (or restores the latest checkpoint into the same
shardings), and runs the compiled step with periodic async checkpoints.

Resumption is exact: the data position is the step (``batches(position, rows)`` must yield
the same batches for the same position) and the step key is ``fold_in(base_key, step)``, so a
run killed at any moment and restarted reproduces the uninterrupted run bit for bit on CPU.
SIGTERM saves at the next step boundary and returns normally. A resume whose config
changes the run's identity refuses before anything is written (``resume_guard``). A non-finite loss or
gradient stops the run with ``FloatingPointError`` without saving the bad state.

Frozen models (a first-stage autoencoder, a CLIP text encoder) enter through
``Task.frozen_params`` and ``Task.prepare_batch``: the frozen params are placed once, sharded
by the same logical rules as trained params, and ``prepare_batch(frozen, batch, key)`` runs as
its own jitted, sharded program on each device batch before the train step, with the frozen
params as *arguments* (never baked into a program as constants, which an SD-sized VAE would
make huge). Hooks (``Hook``) run every N steps with the live state (preview samples);
``on_step`` sees every step's host metrics (progress bars).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

from ldm_jax.training import mesh as mesh_lib
from ldm_jax.training.checkpointing import Checkpointer
from ldm_jax.data.loader import make_global_batch
from ldm_jax.training.context import RunContext, start_run
from ldm_jax.training.distributed import process_batch_rows
from ldm_jax.training.mesh import place_frozen  # noqa: F401  (part of the loop's API)
from ldm_jax.training.optimizer import make_optimizer
from ldm_jax.training.preemption import PreemptionGuard
from ldm_jax.training.resume_guard import check_resume, record_start
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
# Key stream of ``prepare_batch`` (fold_in of the step key), apart from the loss's own use of it.
PREPARE_STREAM = 0x5EED


@dataclasses.dataclass(frozen=True)
class Task:
    """What differs between models: how to create params and what to minimise.

    ``init_params(key)`` returns the (logically boxed) param tree, e.g.
    ``lambda key: model.init(key, *dummy_inputs)["params"]``; ``loss_fn(params, batch, key)``
    returns ``(scalar loss, dict of scalar aux metrics)``, both means over ``batch``. With
    ``loss_takes_step`` it is called as ``loss_fn(params, batch, key, step)`` where ``step`` is
    the number of updates already applied (a traced int32 scalar).

    ``frozen_params``: a tree of arrays that is not trained (leaves may be boxed in
    ``nn.LogicallyPartitioned`` to be sharded by the rules; plain leaves are replicated).
    ``prepare_batch(frozen_params, batch, key) -> batch`` turns each global device batch into
    what ``loss_fn`` sees (e.g. images -> latents); it is jitted on its own with
    ``frozen_params`` as an argument and its key is ``fold_in(step key, PREPARE_STREAM)``, so a
    resumed run prepares the same batches. With ``loss_takes_frozen`` the loss is
    ``loss_fn(params, batch, key, frozen_params)`` (then ``step``): the placed frozen params
    enter the compiled train step as an argument (a frozen U-Net under a trained ControlNet).
    With ``init_takes_frozen`` the params are ``init_params(key, frozen_params)`` (placed
    arrays, arguments of the init program: a ControlNet initialised as a copy of the U-Net).

    ``init_model_state(key)``: the initial non-trainable model state (``TrainState.model_state``,
    e.g. a VQ EMA codebook's statistics; ``key`` is the params' key). The loss is then called
    as ``loss_fn(params, model_state, batch, key[, step]) -> (loss, (aux, new_model_state))``
    (``ldm_jax.training.step``); the state is checkpointed and restored with the rest.

    ``load_params(abstract_params, param_shardings) -> {top-level key: tree}``: pretrained
    weights for a fresh run (fine-tuning): arrays placed with the given shardings (each device
    receives only its shards) that replace those entries of ``init_params``'s tree; the EMA
    starts equal to them. Never called when the run resumes: the checkpoint wins.
    """

    init_params: InitParamsFn
    loss_fn: LossFn
    loss_takes_step: bool = False
    frozen_params: Any = None
    prepare_batch: Callable[[Any, Any, jax.Array], Any] | None = None
    init_model_state: Callable[[jax.Array], Any] | None = None
    loss_takes_frozen: bool = False
    init_takes_frozen: bool = False
    load_params: Callable[[Any, Any], Mapping[str, Any]] | None = None


@dataclasses.dataclass(frozen=True)
class Hook:
    """``fn(step, state)`` after every ``every_steps``-th update (0: never periodically) and,
    with ``at_end``, once after the last update of the run (not on preemption). Runs on every
    process (it may run jitted code on the sharded state); write files on process 0 only."""

    every_steps: int
    fn: Callable[[int, TrainState], None]
    at_end: bool = True


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
    hooks: Sequence[Hook] = (),
    on_step: MetricsCallback | None = None,
    on_start: Callable[[int], None] | None = None,
    run: RunContext | None = None,
) -> TrainResult:
    """Train ``task`` for ``config.train.num_steps`` updates, resuming from ``checkpoint_dir``.

    ``checkpoint_metadata(step)`` adds JSON-able entries to each checkpoint's metadata
    (beside ``step`` and ``data_position``). ``guard`` replaces the default SIGTERM guard.
    ``on_metrics(step, metrics)`` runs every ``config.train.log_every`` steps and after the
    last; ``on_step(step, metrics)`` after every step (one step late: metrics are read after
    the next step is dispatched); ``on_start(step)`` once the state is ready (before the
    first step, which compiles), with the step the run starts from; ``hooks`` see the state (see ``Hook``).
    ``run``: the :class:`~ldm_jax.training.context.RunContext` ``train.py`` made (resolved
    config, mesh); None resolves ``config`` here (``start_run``).
    """
    run = start_run(config) if run is None else run
    config = run.config
    # A resume that would change the run's identity refuses before anything is written
    # (the Checkpointer below already creates and cleans directories).
    check_resume(checkpoint_dir, config)
    # Installed before the (possibly long) restore and compile, so a SIGTERM during start-up
    # still ends in a clean save-and-exit at the first step boundary.
    with (guard if guard is not None else PreemptionGuard()) as active_guard:
        with Checkpointer(
            checkpoint_dir, max_to_keep=config.checkpoint.max_to_keep, async_save=config.checkpoint.async_save
        ) as checkpointer:
            return _train(
                run, task, batches, checkpointer, on_metrics, checkpoint_metadata, active_guard,
                tuple(hooks), on_step, on_start,
            )


def compile_prepare_batch(task: Task, frozen_shardings: Any, mesh: jax.sharding.Mesh) -> Callable:
    """``jax.jit`` of ``task.prepare_batch`` with the frozen params as a sharded argument and
    the batch split over the data axes in and out."""
    b_sharding = mesh_lib.batch_sharding(mesh)
    return jax.jit(
        task.prepare_batch,
        in_shardings=(frozen_shardings, b_sharding, mesh_lib.replicated(mesh)),
        out_shardings=b_sharding,
    )


def _check_loaded(loaded: Mapping[str, Any], abstract_params: Any) -> dict:
    """``loaded`` (a ``Task.load_params`` result) against the abstract params: known top-level
    keys, the same tree, shapes and dtypes; ValueError naming the first differing path."""
    if not isinstance(abstract_params, Mapping) or not isinstance(loaded, Mapping):
        raise ValueError("Task.load_params needs a params tree that is a dict and returns a dict of its entries")
    out = {}
    for key, tree in loaded.items():
        if key not in abstract_params:
            raise ValueError(f"loaded params entry {key!r} is not in the model's params {sorted(abstract_params)}")
        want = dict(jax.tree_util.tree_flatten_with_path(abstract_params[key])[0])
        got = dict(jax.tree_util.tree_flatten_with_path(tree)[0])
        for path in sorted(set(want) | set(got), key=jax.tree_util.keystr):
            name = f"{key}{jax.tree_util.keystr(path)}"
            if path not in got or path not in want:
                raise ValueError(f"loaded params {'lack' if path not in got else 'have an unexpected'} {name}")
            w, g = want[path], got[path]
            if tuple(w.shape) != tuple(g.shape) or w.dtype != g.dtype:
                raise ValueError(f"loaded params {name}: {g.dtype}{list(g.shape)}, the model has {w.dtype}{list(w.shape)}")
        out[key] = tree
    return out


def create_initial_state(task: Task, tx: Any, abstract_state: TrainState, shardings: TrainState, seed: int,
                         init_args: tuple = ()) -> TrainState:
    """The state of a fresh run (what :func:`train` starts from when there is no checkpoint):
    ``task.init_params`` born sharded, with ``task.load_params``'s pretrained entries in place
    of their random init (and as the EMA)."""
    loaded = None
    if task.load_params is not None:
        loaded = _check_loaded(task.load_params(abstract_state.params, shardings.params), abstract_state.params)
    return create_sharded_state(task.init_params, tx, shardings, seed, task.init_model_state, init_args, loaded)


def _train(
    run, task, batches, checkpointer, on_metrics, checkpoint_metadata, guard, hooks, on_step, on_start
) -> TrainResult:
    config, mesh, rules = run.config, run.mesh, run.rules
    tx, lr_schedule = make_optimizer(config.optimizer)
    frozen = frozen_shardings = None
    if task.prepare_batch is not None or task.loss_takes_frozen or task.init_takes_frozen:
        frozen, frozen_shardings = place_frozen(task.frozen_params, mesh, rules)
    init_args = (frozen,) if task.init_takes_frozen else ()
    abstract_state, shardings = state_shardings(
        task.init_params, tx, mesh, rules, config.seed, task.init_model_state, init_args
    )

    # config.json is written by the first start only; later starts append to its history.
    record_start(checkpointer.directory, config, is_main=jax.process_index() == 0)
    # The newest checkpoint that verifies (checksums, finite params); damaged newer ones are
    # reported in one line each and moved aside (ldm_jax.training.checkpoint_integrity).
    restored = checkpointer.restore_latest_valid(abstract_with_shardings(abstract_state, shardings))
    resumed_from = None if restored is None else restored.step
    if restored is not None:
        state, metadata = restored.state, restored.metadata
        position = int(metadata.get("data_position", resumed_from))
        if task.load_params is not None:
            log.info("resumed from step %d: the params are the checkpoint's; the pretrained init is not read",
                     resumed_from)
    else:
        state = create_initial_state(task, tx, abstract_state, shardings, config.seed, init_args)
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
            loss_takes_frozen=task.loss_takes_frozen,
        ),
        shardings,
        mesh,
        frozen_shardings if task.loss_takes_frozen else None,
    )
    key_fn = jax.jit(step_key, out_shardings=mesh_lib.replicated(mesh))
    b_sharding = mesh_lib.batch_sharding(mesh)
    prepare = None
    if task.prepare_batch is not None:
        prepare = compile_prepare_batch(task, frozen_shardings, mesh)
        prepare_key_fn = jax.jit(
            lambda key: jax.random.fold_in(key, PREPARE_STREAM), out_shardings=mesh_lib.replicated(mesh)
        )
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
        if on_step is not None:
            on_step(at_step, host)
        return host

    if on_start is not None:
        on_start(step)

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
        batch = make_global_batch(next(data), b_sharding, global_batch)
        key = key_fn(state.rng, step)
        if prepare is not None:
            batch = prepare(frozen, batch, prepare_key_fn(key))
        state, metrics = train_step(state, batch, key, frozen) if task.loss_takes_frozen else train_step(state, batch, key)
        step += 1
        last_metrics = check(unchecked)
        unchecked = (step, metrics)
        due_hooks = [
            hook
            for hook in hooks
            if (hook.every_steps > 0 and step % hook.every_steps == 0) or (hook.at_end and step == num_steps)
        ]
        if step % every == 0 or step == num_steps or step % log_every == 0 or due_hooks:
            last_metrics = check(unchecked)
            unchecked = None
            if step % log_every == 0 or step == num_steps:
                on_metrics(step, last_metrics)
            if step % every == 0 or step == num_steps:
                save(step)
            for hook in due_hooks:
                hook.fn(step, state)
    last_metrics = check(unchecked)
    checkpointer.wait_until_finished()
    return TrainResult(state, step, preempted, last_metrics, resumed_from)
