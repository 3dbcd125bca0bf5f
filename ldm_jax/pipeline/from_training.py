"""Inference pipelines from training: a :class:`~ldm_jax.ldm.model.DiffusionModel` with its
(EMA) params, or a diffusion training run's checkpoint.

``from_workdir(workdir, step=None)`` restores a diffusion run's EMA params (only those are
read from the checkpoint), its stored scale factor and its frozen first stage / text encoder
(loaded again from where the run's config points) and returns a ``LatentDiffusionPipeline``.
Reading never creates, locks or cleans anything in the workdir, so it is safe while the run
is still training.
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax

from ldm_jax.ldm.model import DiffusionModel, build_model
from ldm_jax.pipeline.pipeline import LatentDiffusionPipeline
from ldm_jax.training import workdir as runs


def pipeline_from_model(model: DiffusionModel, params: Any, **kwargs) -> LatentDiffusionPipeline:
    """A ``LatentDiffusionPipeline`` of ``model`` with these (EMA) params; ``kwargs`` go to
    the pipeline (``info``, ``devices``, ``batch_invariant``)."""
    params = nn.meta.unbox(jax.device_get(params))
    fs = model.first_stage
    conditioner_params = None
    if model.conditioner.params_key is not None:
        conditioner_params = nn.meta.unbox(model.conditioner_params(params, model.frozen_params()))
    return LatentDiffusionPipeline(
        unet=model.unet,
        unet_params=params["unet"],
        first_stage=fs.adapter,
        first_stage_variables=None if fs.kind == "identity" else nn.meta.unbox(fs.variables),
        conditioner=model.conditioner,
        conditioner_params=conditioner_params,
        schedule=dict(model.schedule_config),
        prediction=model.prediction,
        objective=model.objective,
        **kwargs,
    )


def from_workdir(
    workdir: str | os.PathLike, step: int | None = None, config: Any = None, **pipeline_kwargs
) -> LatentDiffusionPipeline:
    """A ``LatentDiffusionPipeline`` with the EMA params of a diffusion run's checkpoint
    ``step`` (default: the latest). ``config``: the run's own ``config.json`` when None, else a
    ConfigDict or a config file ``path.py[:arg]`` (e.g. when the first stage moved).
    ``pipeline_kwargs`` go to ``LatentDiffusionPipeline`` (``devices``, ``batch_invariant``)."""
    if config is None:
        config = runs.read_config(workdir)
    elif isinstance(config, (str, os.PathLike)):
        config = runs.load_config_file(os.fspath(config))
    if config.get("stage") != "diffusion":
        raise ValueError(
            f"{workdir} is a {config.get('stage')!r} run; from_workdir builds diffusion pipelines "
            "(autoencoder runs: ldm_jax.ldm.first_stage.load_autoencoder_run)"
        )
    step = runs.resolve_step(workdir, step)
    metadata = runs.read_metadata(workdir, step)
    model = build_model(config, metadata["data"]).with_scale(float(metadata["scale_factor"]))
    ema, _ = runs.restore_ema_params(workdir, step)
    provenance = {"source": os.path.abspath(os.fspath(workdir)), "format": "ldm_jax.workdir", "step": step}
    return pipeline_from_model(model, ema, info=provenance, **pipeline_kwargs)
