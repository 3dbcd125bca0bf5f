"""DiT (Peebles & Xie 2023), mirroring diffusers' ``DiTTransformer2DModel``, and the transformer
building blocks its text-conditioned PixArt-alpha variant (``ldm_jax.models.pixart``) shares.

A latent [B, H, W, C] (NHWC) is cut into p x p patches by a stride-p convolution (``pos_embed/proj``),
a fixed 2D sin-cos position embedding is added, ``num_layers`` transformer blocks run over the
(H/p)(W/p) tokens, and a final adaptive LayerNorm + linear layer maps each token back to a p x p x
out_channels patch ("unpatchify"). ``out_channels = 2 * in_channels`` is DiT's learned-sigma output
(eps and the variance interpolation v; the caller splits it).

Conditioning: timestep + class label through adaLN-Zero (every block regresses shift/scale/gate for
its attention and MLP from the conditioning vector; that regressor and the final projections are
zero-initialised as in the paper, so each block starts as the identity and the output at 0). The
class table has ``num_classes + 1`` rows; label ``num_classes`` (``DiT.null_class_label``) is the
learned "no class" label for classifier-free guidance (diffusers' ``LabelEmbedding`` with dropout > 0,
so DiT-XL/2's ``num_embeds_ada_norm=1000`` means 1000 classes + the null label). Label dropout during
training is the trainer's job (``ldm_jax.diffusion.guidance.drop_conditioning``), not the model's.

diffusers quirk kept for weight compatibility: in ``DiTTransformer2DModel`` EVERY block owns its own
timestep/label embedding (``transformer_blocks.i.norm1.emb``) and the final layer uses block 0's. The
original DiT shares one (diffusers' conversion copies it into every block). We mirror diffusers, so
parameter counts (DiT-XL/2: 749,826,464 vs the paper's ~675M) and state dicts match exactly; a model
trained here simply learns ``num_layers`` embeddings.

Parameter names follow diffusers with ``name_i`` for ``name.i`` (``transformer_blocks_3/attn1/to_out_0``,
``ff/net_0/proj``), so ``ldm_jax.interop.diffusers_dit`` is a renaming. All attention goes through
:func:`attend` (one call site; the modules' ``attention`` field is the backend name).

Numerics as diffusers: adaLN LayerNorms eps 1e-6 without affine; the MLP's LayerNorm (``norm3``) uses
``norm_eps`` (1e-5 by default); GELU is the tanh approximation for ``activation_fn="gelu-approximate"``;
timestep features are ``timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)``.
Norms, softmax and the position table are float32 whatever ``dtype``.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.kernels.attention import BACKEND_NAMES as ATTENTION_BACKENDS
from ldm_jax.kernels.attention import dot_product_attention
from ldm_jax.models import partitioning as P
from ldm_jax.models.embeddings import TimestepEmbedding, timestep_embedding

Dtype = Any

# Attention backend name -> ``jax.nn.dot_product_attention(implementation=...)``. The project-wide
# backend registry (flash / splash kernels) will replace this table at the single call site below.
ACTIVATIONS = ("gelu-approximate", "gelu")
TIME_FREQ_DIM = 256  # width of the sinusoidal timestep features (diffusers' Timesteps(256, ...))

QKV_KERNEL = ("embed", "heads")
OUT_KERNEL = ("heads", "embed")
MODULATION_TABLE = ("norm", "embed")


def attend(q, k, v, *, key_mask=None, backend: str = "auto"):
    """Softmax attention, scale ``head_dim ** -0.5``, logits and softmax in float32, through the
    project's backend registry (``ldm_jax.kernels``: xla / blockwise / splash / cudnn / auto).

    q [B, T, H, D], k/v [B, S, H, D], key_mask [B, S] (True/1 = attend) or None -> [B, T, H, D].
    THE attention call of this module.
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; known: {sorted(ATTENTION_BACKENDS)}")
    mask = None if key_mask is None else jnp.asarray(key_mask).astype(bool)
    return dot_product_attention(q, k, v, key_mask=mask, backend=backend)


def sincos_pos_embed_2d(
    embed_dim: int, grid_h: int, grid_w: int, *, base_size: int, interpolation_scale: float = 1.0
) -> np.ndarray:
    """MAE/DiT fixed 2D position table as diffusers' ``get_2d_sincos_pos_embed``: [grid_h*grid_w, D]
    float32, tokens row-major. The first D/2 channels encode the column, the last D/2 the row, each
    as [sin(pos*w_i), cos(pos*w_i)] with w_i = 10000^(-i/(D/4)); positions are
    ``arange(n) * base_size / n / interpolation_scale`` (so a larger grid spans the trained range).
    Computed in float64 NumPy (a constant of the traced program), like diffusers."""
    if embed_dim % 4:
        raise ValueError(f"2D sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4))

    def one_axis(n):
        pos = np.arange(n, dtype=np.float32) / np.float32(n / base_size) / np.float32(interpolation_scale)
        out = pos.astype(np.float64)[:, None] * omega[None, :]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # [n, D/2]

    cols = np.broadcast_to(one_axis(grid_w)[None, :, :], (grid_h, grid_w, embed_dim // 2))
    rows = np.broadcast_to(one_axis(grid_h)[:, None, :], (grid_h, grid_w, embed_dim // 2))
    return np.concatenate([cols, rows], axis=-1).reshape(grid_h * grid_w, embed_dim).astype(np.float32)


def unpatchify(tokens, grid_h: int, grid_w: int, patch_size: int, channels: int):
    """[B, h*w, p*p*C] (each token's features ordered (row-in-patch, col-in-patch, channel), as
    diffusers' ``nhwpqc``) -> [B, h*p, w*p, C]."""
    b = tokens.shape[0]
    x = tokens.reshape(b, grid_h, grid_w, patch_size, patch_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid_h * patch_size, grid_w * patch_size, channels)


def layer_norm_f32(eps: float, affine: bool, param_dtype: Dtype, name: str) -> nn.LayerNorm:
    """float32 LayerNorm; without affine parameters unless ``affine`` (torch's elementwise_affine).
    Two-pass variance (not E[x^2]-E[x]^2) to stay within 1e-5 of torch."""
    init = lambda base: nn.with_logical_partitioning(base, ("norm",))  # noqa: E731
    return nn.LayerNorm(
        epsilon=eps,
        use_scale=affine,
        use_bias=affine,
        use_fast_variance=False,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        scale_init=init(nn.initializers.ones_init()),
        bias_init=init(nn.initializers.zeros_init()),
        name=name,
    )


def modulate(normed, shift, scale, dtype):
    """adaLN: ``norm(x) * (1 + scale) + shift`` (norm in float32), cast to the compute dtype."""
    return (normed * (1 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)).astype(dtype)


class PatchEmbed(nn.Module):
    """Stride-p conv patch embedding (``proj``) + fixed sin-cos positions (diffusers ``PatchEmbed``).
    x [B, H, W, C] -> (tokens [B, (H/p)(W/p), D], (H/p, W/p))."""

    patch_size: int
    embed_dim: int
    base_size: int
    interpolation_scale: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        h = P.conv(
            self.embed_dim, (p, p), strides=(p, p), padding="VALID",
            dtype=self.dtype, param_dtype=self.param_dtype, name="proj",
        )(x.astype(self.dtype))
        b, gh, gw, d = h.shape
        pos = sincos_pos_embed_2d(
            d, gh, gw, base_size=self.base_size, interpolation_scale=self.interpolation_scale
        )
        return (h.reshape(b, gh * gw, d) + jnp.asarray(pos)[None]).astype(self.dtype), (gh, gw)


class Attention(nn.Module):
    """Multi-head attention with diffusers' names (``to_q``/``to_k``/``to_v`` with bias when
    ``use_bias``, ``to_out_0``). x [B, T, D], context [B, S, D_ctx] or None, key_mask [B, S] or None."""

    heads: int
    head_dim: int
    use_bias: bool = True
    dropout: float = 0.0
    attention: str = "auto"
    zero_init_out: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, key_mask=None, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        context = x if context is None else context
        inner = self.heads * self.head_dim
        b, t, d = x.shape
        s = context.shape[1]
        proj = lambda name: P.dense(inner, names=QKV_KERNEL, use_bias=self.use_bias, name=name, **kw)  # noqa: E731
        q = proj("to_q")(x.astype(self.dtype)).reshape(b, t, self.heads, self.head_dim)
        k = proj("to_k")(context.astype(self.dtype)).reshape(b, s, self.heads, self.head_dim)
        v = proj("to_v")(context.astype(self.dtype)).reshape(b, s, self.heads, self.head_dim)
        out = attend(q, k, v, key_mask=key_mask, backend=self.attention).reshape(b, t, inner)
        out_init = nn.initializers.zeros_init() if self.zero_init_out else nn.initializers.lecun_normal()
        out = P.dense(d, names=OUT_KERNEL, kernel_init=out_init, name="to_out_0", **kw)(out)
        return nn.Dropout(self.dropout)(out, deterministic=deterministic)


class FeedForward(nn.Module):
    """``net_0/proj`` (D -> mult*D) -> GELU (tanh approximation for "gelu-approximate") -> dropout ->
    ``net_2`` (back to D). diffusers ``FeedForward`` with activation_fn "gelu"/"gelu-approximate"."""

    activation_fn: str = "gelu-approximate"
    mult: int = 4
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d = x.shape[-1]
        h = _GeluProj(self.mult * d, self.activation_fn == "gelu-approximate", name="net_0", **kw)(x)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return P.dense(d, names=("mlp", "embed"), name="net_2", **kw)(h)


class _GeluProj(nn.Module):
    """diffusers ``GELU``: ``gelu(proj(x))``."""

    features: int
    approximate: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = P.dense(self.features, names=("embed", "mlp"), name="proj", **kw)(x)
        return jax.nn.gelu(h, approximate=self.approximate)


class _LabelEmbedding(nn.Module):
    """diffusers ``LabelEmbedding``: an ``embedding_table`` of ``num_classes + 1`` rows (the last is
    the null label). labels [B] int -> [B, D]."""

    num_classes: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, labels):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return P.embed(self.num_classes + 1, self.features, name="embedding_table", **kw)(labels)


class TimestepLabelEmbedding(nn.Module):
    """diffusers ``CombinedTimestepLabelEmbeddings``: ``timestep_embedder(t_freq) + class_embedder(labels)``.
    t_freq [B, 256] (sinusoidal features), labels [B] -> [B, features]."""

    num_classes: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t_freq, labels):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        t_emb = TimestepEmbedding(self.features, name="timestep_embedder", **kw)(t_freq.astype(self.dtype))
        return t_emb + _LabelEmbedding(self.num_classes, self.features, name="class_embedder", **kw)(labels)


class AdaLayerNormZero(nn.Module):
    """diffusers ``AdaLayerNormZero`` with its own embedding (``emb``): ``linear(silu(emb))`` gives
    6 x D modulation values; returns (modulated LayerNorm(x), gate_msa, shift_mlp, scale_mlp,
    gate_mlp, emb). ``linear`` is zero-initialised (the "Zero" of adaLN-Zero: blocks start as identity)."""

    num_classes: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t_freq, labels):
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = TimestepLabelEmbedding(self.num_classes, d, name="emb", **kw)(t_freq, labels)
        mod = P.dense(6 * d, kernel_init=nn.initializers.zeros_init(), name="linear", **kw)(nn.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod[:, None, :], 6, axis=-1)
        normed = layer_norm_f32(1e-6, False, self.param_dtype, "norm")(x)
        return modulate(normed, shift_msa, scale_msa, self.dtype), gate_msa, shift_mlp, scale_mlp, gate_mlp, emb


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block (diffusers ``BasicTransformerBlock``, ``norm_type="ada_norm_zero"``,
    no cross-attention): x + gate_msa * attn1(adaLN(x)); x + gate_mlp * ff(LN(x) * (1 + scale) + shift).
    x [B, T, D], t_freq [B, 256], labels [B] -> (x [B, T, D], this block's conditioning emb [B, D])."""

    heads: int
    head_dim: int
    num_classes: int
    attention_bias: bool = True
    activation_fn: str = "gelu-approximate"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-5
    dropout: float = 0.0
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t_freq, labels, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = x.astype(self.dtype)
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp, emb = AdaLayerNormZero(self.num_classes, name="norm1", **kw)(
            x, t_freq, labels
        )
        attn = Attention(
            self.heads, self.head_dim, self.attention_bias, self.dropout, self.attention, name="attn1", **kw
        )
        x = x + gate_msa * attn(h, None, None, deterministic)
        normed = layer_norm_f32(self.norm_eps, self.norm_elementwise_affine, self.param_dtype, "norm3")(x)
        h = modulate(normed, shift_mlp, scale_mlp, self.dtype)
        ff = FeedForward(self.activation_fn, dropout=self.dropout, name="ff", **kw)
        return x + gate_mlp * ff(h, deterministic), emb


# ------------------------------------------------- checks and helpers shared with PixArtDiT


def check_structure(m) -> None:
    """Construction-time checks common to DiT and PixArtDiT (ValueError naming the option)."""
    sizes = ("sample_size", "patch_size", "in_channels", "num_layers", "num_attention_heads", "attention_head_dim")
    for name in sizes:
        value = getattr(m, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    if m.out_channels is not None and m.out_channels < 1:
        raise ValueError(f"out_channels={m.out_channels!r} must be a positive int or None")
    if m.sample_size % m.patch_size:
        raise ValueError(f"sample_size={m.sample_size} is not divisible by patch_size={m.patch_size}")
    if (m.num_attention_heads * m.attention_head_dim) % 4:
        raise ValueError(
            f"width num_attention_heads*attention_head_dim={m.num_attention_heads * m.attention_head_dim} "
            "must be divisible by 4 (2D sin-cos position embedding)"
        )
    if m.activation_fn not in ACTIVATIONS:
        raise ValueError(f"unsupported activation_fn={m.activation_fn!r}; supported: {ACTIVATIONS}")
    if m.attention not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {m.attention!r}; known: {sorted(ATTENTION_BACKENDS)}")


def check_inputs(m, x, t):
    """x [B, H, W, in_channels] with H, W multiples of patch_size; t scalar or [B] -> t [B]."""
    if x.ndim != 4 or x.shape[-1] != m.in_channels:
        raise ValueError(f"x must be [B, H, W, {m.in_channels}] (NHWC), got shape {x.shape}")
    b, hgt, wid, _ = x.shape
    if hgt % m.patch_size or wid % m.patch_size:
        raise ValueError(f"x spatial size {(hgt, wid)} must be divisible by patch_size={m.patch_size}")
    t = jnp.asarray(t)
    if t.ndim == 0:
        t = jnp.broadcast_to(t, (b,))
    if t.shape != (b,):
        raise ValueError(f"t must be a scalar or [B]=[{b}], got shape {t.shape}")
    return t


def patch_embed(m, x):
    return PatchEmbed(
        m.patch_size,
        m.num_attention_heads * m.attention_head_dim,
        base_size=m.sample_size // m.patch_size,
        interpolation_scale=m.resolved_interpolation_scale,
        dtype=m.dtype,
        param_dtype=m.param_dtype,
        name="pos_embed",
    )(x)


def block_class(cls, remat: bool, deterministic_argnum: int):
    # static: the python bool `deterministic` (argument 0 is the module itself).
    return nn.remat(cls, static_argnums=(deterministic_argnum,)) if remat else cls


# The paper's model sizes (Peebles & Xie 2023, Table 1): name -> (num_layers, width, heads); the
# "/p" suffix is the patch size. Head width is width / heads (64 for every size but XL's 72).
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "DiT-S": (12, 384, 6),
    "DiT-B": (12, 768, 12),
    "DiT-L": (24, 1024, 16),
    "DiT-XL": (28, 1152, 16),
}

# facebook/DiT-XL-2-256 (transformer/config.json, model-defining keys): 32x32x4 SD-VAE latents,
# 1000 ImageNet classes, learned sigma.
DIT_XL_2_256_CONFIG: dict[str, Any] = {
    "sample_size": 32,
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "num_embeds_ada_norm": 1000,
}


def dit_config(name: str, **overrides) -> dict[str, Any]:
    """A diffusers ``DiTTransformer2DModel`` config for a paper size, e.g. ``dit_config("DiT-S/2",
    sample_size=8, num_embeds_ada_norm=10)``; defaults are those of DiT-XL-2-256 (4 latent
    channels, learned sigma, 1000 classes). Build with ``DiT.from_diffusers_config``."""
    size, _, patch = name.partition("/")
    if size not in DIT_SIZES or not patch.isdigit():
        raise ValueError(f"unknown DiT size {name!r}; known: {[f'{k}/<patch>' for k in DIT_SIZES]}")
    layers, width, heads = DIT_SIZES[size]
    config = {
        **DIT_XL_2_256_CONFIG,
        "patch_size": int(patch),
        "num_layers": layers,
        "num_attention_heads": heads,
        "attention_head_dim": width // heads,
    }
    return {**config, **overrides}


class DiT(nn.Module):
    """Class-conditional DiT with diffusers ``DiTTransformer2DModel`` structure, names and config.

    ``apply(params, x, t, context=None, class_labels=labels, train=False)``:
      x [B, H, W, in_channels] (NHWC, H and W multiples of ``patch_size``; other sizes than
      ``sample_size`` get the rescaled position grid, as diffusers), t [B] or scalar (integer or
      fractional), class_labels [B] int in [0, num_classes] (``num_classes`` = no class)
      -> [B, H, W, out_channels] in ``dtype``.

    ``num_classes`` is diffusers' ``num_embeds_ada_norm``. ``remat=True`` rematerialises each block in
    the backward pass. ``attention`` names the attention backend (see :func:`attend`).
    ``context`` is accepted for the common denoiser signature and must be None.
    """

    sample_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int | None = None
    num_layers: int = 28
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    num_classes: int = 1000
    dropout: float = 0.0
    attention_bias: bool = True
    activation_fn: str = "gelu-approximate"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-5
    interpolation_scale: float = 1.0
    attention: str = "auto"
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        super().__post_init__()
        check_structure(self)
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes={self.num_classes!r} must be a positive int")

    @property
    def resolved_interpolation_scale(self) -> float:
        return self.interpolation_scale

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def null_class_label(self) -> int:
        """The label of the learned "no class" embedding (classifier-free guidance)."""
        return self.num_classes

    @property
    def downsample_factor(self) -> int:
        """H and W must be multiples of this."""
        return self.patch_size

    @property
    def uses_cross_attention(self) -> bool:
        return False

    def dummy_inputs(self, batch_size: int = 1, spatial: int | None = None) -> dict[str, Any]:
        """Smallest valid inputs (for ``init`` / ``jax.eval_shape``): keyword arguments of ``apply``."""
        s = spatial or self.patch_size
        return dict(
            x=jnp.zeros((batch_size, s, s, self.in_channels), jnp.float32),
            t=jnp.zeros((batch_size,), jnp.float32),
            class_labels=jnp.zeros((batch_size,), jnp.int32),
        )

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> "DiT":
        """Build from a diffusers ``DiTTransformer2DModel`` config (or a legacy ``Transformer2DModel``
        one with ``norm_type="ada_norm_zero"``, as facebook/DiT-XL-2-256 ships). ``overrides`` set
        module-only fields (``dtype``, ``param_dtype``, ``remat``, ``attention``)."""
        return cls(**dit_config_to_kwargs(config), **overrides)

    def to_diffusers_config(self) -> dict[str, Any]:
        """A ``config.json`` dict that ``DiTTransformer2DModel.from_config`` builds the same network from."""
        if self.interpolation_scale != 1.0:
            raise ValueError(
                f"interpolation_scale={self.interpolation_scale} cannot be written to a DiTTransformer2DModel config"
            )
        return {
            "_class_name": "DiTTransformer2DModel",
            "num_attention_heads": self.num_attention_heads,
            "attention_head_dim": self.attention_head_dim,
            "in_channels": self.in_channels,
            "out_channels": self.output_channels,
            "num_layers": self.num_layers,
            "dropout": self.dropout,
            "norm_num_groups": 32,
            "attention_bias": self.attention_bias,
            "sample_size": self.sample_size,
            "patch_size": self.patch_size,
            "activation_fn": self.activation_fn,
            "num_embeds_ada_norm": self.num_classes,
            "upcast_attention": False,
            "norm_type": "ada_norm_zero",
            "norm_elementwise_affine": self.norm_elementwise_affine,
            "norm_eps": self.norm_eps,
        }

    @nn.compact
    def __call__(self, x, t, context=None, class_labels=None, train: bool = False):
        t = check_inputs(self, x, t)
        b = x.shape[0]
        if context is not None:
            raise ValueError("DiT is class-conditional and takes no context (text: ldm_jax.models.pixart.PixArtDiT)")
        if class_labels is None:
            raise ValueError(f"DiT needs class_labels [B] (use {self.null_class_label} for 'no class')")
        class_labels = jnp.asarray(class_labels)
        if class_labels.shape != (b,):
            raise ValueError(f"class_labels must be [B]=[{b}], got shape {class_labels.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        deterministic = not train

        h, (gh, gw) = patch_embed(self, x)
        t_freq = timestep_embedding(t, TIME_FREQ_DIM, flip_sin_to_cos=True, downscale_freq_shift=1)
        block_cls = block_class(DiTBlock, self.remat, 4)
        cond = None
        for i in range(self.num_layers):
            h, emb = block_cls(
                heads=self.num_attention_heads,
                head_dim=self.attention_head_dim,
                num_classes=self.num_classes,
                attention_bias=self.attention_bias,
                activation_fn=self.activation_fn,
                norm_elementwise_affine=self.norm_elementwise_affine,
                norm_eps=self.norm_eps,
                dropout=self.dropout,
                attention=self.attention,
                name=f"transformer_blocks_{i}",
                **kw,
            )(h, t_freq, class_labels, deterministic)
            cond = emb if i == 0 else cond  # diffusers' final layer reads block 0's embedding

        d = h.shape[-1]
        zeros = nn.initializers.zeros_init()
        mod = P.dense(2 * d, kernel_init=zeros, name="proj_out_1", **kw)(nn.silu(cond))
        shift, scale = jnp.split(mod[:, None, :], 2, axis=-1)
        h = modulate(layer_norm_f32(1e-6, False, self.param_dtype, "norm_out")(h), shift, scale, self.dtype)
        c = self.output_channels
        h = P.dense(self.patch_size**2 * c, kernel_init=zeros, name="proj_out_2", **kw)(h)
        return unpatchify(h, gh, gw, self.patch_size, c)


# --------------------------------------------------------------------- diffusers config parsing

COMMON_CONFIG_KEYS = (
    "num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "num_layers", "dropout",
    "attention_bias", "sample_size", "patch_size", "activation_fn", "norm_elementwise_affine", "norm_eps",
)
# Keys of the legacy Transformer2DModel config, accepted only at the value meaning "feature off".
_LEGACY_ONLY_VALUES: dict[str, tuple] = {
    "num_vector_embeds": (None,),
    "only_cross_attention": (False,),
    "double_self_attention": (False,),
    "attention_type": ("default",),
}
# No effect on the network: norm_num_groups only serves Transformer2DModel's continuous input,
# use_linear_projection too; upcast_attention is always on here (float32 logits and softmax).
_IRRELEVANT_KEYS = ("norm_num_groups", "use_linear_projection", "upcast_attention")


def parse_diffusers_config(
    config: Mapping[str, Any], class_name: str, norm_type: str, keys: tuple, only: dict, ignore: tuple = ()
) -> dict[str, Any]:
    """The ``keys`` of a diffusers ``class_name`` (or legacy ``Transformer2DModel``) config, checked:
    keys in ``only`` must hold one of their listed values, ``ignore``d and "_" keys are skipped,
    anything else raises ValueError naming the key (never silently dropped)."""
    name = config.get("_class_name", class_name)
    legacy = name == "Transformer2DModel"
    if name != class_name and not legacy:
        raise ValueError(f"config _class_name={name!r} is not {class_name!r} (or a legacy 'Transformer2DModel')")
    only = {**only, **(_LEGACY_ONLY_VALUES if legacy else {}), "norm_type": (norm_type,)}
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key.startswith("_") or key in _IRRELEVANT_KEYS or key in ignore:
            continue
        if key in only:
            if value not in only[key]:
                raise ValueError(f"unsupported {name} option {key}={value!r} (ldm_jax supports only {only[key]})")
            continue
        if key not in keys:
            raise ValueError(f"unknown {name} config key {key!r}={value!r}")
        out[key] = value
    if config.get("norm_type", norm_type) != norm_type:  # absent norm_type: the class default
        raise ValueError(f"norm_type={config.get('norm_type')!r} is not {norm_type!r}")
    return out


def dit_config_to_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """:class:`DiT` keyword arguments from a diffusers ``DiTTransformer2DModel`` (or legacy
    ``Transformer2DModel`` with ``norm_type="ada_norm_zero"``) config dict."""
    legacy = config.get("_class_name") == "Transformer2DModel"
    keys = COMMON_CONFIG_KEYS + ("num_embeds_ada_norm",) + (("interpolation_scale",) if legacy else ())
    only = {"cross_attention_dim": (None,), "caption_channels": (None,)} if legacy else {}
    # use_additional_conditions only acts with norm_type="ada_norm_single".
    kwargs = parse_diffusers_config(
        config, "DiTTransformer2DModel", "ada_norm_zero", keys, only, ignore=("use_additional_conditions",)
    )
    if "num_embeds_ada_norm" in kwargs:
        kwargs["num_classes"] = kwargs.pop("num_embeds_ada_norm")
    if legacy:
        # Transformer2DModel's PatchEmbed rescales positions like PixArt; DiTTransformer2DModel never does.
        scale = kwargs.pop("interpolation_scale", None)
        if scale is None:
            scale = max(config.get("sample_size", 32) // 64, 1)
        kwargs["interpolation_scale"] = float(scale)
    return kwargs
