"""Rectified-flow "reflow" (Liu et al. 2023, InstaFlow): re-pair noise and data by the ODE.

A flow model trained on independent (x0, eps) pairs learns v(x, t) = E[eps - x0 | x_t = x]; its
paths curve where straight interpolation lines cross. Running the ODE from noise eps gives a
deterministic coupling (Z0 = ODE(eps), eps); a model retrained with :func:`flow_loss` on those
pairs (``noise=`` the paired noise) has straighter paths, so few Euler steps suffice.

* :func:`reflow_pairs`: the new coupling from a model and noise (a deterministic flow sampler).
* :func:`pairs_velocity_model`: the velocity E[eps - x0 | x_t] of a coupling given by samples,
  by kernel regression (what a flow loss trained to convergence on the pairs would give; for
  tests and small-dimensional demonstrations).
* :func:`straightness`: Liu et al.'s S = int_0^1 E ||(eps - Z0) - v(Z_t, t)||^2 dt along the
  sampler's own paths (0 for straight paths).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.flow import FlowSchedule
from ldm_jax.diffusion.samplers.driver import resolve_sampler, sample


def reflow_pairs(model_fn, schedule: FlowSchedule, noise, *, sampler: str = "flow_heun", num_steps: int = 50, **options):
    """(x0, noise): the samples the flow ODE carries ``noise`` [B, ...] to, paired with it.

    Train the next rectified flow with ``flow_loss(schedule, model, x0, key, noise=noise)``.
    The sampler must be deterministic (the coupling is the ODE's map).
    """
    spec, cfg = resolve_sampler(sampler, schedule, num_steps=num_steps, **options)
    if spec.stochastic(cfg):
        raise ValueError(f"reflow needs a deterministic sampler; {sampler!r} with these options adds noise")
    noise = jnp.asarray(noise, jnp.float32)
    x0 = sample(model_fn, schedule, noise.shape, jax.random.key(0), sampler=sampler, num_steps=num_steps,
                x_T=noise, **options)
    return x0, noise


def pairs_velocity_model(schedule: FlowSchedule, x0, noise, bandwidth: float):
    """``model_fn(x_t, timestep) -> v_hat``: Nadaraya-Watson estimate of E[eps - x0 | x_t] for
    the coupling given by the pairs (x0 [P, ...], noise [P, ...]), Gaussian kernel of width
    ``bandwidth`` on the interpolants x_t^i = (1 - t) x0^i + t eps^i. Cost O(B P D) per call."""
    if not bandwidth > 0:
        raise ValueError(f"bandwidth must be > 0, got {bandwidth!r}")
    x0 = jnp.asarray(x0, jnp.float32).reshape(np.shape(x0)[0], -1)
    noise = jnp.asarray(noise, jnp.float32).reshape(x0.shape)
    delta = noise - x0  # [P, D]

    def model_fn(x_t, t):
        flat = x_t.reshape(x_t.shape[0], -1).astype(jnp.float32)
        tt = (jnp.asarray(t, jnp.float32) / schedule.num_train_timesteps).reshape(-1, 1, 1)
        centres = (1.0 - tt) * x0[None] + tt * noise[None]  # [B or 1, P, D]
        d2 = jnp.sum(jnp.square(flat[:, None, :] - centres), axis=-1)  # [B, P]
        w = jax.nn.softmax(-0.5 * d2 / bandwidth**2, axis=1)
        return (w @ delta).reshape(x_t.shape).astype(x_t.dtype)

    return model_fn


def straightness(model_fn, schedule: FlowSchedule, noise, *, num_steps: int = 50, **options):
    """Liu et al.'s straightness S of the ODE paths from ``noise`` (Euler, ``num_steps``):
    sum_k |dt_k| mean ||(eps - Z0) - v_k||^2 with v_k the velocity of step k, Z0 the endpoint."""
    noise = jnp.asarray(noise, jnp.float32)
    out, traj = sample(model_fn, schedule, noise.shape, jax.random.key(0), sampler="flow_euler",
                       num_steps=num_steps, x_T=noise, return_trajectory=True, **options)
    states = jnp.concatenate([noise[None], traj.x], axis=0)
    times = jnp.concatenate([traj.t / schedule.num_train_timesteps, jnp.zeros((1,))])
    dt = times[1:] - times[:-1]  # < 0
    v = (states[1:] - states[:-1]) / dt.reshape((-1,) + (1,) * noise.ndim)
    axes = tuple(range(1, v.ndim))
    gap = jnp.mean(jnp.square((noise - out)[None] - v), axis=axes)
    return jnp.sum(-dt * gap)
