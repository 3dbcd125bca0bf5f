"""Flash-style attention in pure JAX: online softmax over key blocks, O(T x block) memory.

The forward pass maps over query blocks (``lax.map``, sequential) and scans over key blocks
(``lax.scan``) with the running max / normaliser / accumulator of the online softmax (Milakov &
Gimelshein 2018; FlashAttention, Dao et al. 2022). Only the output and the per-row logsumexp are
saved; ``jax.custom_vjp``'s backward pass recomputes each [block_q, block_k] tile of
probabilities from them (FlashAttention-2's backward: ``dS = P * (dP - rowsum(dO * O))``). So
neither pass holds the [T, S] logits; the largest temporaries are [B, H, block_q, block_k].

Precision matches ``jax.nn.dot_product_attention``'s XLA path: logits and softmax in float32
(``preferred_element_type``), probabilities cast to the value dtype for ``P @ V`` with float32
accumulation, output in the query dtype. Gradients accumulate in float32.

Works on every platform (it is plain XLA); T and S need not be multiples of the block sizes
(the tail is padded and masked). Layout at the interface: [B, T, H, D] like jax.nn.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Finite "minus infinity": exp(MASKED - m) underflows to exactly 0 once any real logit is seen,
# and a row that sees only masked keys never produces inf - inf = NaN.
_MASKED = -1e30


def _pad_axis(x, axis: int, size: int, value=0):
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _blocks(x, axis: int, block: int):
    """[..., n*block (at axis), ...] -> [n, ..., block, ...] (the block index leads, for scan)."""
    shape = x.shape
    n = shape[axis] // block
    x = x.reshape(shape[:axis] + (n, block) + shape[axis + 1 :])
    return jnp.moveaxis(x, axis, 0)


def _unblocks(x, axis: int):
    """Inverse of :func:`_blocks`."""
    x = jnp.moveaxis(x, 0, axis)
    shape = x.shape
    return x.reshape(shape[:axis] + (shape[axis] * shape[axis + 1],) + shape[axis + 2 :])


def _tile_mask(key_valid_blk, q_pos, k_pos, causal: bool):
    """[B, 1, bq|1, bk] bool: which (query, key) pairs of a tile may attend."""
    mask = key_valid_blk[:, None, None, :]
    if causal:
        mask = mask & (k_pos[None, None, None, :] <= q_pos[None, None, :, None])
    return mask


def _forward(q, k, v, key_valid, scale, causal, block_q, block_k):
    """q [B,H,Tp,D], k/v [B,H,Sp,D], key_valid [B,Sp] -> out [B,H,Tp,Dv] (q dtype), lse [B,H,Tp] f32."""
    b, h, tp, d = q.shape
    dv = v.shape[-1]
    k_blocks = _blocks(k, 2, block_k)
    v_blocks = _blocks(v, 2, block_k)
    valid_blocks = _blocks(key_valid, 1, block_k)
    k_starts = jnp.arange(k_blocks.shape[0]) * block_k

    def one_query_block(args):
        q_blk, q_start = args
        q_pos = q_start + jnp.arange(block_q)

        def step(carry, xs):
            m, l, acc = carry
            k_blk, v_blk, valid_blk, k_start = xs
            s = jnp.einsum("bhqd,bhkd->bhqk", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
            mask = _tile_mask(valid_blk, q_pos, k_start + jnp.arange(block_k), causal)
            s = jnp.where(mask, s, _MASKED)
            m_new = jnp.maximum(m, s.max(axis=-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m - m_new)
            l = l * correction + p.sum(axis=-1)
            pv = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v_blk.dtype), v_blk, preferred_element_type=jnp.float32)
            acc = acc * correction[..., None] + pv
            return (m_new, l, acc), None

        init = (
            jnp.full((b, h, block_q), _MASKED, jnp.float32),
            jnp.zeros((b, h, block_q), jnp.float32),
            jnp.zeros((b, h, block_q, dv), jnp.float32),
        )
        (m, l, acc), _ = lax.scan(step, init, (k_blocks, v_blocks, valid_blocks, k_starts))
        out = (acc / l[..., None]).astype(q.dtype)
        return out, m + jnp.log(l)

    q_blocks = _blocks(q, 2, block_q)
    q_starts = jnp.arange(q_blocks.shape[0]) * block_q
    out, lse = lax.map(one_query_block, (q_blocks, q_starts))
    return _unblocks(out, 2), _unblocks(lse, 2)


def _backward(q, k, v, key_valid, out, lse, d_out, scale, causal, block_q, block_k):
    """FlashAttention-2 backward: scan over key blocks (emitting dK, dV blocks); inside, scan over
    query blocks accumulating the key block's dK, dV and emitting that block's dQ contribution."""
    delta = jnp.einsum("bhqd,bhqd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    q_blocks = _blocks(q, 2, block_q)
    do_blocks = _blocks(d_out, 2, block_q)
    lse_blocks = _blocks(lse, 2, block_q)
    delta_blocks = _blocks(delta, 2, block_q)
    q_starts = jnp.arange(q_blocks.shape[0]) * block_q

    def one_key_block(dq, xs):
        k_blk, v_blk, valid_blk, k_start = xs
        k_pos = k_start + jnp.arange(block_k)

        def step(carry, ys):
            dk, dv = carry
            q_blk, do_blk, lse_blk, delta_blk, q_start = ys
            s = jnp.einsum("bhqd,bhkd->bhqk", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
            mask = _tile_mask(valid_blk, q_start + jnp.arange(block_q), k_pos, causal)
            p = jnp.where(mask, jnp.exp(s - lse_blk[..., None]), 0.0)
            dv = dv + jnp.einsum(
                "bhqk,bhqd->bhkd", p.astype(do_blk.dtype), do_blk, preferred_element_type=jnp.float32
            )
            dp = jnp.einsum("bhqd,bhkd->bhqk", do_blk, v_blk, preferred_element_type=jnp.float32)
            ds = p * (dp - delta_blk[..., None]) * scale
            dq_blk = jnp.einsum("bhqk,bhkd->bhqd", ds.astype(k_blk.dtype), k_blk, preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bhqk,bhqd->bhkd", ds.astype(q_blk.dtype), q_blk, preferred_element_type=jnp.float32)
            return (dk, dv), dq_blk

        b, h = q.shape[:2]
        init = (
            jnp.zeros((b, h, block_k, k.shape[-1]), jnp.float32),
            jnp.zeros((b, h, block_k, v.shape[-1]), jnp.float32),
        )
        (dk, dv), dq_parts = lax.scan(step, init, (q_blocks, do_blocks, lse_blocks, delta_blocks, q_starts))
        return dq + _unblocks(dq_parts, 2), (dk, dv)

    k_blocks = _blocks(k, 2, block_k)
    v_blocks = _blocks(v, 2, block_k)
    valid_blocks = _blocks(key_valid, 1, block_k)
    k_starts = jnp.arange(k_blocks.shape[0]) * block_k
    dq0 = jnp.zeros(q.shape, jnp.float32)
    dq, (dk, dv) = lax.scan(one_key_block, dq0, (k_blocks, v_blocks, valid_blocks, k_starts))
    return dq.astype(q.dtype), _unblocks(dk, 2).astype(k.dtype), _unblocks(dv, 2).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _flash(q, k, v, key_valid, scale, causal, block_q, block_k):
    return _forward(q, k, v, key_valid, scale, causal, block_q, block_k)[0]


def _flash_fwd(q, k, v, key_valid, scale, causal, block_q, block_k):
    out, lse = _forward(q, k, v, key_valid, scale, causal, block_q, block_k)
    return out, (q, k, v, key_valid, out, lse)


def _flash_bwd(scale, causal, block_q, block_k, residuals, d_out):
    q, k, v, key_valid, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, key_valid, out, lse, d_out, scale, causal, block_q, block_k)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(
    q, k, v, *, key_mask=None, is_causal: bool = False, scale: float | None = None,
    block_q: int = 512, block_k: int = 512,
):
    """Memory-efficient attention. q [B, T, H, D], k [B, S, H, D], v [B, S, H, Dv],
    key_mask bool [B, S] (True = attend) or None -> [B, T, H, Dv] in q's dtype.

    ``block_q``/``block_k`` are upper bounds: a sequence shorter than its block is one block.
    A query row whose keys are all masked averages v over all (masked) keys, as the XLA
    reference does with its finite mask value.
    """
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be >= 1, got block_q={block_q}, block_k={block_k}")
    b, t, h, d = q.shape
    s = k.shape[1]
    scale = d ** -0.5 if scale is None else float(scale)
    block_q = min(block_q, t)
    block_k = min(block_k, s)
    tp = -(-t // block_q) * block_q
    sp = -(-s // block_k) * block_k
    key_valid = jnp.ones((b, s), bool) if key_mask is None else jnp.asarray(key_mask, bool)
    key_valid = _pad_axis(key_valid, 1, sp, False)
    # [B, T, H, D] -> [B, H, T, D]: per-head tiles are contiguous for the einsums.
    qh = _pad_axis(jnp.swapaxes(q, 1, 2), 2, tp)
    kh = _pad_axis(jnp.swapaxes(k, 1, 2), 2, sp)
    vh = _pad_axis(jnp.swapaxes(v, 1, 2), 2, sp)
    out = _flash(qh, kh, vh, key_valid, scale, bool(is_causal), block_q, block_k)
    return jnp.swapaxes(out[:, :, :t], 1, 2)
