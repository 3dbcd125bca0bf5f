"""Samplers of the flow-matching ODE dx/dt = v(x, t), t from 1 (noise) to 0 (data), as
diffusers' ``FlowMatchEulerDiscreteScheduler`` (also with ``stochastic_sampling``) and
``FlowMatchHeunDiscreteScheduler``.

The carried state is the interpolant x_t = (1 - t) x0 + t eps itself (in plan terms a = 1 - t,
b = t, in_scale = out_scale = 1), which the model sees at the timestep ``N t``
(N = ``schedule.num_train_timesteps``). The model output is converted to (eps, x0) by the driver;
the velocity is eps - x0 whatever the model predicts.

Time sequences (:func:`flow_sigmas`), all before the schedule's shift (then shifted as diffusers):

* ``spacing="linspace"`` (diffusers' default): n points from 1 to the training grid's smallest
  time, the shifted 1 / N (diffusers shifts it once at construction and again with the sequence).
* ``spacing="trailing"``: 1, 1 - 1/n, ..., 1/n (what the Flux pipeline passes as ``sigmas``).
* ``sigmas=(...)``: an explicit descending sequence (few-step schedules; shifted likewise).
* ``karras_sigmas``: the rho = 7 sequence between the first and last shifted times.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.flow import FlowSchedule, apply_schedule_shift, schedule_mu, stretch_to_terminal
from ldm_jax.diffusion.samplers.base import Plan, SamplerConfig, finish_plan, take_rows
from ldm_jax.diffusion.timesteps import karras_sigmas

FLOW_SPACINGS = ("linspace", "trailing")


def flow_namespace(schedule: FlowSchedule):
    """NumPy (float64) for a concrete schedule and static mu, jax.numpy when traced."""
    return jnp if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(schedule)) else np


def resolve_mu(schedule: FlowSchedule, cfg: SamplerConfig):
    """mu for a dynamic-shifting schedule: ``cfg.mu``, or from ``cfg.image_seq_len``."""
    if not schedule.dynamic_shifting:
        return None
    if cfg.mu is not None:
        return cfg.mu
    if cfg.image_seq_len is None:
        raise ValueError("this flow schedule uses dynamic shifting: pass mu or image_seq_len to the sampler")
    return schedule_mu(schedule, cfg.image_seq_len)


def flow_sigmas(schedule: FlowSchedule, cfg: SamplerConfig):
    """The n descending evaluation times (diffusers' ``scheduler.sigmas[:-1]``)."""
    xp = flow_namespace(schedule)
    n = cfg.num_steps
    if cfg.sigmas is not None:
        base = np.asarray(cfg.sigmas, np.float64)
    elif cfg.spacing == "trailing":
        base = np.linspace(1.0, 1.0 / n, n)
    else:
        # The training grid's smallest time (1 / N), shifted once by construction unless dynamic.
        t_min = 1.0 / schedule.num_train_timesteps
        if not schedule.dynamic_shifting:
            t_min = apply_schedule_shift(schedule, t_min)  # a float, or traced with the shift
        base = xp.linspace(1.0, t_min, n)
    if xp is jnp:
        base = jnp.asarray(base, jnp.float32)
    sig = apply_schedule_shift(schedule, base, resolve_mu(schedule, cfg))
    if schedule.shift_terminal is not None:
        sig = stretch_to_terminal(sig, schedule.shift_terminal)
    if cfg.karras_sigmas:
        sig = karras_sigmas(sig[-1], sig[0], n)
    return sig


def _flow_plan(xp, schedule, sig_eval, sig_out, coef) -> Plan:
    a, out_a = 1.0 - sig_eval, 1.0 - sig_out
    return finish_plan(
        xp,
        t=schedule.num_train_timesteps * sig_eval,
        a=a,
        b=sig_eval,
        in_scale=1.0,
        out_a=out_a,
        out_b=sig_out,
        out_scale=1.0,
        # Only read by RePaint jumps; -inf when starting from pure noise (a = 0).
        log_alpha_step=2.0 * (xp.log(xp.maximum(a, 1e-30)) - xp.log(out_a)),
        coef=coef,
        init_scale=1.0,
    )


def _with_zero(xp, sig):
    return xp.concatenate([sig, xp.zeros((1,), sig.dtype)])


def flow_euler_plan(schedule: FlowSchedule, cfg: SamplerConfig, start_step: int = 0) -> Plan:
    """Euler on the flow ODE, x_s = x_t + (s - t) v, which for the linear interpolant is exactly
    DDIM: x_s = (1 - s) x0_hat + s eps_hat. ``eta > 0`` is DDIM's stochastic step in these
    coordinates, x_s = (1 - s) x0_hat + s (sqrt(1 - eta^2 rho) eps_hat + eta sqrt(rho) z) with
    rho = 1 - (sigma_s / sigma_t)^2, sigma = t / (1 - t) (eta = 1: the DDPM posterior step)."""
    xp = flow_namespace(schedule)
    sig = xp.asarray(flow_sigmas(schedule, cfg))
    sig_next = _with_zero(xp, sig)[1:]
    # sigma_s / sigma_t in VE terms, finite at t = 1 (where it is 0).
    ratio = sig_next * (1.0 - sig) / (sig * (1.0 - sig_next))
    rho = 1.0 - ratio**2
    coef = dict(
        dt=sig_next - sig,
        coef_eps=sig_next * xp.sqrt(xp.maximum(1.0 - cfg.eta**2 * rho, 0.0)),
        std=sig_next * cfg.eta * xp.sqrt(rho),
    )
    plan = _flow_plan(xp, schedule, sig, sig_next, coef)
    return take_rows(plan, np.arange(start_step, cfg.num_steps))


def flow_euler_step(cfg: SamplerConfig, row: Plan, state, x, eps, x0, var_param, noise):
    c = row.coef
    if noise is not None:
        return row.out_a * x0 + c["coef_eps"] * eps + c["std"] * noise, state
    # The deterministic step as diffusers forms it (same rounding): x + dt v.
    return x + c["dt"] * (eps - x0), state


def flow_heun_plan(schedule: FlowSchedule, cfg: SamplerConfig, start_step: int = 0) -> Plan:
    """2n - 1 evaluations: the Euler predictor at t_0, then (corrector, predictor) at each t_k,
    k >= 1; the last step, ending at t = 0, stays Euler (as diffusers)."""
    xp = flow_namespace(schedule)
    n = cfg.num_steps
    sig_ext = _with_zero(xp, xp.asarray(flow_sigmas(schedule, cfg)))
    eval_k, out_k, stage, dt_from, dt_to = [0], [1], [0], [0], [1]
    for k in range(1, n):
        eval_k += [k, k]
        out_k += [k, k + 1]
        stage += [1, 0]
        dt_from += [k - 1, k]
        dt_to += [k, k + 1]
    coef = dict(
        dt=sig_ext[np.array(dt_to)] - sig_ext[np.array(dt_from)],
        corrector=np.asarray(stage, np.float32),
    )
    plan = _flow_plan(xp, schedule, sig_ext[np.array(eval_k)], sig_ext[np.array(out_k)], coef)
    return take_rows(plan, np.arange(2 * start_step, 2 * n - 1))


def flow_heun_init_state(x):
    """(velocity of the pending predictor step, the state it started from)."""
    return (jnp.zeros_like(x), jnp.zeros_like(x))


def flow_heun_step(cfg: SamplerConfig, row: Plan, state, x, eps, x0, var_param, noise):
    v_prev, x_start = state
    c = row.coef
    v = eps - x0
    is_corrector = c["corrector"] > 0
    x_next = jnp.where(is_corrector, x_start + 0.5 * (v_prev + v) * c["dt"], x + v * c["dt"])
    state = (jnp.where(is_corrector, v_prev, v), jnp.where(is_corrector, x_start, x))
    return x_next, state
