"""Samplers on integer timesteps: DDPM (ancestral), DDIM (with eta) and PLMS.

Each maps the state at timestep ``t`` to the level of the *next timestep of the sequence*
(clean data after the last one). diffusers' DDPMScheduler does the same; its DDIMScheduler
and PNDMScheduler instead step to ``t - T // n``, which is the next timestep only for
``"leading"`` spacing and for ``"trailing"`` when n divides T (diffusers issues #12633 and
#11347); with those spacings the results are identical.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.samplers.base import (
    Plan,
    SamplerConfig,
    finish_plan,
    log_alpha_span,
    schedule_namespace,
    vp_scales,
)
from ldm_jax.diffusion.schedules import Schedule
from ldm_jax.diffusion.timesteps import discrete_timesteps, plms_timesteps


def _sequence(schedule: Schedule, cfg: SamplerConfig, start_step: int):
    ts = discrete_timesteps(schedule.num_timesteps, cfg.num_steps, cfg.spacing, cfg.steps_offset)
    return ts[start_step:]


def _vp_plan(xp, schedule, t_eval, t_out, coef) -> Plan:
    a, b = vp_scales(xp, schedule, t_eval)
    out_a, out_b = vp_scales(xp, schedule, t_out)
    return finish_plan(
        xp,
        t=np.asarray(t_eval, np.int64),
        a=a,
        b=b,
        in_scale=1.0,
        out_a=out_a,
        out_b=out_b,
        out_scale=1.0,
        log_alpha_step=log_alpha_span(xp, schedule, t_eval, t_out),
        coef=coef,
        init_scale=1.0,
    )


# ----------------------------------------------------------------------------------- DDPM


def ddpm_plan(schedule: Schedule, cfg: SamplerConfig, start_step: int = 0) -> Plan:
    """Ancestral sampling from p(x_prev | x_t) with the posterior mean of q(x_prev | x_t, x0_hat).

    With respaced timesteps the one-step quantities are those of the jump t -> prev:
    alpha' = abar_t / abar_prev, beta' = 1 - alpha' (Nichol & Dhariwal 2021, sec. 4).
    No noise is added on the final step (DDPM's t = 0 rule, applied to the last step of any
    spacing; diffusers adds noise whenever the last timestep is > 0, which only differs for
    spacings that do not end at t = 0).
    """
    xp, schedule = schedule_namespace(schedule)
    t_eval = _sequence(schedule, cfg, start_step)
    t_out = np.concatenate([t_eval[1:], [-1]])
    a, b = vp_scales(xp, schedule, t_eval)
    out_a, out_b = vp_scales(xp, schedule, t_out)
    log_alpha = log_alpha_span(xp, schedule, t_eval, t_out)
    beta_step = -xp.expm1(log_alpha)
    # q(x_prev | x_t, x0): mean = coef_x0 x0 + coef_x x_t, variance = (1-abar_prev)/(1-abar_t) beta'.
    coef_x0 = out_a * beta_step / b**2
    coef_x = xp.exp(0.5 * log_alpha) * out_b**2 / b**2
    var_small = xp.maximum(out_b**2 / b**2 * beta_step, 1e-20)
    noise_mask = np.ones(len(t_eval), np.float32)
    noise_mask[-1] = 0.0
    coef = dict(
        coef_x0=coef_x0,
        coef_x=coef_x,
        log_var_small=xp.log(var_small),
        log_var_large=xp.log(beta_step),
        noise_mask=noise_mask,
    )
    return _vp_plan(xp, schedule, t_eval, t_out, coef)


def ddpm_step(cfg: SamplerConfig, row: Plan, state, x, eps, x0, var_param, noise):
    c = row.coef
    mean = c["coef_x0"] * x0 + c["coef_x"] * x
    if cfg.variance == "fixed_small":
        log_var = c["log_var_small"]
    elif cfg.variance == "fixed_large":
        log_var = c["log_var_large"]
    else:
        # Improved DDPM: the model interpolates the log-variance between the two bounds.
        frac = (var_param + 1.0) / 2.0
        log_var = frac * c["log_var_large"] + (1.0 - frac) * c["log_var_small"]
    return mean + c["noise_mask"] * jnp.exp(0.5 * log_var) * noise, state


# ----------------------------------------------------------------------------------- DDIM


def _final_index(cfg: SamplerConfig) -> int:
    # set_alpha_to_one=False ends at abar[0] rather than at clean data (Stable Diffusion's config).
    return -1 if cfg.set_alpha_to_one else 0


def ddim_plan(schedule: Schedule, cfg: SamplerConfig, start_step: int = 0) -> Plan:
    """DDIM (Song et al. 2021, eq. 12): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - s^2) eps + s z,
    s = eta sqrt((1 - abar_prev) / (1 - abar_t) (1 - abar_t / abar_prev))."""
    xp, schedule = schedule_namespace(schedule)
    t_eval = _sequence(schedule, cfg, start_step)
    t_out = np.concatenate([t_eval[1:], [_final_index(cfg)]])
    a, b = vp_scales(xp, schedule, t_eval)
    out_a, out_b = vp_scales(xp, schedule, t_out)
    log_alpha = log_alpha_span(xp, schedule, t_eval, t_out)
    std = cfg.eta * xp.sqrt(out_b**2 / b**2 * -xp.expm1(log_alpha))
    direction = xp.sqrt(xp.maximum(out_b**2 - std**2, 0.0))
    coef = dict(coef_x0=out_a, coef_eps=direction, std=std)
    return _vp_plan(xp, schedule, t_eval, t_out, coef)


def ddim_step(cfg: SamplerConfig, row: Plan, state, x, eps, x0, var_param, noise):
    c = row.coef
    x_next = c["coef_x0"] * x0 + c["coef_eps"] * eps
    if noise is not None:
        x_next = x_next + c["std"] * noise
    return x_next, state


# ----------------------------------------------------------------------------------- PLMS

# Adams-Bashforth weights on (eps_now, eps_prev, eps_prev2, eps_prev3) once enough history exists.
_AB_WEIGHTS = {
    1: (1.0, 0.0, 0.0, 0.0),
    2: (1.5, -0.5, 0.0, 0.0),
    3: (23 / 12, -16 / 12, 5 / 12, 0.0),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def plms_plan(schedule: Schedule, cfg: SamplerConfig, start_step: int = 0) -> Plan:
    """PLMS (Liu et al. 2022), as diffusers' PNDMScheduler with ``skip_prk_steps=True``.

    For timesteps t_0 > ... > t_{m-1} there are m + 1 model evaluations: a DDIM-like step
    t_0 -> t_1, then its second-order correction (the model re-evaluated at t_1, the two eps
    averaged and the step redone from t_0), then linear multistep (Adams-Bashforth) steps of
    increasing order up to 4 on the eps history. Each transfer uses PNDM's eq. 9.
    The eps history holds eps at each evaluation point; diffusers combines the raw model
    outputs instead, which is the same for eps-prediction and differs for v-prediction.
    """
    xp, schedule = schedule_namespace(schedule)
    ts = _sequence(schedule, cfg, start_step)
    m = len(ts)
    t_eval = plms_timesteps(ts)
    final = _final_index(cfg)
    t_from, t_to, use_saved, push, weights = [], [], [], [], []
    for j in range(len(t_eval)):
        if j <= 1:
            i = 0  # both the predictor and the corrector step from t_0
        else:
            i = j - 1
        t_from.append(ts[i])
        t_to.append(ts[i + 1] if i + 1 < m else final)
        use_saved.append(1.0 if j == 1 else 0.0)
        push.append(0.0 if j == 1 else 1.0)
        if j == 1:
            weights.append((0.5, 0.5, 0.0, 0.0))
        else:
            weights.append(_AB_WEIGHTS[min(j, 4) if j >= 2 else 1])
    t_from, t_to = np.array(t_from), np.array(t_to)
    weights = np.array(weights, np.float32)
    from_a, from_b = vp_scales(xp, schedule, t_from)
    to_a, to_b = vp_scales(xp, schedule, t_to)
    log_alpha = log_alpha_span(xp, schedule, t_from, t_to)
    # PNDM eq. 9: x_to = sqrt(abar_to/abar_from) x - (abar_to - abar_from) e /
    #   (abar_from sqrt(1-abar_to) + sqrt(abar_from (1-abar_from) abar_to)), divided through by abar_from.
    ratio_sqrt = xp.exp(-0.5 * log_alpha)
    coef_eps = -xp.expm1(-log_alpha) / (to_b + from_b * ratio_sqrt)
    coef = dict(
        coef_x=ratio_sqrt,
        coef_eps=coef_eps,
        use_saved=np.asarray(use_saved),
        save=(np.arange(len(t_eval)) == 0).astype(np.float32),
        push=np.asarray(push),
    )
    # The state after evaluation j sits at t_to[j]; the model sees it at t_eval[j + 1].
    plan = _vp_plan(xp, schedule, t_eval, t_to, coef)
    plan.coef["weights"] = xp.asarray(weights)  # [N, 4]
    return plan


def plms_init_state(x):
    """(x saved at the first evaluation, eps history [3, *x.shape] newest first)."""
    return (jnp.zeros_like(x), jnp.zeros((3,) + x.shape, x.dtype))


def plms_step(cfg: SamplerConfig, row: Plan, state, x, eps, x0, var_param, noise):
    saved, history = state
    c = row.coef
    w = c["weights"]
    eps_combined = w[0] * eps + w[1] * history[0] + w[2] * history[1] + w[3] * history[2]
    saved = jnp.where(c["save"] > 0, x, saved)
    base = jnp.where(c["use_saved"] > 0, saved, x)
    x_next = c["coef_x"] * base + c["coef_eps"] * eps_combined
    pushed = jnp.concatenate([eps[None], history[:2]], axis=0)
    history = jnp.where(c["push"] > 0, pushed, history)
    return x_next, (saved, history)


# ----------------------------------------------------------------------------------- LCM


def lcm_timesteps(num_train_timesteps: int, num_steps: int, original_steps: int = 50) -> np.ndarray:
    """diffusers' ``LCMScheduler.set_timesteps`` (strength 1): n of the ``original_steps``
    distillation timesteps k - 1, 2k - 1, ..., T - 1 (k = T // original_steps), evenly picked."""
    if not 1 <= original_steps <= num_train_timesteps:
        raise ValueError(f"lcm_original_steps must be in [1, {num_train_timesteps}], got {original_steps!r}")
    if num_steps > original_steps:
        raise ValueError(f"num_steps={num_steps} exceeds lcm_original_steps={original_steps}")
    k = num_train_timesteps // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    return origin[np.floor(np.linspace(0, len(origin), num_steps, endpoint=False)).astype(np.int64)]


def lcm_plan(schedule: Schedule, cfg: SamplerConfig, start_step: int = 0) -> Plan:
    """Latent consistency models' multistep sampling (Luo et al. 2023), as diffusers' LCMScheduler.

    Each step takes the consistency function's output, denoised = c_out x0_hat + c_skip x_t
    with the boundary scalings c_skip = s_d^2 / ((10 t)^2 + s_d^2), c_out = 10 t / sqrt((10 t)^2 + s_d^2)
    (s_d = 0.5, ``lcm_timestep_scaling`` = 10), and re-noises it to the next timestep with fresh
    noise; the last step returns ``denoised``.
    """
    xp, schedule = schedule_namespace(schedule)
    ts = lcm_timesteps(schedule.num_timesteps, cfg.num_steps, cfg.lcm_original_steps)[start_step:]
    t_out = np.concatenate([ts[1:], [-1]])
    scaled = cfg.lcm_timestep_scaling * ts.astype(np.float64)
    sigma_data = 0.5
    coef = dict(
        c_skip=sigma_data**2 / (scaled**2 + sigma_data**2),
        c_out=scaled / np.sqrt(scaled**2 + sigma_data**2),
    )
    return _vp_plan(xp, schedule, ts, t_out, coef)


def lcm_step(cfg: SamplerConfig, row: Plan, state, x, eps, x0, var_param, noise):
    denoised = row.coef["c_out"] * x0 + row.coef["c_skip"] * x
    # The last row's out level is clean data (out_a = 1, out_b = 0): x_next = denoised.
    return row.out_a * denoised + row.out_b * noise, state
