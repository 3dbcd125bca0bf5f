"""Checkpoints with orbax: async, atomic, keep-last-N, restored into the live shardings.

Layout of a run directory::

    <dir>/config.json            resolved config of the latest start (process 0, atomic replace)
    <dir>/<step>/state/...       TrainState: step, params, opt_state, ema_params, rng key data
    <dir>/<step>/metadata/...    JSON: {"step": ..., "data_position": ..., **user metadata}

A save is written into a temporary directory and renamed into place when complete (orbax's
finalize), so a process killed at any moment leaves either a whole checkpoint or a
temporary directory that the next start deletes and ignores. Async saves copy the arrays to
host memory before returning, so the train step may donate and overwrite them right away.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

from ldm_jax.training.train_state import TrainState

STATE_ITEM = "state"
METADATA_ITEM = "metadata"
CONFIG_FILE = "config.json"


class Checkpointer:
    """Thin wrapper around ``ocp.CheckpointManager`` for a ``TrainState`` plus JSON metadata.

    Every ``save`` call is honoured (the training loop decides when to save); the
    ``max_to_keep`` most recent checkpoints are kept.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, async_save: bool = True):
        if max_to_keep is not None and int(max_to_keep) < 1:
            raise ValueError(f"config.checkpoint.max_to_keep must be >= 1 or None, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=(STATE_ITEM, METADATA_ITEM)
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: TrainState, metadata: Mapping[str, Any] | None = None) -> bool:
        """Start saving ``state`` as checkpoint ``step`` (returns once the arrays are on the
        host; the write finishes in the background). ``metadata`` must be JSON-able."""
        meta = {"step": int(step), **dict(metadata or {})}
        json.dumps(meta)  # fail here, not in a background thread
        return self._manager.save(
            int(step),
            args=ocp.args.Composite(
                **{STATE_ITEM: ocp.args.StandardSave(state), METADATA_ITEM: ocp.args.JsonSave(meta)}
            ),
            force=True,
        )

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[TrainState, dict]:
        """Restore checkpoint ``step`` (default: the latest) into the shardings carried by
        ``abstract_state`` (ShapeDtypeStructs with ``sharding``, see
        ``train_state.abstract_with_shardings``). Returns ``(state, metadata)``."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise ValueError(f"no checkpoint to restore in {self.directory}")
        restored = self._manager.restore(
            int(step),
            args=ocp.args.Composite(
                **{
                    STATE_ITEM: ocp.args.StandardRestore(abstract_state),
                    METADATA_ITEM: ocp.args.JsonRestore(),
                }
            ),
        )
        return restored[STATE_ITEM], dict(restored[METADATA_ITEM])

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

    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
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
