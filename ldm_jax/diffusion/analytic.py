"""Exact denoisers for Gaussian and Gaussian-mixture data: the closed-form references the
samplers and the variational bound are tested against, and a zero-weights way to try the library.

For x0 ~ N(mu, s^2 I) and x_t = a x0 + b eps, x_t ~ N(a mu, (a^2 s^2 + b^2) I) and
E[eps | x_t] = b (x_t - a mu) / (a^2 s^2 + b^2), E[x0 | x_t] = mu + a s^2 (x_t - a mu) / (a^2 s^2 + b^2).
These posterior means are the optimal eps- and x0-predictions, and E[eps - x0 | x_t] the exact
flow-matching velocity. For a mixture sum_k w_k N(mu_k, diag(s_k^2)) of whole examples, each is
the responsibility-weighted sum of the components' posterior means. DDPM (VP) schedules use
a = 1 / sqrt(1 + sigma^2), b = sigma a; flow schedules a = 1 - t, b = t.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.flow import FlowSchedule
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


def _mixture(weights, means, stds):
    weights = jnp.asarray(weights, jnp.float32)
    means = jnp.asarray(means, jnp.float32)
    if weights.ndim != 1 or means.shape[:1] != weights.shape:
        raise ValueError(f"weights {weights.shape} must be [K] and means {means.shape} [K, ...] with the same K")
    stds = jnp.asarray(stds, jnp.float32)
    stds = stds.reshape(stds.shape + (1,) * (means.ndim - stds.ndim)) if stds.ndim == 1 else stds
    return jnp.log(weights / weights.sum()), means, jnp.broadcast_to(stds, means.shape)


def gaussian_mixture_posterior(x_t, a, b, weights, means, stds):
    """(E[eps | x_t], E[x0 | x_t]) for x_t = a x0 + b eps, x0 ~ sum_k w_k N(mu_k, diag(s_k^2)).

    Args:
      x_t: [B, ...]. a, b: scales broadcastable to x_t (e.g. [B, 1, ...]).
      weights: [K]; means: [K, ...] (one example's shape); stds: [K] or [K, ...].
    """
    log_w, means, stds = _mixture(weights, means, stds)
    x = x_t[None].astype(jnp.float32)  # [1, B, ...]
    mu, s2 = means[:, None], jnp.square(stds)[:, None]  # [K, 1, ...]
    var = a**2 * s2 + b**2
    resid = x - a * mu
    axes = tuple(range(2, x.ndim))
    log_lik = -0.5 * jnp.sum(jnp.square(resid) / var + jnp.log(var) + jnp.zeros_like(x), axis=axes)
    resp = jax.nn.softmax(log_w[:, None] + log_lik, axis=0).reshape(log_lik.shape + (1,) * len(axes))
    eps = jnp.sum(resp * b * resid / var, axis=0)
    x0 = jnp.sum(resp * (mu + a * s2 * resid / var), axis=0)
    return eps, x0


def _vp_scales(schedule: Schedule, t, ndim):
    sigma = sigma_at(schedule, t)
    sigma = sigma.reshape(sigma.shape + (1,) * (ndim - sigma.ndim))
    a = 1.0 / jnp.sqrt(1.0 + sigma**2)
    return a, sigma * a


def _flow_scales(schedule: FlowSchedule, t, ndim):
    t = jnp.asarray(t, jnp.float32) / schedule.num_train_timesteps
    t = t.reshape(t.shape + (1,) * (ndim - t.ndim))
    return 1.0 - t, t


def gaussian_mixture_eps_model(schedule: Schedule, weights, means, stds):
    """``model_fn(x_t, t) -> eps_hat``: the exact eps-predictor of a DDPM schedule for mixture data."""

    def model_fn(x_t, t):
        a, b = _vp_scales(schedule, t, x_t.ndim)
        return gaussian_mixture_posterior(x_t, a, b, weights, means, stds)[0].astype(x_t.dtype)

    return model_fn


def gaussian_mixture_velocity_model(schedule: FlowSchedule, weights, means, stds):
    """``model_fn(x_t, timestep) -> v_hat``: the exact flow-matching velocity E[eps - x0 | x_t]
    for mixture data; ``timestep = num_train_timesteps * t`` as the flow samplers pass it."""
    if not isinstance(schedule, FlowSchedule):
        raise ValueError(f"velocity models need a FlowSchedule, got {type(schedule).__name__}")

    def model_fn(x_t, t):
        a, b = _flow_scales(schedule, t, x_t.ndim)
        eps, x0 = gaussian_mixture_posterior(x_t, a, b, weights, means, stds)
        return (eps - x0).astype(x_t.dtype)

    return model_fn


def gaussian_velocity_model(schedule: FlowSchedule, mean, std):
    """``model_fn(x_t, timestep) -> v_hat``, the exact velocity for N(mean, std^2 I) data.

    ``mean`` / ``std`` are scalars or arrays broadcastable to one example's shape.
    """
    if not isinstance(schedule, FlowSchedule):
        raise ValueError(f"velocity models need a FlowSchedule, got {type(schedule).__name__}")
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)

    def model_fn(x_t, t):
        a, b = _flow_scales(schedule, t, x_t.ndim)
        var = a**2 * std**2 + b**2
        resid = x_t - a * mean
        return (b * resid / var - (mean + a * std**2 * resid / var)).astype(x_t.dtype)

    return model_fn
