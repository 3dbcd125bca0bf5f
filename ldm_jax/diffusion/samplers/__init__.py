"""Diffusion samplers: DDPM, DDIM, PLMS, DPM-Solver++ (2M, 3M, 2M SDE, 2S), UniPC (orders 1-3),
Euler, Euler ancestral, Heun and LCM for DDPM schedules, and the flow-matching Euler / Heun for
flow schedules, each a plan + step function pair run by one ``lax.scan`` driver (:func:`sample`)."""

from ldm_jax.diffusion.samplers.base import Plan, SamplerConfig, SamplerSpec, eps_and_x0
from ldm_jax.diffusion.samplers.driver import (
    Inpainting,
    Trajectory,
    check_objective,
    resolve_sampler,
    run_plan,
    sample,
    sampler_names,
    schedule_objective,
)
from ldm_jax.diffusion.samplers.noise import initial_noise, per_example_normal, stream_key
from ldm_jax.diffusion.samplers.registry import SAMPLERS

__all__ = [
    "SAMPLERS",
    "Inpainting",
    "Plan",
    "SamplerConfig",
    "SamplerSpec",
    "Trajectory",
    "check_objective",
    "eps_and_x0",
    "initial_noise",
    "per_example_normal",
    "resolve_sampler",
    "run_plan",
    "sample",
    "sampler_names",
    "schedule_objective",
    "stream_key",
]
