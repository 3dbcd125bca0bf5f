"""Per-example Gaussian noise, so a generated image does not depend on the batch it is in.

Noise for example ``i`` is drawn from ``fold_in(stream_key, i)``, never from a split of a
batch-wide key, so image ``i`` is identical whether it is generated in a batch of 1 or 64,
on one device or sharded over many. ``example_indices`` name the examples (default
``arange(B)``); pass an offset range to continue a numbered sequence across batches.

Streams keep the different uses of randomness independent: image i's noise at step k of
stream s is ``normal(fold_in(fold_in(fold_in(key, s), k), i))``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Stream ids (the second fold_in); fixed so that results are reproducible across versions.
STREAM_INITIAL = 0  # x_T, and the noise of img2img's forward-noised start
STREAM_STEP = 1  # ancestral / SDE noise of sampling step k
STREAM_KNOWN = 2  # forward noise of the known region in inpainting, per step
STREAM_RENOISE = 3  # RePaint's resampling jumps, per event


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _per_example_normal(key, example_indices, shape, dtype):
    return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), shape, dtype))(example_indices)


def per_example_normal(key, example_indices, shape, dtype=jnp.float32):
    """Standard normal noise of shape [len(example_indices), *shape], row j drawn from
    ``fold_in(key, example_indices[j])``.

    Args:
      key: a PRNG key. example_indices: [B] integers. shape: one example's shape.
    """
    # Jitted so that eager callers compile one program rather than a dozen small ones.
    return _per_example_normal(key, jnp.asarray(example_indices), tuple(int(s) for s in shape), jnp.dtype(dtype))


def stream_key(key, stream: int, step=0):
    """The key of noise stream ``stream`` at step ``step`` (an int or traced int)."""
    return jax.random.fold_in(jax.random.fold_in(key, stream), step)


def initial_noise(key, shape, example_indices=None, dtype=jnp.float32):
    """The x_T that :func:`sample` draws from ``key`` for a batch of ``shape`` = [B, ...]."""
    if example_indices is None:
        example_indices = jnp.arange(shape[0])
    return per_example_normal(stream_key(key, STREAM_INITIAL), example_indices, shape[1:], dtype)
