"""Pure, jittable diffusion math: no Flax, no model classes.

Everything here asks only for ``model_fn(x_t, t) -> prediction`` (eps, x0 or v), so any
JAX model plugs in. Schedules are pytrees passed into jitted code as arguments.

    from ldm_jax import diffusion as D
    schedule = D.make_schedule("scaled_linear", 1000)
    loss = D.diffusion_loss(schedule, model_fn, x0, key, prediction="v", weighting="min_snr")
    x0 = jax.jit(lambda k: D.sample(model_fn, schedule, (8, 32, 32, 4), k, sampler="dpmpp_2m",
                                    num_steps=25))(key)

Flow matching (rectified flow) uses a :class:`FlowSchedule` and the "flow_*" samplers:

    flow = D.make_flow_schedule(shift=3.0)
    loss = D.flow_loss(flow, model_fn, x0, key, time_density="logit_normal")
    x0 = D.sample(velocity_fn, flow, (8, 32, 32, 4), key, sampler="flow_euler", num_steps=28)
"""

from ldm_jax.diffusion.analytic import (
    gaussian_eps_model,
    gaussian_mixture_eps_model,
    gaussian_mixture_posterior,
    gaussian_mixture_velocity_model,
    gaussian_velocity_model,
)
from ldm_jax.diffusion.editing import img2img, img2img_start_step, inpaint
from ldm_jax.diffusion.forward import (
    PREDICTION_TYPES,
    eps_from_v,
    eps_from_x0,
    q_posterior,
    q_sample,
    to_eps_and_x0,
    training_target,
    v_from_eps_x0,
    x0_from_eps,
    x0_from_v,
)
from ldm_jax.diffusion.flow import (
    FLOW_PREDICTIONS,
    FLOW_WEIGHTINGS,
    TIME_DENSITIES,
    FlowSchedule,
    apply_schedule_shift,
    dynamic_shift_mu,
    eps_from_velocity,
    flow_eps_and_x0,
    flow_interpolate,
    flow_loss,
    flow_loss_terms,
    flow_loss_weight,
    flow_schedule_config,
    flow_snr,
    flow_training_target,
    is_flow_schedule,
    make_flow_schedule,
    sample_flow_time,
    schedule_mu,
    shift_time,
    stretch_to_terminal,
    time_shift,
    velocity_from_eps,
    velocity_from_x0,
    velocity_target,
    x0_from_velocity,
)
from ldm_jax.diffusion.guidance import apply_guidance, cfg_model_fn, drop_conditioning, null_class_labels
from ldm_jax.diffusion.losses import (
    PMeanVariance,
    diffusion_loss,
    diffusion_loss_terms,
    discretized_gaussian_log_likelihood,
    min_snr_weight,
    normal_kl,
    p_mean_variance,
    prior_bits_per_dim,
    snr,
    split_learned_variance,
    vlb_bits_per_dim,
)
from ldm_jax.diffusion.reflow import pairs_velocity_model, reflow_pairs, straightness
from ldm_jax.diffusion.samplers import (
    SAMPLERS,
    Inpainting,
    Plan,
    SamplerConfig,
    SamplerSpec,
    Trajectory,
    initial_noise,
    check_objective,
    per_example_normal,
    sample,
    sampler_names,
    schedule_objective,
)
from ldm_jax.diffusion.schedules import SCHEDULE_KINDS, Schedule, make_schedule, rescale_zero_terminal_snr, sigma_at
from ldm_jax.diffusion.thresholding import dynamic_threshold, static_clip
from ldm_jax.diffusion.timesteps import (
    discrete_timesteps,
    dpm_solver_timesteps,
    karras_sigmas,
    sigma_to_timestep,
)

__all__ = [name for name in dir() if not name.startswith("_")]
