"""Exact denoisers for Gaussian data: the closed-form references the samplers and the
variational bound are tested against, and a zero-weights way to try the library.

For x0 ~ N(mu, s^2 I) and x_t = a x0 + b eps with a = sqrt(abar_t), b = sqrt(1 - abar_t),
x_t ~ N(a mu, (a^2 s^2 + b^2) I) and the posterior mean of the noise is
E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2), which is the optimal eps-prediction.
"""

from __future__ import annotations

import jax.numpy as jnp

from ldm_jax.diffusion.schedules import Schedule, sigma_at


def gaussian_eps_model(schedule: Schedule, mean, std):
    """Return ``model_fn(x_t, t) -> eps_hat``, the exact eps-predictor for N(mean, std^2 I) data.

    ``mean`` and ``std`` are scalars or arrays broadcastable to one example's shape.
    ``t`` may be integer or fractional (see :func:`sigma_at`), shape [B] or scalar.
    """
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)

    def model_fn(x_t, t):
        sigma = sigma_at(schedule, t)
        sigma = sigma.reshape(sigma.shape + (1,) * (x_t.ndim - sigma.ndim))
        a = 1.0 / jnp.sqrt(1.0 + sigma**2)
        b = sigma * a
        return (b * (x_t - a * mean) / (a**2 * std**2 + b**2)).astype(x_t.dtype)

    return model_fn
