"""DPM-Solver++ multistep samplers (Lu et al. 2022b), as diffusers'
``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++" | "sde-dpmsolver++", solver_type="midpoint",
final_sigmas_type="zero")``.

In terms of lambda = log(alpha / sigma) (alpha, sigma the VP scales) and data predictions
m_k = x0_hat at step k, one step from s to t with h = lambda_t - lambda_s is

  x_t = (sigma_t / sigma_s) x_s - alpha_t expm1(-h) D0 + (higher-order terms in D1, D2)

with D0 = m_0 and divided differences of the previous m's (second-order midpoint form,
third-order form of the paper). The order ramps up 1, 2, (3) from the first step; the last
step is first order (the final sigma is zero), and with ``lower_order_final`` and fewer than
15 steps the second-to-last step is at most second order, as in diffusers.
All coefficients are precomputed per step; the step itself is a linear combination.
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
from ldm_jax.diffusion.timesteps import dpm_solver_timesteps, karras_sigmas, sigma_to_timestep


def solver_orders(num_steps: int, start_step: int, solver_order: int, lower_order_final: bool) -> np.ndarray:
    """The order diffusers uses at each step ``start_step .. num_steps - 1`` (static)."""
    orders = []
    for k in range(start_step, num_steps):
        done = k - start_step  # steps already taken in this run (diffusers' lower_order_nums)
        last = k == num_steps - 1
        second_last = k == num_steps - 2 and lower_order_final and num_steps < 15
        if solver_order == 1 or done < 1 or last:
            orders.append(1)
        elif solver_order == 2 or done < 2 or second_last:
            orders.append(2)
        else:
            orders.append(3)
    return np.array(orders)


def dpm_sigmas(xp, schedule: Schedule, cfg: SamplerConfig):
    """(VE sigmas [n], model timesteps [n] int) of the full n-step run."""
    ts = dpm_solver_timesteps(schedule.num_timesteps, cfg.num_steps, cfg.spacing, cfg.steps_offset)
    if not cfg.karras_sigmas and np.any(np.diff(ts) >= 0):
        # e.g. "leading" with n = T: T // (n + 1) = 0 repeats timesteps; the solver would divide by h = 0.
        raise ValueError(
            f"spacing {cfg.spacing!r} with num_steps={cfg.num_steps} repeats timesteps for DPM-Solver++: {ts[:4]}..."
        )
    if cfg.karras_sigmas:
        sig = karras_sigmas(schedule.sigmas[0], schedule.sigmas[-1], cfg.num_steps)
        # diffusers rounds the model timestep (except for cosine schedules) but keeps the Karras sigma.
        t_model = xp.round(sigma_to_timestep(sig, schedule.sigmas)).astype(xp.int32)
        return sig, t_model
    return schedule.sigmas[ts], ts


def dpm_plan(
    schedule: Schedule, cfg: SamplerConfig, start_step: int = 0, *, solver_order: int = 2, sde: bool = False
) -> Plan:
    xp, schedule = schedule_namespace(schedule)
    n = cfg.num_steps
    sig, t_model = dpm_sigmas(xp, schedule, cfg)
    sig_next = xp.concatenate([sig[1:], xp.zeros((1,), sig.dtype)])
    lam = -xp.log(sig)  # lambda = log(alpha / sigma_vp) = -log(sigma_ve)
    with np.errstate(divide="ignore"):
        lam_next = -xp.log(sig_next)  # +inf at the final (sigma = 0) level
    k = np.arange(n)
    h = lam_next - lam
    h_0 = lam - lam[np.maximum(k - 1, 0)]
    h_1 = lam[np.maximum(k - 1, 0)] - lam[np.maximum(k - 2, 0)]
    orders = np.zeros(n, np.int64)
    orders[start_step:] = solver_orders(n, start_step, solver_order, cfg.lower_order_final)
    use2, use3 = orders >= 2, orders >= 3
    # Unused ratios and step sizes are replaced by 1 so that every branch stays finite.
    h_2 = xp.where(use2, h, 1.0)
    r0 = xp.where(use2, h_0 / h_2, 1.0)
    r1 = xp.where(use3, h_1 / h_2, 1.0)
    a_s, b_s = ve_to_vp(xp, sig)
    a_t, b_t = ve_to_vp(xp, sig_next)
    if sde:
        decay = -xp.expm1(-2.0 * h)  # 1 - exp(-2h)
        coef_x = b_t / b_s * xp.exp(-h)
        coef_d0 = a_t * decay
        coef_da = xp.where(use2, 0.5 * a_t * decay, 0.0)
        coef_db = xp.zeros_like(coef_x)
        std = b_t * xp.sqrt(decay)
    else:
        e = xp.expm1(-h)
        coef_x = b_t / b_s
        coef_d0 = -a_t * e
        h_3 = xp.where(use3, h, 1.0)
        c1 = a_t * (e / h_3 + 1.0)
        c2 = a_t * ((e + h_3) / h_3**2 - 0.5)
        q = r0 / (r0 + r1)
        p = 1.0 / (r0 + r1)
        coef_da = xp.where(use3, c1 * (1.0 + q) - c2 * p, xp.where(use2, -0.5 * a_t * e, 0.0))
        coef_db = xp.where(use3, -c1 * q + c2 * p, 0.0)
        std = xp.zeros_like(coef_x)
    coef = dict(coef_x=coef_x, coef_d0=coef_d0, coef_da=coef_da, coef_db=coef_db, r0=r0, r1=r1, std=std)
    plan = finish_plan(
        xp,
        t=t_model,
        a=a_s,
        b=b_s,
        in_scale=1.0,
        out_a=a_t,
        out_b=b_t,
        out_scale=1.0,
        log_alpha_step=2.0 * (xp.log(a_s) - xp.log(a_t)),
        coef=coef,
        init_scale=1.0,
    )
    return take_rows(plan, np.arange(start_step, n))


def dpm_init_state(x):
    """The two previous data predictions (m_{-1}, m_{-2})."""
    return (jnp.zeros_like(x), jnp.zeros_like(x))


def dpm_step(cfg: SamplerConfig, row: Plan, state, x, eps, x0, var_param, noise):
    m1, m2 = state
    c = row.coef
    d1_0 = (x0 - m1) / c["r0"]
    d1_1 = (m1 - m2) / c["r1"]
    x_next = c["coef_x"] * x + c["coef_d0"] * x0 + c["coef_da"] * d1_0 + c["coef_db"] * d1_1
    if noise is not None:
        x_next = x_next + c["std"] * noise
    return x_next, (x0, m1)


# ------------------------------------------------------------------- singlestep (DPM-Solver++ 2S)


def singlestep_orders(num_steps: int, start_step: int) -> np.ndarray:
    """diffusers' ``DPMSolverSinglestepScheduler.get_order_list`` for order 2 (lower order final,
    final sigma zero): 1, 2, 1, 2, ..., ending 1, 1 (n even) or 1 (n odd). A run started at
    ``start_step`` (img2img) has no previous output, so its first step is first order."""
    n = num_steps
    orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
    orders[-1] = 1
    orders = np.array(orders[:n])
    orders[start_step] = 1
    return orders


def dpm_singlestep_plan(schedule: Schedule, cfg: SamplerConfig, start_step: int = 0) -> Plan:
    """DPM-Solver++(2S) (Lu et al. 2022b, alg. 1 with the schedule's own intermediate points), as
    diffusers' ``DPMSolverSinglestepScheduler(solver_order=2, algorithm_type="dpmsolver++")``.

    Steps alternate: a first-order step s_{k-1} -> s_k (the intermediate point, state saved),
    then a second-order step from the SAVED state at s_{k-1} straight to s_{k+1} using the data
    predictions at s_{k-1} and s_k (D0 = m_{k-1}, D1 = (m_k - m_{k-1}) / r, r = h_0 / h):
    midpoint x = (sigma_t / sigma_s) x_s - alpha_t expm1(-h) (D0 + D1 / 2), or with
    ``solver_type="heun"`` the D1 coefficient alpha_t (expm1(-h) / h + 1).
    """
    xp, schedule = schedule_namespace(schedule)
    n = cfg.num_steps
    sig, t_model = dpm_sigmas(xp, schedule, cfg)
    sig_ext = xp.concatenate([sig, xp.zeros((1,), sig.dtype)])
    orders = np.ones(n, np.int64)
    orders[start_step:] = singlestep_orders(n, start_step)[start_step:]
    second = orders == 2
    k = np.arange(n)
    base = np.where(second, k - 1, k)  # the step starts from this level's state
    lam = -xp.log(sig)
    with np.errstate(divide="ignore"):
        lam_ext = -xp.log(sig_ext)
    h = lam_ext[k + 1] - lam[base]
    h_safe = xp.where(second, h, 1.0)
    r0 = xp.where(second, (lam - lam[base]) / h_safe, 1.0)
    a_t, b_t = ve_to_vp(xp, sig_ext[k + 1])
    _, b_base = ve_to_vp(xp, sig[base])
    big_a = -a_t * xp.expm1(-h)
    if cfg.solver_type == "heun":
        d1 = a_t * (xp.expm1(-h_safe) / h_safe + 1.0)
    else:
        d1 = 0.5 * big_a
    d1 = xp.where(second, d1, 0.0)
    coef = dict(
        coef_x=b_t / b_base,
        coef_x0=xp.where(second, d1 / r0, big_a),
        coef_m=xp.where(second, big_a - d1 / r0, 0.0),
        use_saved=second.astype(np.float32),
    )
    a_s, b_s = ve_to_vp(xp, sig)
    plan = finish_plan(
        xp,
        t=t_model,
        a=a_s,
        b=b_s,
        in_scale=1.0,
        out_a=a_t,
        out_b=b_t,
        out_scale=1.0,
        log_alpha_step=2.0 * (xp.log(a_s) - xp.log(a_t)),
        coef=coef,
        init_scale=1.0,
    )
    return take_rows(plan, np.arange(start_step, n))


def dpm_singlestep_init_state(x):
    """(the state a first-order step started from, its data prediction)."""
    return (jnp.zeros_like(x), jnp.zeros_like(x))


def dpm_singlestep_step(cfg: SamplerConfig, row: Plan, state, x, eps, x0, var_param, noise):
    saved, m_prev = state
    c = row.coef
    second = c["use_saved"] > 0
    start = jnp.where(second, saved, x)
    x_next = c["coef_x"] * start + c["coef_x0"] * x0 + c["coef_m"] * m_prev
    return x_next, (start, x0)
