"""One attention interface over several kernels, chosen by name.

``dot_product_attention(q, k, v, key_mask=None, is_causal=False, backend="auto")`` with
q [B, T, H, D], k/v [B, S, H, D] (jax.nn's layout) and key_mask bool [B, S] (True = attend).

Backends (``BACKENDS``, a registry: a new kernel is one function and one line):
  ``xla``        ``jax.nn.dot_product_attention``'s XLA path: materialises the [B, H, T, S]
                 logits (float32). The reference, and the fastest for short sequences.
  ``blockwise``  :mod:`ldm_jax.kernels.blockwise`: flash-style online softmax in pure JAX with a
                 recomputing custom VJP; O(T x block) memory on every platform.
  ``splash``     :mod:`ldm_jax.kernels.splash`: the TPU Pallas splash kernel (interpret mode off
                 TPU), shard_mapped over the mesh's batch/heads axes.
  ``cudnn``      ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused flash
                 kernel on NVIDIA GPUs. cuDNN takes only fp16/bf16 and head dims <= 128 that are
                 multiples of 8; elsewhere (float32, SD 1.x's 160-wide heads, a non-GPU platform)
                 this backend falls back to ``blockwise`` and logs that once per shape.
  ``auto``       TPU -> splash; GPU -> cudnn (with the fallback above); other platforms ->
                 blockwise when one head's [T, S] logits reach ``AUTO_BLOCKWISE_MIN_LOGITS``
                 elements, else xla. Logged once per (platform, dtype, shape).

All backends compute the logits and softmax in float32 and cast the probabilities to the value
dtype for ``P @ V``, so results agree to float32 rounding (bf16: to bf16 rounding of P).
"""

from __future__ import annotations

import logging
from typing import Callable

import jax
import jax.numpy as jnp

from ldm_jax.kernels.blockwise import blockwise_attention
from ldm_jax.kernels.splash import splash_attention

log = logging.getLogger(__name__)

# One head's logits of at least 256 x 256 (a 16x16 latent self-attention) go blockwise under
# "auto" off TPU/GPU: benchmarks/results/attention.md measured blockwise faster than the XLA path
# on CPU at every T it timed (256, 1024, 4096; 1.1-2.3x forward+backward) besides its O(T x block)
# memory. Below 256 x 256 nothing was measured, so the reference path stays.
AUTO_BLOCKWISE_MIN_LOGITS = 256 * 256
CUDNN_DTYPES = (jnp.float16, jnp.bfloat16)
CUDNN_MAX_HEAD_DIM = 128

_logged: set = set()


def _log_once(key, msg: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        log.info(msg, *args)


def xla_attention(q, k, v, *, key_mask=None, is_causal: bool = False, scale: float | None = None):
    mask = None if key_mask is None else jnp.asarray(key_mask, bool)[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale, implementation="xla")


def cudnn_refusal(q, k, v, platform: str | None = None) -> str | None:
    """Why cuDNN's fused attention cannot take these inputs, or None if it can."""
    platform = platform or jax.default_backend()
    if platform not in ("gpu", "cuda"):
        return f"platform {platform!r} is not a GPU"
    if q.dtype not in CUDNN_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (cuDNN takes float16/bfloat16)"
    d = q.shape[-1]
    if d > CUDNN_MAX_HEAD_DIM or d % 8 or v.shape[-1] != d:
        return f"head_dim {d} (cuDNN takes multiples of 8 up to {CUDNN_MAX_HEAD_DIM})"
    return None


def cudnn_attention(q, k, v, *, key_mask=None, is_causal: bool = False, scale: float | None = None):
    reason = cudnn_refusal(q, k, v)
    if reason is not None:
        _log_once(("cudnn-fallback", q.shape, k.shape, str(q.dtype)),
                  "attention: cudnn refuses %s; using blockwise for q%s k%s", reason, q.shape, k.shape)
        return blockwise_attention(q, k, v, key_mask=key_mask, is_causal=is_causal, scale=scale)
    mask = None if key_mask is None else jnp.asarray(key_mask, bool)[:, None, None, :]
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=is_causal, scale=scale, implementation="cudnn"
    )


BACKENDS: dict[str, Callable] = {
    "xla": xla_attention,
    "blockwise": blockwise_attention,
    "splash": splash_attention,
    "cudnn": cudnn_attention,
}
BACKEND_NAMES = ("auto",) + tuple(BACKENDS)


def select_backend(backend: str, q, k, platform: str | None = None) -> str:
    """The concrete backend name for ``backend`` ("auto" resolved by platform, dtype and shape)."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKEND_NAMES}")
    if backend != "auto":
        return backend
    platform = platform or jax.default_backend()
    t, s = q.shape[1], k.shape[1]
    if platform == "tpu":
        chosen = "splash"
    elif platform in ("gpu", "cuda"):
        chosen = "cudnn"
    elif t * s >= AUTO_BLOCKWISE_MIN_LOGITS:
        chosen = "blockwise"
    else:
        chosen = "xla"
    _log_once(("auto", platform, str(q.dtype), q.shape, k.shape),
              "attention auto: %s for %s q%s k%s on %s", chosen, q.dtype, q.shape, k.shape, platform)
    return chosen


def dot_product_attention(
    q, k, v, *, key_mask=None, is_causal: bool = False, scale: float | None = None, backend: str = "auto"
):
    """Scaled dot-product attention through the named backend.

    q [B, T, H, D], k [B, S, H, D], v [B, S, H, Dv]; key_mask bool [B, S] (True = attend) or
    None; ``is_causal`` hides keys after the query position (top-left aligned); ``scale``
    defaults to D ** -0.5. Returns [B, T, H, Dv] in q's dtype.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D], got shapes {q.shape}, {k.shape}, {v.shape}")
    if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {q.shape}, k {k.shape}, v {v.shape} disagree on batch, length or heads")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if key_mask is not None and tuple(key_mask.shape) != (k.shape[0], k.shape[1]):
        raise ValueError(f"key_mask must be [B, S] = {(k.shape[0], k.shape[1])}, got {tuple(key_mask.shape)}")
    name = select_backend(backend, q, k)
    return BACKENDS[name](q, k, v, key_mask=key_mask, is_causal=is_causal, scale=scale)
