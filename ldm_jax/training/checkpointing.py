"""Checkpoints with orbax: async, atomic, verified on restore, keep-last-N, restored into the
live shardings.

Layout of a run directory::

    <dir>/config.json            resolved config of the latest start (process 0, atomic replace)
    <dir>/<step>/state/...       TrainState: step, params, opt_state, ema_params, rng key data
    <dir>/<step>/metadata/...    JSON: {"step": ..., "data_position": ..., **user metadata}
    <dir>/<step>/manifest/...    JSON: shape, dtype and fingerprint of every array, finiteness
                                 of params/EMA, sha256 of the metadata (checkpoint_integrity)
    <dir>/damaged/step_<N>[.k]   checkpoints found damaged, moved aside (never deleted)

A save is written into a temporary directory and renamed into place when complete (orbax's
finalize); the manifest is one more item of the same save, so it is renamed with the arrays
and a checkpoint either has both or is not a checkpoint. A process killed at any moment leaves
either a whole checkpoint or a temporary directory that the next start deletes and ignores.
Async saves copy the arrays to host memory before returning, so the train step may donate and
overwrite them right away.

``restore_latest_valid`` walks back from the newest checkpoint until one verifies; each
damaged one is reported in one log line (step and reason) and moved to ``damaged/``.
Rotation is ours, not orbax's ``max_to_keep``: the newest ``max_to_keep`` checkpoints are
kept, and so is the newest checkpoint known good (restored and verified by this run, or
written by this run from finite params), whatever its age.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ldm_jax.training import checkpoint_integrity as integrity
from ldm_jax.training.train_state import TrainState

log = logging.getLogger(__name__)

STATE_ITEM = "state"
METADATA_ITEM = "metadata"
MANIFEST_ITEM = "manifest"
CONFIG_FILE = "config.json"
DAMAGED_DIR = "damaged"
ORBAX_STEP_METADATA = "_CHECKPOINT_METADATA"
# Recorded in orbax's per-step metadata, so a checkpoint whose manifest was deleted is told
# apart from one written before manifests existed.
_CUSTOM_MANIFEST_KEY = "ldm_jax_manifest"


class CheckpointError(ValueError):
    """No usable checkpoint (all damaged) or one that does not fit the model; one line."""


@dataclasses.dataclass(frozen=True)
class DamagedCheckpoint:
    step: int
    reason: str
    moved_to: str | None = None


@dataclasses.dataclass(frozen=True)
class RestoredCheckpoint:
    """What ``restore_latest_valid`` found: the state and metadata of ``step``; ``verified``
    is False for a checkpoint written before manifests existed (only checked for finite
    params); ``damaged`` lists the newer checkpoints that were skipped."""

    state: Any
    metadata: dict
    step: int
    verified: bool
    damaged: tuple[DamagedCheckpoint, ...] = ()


def _one_line(error: BaseException, limit: int = 300) -> str:
    """The root cause of ``error`` on one line: orbax wraps TensorStore's message (which
    names the array and the file) in a generic one that dumps the whole spec."""
    seen = set()
    while (error.__cause__ or error.__context__) is not None and id(error) not in seen:
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    text = " ".join(str(error).split()) or type(error).__name__
    text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _all_processes_ok(ok: bool) -> bool:
    """True when every process says ok (restores are collective: all must pick the same step)."""
    if jax.process_count() == 1:
        return ok
    flags = multihost_utils.process_allgather(np.asarray(ok, np.int32))
    return bool(np.all(flags))


class Checkpointer:
    """Thin wrapper around ``ocp.CheckpointManager`` for a ``TrainState`` plus JSON metadata
    and an integrity manifest.

    Every ``save`` call is honoured (the training loop decides when to save); the
    ``max_to_keep`` most recent checkpoints are kept, plus the newest known-good one.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3, async_save: bool = True):
        if max_to_keep is not None and int(max_to_keep) < 1:
            raise ValueError(f"config.checkpoint.max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.max_to_keep = None if max_to_keep is None else int(max_to_keep)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None,  # rotation is ours (``_rotate``): never drop the last good one
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(STATE_ITEM, METADATA_ITEM, MANIFEST_ITEM)
        )
        # The newest checkpoint known good; saves become good once finalized (see _rotate).
        self.last_good_step: int | None = None
        self._pending_good: list[int] = []

    # ------------------------------------------------------------------ listing

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    # ------------------------------------------------------------------ save

    def save(self, step: int, state: TrainState, metadata: Mapping[str, Any] | None = None) -> bool:
        """Start saving ``state`` as checkpoint ``step`` (returns once the arrays are on the
        host; the write finishes in the background). ``metadata`` must be JSON-able."""
        meta = {"step": int(step), **dict(metadata or {})}
        json.dumps(meta)  # fail here, not in a background thread
        manifest = integrity.build_manifest(step, state, meta)
        # orbax waits for the previous async save before starting this one; rotating first
        # means the previous save is finalized when its predecessors are deleted.
        self._manager.wait_until_finished()
        self._rotate()
        saved = self._manager.save(
            int(step),
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.StandardSave(state),
                    METADATA_ITEM: ocp.args.JsonSave(meta),
                    MANIFEST_ITEM: ocp.args.JsonSave(manifest),
                }
            ),
            force=True,
            custom_metadata={_CUSTOM_MANIFEST_KEY: integrity.MANIFEST_FORMAT},
        )
        if saved and all(manifest["finite"].values()):
            self._pending_good.append(int(step))
        elif saved:
            log.warning("checkpoint step %d holds non-finite params/EMA: it will never be restored", step)
        return saved

    def _rotate(self) -> None:
        """Delete all but the newest ``max_to_keep`` finalized checkpoints, never the newest
        known-good one. Runs when no save is in flight (the same decision on every process)."""
        steps = self.all_steps()
        finalized = [s for s in self._pending_good if s in steps]
        if finalized:
            self.last_good_step = max([*finalized, *([self.last_good_step] if self.last_good_step is not None else [])])
        self._pending_good = [s for s in self._pending_good if s not in steps]
        if self.max_to_keep is None:
            return
        if self.last_good_step is None:
            # Nothing restored or written good yet (a Checkpointer used without
            # restore_latest_valid): protect the newest earlier checkpoint whose manifest
            # says its params are finite, unverified but the best candidate there is.
            self.last_good_step = self._newest_finite_on_disk(steps)
        keep = set(steps[-self.max_to_keep:])
        if self.last_good_step is not None:
            keep.add(self.last_good_step)
        for step in steps:
            if step not in keep:
                self._manager.delete(step)

    def _newest_finite_on_disk(self, steps: list[int]) -> int | None:
        for step in sorted(steps, reverse=True):
            if step in self._pending_good or self._structure_problem(step) is not None:
                continue
            try:
                manifest = self.read_manifest(step)
            except Exception:  # noqa: BLE001 - unreadable: not a candidate
                continue
            if manifest is None or all(manifest.get("finite", {}).values()):
                return step
        return None

    # ------------------------------------------------------------------ restore

    def _restore_args(self, abstract_state: Any) -> dict:
        return {
            STATE_ITEM: ocp.args.StandardRestore(abstract_state),
            METADATA_ITEM: ocp.args.JsonRestore(),
        }

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Restore checkpoint ``step`` (default: the latest) into the shardings carried by
        ``abstract_state`` (ShapeDtypeStructs with ``sharding``, see
        ``train_state.abstract_with_shardings``). Returns ``(state, metadata)``. Does not
        verify; see ``restore_latest_valid``."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise ValueError(f"no checkpoint to restore in {self.directory}")
        restored = self._manager.restore(int(step), args=ocp.args.Composite(**self._restore_args(abstract_state)))
        return restored[STATE_ITEM], dict(restored[METADATA_ITEM])

    def _structure_problem(self, step: int) -> str | None:
        """What is missing from the step directory, read without touching the arrays."""
        path = self.step_dir(step)
        if not os.path.isfile(os.path.join(path, ORBAX_STEP_METADATA)):
            return f"missing {ORBAX_STEP_METADATA}"
        for item in (STATE_ITEM, METADATA_ITEM):
            if not os.path.isdir(os.path.join(path, item)):
                return f"missing {item}/"
        if not os.path.isfile(os.path.join(path, STATE_ITEM, "_METADATA")):
            return f"missing {STATE_ITEM}/_METADATA"
        if self._expects_manifest(step) and not os.path.isdir(os.path.join(path, MANIFEST_ITEM)):
            return f"missing {MANIFEST_ITEM}/"
        return None

    def _expects_manifest(self, step: int) -> bool:
        try:
            with open(os.path.join(self.step_dir(step), ORBAX_STEP_METADATA)) as f:
                custom = json.load(f).get("custom_metadata") or {}
        except (OSError, ValueError):
            return True  # unreadable orbax metadata is reported by _structure_problem
        return _CUSTOM_MANIFEST_KEY in custom

    def read_manifest(self, step: int) -> dict | None:
        """The manifest of ``step``, or None for a checkpoint written before manifests."""
        if not os.path.isdir(os.path.join(self.step_dir(step), MANIFEST_ITEM)):
            return None
        restored = self._manager.restore(int(step), args=ocp.args.Composite(**{MANIFEST_ITEM: ocp.args.JsonRestore()}))
        return dict(restored[MANIFEST_ITEM])

    def _try_restore(self, abstract_state: Any, step: int) -> tuple[Any, dict, bool, str | None]:
        """``(state, metadata, verified, reason)``; ``reason`` is None when usable. Raises
        CheckpointError when the checkpoint is intact but does not fit ``abstract_state``."""
        reason = self._structure_problem(step)
        if reason is not None:
            return None, {}, False, reason
        try:
            manifest = self.read_manifest(step)
        except Exception as error:  # noqa: BLE001 - any failure to read is damage
            return None, {}, False, f"unreadable {MANIFEST_ITEM}: {_one_line(error)}"
        if manifest is not None:
            try:
                integrity.check_target(manifest, abstract_state)
            except integrity.ManifestMismatch as error:
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} does not fit the model: {error}"
                ) from None
        try:
            state, metadata = self.restore(abstract_state, step)
        except Exception as error:  # noqa: BLE001 - a truncated/garbled file raises anything
            return None, {}, False, f"unreadable: {_one_line(error)}"
        if manifest is None:
            return state, metadata, False, integrity.non_finite_reason(state)
        return state, metadata, True, integrity.verify(manifest, state, metadata)

    def _move_aside(self, step: int) -> str | None:
        """Rename a damaged step to ``damaged/step_<N>`` (process 0), so a new save of that
        step can happen and nothing lists it as a checkpoint any more. Never deletes."""
        target = None
        if jax.process_index() == 0:
            root = os.path.join(self.directory, DAMAGED_DIR)
            os.makedirs(root, exist_ok=True)
            target = os.path.join(root, f"step_{step}")
            k = 1
            while os.path.exists(target):
                target, k = os.path.join(root, f"step_{step}.{k}"), k + 1
            os.rename(self.step_dir(step), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"ldm_jax_checkpoint_move_aside_{step}")
        return target

    def restore_latest_valid(self, abstract_state: TrainState) -> RestoredCheckpoint | None:
        """Restore the newest checkpoint that verifies, or None when there is no checkpoint.

        A damaged one (files missing, unreadable or truncated data, checksum mismatch,
        non-finite params/EMA) is logged in one line naming its step and the reason, then
        moved to ``damaged/`` once an older good one has been found. When every checkpoint is
        damaged nothing is moved and CheckpointError lists them (starting from scratch over
        a damaged run is the user's decision). A checkpoint without a manifest (written by
        an older ldm_jax) is accepted with a log line saying it could not be verified."""
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None
        damaged: list[DamagedCheckpoint] = []
        for step in steps:
            state, metadata, verified, reason = self._try_restore(abstract_state, step)
            if not _all_processes_ok(reason is None):
                damaged.append(DamagedCheckpoint(step, reason or "damaged on another process"))
                continue
            moved = []
            for bad in damaged:
                target = self._move_aside(bad.step)
                moved.append(dataclasses.replace(bad, moved_to=target))
                # One line per damaged checkpoint: which, why, where it went, what is used.
                (log.error if jax.process_index() == 0 else log.debug)("checkpoint step %d in %s is damaged (%s): moved to %s; resuming from step %d",
                          bad.step, self.directory, bad.reason, target, step)
            if moved:
                self._manager.reload()
            if not verified and jax.process_index() == 0:
                log.warning("checkpoint step %d in %s has no integrity manifest (written by an older version): "
                            "restored without checksum verification", step, self.directory)
            self.last_good_step = step
            return RestoredCheckpoint(state, metadata, step, verified, tuple(moved))
        listed = "; ".join(f"step {d.step}: {d.reason}" for d in damaged)
        raise CheckpointError(f"every checkpoint in {self.directory} is damaged ({listed}); "
                              f"move them away to start from scratch")

    def metadata(self, step: int | None = None) -> dict:
        """The JSON metadata of checkpoint ``step`` (default: the latest) without reading
        the arrays, e.g. for a data pipeline to find its position before the state exists."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise ValueError(f"no checkpoint to restore in {self.directory}")
        restored = self._manager.restore(
            int(step), args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()})
        )
        return dict(restored[METADATA_ITEM])

    def latest_intact_metadata(self) -> tuple[int, dict] | None:
        """``(step, metadata)`` of the newest checkpoint whose files are all there and whose
        metadata matches its manifest, read without the arrays (for start-up code that needs
        e.g. the scale factor before the state exists); None when there is none. The arrays
        are checked later by ``restore_latest_valid``, which may fall back further."""
        for step in sorted(self.all_steps(), reverse=True):
            if self._structure_problem(step) is not None:
                continue
            try:
                manifest = self.read_manifest(step)
                metadata = self.metadata(step)
            except Exception:  # noqa: BLE001 - unreadable: try an older one
                continue
            if manifest is None or manifest.get("metadata_sha256") == integrity.metadata_digest(metadata):
                return step, metadata
        return None

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()
        self._rotate()

    def close(self) -> None:
        try:
            self._manager.wait_until_finished()
            self._rotate()
        finally:
            self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_config_json(directory: str | os.PathLike, config: Mapping[str, Any] | Any) -> str | None:
    """Write the resolved config as ``<directory>/config.json`` (process 0 only, atomically
    via a temporary file and ``os.replace``). Accepts a ConfigDict or a plain mapping.
    Returns the path written, or None on other processes."""
    if jax.process_index() != 0:
        return None
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CONFIG_FILE)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".config.", suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(as_dict, f, indent=2, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path
