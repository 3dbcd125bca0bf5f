"""Training stages, by ``config.stage`` name.

Each stage is a module with ``build_stage(config, data_stats, *, source=None, run=None) ->
Stage`` (see ``base``); ``train.py`` looks it up here and never looks inside. Modules are
imported on first use, so naming a stage costs nothing for the others (and this package
imports without JAX; the JAX-free config sections are in ``sections``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

# config.stage -> module path
STAGES: dict[str, str] = {
    "autoencoder": "ldm_jax.training.stages.autoencoder",
    "diffusion": "ldm_jax.training.stages.diffusion",
    "controlnet": "ldm_jax.training.stages.controlnet",
    "finetune": "ldm_jax.training.stages.finetune",
}


def stage_module(name: str) -> ModuleType:
    """The module of stage ``name``; ValueError naming the known stages otherwise."""
    if name not in STAGES:
        raise ValueError(f"unknown config.stage {name!r}; choose one of {', '.join(sorted(STAGES))}")
    return importlib.import_module(STAGES[name])


__all__ = ["STAGES", "stage_module"]
