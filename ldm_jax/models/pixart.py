"""PixArt-alpha's text-conditioned DiT (Chen et al. 2023), mirroring diffusers'
``PixArtTransformer2DModel``: the DiT backbone of ``ldm_jax.models.dit`` (same patch embedding,
attention, MLP and unpatchify) with

  * adaLN-single: ONE timestep MLP (``adaln_single``) gives 6*D modulation values shared by all
    blocks; each block adds its own learned ``scale_shift_table`` [6, D] (far fewer parameters than
    DiT's per-block adaLN-Zero regressors);
  * cross-attention (``attn2``) from the image tokens to a text encoder's ``context`` after the
    self-attention, without a norm in front (as PixArt), with an optional key-padding ``context_mask``;
  * an optional ``caption_projection`` (PixArt's T5 4096 -> D MLP) of the context;
  * optional micro-conditions (``use_additional_conditions``: image resolution and aspect ratio,
    PixArt-alpha 1024).

Parameter names follow diffusers with ``name_i`` for ``name.i``; ``ldm_jax.interop.diffusers_dit``
loads and exports the folders. Numerics as diffusers: ``norm1``/``norm2`` use ``norm_eps`` (1e-6 by
default) without affine parameters unless ``norm_elementwise_affine``; timestep features are
``timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)``.
Initialisation follows PixArt where it differs from a plain init: zero ``attn2`` output and final
projections; ``scale_shift_table`` ~ N(0, 1/D).
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models import partitioning as P
from ldm_jax.models.dit import (
    COMMON_CONFIG_KEYS,
    MODULATION_TABLE,
    TIME_FREQ_DIM,
    Attention,
    FeedForward,
    block_class,
    check_inputs,
    check_structure,
    layer_norm_f32,
    modulate,
    parse_diffusers_config,
    patch_embed,
    unpatchify,
)
from ldm_jax.models.embeddings import TimestepEmbedding, timestep_embedding

Dtype = Any


class PixArtBlock(nn.Module):
    """adaLN-single block (diffusers ``BasicTransformerBlock``, ``norm_type="ada_norm_single"``):
    modulation = ``scale_shift_table`` [6, D] + the shared 6*D timestep projection;
    x + gate_msa * attn1(LN(x)*(1+scale)+shift); x + attn2(x, context) (no norm, as PixArt);
    x + gate_mlp * ff(LN(x)*(1+scale)+shift). ``attn2``'s output projection is zero-initialised
    (PixArt's init). x [B, T, D], modulation [B, 6*D], context [B, S, D_ctx], context_mask [B, S] or None."""

    heads: int
    head_dim: int
    attention_bias: bool = True
    activation_fn: str = "gelu-approximate"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    dropout: float = 0.0
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, modulation, context, context_mask, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, _, d = x.shape
        x = x.astype(self.dtype)
        table = self.param(
            "scale_shift_table",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=d**-0.5), MODULATION_TABLE),
            (6, d),
            self.param_dtype,
        )
        mod = table[None].astype(jnp.float32) + modulation.reshape(b, 6, d).astype(jnp.float32)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=1)  # [B, 1, D]
        affine = self.norm_elementwise_affine
        norm = lambda name: layer_norm_f32(self.norm_eps, affine, self.param_dtype, name)  # noqa: E731
        attn_args = (self.heads, self.head_dim, self.attention_bias, self.dropout, self.attention)

        h = modulate(norm("norm1")(x), shift_msa, scale_msa, self.dtype)
        attn = Attention(*attn_args, name="attn1", **kw)
        x = x + gate_msa.astype(self.dtype) * attn(h, None, None, deterministic)
        cross = Attention(*attn_args, zero_init_out=True, name="attn2", **kw)
        x = x + cross(x, context, context_mask, deterministic)
        h = modulate(norm("norm2")(x), shift_mlp, scale_mlp, self.dtype)
        ff = FeedForward(self.activation_fn, dropout=self.dropout, name="ff", **kw)
        return x + gate_mlp.astype(self.dtype) * ff(h, deterministic)


# PixArt-alpha/PixArt-XL-2-512x512 (transformer/config.json, model-defining keys): T5-XXL captions.
PIXART_XL_2_512_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "num_layers": 28,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "caption_channels": 4096,
    "cross_attention_dim": 1152,
}


class PixArtDiT(nn.Module):
    """Text-conditioned DiT of PixArt-alpha with diffusers ``PixArtTransformer2DModel`` structure,
    names and config (loads/exports its folders through ``ldm_jax.interop.diffusers_dit``).

    ``apply(params, x, t, context, train=False, context_mask=None, resolution=None, aspect_ratio=None)``:
      x [B, H, W, in_channels] (NHWC), t [B] or scalar, context [B, S, caption_channels] (or
      [B, S, cross_attention_dim] without a caption projection), context_mask [B, S] (1 = real token)
      or None; with ``use_additional_conditions`` also resolution [B, 2] (height, width) and
      aspect_ratio [B, 1] (PixArt-alpha 1024's micro-conditions) -> [B, H, W, out_channels].
    ``class_labels`` is accepted for the common denoiser signature and must be None.

    ``interpolation_scale=None`` and ``use_additional_conditions=None`` resolve as diffusers does
    (``max(sample_size // 64, 1)``; ``sample_size == 128``). ``num_embeds_ada_norm`` only travels
    with the config (diffusers requires it, the network does not use it).
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int | None = 8
    num_layers: int = 28
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    cross_attention_dim: int = 1152
    caption_channels: int | None = None
    dropout: float = 0.0
    attention_bias: bool = True
    activation_fn: str = "gelu-approximate"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    interpolation_scale: float | None = None
    use_additional_conditions: bool | None = None
    num_embeds_ada_norm: int | None = 1000
    attention: str = "auto"
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        super().__post_init__()
        check_structure(self)
        inner = self.num_attention_heads * self.attention_head_dim
        if not isinstance(self.cross_attention_dim, int) or self.cross_attention_dim < 1:
            raise ValueError(f"cross_attention_dim={self.cross_attention_dim!r} must be a positive int")
        if self.caption_channels is not None and self.cross_attention_dim != inner:
            raise ValueError(
                f"with caption_channels={self.caption_channels} the context is projected to the model width "
                f"{inner}, so cross_attention_dim={self.cross_attention_dim} must equal it"
            )
        if self.additional_conditions and inner % 3:
            raise ValueError(f"use_additional_conditions needs a model width divisible by 3, got {inner}")
        if self.num_embeds_ada_norm is None:
            raise ValueError("num_embeds_ada_norm must be set (diffusers refuses None for PixArt)")

    @property
    def resolved_interpolation_scale(self) -> float:
        if self.interpolation_scale is not None:
            return self.interpolation_scale
        return max(self.sample_size // 64, 1)

    @property
    def additional_conditions(self) -> bool:
        if self.use_additional_conditions is not None:
            return self.use_additional_conditions
        return self.sample_size == 128

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def context_dim(self) -> int:
        """Feature size of the ``context`` this model takes."""
        return self.caption_channels if self.caption_channels is not None else self.cross_attention_dim

    @property
    def null_class_label(self) -> None:
        return None

    @property
    def downsample_factor(self) -> int:
        return self.patch_size

    @property
    def uses_cross_attention(self) -> bool:
        return True

    def dummy_inputs(self, batch_size: int = 1, spatial: int | None = None) -> dict[str, Any]:
        s = spatial or self.patch_size
        out = dict(
            x=jnp.zeros((batch_size, s, s, self.in_channels), jnp.float32),
            t=jnp.zeros((batch_size,), jnp.float32),
            context=jnp.zeros((batch_size, 1, self.context_dim), jnp.float32),
        )
        if self.additional_conditions:
            out["resolution"] = jnp.zeros((batch_size, 2), jnp.float32)
            out["aspect_ratio"] = jnp.zeros((batch_size, 1), jnp.float32)
        return out

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> "PixArtDiT":
        """Build from a diffusers ``PixArtTransformer2DModel`` config (or a legacy ``Transformer2DModel``
        one with ``norm_type="ada_norm_single"``)."""
        return cls(**pixart_config_to_kwargs(config), **overrides)

    def to_diffusers_config(self) -> dict[str, Any]:
        """A ``config.json`` dict that ``PixArtTransformer2DModel.from_config`` builds the same network from."""
        return {
            "_class_name": "PixArtTransformer2DModel",
            "num_attention_heads": self.num_attention_heads,
            "attention_head_dim": self.attention_head_dim,
            "in_channels": self.in_channels,
            "out_channels": self.output_channels,
            "num_layers": self.num_layers,
            "dropout": self.dropout,
            "norm_num_groups": 32,
            "cross_attention_dim": self.cross_attention_dim,
            "attention_bias": self.attention_bias,
            "sample_size": self.sample_size,
            "patch_size": self.patch_size,
            "activation_fn": self.activation_fn,
            "num_embeds_ada_norm": self.num_embeds_ada_norm,
            "upcast_attention": False,
            "norm_type": "ada_norm_single",
            "norm_elementwise_affine": self.norm_elementwise_affine,
            "norm_eps": self.norm_eps,
            # as given (None = diffusers' own default rule, which resolved_* mirrors)
            "interpolation_scale": self.interpolation_scale,
            "use_additional_conditions": self.use_additional_conditions,
            "caption_channels": self.caption_channels,
            "attention_type": "default",
        }

    @nn.compact
    def __call__(
        self, x, t, context=None, class_labels=None, train: bool = False, *,
        context_mask=None, resolution=None, aspect_ratio=None,
    ):
        t = check_inputs(self, x, t)
        b = x.shape[0]
        if class_labels is not None:
            raise ValueError("PixArtDiT is text-conditioned and takes no class_labels; use DiT for classes")
        if context is None or context.ndim != 3 or context.shape[0] != b or context.shape[-1] != self.context_dim:
            shape = None if context is None else context.shape
            raise ValueError(f"context must be [B={b}, S, {self.context_dim}], got {shape}")
        if context_mask is not None and jnp.shape(context_mask) != context.shape[:2]:
            raise ValueError(f"context_mask must be [B, S]={context.shape[:2]}, got {jnp.shape(context_mask)}")
        if self.additional_conditions:
            if resolution is None or aspect_ratio is None:
                raise ValueError("this PixArtDiT uses additional conditions: pass resolution and aspect_ratio")
            if jnp.shape(resolution) != (b, 2) or jnp.shape(aspect_ratio) != (b, 1):
                raise ValueError(
                    f"resolution must be [B={b}, 2] and aspect_ratio [B, 1], "
                    f"got {jnp.shape(resolution)} and {jnp.shape(aspect_ratio)}"
                )
        elif resolution is not None or aspect_ratio is not None:
            raise ValueError("resolution/aspect_ratio given but use_additional_conditions is off")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        deterministic = not train

        h, (gh, gw) = patch_embed(self, x)
        d = h.shape[-1]
        modulation, emb = AdaLayerNormSingle(self.additional_conditions, name="adaln_single", **kw)(
            t, resolution, aspect_ratio, d
        )
        context = context.astype(self.dtype)
        if self.caption_channels is not None:
            context = CaptionProjection(d, name="caption_projection", **kw)(context)

        block_cls = block_class(PixArtBlock, self.remat, 5)
        for i in range(self.num_layers):
            h = block_cls(
                heads=self.num_attention_heads,
                head_dim=self.attention_head_dim,
                attention_bias=self.attention_bias,
                activation_fn=self.activation_fn,
                norm_elementwise_affine=self.norm_elementwise_affine,
                norm_eps=self.norm_eps,
                dropout=self.dropout,
                attention=self.attention,
                name=f"transformer_blocks_{i}",
                **kw,
            )(h, modulation, context, context_mask, deterministic)

        table = self.param(
            "scale_shift_table",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=d**-0.5), MODULATION_TABLE),
            (2, d),
            self.param_dtype,
        )
        mod = table[None].astype(jnp.float32) + emb[:, None, :].astype(jnp.float32)
        shift, scale = jnp.split(mod, 2, axis=1)  # [B, 1, D] each
        h = modulate(layer_norm_f32(1e-6, False, self.param_dtype, "norm_out")(h), shift, scale, self.dtype)
        c = self.output_channels
        h = P.dense(self.patch_size**2 * c, kernel_init=nn.initializers.zeros_init(), name="proj_out", **kw)(h)
        return unpatchify(h, gh, gw, self.patch_size, c)


class TimestepSizeEmbedding(nn.Module):
    """diffusers ``PixArtAlphaCombinedTimestepSizeEmbeddings``: ``timestep_embedder`` of t's 256
    sinusoidal features (shift 0), plus, with ``additional_conditions``, the concatenated embeddings
    of the (height, width) ``resolution`` [B, 2] and ``aspect_ratio`` [B, 1], D/3 wide per scalar."""

    additional_conditions: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t, resolution, aspect_ratio, features: int):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        freq = lambda v: timestep_embedding(  # noqa: E731
            jnp.asarray(v).reshape(-1), TIME_FREQ_DIM, flip_sin_to_cos=True, downscale_freq_shift=0
        ).astype(self.dtype)
        emb = TimestepEmbedding(features, name="timestep_embedder", **kw)(freq(t))
        if not self.additional_conditions:
            return emb
        b = emb.shape[0]
        res = TimestepEmbedding(features // 3, name="resolution_embedder", **kw)(freq(resolution)).reshape(b, -1)
        ar = TimestepEmbedding(features // 3, name="aspect_ratio_embedder", **kw)(freq(aspect_ratio))
        ar = ar.reshape(b, -1)
        return emb + jnp.concatenate([res, ar], axis=-1)


class AdaLayerNormSingle(nn.Module):
    """diffusers ``AdaLayerNormSingle``: returns (``linear(silu(emb))`` [B, 6*D] shared by every block,
    ``emb`` [B, D] for the final layer)."""

    additional_conditions: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t, resolution, aspect_ratio, features: int):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        embed = TimestepSizeEmbedding(self.additional_conditions, name="emb", **kw)
        emb = embed(t, resolution, aspect_ratio, features)
        return P.dense(6 * features, name="linear", **kw)(nn.silu(emb)), emb


class CaptionProjection(nn.Module):
    """diffusers ``PixArtAlphaTextProjection``: ``linear_2(gelu_tanh(linear_1(caption)))``,
    [B, S, C] -> [B, S, D]."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, caption):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = P.dense(self.features, name="linear_1", **kw)(caption)
        return P.dense(self.features, name="linear_2", **kw)(jax.nn.gelu(h, approximate=True))



def pixart_config_to_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`PixArtDiT` keyword arguments from a diffusers ``PixArtTransformer2DModel`` (or legacy
    ``Transformer2DModel`` with ``norm_type="ada_norm_single"``) config dict."""
    keys = COMMON_CONFIG_KEYS + (
        "cross_attention_dim", "caption_channels", "interpolation_scale", "use_additional_conditions",
        "num_embeds_ada_norm",
    )
    only = {"attention_type": ("default", None)}
    return parse_diffusers_config(config, "PixArtTransformer2DModel", "ada_norm_single", keys, only)
