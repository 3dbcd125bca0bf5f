"""Euler and Heun samplers of Karras et al. 2022 on the variance-exploding variable, as
diffusers' ``EulerDiscreteScheduler`` / ``HeunDiscreteScheduler`` (deterministic: s_churn = 0).

The carried state is x_ve = x0 + sigma eps; the model sees x_ve / sqrt(sigma^2 + 1) (the VP
sample) at the fractional timestep whose sigma this is. The ODE dx/dsigma = (x - x0_hat) / sigma
is integrated from sigma_max to 0 with Euler steps, or with Heun's method (one Euler step,
then the model re-evaluated at the new level and the two slopes averaged; the last step,
ending at sigma = 0, stays Euler). Sigmas are the schedule's sigmas at the spaced timesteps
(linear interpolation for fractional ones, as diffusers) or, with ``karras_sigmas``, the
rho = 7 sequence between the first and last of those.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.samplers.base import (
    Plan,
    SamplerConfig,
    finish_plan,
    schedule_namespace,
    take_rows,
    ve_to_vp,
)
from ldm_jax.diffusion.schedules import Schedule
from ldm_jax.diffusion.timesteps import discrete_timesteps, karras_sigmas, sigma_to_timestep


def karras_family_sigmas(xp, schedule: Schedule, cfg: SamplerConfig):
    """(sigmas [n] descending, model timesteps [n] float) of the full n-step run."""
    ts = discrete_timesteps(
        schedule.num_timesteps, cfg.num_steps, cfg.spacing, cfg.steps_offset, rounded=False
    )
    grid = np.arange(schedule.num_timesteps, dtype=np.float64)
    sig = xp.interp(ts, grid, schedule.sigmas)
    if cfg.karras_sigmas:
        sig = karras_sigmas(sig[-1], sig[0], cfg.num_steps)
        return sig, sigma_to_timestep(sig, schedule.sigmas)
    return sig, ts


def _init_scale(xp, sig, cfg: SamplerConfig):
    # diffusers' init_noise_sigma: sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing.
    sigma_max = xp.max(sig)
    if cfg.spacing in ("linspace", "trailing"):
        return sigma_max
    return xp.sqrt(sigma_max**2 + 1.0)


def _ve_plan(xp, t_model, sig_eval, sig_out, coef, init_scale) -> Plan:
    a, b = ve_to_vp(xp, sig_eval)
    out_a, out_b = ve_to_vp(xp, sig_out)
    return finish_plan(
        xp,
        t=t_model,
        a=a,
        b=b,
        in_scale=a,
        out_a=out_a,
        out_b=out_b,
        out_scale=out_a,
        log_alpha_step=2.0 * (xp.log(a) - xp.log(out_a)),
        coef=coef,
        init_scale=init_scale,
    )


def euler_plan(schedule: Schedule, cfg: SamplerConfig, start_step: int = 0) -> Plan:
    xp, schedule = schedule_namespace(schedule)
    sig, t_model = karras_family_sigmas(xp, schedule, cfg)
    sig_next = xp.concatenate([sig[1:], xp.zeros((1,), sig.dtype)])
    coef = dict(sigma=sig, dt=sig_next - sig)
    plan = _ve_plan(xp, t_model, sig, sig_next, coef, _init_scale(xp, sig, cfg))
    return take_rows(plan, np.arange(start_step, cfg.num_steps))


def euler_step(cfg: SamplerConfig, row: Plan, state, x, eps, x0, var_param, noise):
    slope = (x - x0) / row.coef["sigma"]
    return x + slope * row.coef["dt"], state


def heun_plan(schedule: Schedule, cfg: SamplerConfig, start_step: int = 0) -> Plan:
    """2n - 1 evaluations: predictor at sigma_0, then (corrector, predictor) at each sigma_k, k >= 1."""
    xp, schedule = schedule_namespace(schedule)
    n = cfg.num_steps
    sig, t_model = karras_family_sigmas(xp, schedule, cfg)
    sig_ext = xp.concatenate([sig, xp.zeros((1,), sig.dtype)])
    eval_k, out_k, stage, dt_from, dt_to = [0], [1], [0], [0], [1]
    for k in range(1, n):
        eval_k += [k, k]
        out_k += [k, k + 1]
        stage += [1, 0]
        dt_from += [k - 1, k]
        dt_to += [k, k + 1]
    eval_k, out_k = np.array(eval_k), np.array(out_k)
    coef = dict(
        sigma=sig_ext[eval_k],
        dt=sig_ext[np.array(dt_to)] - sig_ext[np.array(dt_from)],
        corrector=np.asarray(stage, np.float32),
    )
    plan = _ve_plan(xp, t_model[eval_k], sig_ext[eval_k], sig_ext[out_k], coef, _init_scale(xp, sig, cfg))
    # Evaluation 2k is the predictor at sigma_k, where step k starts.
    return take_rows(plan, np.arange(2 * start_step, 2 * n - 1))


def heun_init_state(x):
    """(slope of the pending predictor step, the state it started from)."""
    return (jnp.zeros_like(x), jnp.zeros_like(x))


def heun_step(cfg: SamplerConfig, row: Plan, state, x, eps, x0, var_param, noise):
    slope_prev, x_start = state
    c = row.coef
    slope = (x - x0) / c["sigma"]
    is_corrector = c["corrector"] > 0
    x_next = jnp.where(is_corrector, x_start + 0.5 * (slope_prev + slope) * c["dt"], x + slope * c["dt"])
    state = (jnp.where(is_corrector, slope_prev, slope), jnp.where(is_corrector, x_start, x))
    return x_next, state



def euler_ancestral_plan(schedule: Schedule, cfg: SamplerConfig, start_step: int = 0) -> Plan:
    """Euler ancestral (k-diffusion's ``sample_euler_ancestral``, diffusers'
    ``EulerAncestralDiscreteScheduler``): an Euler step down to sigma_down, then fresh noise of
    std sigma_up, with sigma_up^2 = sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2 and
    sigma_down^2 = sigma_next^2 - sigma_up^2, so the marginal lands on sigma_next."""
    xp, schedule = schedule_namespace(schedule)
    sig, t_model = karras_family_sigmas(xp, schedule, cfg)
    sig_next = xp.concatenate([sig[1:], xp.zeros((1,), sig.dtype)])
    sigma_up = xp.sqrt(sig_next**2 * (sig**2 - sig_next**2) / sig**2)
    sigma_down = xp.sqrt(sig_next**2 - sigma_up**2)
    coef = dict(sigma=sig, dt=sigma_down - sig, std=sigma_up)
    plan = _ve_plan(xp, t_model, sig, sig_next, coef, _init_scale(xp, sig, cfg))
    return take_rows(plan, np.arange(start_step, cfg.num_steps))


def euler_ancestral_step(cfg: SamplerConfig, row: Plan, state, x, eps, x0, var_param, noise):
    slope = (x - x0) / row.coef["sigma"]
    return x + slope * row.coef["dt"] + row.coef["std"] * noise, state
