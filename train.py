"""Train a stage of latent diffusion: the autoencoder or the (latent / pixel) diffusion model.

    python train.py --config configs/digits_autoencoder.py --workdir runs/digits_ae
    python train.py --config configs/digits_ldm.py --workdir runs/digits_ldm \\
        --config.first_stage.workdir=runs/digits_ae
    python train.py --config configs/digits_ldm.py:runlocal ...   # shrunken local variant

Any config field can be overridden with ``--config.<path>=<value>``. Re-running the same command
resumes from the latest checkpoint in ``<workdir>/checkpoints``. SIGTERM (preemption) saves a
checkpoint and exits 0; a NaN/inf loss stops with a message and exit code 3, keeping the last
good checkpoint. A bad config fails at start-up with one line on stderr and exit code 2.

Multi-host: run the same command on every host with ``--config.distributed.coordinator_address=
host0:1234 --config.distributed.num_processes=N --config.distributed.process_id=i`` (or the
``LDM_JAX_*`` environment variables, or ``--config.distributed.auto=True`` on TPU pods / SLURM);
``workdir`` must be on storage every host can write.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/<name>.py[:arg]).")
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, samples, TensorBoard, exported model.")

log = logging.getLogger("train")

EXIT_CONFIG_ERROR = 2
EXIT_NON_FINITE = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention for Ctrl-C


class StartupError(Exception):
    """A bad config or missing input found before the first training step (one-line message)."""


def _model_params(state):
    """What previews and exports see: the EMA params, plus the non-trainable model state
    (e.g. ``vq_ema``, the EMA codebook) when the task has one."""
    model_state = getattr(state, "model_state", None)
    return state.ema_params if model_state is None else {**state.ema_params, **model_state}


def run(config, workdir: str, extra_hooks=(), guard=None):
    """Train ``config`` in ``workdir`` (resuming if it holds checkpoints). Returns the loop's
    ``TrainResult``. Raises StartupError (one-line message) for anything wrong before the first
    step; errors after that propagate unchanged. ``extra_hooks``: more ``loop.Hook`` objects;
    ``guard``: the loop's PreemptionGuard (SIGTERM/SIGINT), so the caller can read which signal
    stopped the run. The workdir is locked for the whole run (one run per workdir)."""
    with contextlib.ExitStack() as stack:
        return _run(config, workdir, extra_hooks, guard, stack)


def _run(config, workdir, extra_hooks, guard, stack):
    import jax
    import numpy as np

    from ldm_jax.data import build_dataset, build_loader, dataset_stats
    from ldm_jax.training.context import start_run
    from ldm_jax.training.loop import Hook, train
    from ldm_jax.training.run_logger import RunLogger
    from ldm_jax.training.stages import stage_module
    from ldm_jax.training.atomic_export import export_atomically, export_complete
    from ldm_jax.training.workdir import checkpoint_dir
    from ldm_jax.training.workdir_lock import WorkdirLockedError, lock_workdir
    from ldm_jax.training.resume_guard import check_resume

    started = False
    workdir = os.path.abspath(workdir)
    try:
        if not config.get("stage"):
            raise ValueError("config.stage is not set (e.g. 'autoencoder' or 'diffusion')")
        with config.unlocked():
            config.workdir = workdir
        # Resolved once: distributed start-up, the config checked against the devices, the mesh.
        run_context = start_run(config)
        # Locked after distributed start-up (the lock is a collective) and before anything is
        # written to the workdir (latent cache, config.json, checkpoints).
        os.makedirs(workdir, exist_ok=True)
        stack.enter_context(lock_workdir(workdir))
        resolved = run_context.config
        # A resume that would change the run's identity refuses here, before the stage
        # writes anything (latent cache) and before the loop records the config.
        check_resume(checkpoint_dir(workdir), resolved)
        module = stage_module(resolved.stage)
        source = build_dataset(resolved.data)
        stats = dataset_stats(source, str(resolved.data.name))
        stage = module.build_stage(resolved, stats, source=source, run=run_context)
        train_source = stage.data_source if stage.data_source is not None else source
        global_batch = run_context.global_batch
        loader = build_loader(resolved.data, global_batch, source=train_source)

        def batches(position: int, rows: slice):
            expected = slice(loader.process_index * loader.local_batch_size,
                             (loader.process_index + 1) * loader.local_batch_size)
            if (rows.start, rows.stop) != (expected.start, expected.stop):
                raise ValueError(f"the mesh gives this process batch rows {rows}, the loader serves {expected}")
            with loader.iterate(start_step=position) as iterator:
                for batch in iterator:
                    yield stage.host_batch(batch)

        logging_config = resolved.get("logging") or {}
        logger = RunLogger(
            workdir,
            total_steps=int(resolved.train.num_steps),
            global_batch_size=global_batch,
            tensorboard=bool(logging_config.get("tensorboard", True)),
            progress_bar=bool(logging_config.get("progress_bar", True)),
            skipped_images=lambda: int(getattr(train_source, "num_skipped", 0)),
        )
        preview_config = resolved.get("preview") or {}
        hooks = []
        preview_every = int(preview_config.get("every_steps", 0))
        if stage.preview is not None and preview_every >= 0:
            columns = int(stage.preview_columns or preview_config.get("columns", 0))
            seed = int(preview_config.get("seed", 0))

            def write_preview(step, state):
                images = stage.preview(_model_params(state), jax.random.PRNGKey(seed))
                path = logger.write_grid(step, np.asarray(images), "samples", columns)
                if path:
                    log.info("wrote preview %s", path)

            hooks.append(Hook(preview_every, write_preview, at_end=True))
        from ldm_jax.training.eval_hook import build_eval_hook

        eval_hook = build_eval_hook(resolved, stage, workdir, run_context, logger.write_scalars, logger.write_grid)  # config.eval
        if eval_hook is not None:
            hooks.append(eval_hook)
        hooks.extend(extra_hooks)
    except (ValueError, OSError, WorkdirLockedError) as error:
        raise StartupError(str(error)) from error

    def on_start(step):
        nonlocal started
        started = True
        logger.on_start(step)

    def metadata(step):
        return dict(stage.metadata)

    try:
        with logger:
            result = train(
                resolved,
                stage.task,
                batches,
                checkpoint_dir(workdir),
                on_metrics=logger.on_metrics,
                on_step=logger.on_step,
                on_start=on_start,
                hooks=hooks,
                checkpoint_metadata=metadata,
                run=run_context,
                guard=guard,
            )
    except ValueError as error:
        if started:
            raise
        raise StartupError(str(error)) from error
    finally:
        loader.close()

    num_steps = int(resolved.train.num_steps)
    export_config = resolved.get("export") or {}
    export_dir = os.path.join(workdir, str(export_config.get("dirname", "model")))
    finished = result.step == num_steps and not result.preempted
    # Re-exported whenever the finished run's export is missing or incomplete (no marker for
    # this step), e.g. after a kill during a previous export.
    fresh = not export_complete(export_dir, step=num_steps)
    if stage.export is not None and export_config.get("enabled", True) and finished and fresh:
        ema = _model_params(result.state)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            ema = multihost_utils.process_allgather(ema, tiled=True)
        if jax.process_index() == 0:
            export_atomically(stage.export, jax.device_get(ema), export_dir, {"step": num_steps})
            log.info("exported the EMA model to %s", export_dir)
    if result.preempted:
        log.warning("preempted at step %d; re-run the same command to resume", result.step)
    return result


def main(argv):
    if len(argv) > 1:
        print(f"train.py: error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if FLAGS.workdir is None:
        print("train.py: error: --workdir is required", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if _CONFIG.value is None:
        print("train.py: error: --config is required (e.g. configs/digits_ldm.py)", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    return run_command(_CONFIG.value, FLAGS.workdir)


def run_command(config, workdir: str) -> int:
    """What ``main`` does once the flags are parsed: train, and turn every expected failure
    into one ``train.py: ...`` line on stderr and an exit status (2 bad input, 3 stopped,
    130 interrupted). Callable in-process (tests)."""
    logging.getLogger().setLevel(logging.INFO)
    # orbax reports every checkpoint step at INFO through absl; keep the run log readable.
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax").setLevel(logging.WARNING)  # backend probing ("no TPU found")
    from ldm_jax.data.folder import UnreadableDataError
    from ldm_jax.training.atomic_export import ExportError
    from ldm_jax.training.cli import one_line
    from ldm_jax.training.preemption import PreemptionGuard

    if os.path.exists(workdir) and not os.path.isdir(workdir):
        print(f"train.py: error: --workdir {workdir} is a file, not a directory", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    guard = PreemptionGuard()  # SIGTERM and SIGINT: save at the next step boundary
    try:
        result = run(config, workdir, guard=guard)
    except (StartupError, UnreadableDataError) as error:
        print(f"train.py: error: {one_line(error)}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    except (FloatingPointError, ExportError) as error:
        print(f"train.py: stopped: {one_line(error)}", file=sys.stderr)
        return EXIT_NON_FINITE
    except KeyboardInterrupt:
        print("train.py: interrupted again: stopped without saving (the last checkpoint is kept)", file=sys.stderr)
        return EXIT_INTERRUPTED
    if result.preempted:
        print(f"train.py: stopped by {guard.describe()} at step {result.step}; checkpoint saved, "
              "re-run the same command to resume", file=sys.stderr)
        return guard.exit_code
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ldm_jax.training.cli import absl_flags_parser

    # Unknown or misspelled --config.<key> (nearest names given), a bad value, a missing or
    # broken config file: one line and exit 2 before anything is imported or written.
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=absl_flags_parser("train.py"))
