"""The forward (noising) process, its Gaussian posterior, and conversions between the
eps, x0 and v parameterisations of a denoiser's output.

All functions take a :class:`~ldm_jax.diffusion.schedules.Schedule` and integer timesteps
``t`` of shape [B] (or a scalar) and arrays ``x`` of shape [B, ...]; they are pure and work
under ``jit``, ``vmap`` and ``grad``.
"""

from __future__ import annotations

import jax.numpy as jnp

from ldm_jax.diffusion.schedules import Schedule, extract

PREDICTION_TYPES = ("eps", "x0", "v")


def _check_timesteps(t, x: jnp.ndarray) -> None:
    # A [B'] timestep vector with B' != B would otherwise broadcast into a [B', B, ...] array
    # or fail deep inside XLA; name both shapes instead.
    t_shape = jnp.shape(t)
    batch = x.shape[0] if x.ndim else None
    if len(t_shape) > 1 or (len(t_shape) == 1 and t_shape[0] not in (1, batch)):
        raise ValueError(f"timesteps t of shape {t_shape} do not match the batch of x with shape {x.shape}")


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTION_TYPES}")


def q_sample(schedule: Schedule, x0: jnp.ndarray, t: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
    """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I).

    Args:
      x0: clean data [B, ...]. t: int timesteps [B] or scalar. noise: standard normal, like x0.
    Returns: x_t with the shape and dtype of x0.
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {noise.shape} does not match x0 shape {x0.shape}")
    _check_timesteps(t, x0)
    a = extract(schedule.sqrt_alphas_cumprod, t, x0.ndim)
    s = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
    return (a * x0 + s * noise).astype(x0.dtype)


def q_posterior(schedule: Schedule, x0: jnp.ndarray, x_t: jnp.ndarray, t: jnp.ndarray):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 7).

    Returns: ``(mean [B, ...], variance [B, 1, ...], log_variance_clipped [B, 1, ...])``.
    """
    if x0.shape != x_t.shape:
        raise ValueError(f"x0 shape {x0.shape} does not match x_t shape {x_t.shape}")
    _check_timesteps(t, x_t)
    mean = (
        extract(schedule.posterior_mean_coef1, t, x_t.ndim) * x0
        + extract(schedule.posterior_mean_coef2, t, x_t.ndim) * x_t
    )
    var = extract(schedule.posterior_variance, t, x_t.ndim)
    log_var = extract(schedule.posterior_log_variance_clipped, t, x_t.ndim)
    return mean, var, log_var


def x0_from_eps(schedule: Schedule, x_t, t, eps):
    """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    return (
        extract(schedule.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
        - extract(schedule.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
    )


def eps_from_x0(schedule: Schedule, x_t, t, x0):
    """eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    return (x_t - extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * x0) / extract(
        schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim
    )


def v_from_eps_x0(schedule: Schedule, t, eps, x0):
    """v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, eps.ndim) * eps
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, eps.ndim) * x0
    )


def x0_from_v(schedule: Schedule, x_t, t, v):
    """x0 = sqrt(abar) x_t - sqrt(1 - abar) v."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * x_t
        - extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * v
    )


def eps_from_v(schedule: Schedule, x_t, t, v):
    """eps = sqrt(1 - abar) x_t + sqrt(abar) v."""
    return (
        extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim) * x_t
        + extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim) * v
    )


def to_eps_and_x0(schedule: Schedule, model_output, x_t, t, prediction: str = "eps"):
    """Interpret a model output of the given ``prediction`` type as (eps_hat, x0_hat).

    Samplers use this so that any parameterisation plugs into any sampler.
    """
    _check_prediction(prediction)
    if model_output.shape != x_t.shape:
        raise ValueError(f"model output shape {model_output.shape} does not match x_t shape {x_t.shape}")
    _check_timesteps(t, x_t)
    if prediction == "eps":
        eps = model_output
        x0 = x0_from_eps(schedule, x_t, t, eps)
    elif prediction == "x0":
        x0 = model_output
        eps = eps_from_x0(schedule, x_t, t, x0)
    else:
        x0 = x0_from_v(schedule, x_t, t, model_output)
        eps = eps_from_v(schedule, x_t, t, model_output)
    return eps, x0


def training_target(schedule: Schedule, x0, noise, t, prediction: str = "eps"):
    """The regression target of a denoiser trained with the given parameterisation."""
    _check_prediction(prediction)
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {noise.shape} does not match x0 shape {x0.shape}")
    _check_timesteps(t, x0)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    return v_from_eps_x0(schedule, t, noise, x0)
