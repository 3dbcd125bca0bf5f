"""Attention and the spatial transformer of the Stable Diffusion U-Net.

Parameter names follow diffusers (``to_q``/``to_k``/``to_v``/``to_out_0``, ``norm1..3``,
``attn1``/``attn2``, ``ff/net_0/proj``, ``ff/net_2``, ``proj_in``/``proj_out``), with a list
index written ``name_i`` where diffusers writes ``name.i``; ``ldm_jax.interop.diffusers_unet``
relies on that.

Attention goes through ``ldm_jax.kernels.dot_product_attention``; the ``attention`` field names
its backend ("auto", "xla", "blockwise", "splash", "cudnn"; see ``ldm_jax.kernels.attention``).
Every backend computes the logits ``q k^T`` with float32 accumulation and the softmax in float32
even when q/k/v are bfloat16; the probabilities are cast back to the compute dtype for the
``probs @ v`` product. So diffusers' ``upcast_attention`` (used by SD 2.1) is always in effect
and needs no switch. The "xla" backend materialises the [B, heads, T, S] logits (about 0.5 GB per
sample for the 64x64 latent self-attention of SD at 512 px); "blockwise" and "splash" do not.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.kernels import dot_product_attention
from ldm_jax.models import partitioning as P

Dtype = Any

# Projections into the fused heads*head_dim axis read "embed" -> "heads"; out of it, the reverse,
# so tensor-parallel rules give the usual column-parallel / row-parallel split.
QKV_KERNEL = ("embed", "heads")
OUT_KERNEL = ("heads", "embed")
FF_IN_KERNEL = ("embed", "mlp")
FF_OUT_KERNEL = ("mlp", "embed")


class Attention(nn.Module):
    """Multi-head (self or cross) attention with diffusers' ``Attention`` parameter names.

    Shapes: x [B, T, D], context [B, S, D_ctx] or None (self-attention) -> [B, T, D].
    q/k/v projections have no bias (diffusers' default ``bias=False``), the output projection has one.
    The scale is ``head_dim ** -0.5``.
    """

    heads: int
    head_dim: int
    dropout: float = 0.0
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, deterministic: bool = True):
        if self.heads < 1 or self.head_dim < 1:
            raise ValueError(f"attention needs heads >= 1 and head_dim >= 1, got {self.heads}, {self.head_dim}")
        context = x if context is None else context
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.head_dim
        b, t, d = x.shape
        s = context.shape[1]
        x = x.astype(self.dtype)
        context = context.astype(self.dtype)
        q = P.dense(inner, names=QKV_KERNEL, use_bias=False, name="to_q", **kw)(x)
        k = P.dense(inner, names=QKV_KERNEL, use_bias=False, name="to_k", **kw)(context)
        v = P.dense(inner, names=QKV_KERNEL, use_bias=False, name="to_v", **kw)(context)
        q = q.reshape(b, t, self.heads, self.head_dim)
        k = k.reshape(b, s, self.heads, self.head_dim)
        v = v.reshape(b, s, self.heads, self.head_dim)
        out = dot_product_attention(q, k, v, backend=self.attention)
        out = out.reshape(b, t, inner)
        out = P.dense(d, names=OUT_KERNEL, name="to_out_0", **kw)(out)
        return nn.Dropout(self.dropout)(out, deterministic=deterministic)


class GEGLU(nn.Module):
    """``proj`` to 2*features, split into (value, gate), return ``value * gelu(gate)`` with the
    exact (erf) GELU as in diffusers. Shapes: [..., D] -> [..., features]."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = P.dense(
            2 * self.features, names=FF_IN_KERNEL, dtype=self.dtype, param_dtype=self.param_dtype, name="proj"
        )(x)
        value, gate = jnp.split(h, 2, axis=-1)
        return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """``net_0`` (GEGLU to ``mult * D``) -> dropout -> ``net_2`` (linear back to D).
    Shapes: [B, T, D] -> [B, T, D]."""

    mult: int = 4
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = GEGLU(self.mult * d, name="net_0", **kw)(x)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return P.dense(d, names=FF_OUT_KERNEL, name="net_2", **kw)(h)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention on ``context``,
    GEGLU feed-forward, each with a residual connection (diffusers ``BasicTransformerBlock``
    with ``norm_type="layer_norm"``). LayerNorms run in float32 (eps 1e-5).

    With ``context=None`` the second attention attends to x itself (as diffusers does).
    Shapes: x [B, T, D], context [B, S, D_ctx] or None -> [B, T, D].
    """

    heads: int
    head_dim: int
    dropout: float = 0.0
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, deterministic: bool = True):
        attn_kw = dict(
            heads=self.heads,
            head_dim=self.head_dim,
            dropout=self.dropout,
            attention=self.attention,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        norm_kw = dict(epsilon=1e-5, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)
        h = P.layer_norm(name="norm1", **norm_kw)(x).astype(self.dtype)
        x = x + Attention(name="attn1", **attn_kw)(h, None, deterministic)
        h = P.layer_norm(name="norm2", **norm_kw)(x).astype(self.dtype)
        x = x + Attention(name="attn2", **attn_kw)(h, context, deterministic)
        h = P.layer_norm(name="norm3", **norm_kw)(x).astype(self.dtype)
        ff = FeedForward(dropout=self.dropout, dtype=self.dtype, param_dtype=self.param_dtype, name="ff")
        return x + ff(h, deterministic)


class Transformer2D(nn.Module):
    """Spatial transformer over a feature map (diffusers ``Transformer2DModel`` with continuous
    input; LDM's ``SpatialTransformer``): GroupNorm (eps 1e-6) -> ``proj_in`` -> ``depth``
    BasicTransformerBlocks over the H*W tokens -> ``proj_out`` -> + input.

    ``use_linear_projection`` makes proj_in/proj_out Dense layers applied after flattening
    (SD 2.x); otherwise they are 1x1 convolutions (SD 1.x). The width inside is heads*head_dim.
    Shapes: x [B, H, W, C], context [B, S, D_ctx] or None -> [B, H, W, C].
    """

    heads: int
    head_dim: int
    depth: int = 1
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    dropout: float = 0.0
    attention: str = "auto"
    remat: bool = False  # checkpoint each transformer block (the U-Net's remat_policy "layer")
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, deterministic: bool = True):
        b, hgt, wid, c = x.shape
        inner = self.heads * self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        residual = x.astype(self.dtype)
        h = P.group_norm(self.norm_num_groups, epsilon=1e-6, param_dtype=self.param_dtype, name="norm")(x)
        h = h.astype(self.dtype)
        if self.use_linear_projection:
            h = h.reshape(b, hgt * wid, c)
            h = P.dense(inner, name="proj_in", **kw)(h)
        else:
            h = P.conv(inner, (1, 1), padding="VALID", name="proj_in", **kw)(h)
            h = h.reshape(b, hgt * wid, inner)
        # static: the python bool `deterministic` (argument 0 is the module itself).
        block_cls = nn.remat(BasicTransformerBlock, static_argnums=(3,)) if self.remat else BasicTransformerBlock
        for i in range(self.depth):
            h = block_cls(
                heads=self.heads,
                head_dim=self.head_dim,
                dropout=self.dropout,
                attention=self.attention,
                name=f"transformer_blocks_{i}",
                **kw,
            )(h, context, deterministic)
        if self.use_linear_projection:
            h = P.dense(c, name="proj_out", **kw)(h)
            h = h.reshape(b, hgt, wid, c)
        else:
            h = h.reshape(b, hgt, wid, inner)
            h = P.conv(c, (1, 1), padding="VALID", name="proj_out", **kw)(h)
        return h + residual
