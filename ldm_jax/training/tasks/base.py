"""What a training stage provides to the shared loop and to ``train.py``.

A stage (first-stage autoencoder, latent/pixel diffusion) is built from the config by its
module's ``build_stage(config, data_stats) -> Stage``. ``train.py`` picks the module by
``config.stage`` and never looks inside; the loop sees only ``stage.task``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from ldm_jax.training.loop import Task


@dataclasses.dataclass(frozen=True)
class Stage:
    """Everything that differs between training stages.

    task: ``Task(init_params, loss_fn, loss_takes_step)`` for the shared loop; params is one
      tree (e.g. ``{"autoencoder": ..., "discriminator": ...}``) so that one optimizer,
      EMA and checkpoint cover the whole stage.
    host_batch: turns one host batch from ``ldm_jax.data`` (numpy arrays plus a list of
      caption strings) into the tree of numpy arrays the loss sees (e.g. tokenizes captions,
      drops keys the loss does not use). Runs on the host, per process, before sharding.
    preview: ``preview(params, key) -> uint8 [N, H, W, C]`` images to log as a grid (samples
      or reconstructions), or None. ``params`` are the EMA params.
    export: ``export(params, directory)`` writes an inference model folder (EMA params) that
      ``ldm_jax.pipeline`` loads, or None for stages that have nothing to sample with.
    metadata: JSON-able facts to store with checkpoints (e.g. the estimated scale_factor).
    """

    task: Task
    host_batch: Callable[[Mapping[str, Any]], Mapping[str, np.ndarray]]
    preview: Callable[[Any, Any], np.ndarray] | None = None
    export: Callable[[Any, str], None] | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
