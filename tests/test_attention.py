"""Attention backends (ldm_jax.kernels) against a float64 NumPy attention with its closed-form
gradient: forward and jax.grad, float32 and bfloat16, self/cross (T != S), head dims 40/64/160,
key padding and causal masks, lengths that are not multiples of the block size.

Tolerances (max |ours - ref| / max |ref|): float32 1e-5. bfloat16 2e-2: inputs are rounded to
bfloat16 for the reference too, so what remains is the bfloat16 rounding of the probabilities
before P @ V and of the output / gradients (2^-8 = 0.4% per rounding, a few accumulate).
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.kernels import attention as attn
from ldm_jax.kernels.blockwise import blockwise_attention
from ldm_jax.kernels.splash import splash_attention

F32_TOL = 1e-5
BF16_TOL = 2e-2

# name: (T, S, heads, head_dim, key padding mask, causal)
CASES = {
    "self_d40": (37, 37, 2, 40, False, False),
    "cross_d64_mask": (37, 21, 2, 64, True, False),
    "self_d160_mask": (20, 20, 1, 160, True, False),
    "causal_d64_mask": (19, 19, 2, 64, True, True),  # CLIP's text self-attention
}


def _inputs(case, dtype):
    t, s, h, d, masked, _ = CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()))  # stable across processes, unlike hash()
    q, k, v = (rng.standard_normal((2, n, h, d)).astype(np.float32) for n in (t, s, s))
    w = rng.standard_normal((2, t, h, d)).astype(np.float32)  # d loss / d out
    # Round to the compute dtype first so that the float64 reference sees the same inputs.
    q, k, v = (np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)) for x in (q, k, v))
    mask = None
    if masked:
        lengths = np.array([s, max(1, s - 7)])
        mask = np.arange(s)[None, :] < lengths[:, None]
    return q, k, v, w, mask


def _reference(q, k, v, w, mask, causal):
    """float64 attention and the gradients of sum(out * w): dV = P^T dO, dP = dO V^T,
    dS = P (dP - rowsum(dP P)), dQ = scale dS K, dK = scale dS^T Q."""
    q, k, v, w = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v, w))  # [B, H, T, D]
    scale = q.shape[-1] ** -0.5
    logits = scale * q @ k.transpose(0, 1, 3, 2)
    allowed = np.ones(logits.shape, bool)
    if mask is not None:
        allowed &= mask[:, None, None, :]
    if causal:
        allowed &= np.tril(np.ones(logits.shape[-2:], bool))
    logits = np.where(allowed, logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = p @ v
    dv = p.transpose(0, 1, 3, 2) @ w
    dp = w @ v.transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = scale * ds @ k
    dk = scale * ds.transpose(0, 1, 3, 2) @ q
    back = lambda x: x.transpose(0, 2, 1, 3)  # noqa: E731
    return back(out), (back(dq), back(dk), back(dv))


def _ours(fn, q, k, v, w, mask, causal, dtype):
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    mask = None if mask is None else jnp.asarray(mask)

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v, key_mask=mask, is_causal=causal).astype(jnp.float32) * w)

    @jax.jit
    def run(q, k, v):
        out = fn(q, k, v, key_mask=mask, is_causal=causal)
        return out, jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    out, grads = run(q, k, v)
    return np.asarray(out.astype(jnp.float32)), [np.asarray(g.astype(jnp.float32)) for g in grads]


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def _check(fn, case, dtype, tol):
    q, k, v, w, mask = _inputs(case, dtype)
    causal = CASES[case][5]
    out, grads = _ours(fn, q, k, v, w, mask, causal, dtype)
    ref_out, ref_grads = _reference(q, k, v, w, mask, causal)
    errors = {"out": _rel(out, ref_out)}
    errors.update({f"d{n}": _rel(g, r) for n, g, r in zip("qkv", grads, ref_grads)})
    assert max(errors.values()) <= tol, errors


def _blockwise_16(q, k, v, **kw):
    # 16-wide blocks: 37 and 21 are not multiples, 37 queries make three query blocks.
    return blockwise_attention(q, k, v, block_q=16, block_k=16, **kw)


F32_BACKENDS = {
    "xla": attn.xla_attention,
    "blockwise": _blockwise_16,
    "splash": splash_attention,  # Pallas interpret mode on CPU
}


# Every case for blockwise; xla (the default path) and splash (slow to compile in interpret
# mode) on the cases that differ most; splash's d40 self-attention runs in the mesh test below.
F32_RUNS = [("blockwise", case) for case in CASES] + [
    ("xla", "cross_d64_mask"), ("xla", "causal_d64_mask"), ("xla", "self_d160_mask"),
    ("splash", "cross_d64_mask"), ("splash", "self_d160_mask"),
]


@pytest.mark.parametrize("backend,case", F32_RUNS)
def test_backend_float32_matches_float64_numpy_forward_and_grad(backend, case):
    _check(F32_BACKENDS[backend], case, jnp.float32, F32_TOL)


@pytest.mark.parametrize(
    "backend,case", [("xla", "cross_d64_mask"), ("blockwise", "cross_d64_mask"), ("blockwise", "self_d160_mask"),
                     ("splash", "causal_d64_mask")],
)
def test_backend_bfloat16_matches_float64_numpy_forward_and_grad(backend, case):
    _check(F32_BACKENDS[backend], case, jnp.bfloat16, BF16_TOL)


def test_cudnn_falls_back_on_cpu_and_matches_reference():
    # No GPU here: the cudnn backend must still give correct attention (via blockwise).
    _check(attn.cudnn_attention, "self_d160_mask", jnp.bfloat16, BF16_TOL)


def test_splash_under_mesh_shard_maps_batch_and_heads_and_matches_reference():
    devices = np.array(jax.devices()[:4]).reshape(2, 1, 2)
    mesh = jax.sharding.Mesh(devices, ("data", "fsdp", "tensor"))
    q, k, v, w, mask = _inputs("self_d40", jnp.float32)
    ref_out, ref_grads = _reference(q, k, v, w, mask, False)
    with jax.set_mesh(mesh):
        out, grads = _ours(splash_attention, q, k, v, w, mask, False, jnp.float32)
        jaxpr = str(jax.make_jaxpr(lambda q, k, v: splash_attention(q, k, v))(q, k, v))
    # The kernel runs per shard: batch over data (2), heads over tensor (2).
    assert "shard_map" in jaxpr and "P('data', None, 'tensor', None)" in jaxpr, jaxpr[:2000]
    assert _rel(out, ref_out) <= F32_TOL
    assert max(_rel(g, r) for g, r in zip(grads, ref_grads)) <= F32_TOL


def test_blockwise_grad_temp_memory_is_far_below_xla_logits():
    # T = S = 1024, one head of width 8: XLA keeps the 4 MiB float32 logits (and probabilities)
    # for the backward pass; blockwise with 128-wide blocks holds 128 x 128 tiles.
    q = jax.ShapeDtypeStruct((1, 1024, 1, 8), jnp.float32)

    def temp_bytes(fn):
        loss = lambda q, k, v: jnp.sum(fn(q, k, v))  # noqa: E731
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    xla = temp_bytes(attn.xla_attention)
    blockwise = temp_bytes(lambda q, k, v: blockwise_attention(q, k, v, block_q=128, block_k=128))
    assert xla >= 4 * 2**20, xla
    assert blockwise * 4 < xla, (blockwise, xla)


def test_auto_selects_by_platform_and_size():
    small = jnp.zeros((1, 64, 1, 8))
    large = jnp.zeros((1, 1024, 1, 8))
    assert attn.select_backend("auto", small, small, platform="cpu") == "xla"
    assert attn.select_backend("auto", large, large, platform="cpu") == "blockwise"
    # The CPU threshold: 256 x 256 logits (where benchmarks/results/attention.md starts) and up.
    at, below = jnp.zeros((1, 256, 1, 8)), jnp.zeros((1, 255, 1, 8))
    assert attn.select_backend("auto", at, at, platform="cpu") == "blockwise"
    assert attn.select_backend("auto", below, below, platform="cpu") == "xla"
    assert attn.select_backend("auto", small, small, platform="tpu") == "splash"
    assert attn.select_backend("auto", small, small, platform="gpu") == "cudnn"
    assert attn.select_backend("xla", large, large, platform="tpu") == "xla"
    with pytest.raises(ValueError, match="flash"):
        attn.select_backend("flash", small, small)


def test_cudnn_refusal_rules():
    bf16_64 = jnp.zeros((1, 8, 1, 64), jnp.bfloat16)
    assert attn.cudnn_refusal(bf16_64, bf16_64, bf16_64, platform="gpu") is None
    bf16_160 = jnp.zeros((1, 8, 1, 160), jnp.bfloat16)
    assert "head_dim 160" in attn.cudnn_refusal(bf16_160, bf16_160, bf16_160, platform="gpu")
    f32 = jnp.zeros((1, 8, 1, 64))
    assert "float32" in attn.cudnn_refusal(f32, f32, f32, platform="gpu")
    assert "not a GPU" in attn.cudnn_refusal(bf16_64, bf16_64, bf16_64, platform="cpu")


def test_bad_shapes_raise_clear_errors():
    q = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match="key_mask"):
        attn.dot_product_attention(q, q, q, key_mask=jnp.ones((1, 7), bool))
    with pytest.raises(ValueError, match="head dims"):
        attn.dot_product_attention(q, q[..., :8], q)
