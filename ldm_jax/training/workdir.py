"""Reading a training run directory back: its config, checkpoints and EMA weights, and the
inference objects built from them.

Layout written by ``train.py``::

    <workdir>/checkpoints/config.json        the resolved config
    <workdir>/checkpoints/<step>/state/...   TrainState (params, opt_state, ema_params, ...)
    <workdir>/checkpoints/<step>/metadata    JSON (scale_factor, data facts, ...)
    <workdir>/model/                         the exported EMA model (end of training)
    <workdir>/samples/*.png, tensorboard/    previews and event files

This module only reads (and imports no stage or model): the inference objects built from a
run are ``ldm_jax.pipeline.from_workdir`` (a diffusion run) and
``ldm_jax.ldm.first_stage.load_autoencoder_run`` (an autoencoder run, the diffusion stage's
``first_stage.source="workdir"``). Reading never creates, locks or cleans anything in the
workdir, so it is safe while the run is still training.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ldm_jax.training.checkpointing import CONFIG_FILE, METADATA_ITEM, STATE_ITEM

CHECKPOINTS = "checkpoints"


def checkpoint_dir(workdir: str | os.PathLike) -> str:
    return os.path.join(os.path.abspath(os.fspath(workdir)), CHECKPOINTS)


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The resolved config a run was started with (``checkpoints/config.json``)."""
    path = os.path.join(checkpoint_dir(workdir), CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {checkpoint_dir(workdir)}: not a training workdir")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
    """Steps of the finished checkpoints (orbax renames a save into ``<step>`` when complete)."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        return []
    steps = []
    for name in os.listdir(directory):
        if name.isdigit() and os.path.isdir(os.path.join(directory, name, STATE_ITEM)):
            steps.append(int(name))
    return sorted(steps)


def resolve_step(workdir: str | os.PathLike, step: int | None = None) -> int:
    """``step`` if that checkpoint exists, the latest when None; ValueError naming the choices."""
    steps = checkpoint_steps(workdir)
    if not steps:
        raise ValueError(f"no checkpoint in {checkpoint_dir(workdir)}")
    if step is None:
        return steps[-1]
    if int(step) not in steps:
        raise ValueError(f"no checkpoint for step {step} in {checkpoint_dir(workdir)}; available: {steps}")
    return int(step)


def read_metadata(workdir: str | os.PathLike, step: int | None = None) -> dict:
    """The JSON metadata stored with checkpoint ``step`` (default: the latest)."""
    step = resolve_step(workdir, step)
    path = os.path.join(checkpoint_dir(workdir), str(step), METADATA_ITEM)
    return dict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path))


def latest_metadata(workdir: str | os.PathLike) -> dict | None:
    """The latest checkpoint's metadata, or None when the run has no checkpoint yet."""
    if not checkpoint_steps(workdir):
        return None
    return read_metadata(workdir)


def restore_ema_params(workdir: str | os.PathLike, step: int | None = None) -> tuple[Any, int]:
    """``(ema_params as host NumPy arrays, step)``; only the EMA tree is read from disk."""
    step = resolve_step(workdir, step)
    path = os.path.join(checkpoint_dir(workdir), str(step), STATE_ITEM)
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path)
    tree = tree.item_metadata.tree if hasattr(tree, "item_metadata") else tree
    if "ema_params" not in tree:
        raise ValueError(f"checkpoint {path} holds no ema_params")
    item = {"ema_params": jax.tree.map(lambda m: np.zeros((), np.float32), tree["ema_params"])}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    restored = checkpointer.restore(
        path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    )
    return restored["ema_params"], step


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``get_config(arg)`` of an experiment config file given as ``path/to/name.py[:arg]``
    (the same syntax as ``train.py --config``); one-line errors (``ldm_jax.training.cli``)."""
    from ldm_jax.training.cli import load_config_file as load

    return load(spec)
