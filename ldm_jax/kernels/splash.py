"""TPU splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``) behind the
[B, T, H, D] interface, sharded with ``shard_map`` over the mesh's batch and heads axes.

The kernel works on one example, [H, T, D], with T and S multiples of its 128-wide blocks and
the lane (head) dimension padded to 128. So this wrapper
  * scales q by ``scale`` (the kernel applies none),
  * zero-pads head_dim to a multiple of 128 (zeros change neither q.k nor the kept outputs),
  * pads T and S to multiples of the block size and hides the padded keys (and the caller's
    key padding mask) with ``SegmentIds``: valid keys and every query are segment 1, hidden keys 0,
  * vmaps the single-example kernel over the batch.
Under a mesh (``jax.set_mesh(mesh)`` / ``with jax.sharding.use_mesh(mesh)``) the call is wrapped
in ``shard_map`` with the batch split over the mesh axes ``data``/``fsdp`` and the heads over
``tensor`` (those of them that the mesh has and that divide the dimension): Pallas kernels
cannot be partitioned by GSPMD, so without this XLA would gather every input to each device.

Off TPU the kernel runs in Pallas interpret mode (``interpret=True``): slow, but the same
kernel program, which is how the tests verify it on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

_LANES = 128
_BATCH_MESH_AXES = ("data", "fsdp")
_HEADS_MESH_AXIS = "tensor"


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# Built inside the trace on every call (not cached): the kernel object holds jnp arrays, which a
# cache would leak across traces. The mask preprocessing is NumPy and cheap for these sizes.
def _kernel(heads: int, t: int, s: int, causal: bool, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    if causal:
        mask = sa.CausalMask((t, s))
    else:
        mask = sa.FullMask((t, s))
    mask = sa.MultiHeadMask([mask] * heads)
    blocks = sa.BlockSizes(
        block_q=block, block_kv=block, block_kv_compute=block,
        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
        block_q_dq=block, block_kv_dq=block,
    )
    return sa.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)


def _local_splash(q, k, v, key_valid, *, causal: bool, block: int, interpret: bool):
    """Per-shard body: q [b, Tp, h, Dp] (already scaled and padded), key_valid [b, Sp]."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b, tp, h, _ = q.shape
    sp = k.shape[1]
    kernel = _kernel(h, tp, sp, causal, block, interpret)
    q_seg = jnp.ones((b, tp), jnp.int32)
    kv_seg = key_valid.astype(jnp.int32)

    def one(q1, k1, v1, qs, ks):
        out = kernel(q1.swapaxes(0, 1), k1.swapaxes(0, 1), v1.swapaxes(0, 1), segment_ids=sa.SegmentIds(qs, ks))
        return out.swapaxes(0, 1)

    return jax.vmap(one)(q, k, v, q_seg, kv_seg)


def _mesh_spec(mesh, batch: int, heads: int):
    """PartitionSpec for [B, T, H, D] over the axes of ``mesh`` that exist and divide the dims."""
    names = dict(zip(mesh.axis_names, mesh.axis_sizes)) if mesh is not None else {}
    batch_axes, size = [], 1
    for ax in _BATCH_MESH_AXES:
        if names.get(ax, 1) > 1 and batch % (size * names[ax]) == 0:
            batch_axes.append(ax)
            size *= names[ax]
    head_axis = _HEADS_MESH_AXIS if names.get(_HEADS_MESH_AXIS, 1) > 1 and heads % names[_HEADS_MESH_AXIS] == 0 else None
    return PartitionSpec(tuple(batch_axes) or None, None, head_axis, None)


def splash_attention(
    q, k, v, *, key_mask=None, is_causal: bool = False, scale: float | None = None,
    block: int = 128, interpret: bool | None = None,
):
    """q [B, T, H, D], k [B, S, H, D], v [B, S, H, D] (same head width), key_mask bool [B, S] or
    None -> [B, T, H, D]. ``interpret=None`` interprets everywhere but on TPU."""
    b, t, h, d = q.shape
    s = k.shape[1]
    if v.shape[-1] != d:
        raise ValueError(f"splash attention needs equal q/k and v head dims, got {d} and {v.shape[-1]}")
    if block % _LANES:
        raise ValueError(f"splash block size must be a multiple of {_LANES}, got {block}")
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    scale = d ** -0.5 if scale is None else float(scale)
    dp = _round_up(d, _LANES)
    tp, sp = _round_up(t, block), _round_up(s, block)
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, dp - d)))  # noqa: E731
    qp = pad(q * jnp.asarray(scale, q.dtype), tp)
    kp, vp = pad(k, sp), pad(v, sp)
    key_valid = jnp.ones((b, s), bool) if key_mask is None else jnp.asarray(key_mask, bool)
    key_valid = jnp.pad(key_valid, ((0, 0), (0, sp - s)), constant_values=False)

    body = functools.partial(_local_splash, causal=bool(is_causal), block=block, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is not None and not mesh.empty and int(np.prod(mesh.axis_sizes)) > 1:
        spec = _mesh_spec(mesh, b, h)
        valid_spec = PartitionSpec(spec[0], None)
        body = jax.shard_map(body, in_specs=(spec, spec, spec, valid_spec), out_specs=spec, check_vma=False)
    out = body(qp, kp, vp, key_valid)
    return out[:, :t, :, :d]
