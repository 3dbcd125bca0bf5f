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


def sdxl_time_ids(
    original_size: tuple[int, int],
    crops_coords_top_left: tuple[int, int] = (0, 0),
    target_size: tuple[int, int] | None = None,
    *,
    aesthetic_score: float | None = None,
) -> jnp.ndarray:
    """SDXL's micro-conditioning ids for one image, the U-Net's ``time_ids`` row, in the order
    the SDXL U-Nets were trained with (and diffusers' ``_get_add_time_ids`` writes):

    * base: ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)`` - 6 ids;
    * refiner (``aesthetic_score`` given): ``(orig_h, orig_w, crop_top, crop_left, score)`` - 5 ids.

    Sizes are (height, width) in pixels. Returns float32 [N]; broadcast to [B, N] for a batch.
    """
    if aesthetic_score is not None:
        if target_size is not None:
            raise ValueError("the refiner's time ids take aesthetic_score instead of target_size, not both")
        ids = (*original_size, *crops_coords_top_left, aesthetic_score)
    else:
        if target_size is None:
            raise ValueError("target_size is required (or aesthetic_score for the refiner)")
        ids = (*original_size, *crops_coords_top_left, *target_size)
    if len(ids) != (5 if aesthetic_score is not None else 6):
        raise ValueError(
            f"original_size {original_size!r}, crops_coords_top_left {crops_coords_top_left!r} and target_size "
            f"{target_size!r} must be (height, width) / (top, left) pairs"
        )
    return jnp.asarray(ids, jnp.float32)
