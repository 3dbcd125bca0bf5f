"""Timestep embeddings for the U-Net.

``timestep_embedding`` follows diffusers' ``get_timestep_embedding`` (and so the sinusoidal
embedding of DDPM / LDM): frequencies ``exp(-log(max_period) * i / (half - downscale_freq_shift))``
for ``i in [0, half)``, ``[sin, cos]`` halves (``[cos, sin]`` with ``flip_sin_to_cos``), and a
zero column appended when ``dim`` is odd. Timesteps may be fractional (continuous-time
samplers, DPM-Solver, ...); the embedding is always computed in float32.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models import partitioning as P

Dtype = Any


def timestep_embedding(
    timesteps,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jnp.ndarray:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    Args:
      timesteps: [B] integer or float timesteps.
      dim: embedding width.
      flip_sin_to_cos: put the cosine half first (Stable Diffusion: True).
      downscale_freq_shift: ``half - shift`` is the frequency denominator (SD: 0; DDPM: 1).
      scale: multiplies the phases (diffusers' ``scale``).
      max_period: the slowest period.

    Returns:
      [B, dim] float32.
    """
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D [B], got shape {timesteps.shape}")
    if dim < 2:
        raise ValueError(f"timestep embedding dim must be >= 2, got {dim}")
    half = dim // 2
    if half - downscale_freq_shift == 0:
        raise ValueError(f"downscale_freq_shift={downscale_freq_shift} gives a zero frequency denominator for dim={dim}")
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    phases = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    phases = scale * phases
    sin, cos = jnp.sin(phases), jnp.cos(phases)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """``linear_1 -> SiLU -> linear_2`` (diffusers ``TimestepEmbedding`` with default options).

    Shapes: [B, C_in] -> [B, features].
    """

    features: int
    out_features: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = P.dense(self.features, name="linear_1", **kw)(x.astype(self.dtype))
        h = nn.silu(h)
        return P.dense(self.out_features or self.features, name="linear_2", **kw)(h)
