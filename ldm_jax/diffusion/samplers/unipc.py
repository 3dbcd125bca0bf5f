"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) with a free corrector (UniC), on data
predictions, as diffusers' ``UniPCMultistepScheduler(predict_x0=True)``, ``solver_type`` "bh1"
(B(h) = h) or "bh2" (B(h) = e^h - 1), orders 1-3.

With lambda = -log(sigma_VE), h = lambda_next - lambda_k and the data predictions m_j, step k:

1. corrector (k > 0): the model output m_k at the predicted x_k is used to redo the previous
   step from the corrected x_{k-1} with one more term, of the previous step's order;
2. predictor: x_{k+1} = (sigma_{k+1} / sigma_k) x_k - alpha_{k+1} (e^{-h} - 1) m_k
   - alpha_{k+1} B(-h) sum_i rho_i (m_{k-i} - m_k) / r_i, r_i = (lambda_{k-i} - lambda_k) / h,

where the rho solve the order conditions (diffusers: rho = 1/2 at order 2, a linear solve at
order 3). Orders warm up 1, 2, 3 and, with ``lower_order_final``, fall to n - k at the end
(no n < 15 condition, unlike DPM-Solver++). Every coefficient is precomputed per step, so the
step is two linear combinations. Timesteps and sigmas are DPM-Solver++'s.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.samplers.base import Plan, SamplerConfig, finish_plan, schedule_namespace, take_rows, ve_to_vp
from ldm_jax.diffusion.samplers.dpm_solver import dpm_sigmas
from ldm_jax.diffusion.schedules import Schedule


def unipc_orders(num_steps: int, start_step: int, solver_order: int, lower_order_final: bool) -> np.ndarray:
    """The predictor order diffusers uses at steps start_step .. n - 1. The last step (to sigma
    = 0, infinite h) is first order even without ``lower_order_final`` (where diffusers' solve
    fails on a singular system)."""
    k = np.arange(start_step, num_steps)
    orders = np.minimum(solver_order, k - start_step + 1)
    if lower_order_final:
        orders = np.minimum(orders, num_steps - k)
    orders[-1] = 1
    return orders


def _rhos(xp, hh, rks, order, bh: str, predictor: bool):
    """rho coefficients [N, 3] (zero-padded) for per-row orders; rks [N, 2] (r_1, r_2)."""
    n = hh.shape[0]
    h_phi_1 = xp.expm1(hh)
    b_h = hh if bh == "bh1" else xp.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1.0
    bs = []
    for i in range(1, 4):
        bs.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    b = xp.stack(bs, axis=1)  # [N, 3]
    # R[i, j] = rk_j^i with rk = (r_1, r_2, 1)[: order]; pad unused rows/columns with identity.
    ones = xp.ones((n,))
    rk_full = xp.stack([rks[:, 0], rks[:, 1], ones], axis=1)
    size = order - 1 if predictor else order  # the predictor drops the last row/column
    rows = []
    for i in range(3):
        cols = []
        for j in range(3):
            # Column j holds rk_j for j < order - 1 and the trailing 1 at column order - 1.
            rk_j = xp.where(j < order - 1, rk_full[:, min(j, 1)], ones)
            inside = (i < size) & (j < size)
            cols.append(xp.where(inside, rk_j**i, xp.where(i == j, 1.0, 0.0)))
        rows.append(xp.stack(cols, axis=1))
    mat = xp.stack(rows, axis=1)  # [N, 3 (i), 3 (j)]
    rhs = xp.where(np.arange(3)[None, :] < size[:, None], b, 0.0)
    rho = xp.linalg.solve(mat, rhs[..., None])[..., 0]
    # diffusers' special cases: rho_p = 1/2 at order 2, rho_c = 1/2 at order 1.
    half = np.array([0.5, 0.0, 0.0])
    special = (order == 2) if predictor else (order == 1)
    rho = xp.where(special[:, None], half[None, :], rho)
    return rho, h_phi_1, b_h


def unipc_plan(schedule: Schedule, cfg: SamplerConfig, start_step: int = 0, *, solver_order: int = 2) -> Plan:
    xp, schedule = schedule_namespace(schedule)
    n = cfg.num_steps
    sig, t_model = dpm_sigmas(xp, schedule, cfg)
    sig_ext = xp.concatenate([sig, xp.zeros((1,), sig.dtype)])
    with np.errstate(divide="ignore"):
        lam = -xp.log(sig_ext)  # +inf at the final zero sigma
    alpha, sigma_vp = ve_to_vp(xp, sig_ext)
    k = np.arange(n)
    p = np.ones(n, np.int64)
    p[start_step:] = unipc_orders(n, start_step, solver_order, cfg.lower_order_final)
    idx = lambda j: np.clip(j, 0, n)  # noqa: E731

    # Predictor k: from level k to k + 1, history m_{k-1}, m_{k-2}.
    h = lam[idx(k + 1)] - lam[k]
    h_p = xp.where(p > 1, h, 1.0)  # keep unused (final, infinite h) rows finite
    rks = xp.stack([(lam[idx(k - 1)] - lam[k]) / h_p, (lam[idx(k - 2)] - lam[k]) / h_p], axis=1)
    rks = xp.where(np.stack([p > 1, p > 2], axis=1), rks, 1.0)
    rho, _, b_h = _rhos(xp, -h_p, rks, p, cfg.solver_type, predictor=True)
    h_phi_1 = xp.expm1(-h)  # the true (possibly infinite) step for the first-order part
    a_t = alpha[idx(k + 1)]
    used = [(p > 1 + i) for i in range(2)]
    d_coef = [xp.where(used[i], -a_t * b_h * rho[:, i] / rks[:, i], 0.0) for i in range(2)]
    pred = xp.stack(
        [sigma_vp[idx(k + 1)] / sigma_vp[k], -a_t * h_phi_1 - d_coef[0] - d_coef[1], d_coef[0], d_coef[1]], axis=1
    )

    # Corrector k (k > start): redo step k - 1 -> k with order q = p_{k-1} and m_k.
    q = np.concatenate([[1], p[:-1]])
    use_c = (k > start_step).astype(np.float32)
    prev = idx(k - 1)
    hc = lam[k] - lam[prev]
    hc = xp.where(use_c > 0, hc, 1.0)
    rkc = xp.stack([(lam[idx(k - 2)] - lam[prev]) / hc, (lam[idx(k - 3)] - lam[prev]) / hc], axis=1)
    rkc = xp.where(np.stack([q > 1, q > 2], axis=1), rkc, 1.0)
    rho_c, h_phi_c, b_hc = _rhos(xp, -hc, rkc, q, cfg.solver_type, predictor=False)
    a_k = alpha[k]
    last = xp.take_along_axis(rho_c, (q - 1)[:, None], axis=1)[:, 0]  # rho for D1_t = m_k - m_{k-1}
    c_hist = [xp.where(q > 1 + i, -a_k * b_hc * rho_c[:, i] / rkc[:, i], 0.0) for i in range(2)]
    corr = xp.stack(
        [
            sigma_vp[k] / sigma_vp[prev],  # on the corrected x_{k-1}
            -a_k * b_hc * last,  # on m_k
            -a_k * h_phi_c + a_k * b_hc * last - c_hist[0] - c_hist[1],  # on m_{k-1}
            c_hist[0],  # on m_{k-2}
            c_hist[1],  # on m_{k-3}
        ],
        axis=1,
    )
    corr = xp.where(use_c[:, None] > 0, corr, 0.0)
    plan = finish_plan(
        xp,
        t=t_model,
        a=alpha[:n],
        b=sigma_vp[:n],
        in_scale=1.0,
        out_a=alpha[1:],
        out_b=sigma_vp[1:],
        out_scale=1.0,
        log_alpha_step=2.0 * (xp.log(alpha[:n]) - xp.log(alpha[1:])),
        coef=dict(use_corrector=use_c),
        init_scale=1.0,
    )
    plan.coef["predictor"] = xp.asarray(pred, dtype=xp.float32)
    plan.coef["corrector"] = xp.asarray(corr, dtype=xp.float32)
    return take_rows(plan, np.arange(start_step, n))


def unipc_init_state(x):
    """(the corrected state of the previous step, data predictions m_{k-1}, m_{k-2}, m_{k-3})."""
    return (jnp.zeros_like(x), jnp.zeros((3,) + x.shape, x.dtype))


def unipc_step(cfg: SamplerConfig, row: Plan, state, x, eps, x0, var_param, noise):
    last, hist = state
    c, p = row.coef["corrector"], row.coef["predictor"]
    corrected = c[0] * last + c[1] * x0 + c[2] * hist[0] + c[3] * hist[1] + c[4] * hist[2]
    x = jnp.where(row.coef["use_corrector"] > 0, corrected, x)
    x_next = p[0] * x + p[1] * x0 + p[2] * hist[0] + p[3] * hist[1]
    return x_next, (x, jnp.concatenate([x0[None], hist[:2]], axis=0))


unipc_plan_order = {order: functools.partial(unipc_plan, solver_order=order) for order in (1, 2, 3)}
