"""What a training stage provides to the shared loop and to ``train.py``.

A stage (first-stage autoencoder, latent/pixel diffusion) is built from the config by its
module's ``build_stage``, one signature for every stage::

    build_stage(config, data_stats, *, source=None, run=None) -> Stage

``config``: the experiment config; ``data_stats``: the dataset's ``ldm_jax.data.DatasetStats``;
``source``: the dataset itself (built from ``config.data`` when a stage needs it and it is
None); ``run``: the :class:`~ldm_jax.training.context.RunContext` (resolved config, mesh)
that ``train.py`` made once (made by the stage when None, for library use and tests).
``train.py`` picks the module by ``config.stage`` and never looks inside; the loop sees only
``stage.task``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ldm_jax.training.loop import Task


@dataclasses.dataclass(frozen=True)
class Stage:
    """Everything that differs between training stages.

    task: ``Task(init_params, loss_fn, ...)`` for the shared loop; params is one tree (e.g.
      ``{"autoencoder": ..., "discriminator": ...}``) so that one optimizer, EMA and
      checkpoint cover the whole stage.
    host_batch: turns one host batch from ``ldm_jax.data`` (numpy arrays plus a list of
      caption strings) into the tree of numpy arrays the loss sees (e.g. tokenizes captions,
      drops keys the loss does not use). Runs on the host, per process, before sharding.
    preview: ``preview(params, key) -> uint8 [N, H, W, C]`` images to log as a grid (samples
      or reconstructions), or None. ``params`` are the EMA params.
    export: ``export(params, directory)`` writes an inference model folder (EMA params), or
      None for stages that have nothing to export.
    metadata: JSON-able facts to store with checkpoints (e.g. the estimated scale_factor).
    data_source: the data source to train on when it differs from the configured dataset
      (the diffusion stage's latent cache), else None.
    preview_columns: images per preview grid row (0: ``config.preview.columns``).
    preview_rows: what each preview row shows (class ids, prompts), for logs and tests.
    model: the stage's model object (e.g. ``ldm_jax.ldm.model.DiffusionModel``), for tests.
    sample: ``sample(ema_params, labels or None, key, settings) -> uint8 [N, H, W, C]``
      generated images for the evaluation hook (``ldm_jax.training.eval_hook``), or None for
      stages that do not generate.
    """

    task: Task
    host_batch: Callable[[Mapping[str, Any]], Mapping[str, np.ndarray]]
    preview: Callable[[Any, Any], np.ndarray] | None = None
    export: Callable[[Any, str], None] | None = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    data_source: Any = None
    preview_columns: int = 0
    preview_rows: Sequence[str] = ()
    model: Any = None
    sample: Callable[..., np.ndarray] | None = None
