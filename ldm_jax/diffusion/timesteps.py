"""Sampling timestep and noise-level sequences, computed as diffusers computes them.

The integer sequences depend only on the number of training timesteps ``T``, the number of
sampling steps and the spacing, all static, so they are plain NumPy arrays (descending,
noisiest first). The Karras sigma sequence and the sigma -> timestep map also depend on the
schedule's values; they work on NumPy arrays (float64, used when the schedule is concrete)
and on (possibly traced) JAX arrays alike, so samplers can also be built inside ``jit`` from
a schedule that is a traced argument.

Spacings (Lin et al. 2023, table 2):

* ``"leading"``: ``arange(n) * (T // n)`` reversed, plus ``steps_offset`` (Stable Diffusion
  configs use ``steps_offset=1``: 981, 961, ..., 1 for n = 50).
* ``"trailing"``: ``round(arange(T, 0, -T / n)) - 1`` (999, 979, ..., 19); ignores the offset.
* ``"linspace"``: ``round(linspace(0, T - 1, n))`` reversed; ignores the offset. The Euler and
  Heun schedulers keep these unrounded (``rounded=False``).

The DPM-Solver multistep scheduler computes ``n + 1`` points and drops the last one for
``"linspace"`` and ``"leading"``: :func:`dpm_solver_timesteps`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SPACINGS = ("leading", "trailing", "linspace")


def _check_counts(num_train_timesteps: int, num_steps: int) -> None:
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if num_steps > num_train_timesteps:
        raise ValueError(
            f"num_steps={num_steps} exceeds the schedule's num_timesteps={num_train_timesteps}"
        )


def _check_spacing(spacing: str) -> None:
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")


def _check_in_range(timesteps: np.ndarray, num_train_timesteps: int, spacing: str, steps_offset: int):
    if timesteps.min() < 0 or timesteps.max() > num_train_timesteps - 1:
        raise ValueError(
            f"spacing {spacing!r} with steps_offset={steps_offset} gives timesteps outside "
            f"[0, {num_train_timesteps - 1}]: [{timesteps.min()}, {timesteps.max()}]"
        )


def discrete_timesteps(
    num_train_timesteps: int,
    num_steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
    *,
    rounded: bool = True,
) -> np.ndarray:
    """The sampling timesteps of DDPM / DDIM / PNDM / Euler / Heun in diffusers.

    Args:
      num_train_timesteps: T.
      num_steps: n, the number of sampling steps (1 <= n <= T).
      spacing: ``"leading"``, ``"trailing"`` or ``"linspace"``.
      steps_offset: added to ``"leading"`` timesteps only (as in diffusers).
      rounded: ``False`` keeps ``"linspace"`` timesteps fractional, as the Euler and Heun
        schedulers do; the other spacings are integers either way.

    Returns:
      [n] descending timesteps, int64 (float64 when ``rounded=False``).
    """
    _check_counts(num_train_timesteps, num_steps)
    _check_spacing(spacing)
    T, n = num_train_timesteps, num_steps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n)[::-1]
        ts = ts.round().astype(np.int64) if rounded else ts.astype(np.float64)
    elif spacing == "leading":
        ts = (np.arange(n) * (T // n))[::-1].astype(np.int64) + steps_offset
    else:
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    ts = np.ascontiguousarray(ts)
    _check_in_range(ts, T, spacing, steps_offset)
    if not rounded:
        ts = ts.astype(np.float64)
    return ts


def dpm_solver_timesteps(
    num_train_timesteps: int, num_steps: int, spacing: str = "linspace", steps_offset: int = 0
) -> np.ndarray:
    """The integer timesteps of diffusers' ``DPMSolverMultistepScheduler`` (no lambda clipping).

    ``"linspace"``: ``round(linspace(0, T - 1, n + 1))`` reversed without its last point;
    ``"leading"``: ``arange(n + 1) * (T // (n + 1))`` reversed without its last point, plus
    ``steps_offset``; ``"trailing"``: as :func:`discrete_timesteps`.

    Returns: [n] descending int64 timesteps.
    """
    _check_counts(num_train_timesteps, num_steps)
    _check_spacing(spacing)
    T, n = num_train_timesteps, num_steps
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(n + 1) * (T // (n + 1)))[::-1][:-1].astype(np.int64) + steps_offset
    else:
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    ts = np.ascontiguousarray(ts)
    _check_in_range(ts, T, spacing, steps_offset)
    return ts


def plms_timesteps(timesteps: np.ndarray) -> np.ndarray:
    """Model-evaluation timesteps of PLMS (diffusers ``PNDMScheduler(skip_prk_steps=True)``).

    For a descending sequence ``t_0 > ... > t_{n-1}`` with n >= 2 this is
    ``[t_0, t_1, t_1, t_2, ..., t_{n-1}]`` (n + 1 evaluations): the second evaluation is the
    corrector of a second-order start-up step that re-evaluates the model at ``t_1``.
    For n = 1 it is ``[t_0]``.
    """
    timesteps = np.asarray(timesteps)
    if timesteps.shape[0] < 2:
        return timesteps.copy()
    return np.concatenate([timesteps[:1], timesteps[1:2], timesteps[1:]])


def karras_sigmas(sigma_min, sigma_max, num_steps: int, rho: float = 7.0):
    """Karras et al. 2022 (eq. 5) noise levels, descending from ``sigma_max`` to ``sigma_min``.

    sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho.
    ``sigma_min`` / ``sigma_max`` may be Python floats, NumPy or JAX scalars; the result has
    the matching array type. Returns: [num_steps] sigmas (no trailing zero).
    """
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    ramp = np.linspace(0.0, 1.0, num_steps)
    lo = sigma_min ** (1.0 / rho)
    hi = sigma_max ** (1.0 / rho)
    return (hi + (lo - hi) * ramp) ** rho


def sigma_to_timestep(sigma, schedule_sigmas):
    """Fractional timestep whose noise level is ``sigma``, by linear interpolation of
    log(sigma) between neighbouring training timesteps (diffusers' ``_sigma_to_t``).

    This is the inverse of :func:`ldm_jax.diffusion.schedules.sigma_at` on
    ``[sigma_0, sigma_{T-1}]``; sigmas outside that range map to 0 or T - 1.

    Args:
      sigma: noise levels, any shape.
      schedule_sigmas: [T] increasing per-timestep sigmas (``Schedule.sigmas``).
    Returns: shaped like ``sigma``: float64 NumPy when both inputs are NumPy arrays (or
      scalars), else a float32 JAX array.
    """
    numpy_in = not isinstance(sigma, jax.Array) and not isinstance(schedule_sigmas, jax.Array)
    xp, dtype = (np, np.float64) if numpy_in else (jnp, jnp.float32)
    log_sigmas = xp.log(xp.asarray(schedule_sigmas, dtype))
    log_sigma = xp.log(xp.maximum(xp.asarray(sigma, dtype), 1e-10))
    num = log_sigmas.shape[0]
    low = xp.clip(xp.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, num - 2)
    lo_val, hi_val = log_sigmas[low], log_sigmas[low + 1]
    w = xp.clip((lo_val - log_sigma) / (lo_val - hi_val), 0.0, 1.0)
    return (low + w).astype(dtype)


def repaint_events(num_steps: int, jump_length: int, jump_n_sample: int) -> list[tuple[str, int]]:
    """The RePaint resampling schedule (Lugmayr et al. 2022) as a list of events.

    Steps are indexed by ``k = 0..n-1`` (``k = 0`` is the noisiest model evaluation). An event
    ``("denoise", k)`` runs sampling step k; ``("renoise", k)`` diffuses the state forward
    from the level reached by step k back to the level step k starts from. Every
    ``jump_length`` steps the chain jumps back ``jump_length`` steps, ``jump_n_sample - 1``
    times, as diffusers' ``RePaintScheduler.set_timesteps`` orders them.
    """
    for name, value in (("num_steps", num_steps), ("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    # Levels u = n-1 .. 0 in RePaint's order; u is the step evaluated at "timestep index" u.
    jumps = {u: jump_n_sample - 1 for u in range(0, num_steps - jump_length, jump_length)}
    levels = []
    u = num_steps
    while u >= 1:
        u -= 1
        levels.append(u)
        if jumps.get(u, 0) > 0:
            jumps[u] -= 1
            for _ in range(jump_length):
                u += 1
                levels.append(u)
    events = []
    last = num_steps
    for u in levels:
        events.append(("denoise" if u < last else "renoise", num_steps - 1 - u))
        last = u
    return events
