"""Keeping predicted clean samples in range: static clipping and Imagen's dynamic thresholding."""

from __future__ import annotations

import jax.numpy as jnp


def static_clip(x0: jnp.ndarray, max_value: float = 1.0) -> jnp.ndarray:
    """Clip x0_hat elementwise to [-max_value, max_value] (DDPM's ``clip_denoised``)."""
    return jnp.clip(x0, -max_value, max_value)


def dynamic_threshold(x0: jnp.ndarray, percentile: float = 0.995, max_value: float = 1.0) -> jnp.ndarray:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3), per example.

    s = the ``percentile`` quantile of |x0| over all non-batch axes, clamped to
    [1, max_value]; x0 is clipped to [-s, s] and divided by s. With ``max_value = 1`` it
    reduces to static clipping. diffusers' ``sample_max_value`` is ``max_value`` here.

    Args: x0 [B, ...]. Returns: an array like x0.
    """
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"percentile must be in (0, 1], got {percentile!r}")
    if max_value < 1.0:
        raise ValueError(f"max_value must be >= 1, got {max_value!r}")
    flat = jnp.abs(x0.reshape(x0.shape[0], -1)).astype(jnp.float32)
    s = jnp.quantile(flat, percentile, axis=1)
    s = jnp.clip(s, 1.0, max_value).reshape((-1,) + (1,) * (x0.ndim - 1))
    return (jnp.clip(x0, -s, s) / s).astype(x0.dtype)
