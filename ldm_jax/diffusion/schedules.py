"""Noise schedules as immutable pytrees of precomputed arrays.

A :class:`Schedule` holds every per-timestep quantity that the forward process, the losses
and the samplers need, computed once in float64 with NumPy and stored as float32 JAX arrays.
It is a ``NamedTuple`` (a pytree), so it is passed into jitted functions as an argument
rather than closed over, and no Flax is needed to use it.

Timesteps are integers ``t`` in ``[0, T)``, as in diffusers: ``t = 0`` is the least noisy
step (``alphas_cumprod[0] = 1 - betas[0]``), and ``t = T - 1`` the noisiest.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

SCHEDULE_KINDS = ("linear", "scaled_linear", "cosine")


class Schedule(NamedTuple):
    """Per-timestep arrays of a discrete-time variance-preserving diffusion, each of shape [T].

    ``alphas_cumprod_prev[t]`` is ``alphas_cumprod[t - 1]`` with ``alphas_cumprod_prev[0] = 1``.
    ``sigmas`` are the equivalent variance-exploding noise levels ``sqrt((1 - abar) / abar)``
    used by the Karras-style samplers (Euler, Heun). ``posterior_*`` describe
    ``q(x_{t-1} | x_t, x_0)``; the log-variance at ``t = 0`` is clipped to the value at
    ``t = 1`` because the true posterior variance there is zero (Ho et al. 2020).
    """

    betas: jnp.ndarray
    alphas: jnp.ndarray
    alphas_cumprod: jnp.ndarray
    alphas_cumprod_prev: jnp.ndarray
    sqrt_alphas_cumprod: jnp.ndarray
    sqrt_one_minus_alphas_cumprod: jnp.ndarray
    log_one_minus_alphas_cumprod: jnp.ndarray
    sqrt_recip_alphas_cumprod: jnp.ndarray
    sqrt_recipm1_alphas_cumprod: jnp.ndarray
    sigmas: jnp.ndarray
    log_snr: jnp.ndarray
    posterior_variance: jnp.ndarray
    posterior_log_variance_clipped: jnp.ndarray
    posterior_mean_coef1: jnp.ndarray
    posterior_mean_coef2: jnp.ndarray

    @property
    def num_timesteps(self) -> int:
        """T, the number of training timesteps (static: read from the array shape)."""
        return self.betas.shape[0]


def _cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    # Nichol & Dhariwal 2021, eq. 17: abar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2);
    # betas are clipped at max_beta to keep the end of the chain from being singular.
    def abar(t):
        return math.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

    return np.array(
        [min(1 - abar(i + 1) / abar(i), max_beta) for i in range(num_timesteps)], dtype=np.float64
    )


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so that the last timestep has exactly zero SNR (Lin et al. 2023, Alg. 1).

    sqrt(abar) is shifted so its last value is 0 and scaled so its first value is unchanged.
    """
    betas = np.asarray(betas, dtype=np.float64)
    sqrt_abar = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_abar[0], sqrt_abar[-1]
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


def make_schedule(
    kind: str = "linear",
    num_timesteps: int = 1000,
    *,
    beta_start: float | None = None,
    beta_end: float | None = None,
    betas: np.ndarray | None = None,
    rescale_to_zero_terminal_snr: bool = False,
    terminal_alphas_cumprod: float = 2.0**-24,
) -> Schedule:
    """Build a :class:`Schedule`.

    Args:
      kind: ``"linear"`` (DDPM: betas linear from 1e-4 to 0.02), ``"scaled_linear"``
        (Stable Diffusion: linear in sqrt(beta) from 0.00085 to 0.012) or ``"cosine"``
        (improved DDPM, s = 0.008, betas capped at 0.999). Ignored when ``betas`` is given.
      num_timesteps: T, the number of training timesteps.
      beta_start, beta_end: override the endpoints of ``"linear"`` / ``"scaled_linear"``.
      betas: explicit betas of shape [T] (diffusers' ``trained_betas``).
      rescale_to_zero_terminal_snr: apply Lin et al. 2023 so ``alphas_cumprod[-1] == 0``.
      terminal_alphas_cumprod: with a zero terminal SNR, ``alphas_cumprod[-1]`` is replaced
        by this tiny value in the derived quantities that would divide by it (``sigmas``,
        ``sqrt_recip*``, ``log_snr``), as diffusers does, so that they stay finite; the
        forward process itself uses the exact zero.

    Returns:
      A Schedule whose arrays have shape [T] and dtype float32.
    """
    if betas is None:
        if kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule kind {kind!r}; expected one of {SCHEDULE_KINDS}")
        if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 2:
            raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
        if kind == "linear":
            lo = 1e-4 if beta_start is None else beta_start
            hi = 0.02 if beta_end is None else beta_end
            b = np.linspace(lo, hi, num_timesteps, dtype=np.float64)
        elif kind == "scaled_linear":
            lo = 0.00085 if beta_start is None else beta_start
            hi = 0.012 if beta_end is None else beta_end
            b = np.linspace(lo**0.5, hi**0.5, num_timesteps, dtype=np.float64) ** 2
        else:
            b = _cosine_betas(num_timesteps)
    else:
        b = np.asarray(betas, dtype=np.float64)
        if b.ndim != 1 or b.shape[0] < 2:
            raise ValueError(f"betas must be a 1-D array of length >= 2, got shape {b.shape}")
    if np.any(b <= 0) or np.any(b > 1):
        raise ValueError(f"betas must lie in (0, 1], got range [{b.min()}, {b.max()}]")
    if rescale_to_zero_terminal_snr:
        b = rescale_zero_terminal_snr(b)
    return _schedule_from_betas(b, terminal_alphas_cumprod)


def _schedule_from_betas(betas: np.ndarray, terminal_alphas_cumprod: float) -> Schedule:
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    # Only an exact zero (zero terminal SNR) is replaced, and only in the quantities that divide
    # by abar; q_sample uses the exact value. A tiny but positive abar (the cosine schedule ends
    # at ~2e-9) is kept, so sigma_max matches diffusers.
    abar_safe = np.where(abar > 0, abar, terminal_alphas_cumprod)
    posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
    posterior_log_variance_clipped = np.log(
        np.concatenate([posterior_variance[1:2], posterior_variance[1:]])
    )
    arrays = dict(
        betas=betas,
        alphas=alphas,
        alphas_cumprod=abar,
        alphas_cumprod_prev=abar_prev,
        sqrt_alphas_cumprod=np.sqrt(abar),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - abar),
        log_one_minus_alphas_cumprod=np.log(1.0 - abar),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / abar_safe),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / abar_safe - 1.0),
        sigmas=np.sqrt((1.0 - abar_safe) / abar_safe),
        log_snr=np.log(abar_safe) - np.log(1.0 - abar),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=posterior_log_variance_clipped,
        posterior_mean_coef1=betas * np.sqrt(abar_prev) / (1.0 - abar),
        posterior_mean_coef2=(1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar),
    )
    return Schedule(**{k: jnp.asarray(v, dtype=jnp.float32) for k, v in arrays.items()})


def extract(values: jnp.ndarray, t: jnp.ndarray, ndim: int) -> jnp.ndarray:
    """Gather ``values[t]`` for a batch of timesteps and reshape to broadcast against an
    array of rank ``ndim``: [B] -> [B, 1, ..., 1]. A scalar ``t`` gives a scalar-like [1,...]."""
    t = jnp.asarray(t)
    out = values[t]
    return out.reshape(out.shape + (1,) * (ndim - out.ndim))


def sigma_at(schedule: Schedule, t: jnp.ndarray) -> jnp.ndarray:
    """sigma(t) = sqrt((1 - abar_t) / abar_t) at integer or fractional timesteps.

    Fractional ``t`` (which Karras-sigma samplers produce) interpolates log(sigma) linearly
    between neighbouring integer timesteps, the same convention diffusers uses to map a
    sigma back to a timestep, so a model evaluated at the fractional timestep sees the noise
    level the sampler intended. ``t`` outside ``[0, T - 1]`` is clamped to that range.

    Args: t, float or int timesteps of any shape. Returns: sigma, float32, same shape as t.
    """
    # Clamping t first keeps out-of-range timesteps at the end sigmas instead of
    # extrapolating log(sigma) linearly past t = 0.
    t = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, schedule.num_timesteps - 1)
    log_sigmas = jnp.log(schedule.sigmas)
    lo = jnp.clip(jnp.floor(t), 0, schedule.num_timesteps - 1).astype(jnp.int32)
    hi = jnp.clip(lo + 1, 0, schedule.num_timesteps - 1)
    w = t - lo
    return jnp.exp((1.0 - w) * log_sigmas[lo] + w * log_sigmas[hi])
