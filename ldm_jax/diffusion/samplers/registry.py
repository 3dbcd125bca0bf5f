"""Name -> sampler. Adding a sampler: write its plan and step functions (see
:mod:`ldm_jax.diffusion.samplers.base`) and add one entry here."""

from __future__ import annotations

import functools

from ldm_jax.diffusion.samplers import discrete, dpm_solver, flow, karras, unipc
from ldm_jax.diffusion.samplers.base import SamplerSpec

_always = lambda cfg: True  # noqa: E731
_FLOW_OPTIONS = frozenset({"thresholding", "karras_sigmas", "mu", "image_seq_len", "sigmas"})

SAMPLERS: dict[str, SamplerSpec] = {
    "ddpm": SamplerSpec(
        discrete.ddpm_plan, discrete.ddpm_step, options=frozenset({"variance", "thresholding"}), stochastic=_always
    ),
    "ddim": SamplerSpec(
        discrete.ddim_plan,
        discrete.ddim_step,
        options=frozenset({"eta", "thresholding", "set_alpha_to_one"}),
        stochastic=lambda cfg: cfg.eta > 0,
    ),
    "plms": SamplerSpec(
        discrete.plms_plan,
        discrete.plms_step,
        init_state=discrete.plms_init_state,
        options=frozenset({"set_alpha_to_one"}),
        memoryless=False,
    ),
    "dpmpp_2m": SamplerSpec(
        functools.partial(dpm_solver.dpm_plan, solver_order=2),
        dpm_solver.dpm_step,
        init_state=dpm_solver.dpm_init_state,
        default_spacing="linspace",
        options=frozenset({"thresholding", "karras_sigmas", "lower_order_final"}),
        memoryless=False,
    ),
    "dpmpp_3m": SamplerSpec(
        functools.partial(dpm_solver.dpm_plan, solver_order=3),
        dpm_solver.dpm_step,
        init_state=dpm_solver.dpm_init_state,
        default_spacing="linspace",
        options=frozenset({"thresholding", "karras_sigmas", "lower_order_final"}),
        memoryless=False,
    ),
    "dpmpp_2m_sde": SamplerSpec(
        functools.partial(dpm_solver.dpm_plan, solver_order=2, sde=True),
        dpm_solver.dpm_step,
        init_state=dpm_solver.dpm_init_state,
        default_spacing="linspace",
        options=frozenset({"thresholding", "karras_sigmas", "lower_order_final"}),
        stochastic=_always,
        memoryless=False,
    ),
    "euler": SamplerSpec(
        karras.euler_plan,
        karras.euler_step,
        default_spacing="linspace",
        options=frozenset({"thresholding", "karras_sigmas"}),
    ),
    "heun": SamplerSpec(
        karras.heun_plan,
        karras.heun_step,
        init_state=karras.heun_init_state,
        default_spacing="linspace",
        options=frozenset({"thresholding", "karras_sigmas"}),
        memoryless=False,
    ),
    "euler_ancestral": SamplerSpec(
        karras.euler_ancestral_plan,
        karras.euler_ancestral_step,
        default_spacing="linspace",
        options=frozenset({"thresholding"}),
        stochastic=_always,
    ),
    "dpmpp_2s": SamplerSpec(
        dpm_solver.dpm_singlestep_plan,
        dpm_solver.dpm_singlestep_step,
        init_state=dpm_solver.dpm_singlestep_init_state,
        default_spacing="linspace",
        options=frozenset({"thresholding", "karras_sigmas", "solver_type"}),
        memoryless=False,
        solver_types=("midpoint", "heun"),
    ),
    "lcm": SamplerSpec(
        discrete.lcm_plan,
        discrete.lcm_step,
        options=frozenset({"thresholding", "lcm_original_steps", "lcm_timestep_scaling"}),
        stochastic=_always,
    ),
    **{
        f"unipc_{order}": SamplerSpec(
            unipc.unipc_plan_order[order],
            unipc.unipc_step,
            init_state=unipc.unipc_init_state,
            default_spacing="linspace",
            options=frozenset({"thresholding", "karras_sigmas", "lower_order_final", "solver_type"}),
            memoryless=False,
            solver_types=("bh2", "bh1"),
        )
        for order in (1, 2, 3)
    },
    # Flow matching (objective="flow": they need a FlowSchedule and refuse a DDPM one).
    "flow_euler": SamplerSpec(
        flow.flow_euler_plan,
        flow.flow_euler_step,
        default_spacing="linspace",
        options=_FLOW_OPTIONS | {"eta"},
        stochastic=lambda cfg: cfg.eta > 0,
        objective="flow",
    ),
    "flow_heun": SamplerSpec(
        flow.flow_heun_plan,
        flow.flow_heun_step,
        init_state=flow.flow_heun_init_state,
        default_spacing="linspace",
        options=_FLOW_OPTIONS,
        memoryless=False,
        objective="flow",
    ),
}
