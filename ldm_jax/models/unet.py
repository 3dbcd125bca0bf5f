"""The conditional U-Net of latent diffusion, mirroring diffusers' ``UNet2DConditionModel``.

The module's attributes use diffusers' config vocabulary (``block_out_channels``,
``layers_per_block``, ``down_block_types``, ``attention_head_dim``, ``use_linear_projection``,
...) with the same meaning, so a diffusers ``config.json`` maps onto it one to one
(``UNet.from_diffusers_config``) and the parameter tree mirrors diffusers' state dict
(``down_blocks.0.attentions.1.proj_in.weight`` <-> ``down_blocks_0/attentions_1/proj_in/kernel``).

Conditioning:
  * text / any token sequence: cross-attention on ``context`` [B, L, cross_attention_dim];
  * class labels: an embedding table whose row is added to the time embedding. diffusers'
    ``num_class_embeds`` sizes the table as given. ``num_classes`` (an ldm_jax extension) sizes it
    ``num_classes + 1`` and reserves label ``num_classes`` (``UNet.null_class_label``) as the
    "no class" label for classifier-free guidance training (label dropout) and sampling;
  * SDXL micro-conditioning (``addition_embed_type="text_time"``): ``text_embeds`` [B, D_pooled]
    (the pooled, projected text embedding) and ``time_ids`` [B, N] (base: original height/width,
    crop top/left, target height/width; refiner: original size, crop, aesthetic score). Each id
    gets an ``addition_time_embed_dim``-wide sinusoidal embedding; the concatenation
    (``projection_class_embeddings_input_dim`` wide) goes through ``add_embedding`` and is added
    to the time embedding;
  * channel concatenation (inpainting, super-resolution, depth): set ``in_channels`` to the total
    and concatenate along the last axis before calling.
A learned-variance model (improved DDPM) is ``out_channels = 2 * latent_channels``; the caller
splits the output.

Transformer depth (as in diffusers): ``transformer_layers_per_block`` is an int, one int per level
(SDXL base: [1, 2, 10]) or one per-layer list per level; the up blocks use
``reverse_transformer_layers_per_block`` or else the per-level list reversed, the mid block the
last level's depth. Levels whose block type has no attention (``DownBlock2D``/``UpBlock2D``)
ignore their entry.

Attention-head semantics (as in diffusers): the number of heads of block i is
``(num_attention_heads or attention_head_dim)[i]`` and the head width is
``block_out_channels[i] // heads``. So SD 1.x's ``attention_head_dim=8`` means 8 heads, and SD 2.x's
``attention_head_dim=(5, 10, 20, 20)`` with ``block_out_channels=(320, 640, 1280, 1280)`` means
64-wide heads.

Options that change nothing here: ``upcast_attention`` (attention logits and softmax are always
float32, see ``ldm_jax.models.attention``); ``sample_size`` (informational).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models import partitioning as P
from ldm_jax.models.attention import Transformer2D
from ldm_jax.models.embeddings import TimestepEmbedding, timestep_embedding
from ldm_jax.models.layers import Downsample, ResnetBlock, Upsample
from ldm_jax.models.remat import checkpoint_policy
from ldm_jax.models.unet_config import (  # noqa: F401  (SD*_UNET_CONFIG re-exported)
    SD2_UNET_CONFIG,
    SD15_UNET_CONFIG,
    diffusers_config_to_kwargs,
    unet_to_diffusers_config,
)

Dtype = Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)
# "text_time": SDXL's micro-conditioning (pooled text embedding + Fourier-embedded time ids).
ADDITION_EMBED_TYPES = (None, "text_time")

def _per_block(value, n: int, name: str, nested: bool = False) -> tuple:
    """An int/None broadcast to n blocks, or a sequence of length n (whose entries may be
    per-layer sequences when ``nested``)."""
    if value is None or isinstance(value, (int, float)):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name}={value!r} must have one entry per block ({n})")
    for v in value:
        if isinstance(v, (list, tuple)) and not nested:
            raise ValueError(f"{name}={value!r}: nested per-layer lists are not supported")
    return value


def _per_layer(value, num_layers: int, name: str) -> tuple[int, ...]:
    """One block's transformer depth: an int for every layer, or one int per layer."""
    if isinstance(value, int):
        return (value,) * num_layers
    value = tuple(value)
    if len(value) != num_layers or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{name} entry {value!r} must be an int or {num_layers} ints (one per layer)")
    return value


def _resnet(block: nn.Module, out_channels: int, name: str, output_scale_factor: float = 1.0) -> ResnetBlock:
    """The ResnetBlock every U-Net block builds, configured from the block's own fields."""
    # remat_policy "layer": each ResnetBlock is its own checkpoint (arg 3 = the python bool deterministic).
    cls = nn.remat(ResnetBlock, static_argnums=(3,)) if block.remat_layers else ResnetBlock
    return cls(
        out_channels=out_channels,
        groups=block.norm_num_groups,
        eps=block.norm_eps,
        dropout=block.dropout,
        time_embedding_norm=block.time_embedding_norm,
        output_scale_factor=output_scale_factor,
        dtype=block.dtype,
        param_dtype=block.param_dtype,
        conv_impl=block.conv_impl,
        name=name,
    )


def _transformer(block: nn.Module, channels: int, name: str, layer: int = 0) -> Transformer2D:
    """The spatial transformer of layer ``layer`` of a cross-attention U-Net block, from the
    block's fields (``transformer_depth`` is one int for all layers or one per layer)."""
    depth = block.transformer_depth
    return Transformer2D(
        heads=block.heads,
        head_dim=channels // block.heads,
        depth=depth if isinstance(depth, int) else depth[layer],
        use_linear_projection=block.use_linear_projection,
        norm_num_groups=block.norm_num_groups,
        attention=block.attention,
        remat=block.remat_layers,
        dtype=block.dtype,
        param_dtype=block.param_dtype,
        name=name,
    )


class _UNetBlock(nn.Module, kw_only=True):
    """Settings every down/mid/up block shares (keyword-only, so each block type adds its own
    required fields in front): one list of fields instead of one per block type."""

    has_attention: bool
    heads: int = 1
    transformer_depth: int | tuple[int, ...] = 1  # one for every layer, or one per layer
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0
    time_embedding_norm: str = "default"
    attention: str = "auto"  # attention backend (ldm_jax.kernels)
    remat_layers: bool = False  # checkpoint each resnet / transformer layer (remat_policy="layer")
    conv_impl: str = "xla"  # ldm_jax.kernels.conv formulation of the resnet / resampling convs
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32


class DownBlock(_UNetBlock):
    """diffusers ``DownBlock2D`` (``has_attention=False``) or ``CrossAttnDownBlock2D``:
    ``num_layers`` x (ResnetBlock [-> Transformer2D]) then an optional stride-2 Downsample.

    Shapes: x [B, H, W, C_in], temb [B, D_t], context [B, S, D_ctx] or None ->
    (x [B, H', W', out_channels], skips: one [B, ., ., out_channels] per layer and downsample).
    """

    out_channels: int
    num_layers: int
    add_downsample: bool

    @nn.compact
    def __call__(self, x, temb, context, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        skips = []
        for i in range(self.num_layers):
            x = _resnet(self, self.out_channels, f"resnets_{i}")(x, temb, deterministic)
            if self.has_attention:
                x = _transformer(self, self.out_channels, f"attentions_{i}", i)(x, context, deterministic)
            skips.append(x)
        if self.add_downsample:
            x = Downsample(
                self.out_channels, padding="symmetric", conv_impl=self.conv_impl, name="downsamplers_0", **kw
            )(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(_UNetBlock):
    """diffusers ``UNetMidBlock2DCrossAttn`` (ResnetBlock -> Transformer2D -> ResnetBlock) or,
    with ``has_attention=False``, ``UNetMidBlock2D`` as UNet2DConditionModel builds it (a single
    ResnetBlock). Shapes: x [B, H, W, C] -> [B, H, W, C]."""

    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x, temb, context, deterministic: bool = True):
        channels = x.shape[-1]
        x = _resnet(self, channels, "resnets_0", self.output_scale_factor)(x, temb, deterministic)
        if self.has_attention:
            x = _transformer(self, channels, "attentions_0")(x, context, deterministic)
            x = _resnet(self, channels, "resnets_1", self.output_scale_factor)(x, temb, deterministic)
        return x


class UpBlock(_UNetBlock):
    """diffusers ``UpBlock2D`` / ``CrossAttnUpBlock2D``: ``num_layers`` x (concat the last skip on
    channels -> ResnetBlock [-> Transformer2D]) then an optional nearest x2 Upsample.

    Shapes: x [B, H, W, C], skips: ``num_layers`` maps consumed last-first ->
    [B, H', W', out_channels].
    """

    out_channels: int
    num_layers: int
    add_upsample: bool

    @nn.compact
    def __call__(self, x, skips, temb, context, deterministic: bool = True):
        if len(skips) != self.num_layers:
            raise ValueError(f"UpBlock with {self.num_layers} layers got {len(skips)} skip connections")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_layers):
            skip = skips[self.num_layers - 1 - i]
            x = jnp.concatenate([x.astype(self.dtype), skip.astype(self.dtype)], axis=-1)
            x = _resnet(self, self.out_channels, f"resnets_{i}")(x, temb, deterministic)
            if self.has_attention:
                x = _transformer(self, self.out_channels, f"attentions_{i}", i)(x, context, deterministic)
        if self.add_upsample:
            x = Upsample(self.out_channels, conv_impl=self.conv_impl, name="upsamplers_0", **kw)(x)
        return x


class UNet(nn.Module):
    """Conditional U-Net with diffusers ``UNet2DConditionModel`` structure, names and config.

    ``apply(params, x, t, context=None, class_labels=None, train=False, *, text_embeds=None, time_ids=None)``:
      x [B, H, W, in_channels] (NHWC; H and W divisible by 2**(number of levels - 1)),
      t [B] or scalar, integer or fractional timesteps,
      context [B, L, cross_attention_dim] when any block has cross-attention, else None,
      class_labels [B] int when the model is class-conditional, else None,
      text_embeds [B, D_pooled] and time_ids [B, N] (float) when ``addition_embed_type="text_time"``,
      train: enables dropout (needs a ``"dropout"`` rng when ``dropout > 0``)
      -> [B, H, W, out_channels] in ``dtype``.

    ``dtype`` is the compute dtype (e.g. bfloat16); ``param_dtype`` the storage dtype; norms and
    the attention softmax always run in float32. ``remat=True`` rematerialises each down/mid/up
    block in the backward pass (``nn.remat``), trading compute for activation memory; ``remat_policy``
    picks the granularity / what is saved (``ldm_jax.models.remat``).
    ``num_classes`` is an ldm_jax extension (see module docstring); do not combine it with
    ``num_class_embeds``.
    """

    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: Sequence[str] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: Sequence[str] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: int | Sequence[int] = 2
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | Sequence[int] | None = 1280
    transformer_layers_per_block: int | Sequence[int] | Sequence[Sequence[int]] = 1
    reverse_transformer_layers_per_block: Sequence[int] | Sequence[Sequence[int]] | None = None
    attention_head_dim: int | Sequence[int] = 8
    num_attention_heads: int | Sequence[int] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    num_class_embeds: int | None = None
    num_classes: int | None = None
    resnet_time_scale_shift: str = "default"
    time_embedding_dim: int | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    attention: str = "auto"
    remat: bool = False
    remat_policy: str = "block"  # ldm_jax.models.remat.REMAT_POLICIES; used when remat=True
    conv_impl: str = "xla"  # ldm_jax.kernels.conv.CONV_IMPL_NAMES; same parameters whichever runs
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    # ----------------------------------------------------------------- configuration helpers

    def __post_init__(self):
        super().__post_init__()
        self.resolved()  # fail at construction, with a message naming the option

    def resolved(self) -> dict[str, Any]:
        """Per-block settings after diffusers' broadcasting rules (raises ValueError on bad config)."""
        n = len(self.block_out_channels)
        if n < 1:
            raise ValueError("block_out_channels must not be empty")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"down_block_types={tuple(self.down_block_types)} and up_block_types={tuple(self.up_block_types)} "
                f"must both have one entry per block_out_channels entry ({n})"
            )
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                raise ValueError(f"unsupported down block type {t!r}; supported: {DOWN_BLOCK_TYPES}")
        for t in self.up_block_types:
            if t not in UP_BLOCK_TYPES:
                raise ValueError(f"unsupported up block type {t!r}; supported: {UP_BLOCK_TYPES}")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"unsupported mid_block_type {self.mid_block_type!r}; supported: {MID_BLOCK_TYPES}")
        if self.addition_embed_type not in ADDITION_EMBED_TYPES:
            raise ValueError(
                f"unsupported addition_embed_type {self.addition_embed_type!r}; supported: {ADDITION_EMBED_TYPES}"
            )
        if self.addition_embed_type == "text_time":
            for name in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                value = getattr(self, name)
                if not isinstance(value, int) or value < 1:
                    raise ValueError(f"addition_embed_type='text_time' needs {name} >= 1, got {value!r}")
        if self.resnet_time_scale_shift not in ("default", "scale_shift"):
            raise ValueError(f"unsupported resnet_time_scale_shift {self.resnet_time_scale_shift!r}")
        if self.num_classes is not None and self.num_class_embeds is not None:
            raise ValueError(
                f"set num_classes={self.num_classes} (ldm_jax, adds a null label) or "
                f"num_class_embeds={self.num_class_embeds} (diffusers, table size as given), not both"
            )
        for name in ("num_classes", "num_class_embeds"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1")
        for name in ("conv_in_kernel", "conv_out_kernel"):
            k = getattr(self, name)
            if k < 1 or k % 2 == 0:
                raise ValueError(f"{name}={k} must be a positive odd integer")
        heads = _per_block(
            self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim,
            n,
            "num_attention_heads" if self.num_attention_heads is not None else "attention_head_dim",
        )
        cross = _per_block(self.cross_attention_dim, n, "cross_attention_dim")
        layers = _per_block(self.layers_per_block, n, "layers_per_block")
        depth_down, depth_mid, depth_up = self._transformer_depths(layers)
        channels = tuple(int(c) for c in self.block_out_channels)
        for i, c in enumerate(channels):
            if c % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels[{i}]={c} is not divisible by norm_num_groups={self.norm_num_groups}"
                )
        attn_down = tuple(t == "CrossAttnDownBlock2D" for t in self.down_block_types)
        attn_up = tuple(t == "CrossAttnUpBlock2D" for t in self.up_block_types)
        attn_mid = self.mid_block_type == "UNetMidBlock2DCrossAttn"
        for i in range(n):
            uses_attention = attn_down[i] or attn_up[n - 1 - i] or (attn_mid and i == n - 1)
            if uses_attention:
                if heads[i] is None or heads[i] < 1:
                    raise ValueError(f"attention heads for block {i} must be >= 1, got {heads[i]}")
                if cross[i] is None:
                    raise ValueError(f"cross_attention_dim must be set for the cross-attention block {i}")
        if self.num_classes is not None:
            class_rows = self.num_classes + 1
        else:
            class_rows = self.num_class_embeds
        return dict(
            n=n,
            channels=channels,
            heads=heads,
            cross=cross,
            layers=layers,
            depth_down=depth_down,
            depth_mid=depth_mid,
            depth_up=depth_up,
            attn_down=attn_down,
            attn_up=attn_up,
            attn_mid=attn_mid,
            class_rows=class_rows,
            time_embed_dim=self.time_embedding_dim or 4 * channels[0],
        )

    def _transformer_depths(self, layers: tuple[int, ...]):
        """Per-layer transformer depths of the down blocks, the mid block and the up blocks
        (in execution order), following diffusers: the mid block takes the last down level's
        (first) depth; the up blocks take ``reverse_transformer_layers_per_block`` if given,
        else the down levels' entries reversed (SDXL base: [1, 2, 10] down, [10, 2, 1] up).
        Per-layer (nested) lists need the explicit reverse list, as in diffusers."""
        n = len(layers)
        name = "transformer_layers_per_block"
        per_level = _per_block(self.transformer_layers_per_block, n, name, nested=True)
        down = tuple(_per_layer(d, layers[i], name) for i, d in enumerate(per_level))
        mid = down[-1][0]
        reverse = self.reverse_transformer_layers_per_block
        if reverse is None:
            if any(not isinstance(d, int) for d in per_level):
                raise ValueError(
                    f"{name}={self.transformer_layers_per_block!r} has per-layer lists: "
                    "reverse_transformer_layers_per_block must be given too"
                )
            reverse = per_level[::-1]
        reverse = _per_block(reverse, n, "reverse_transformer_layers_per_block", nested=True)
        up = tuple(
            _per_layer(d, layers[::-1][i] + 1, "reverse_transformer_layers_per_block") for i, d in enumerate(reverse)
        )
        return down, mid, up

    @property
    def num_time_ids(self) -> int | None:
        """How many time ids ``dummy_inputs`` passes to a "text_time" model (the SDXL base's 6
        when they fit, else 1). Only ``text_embeds`` width + ``time_ids`` count x
        ``addition_time_embed_dim`` is fixed by the weights; the split is the caller's (SDXL
        base: 1280 + 6 x 256; refiner: 1280 + 5 x 256 with the aesthetic score)."""
        if self.addition_embed_type != "text_time":
            return None
        return 6 if self.projection_class_embeddings_input_dim > 6 * self.addition_time_embed_dim else 1

    @property
    def null_class_label(self) -> int | None:
        """The label reserved for "no class" (classifier-free guidance), or None when the model
        was not built with ``num_classes``."""
        return self.num_classes

    @property
    def downsample_factor(self) -> int:
        """H and W must be multiples of this."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def uses_cross_attention(self) -> bool:
        r = self.resolved()
        return any(r["attn_down"]) or any(r["attn_up"]) or r["attn_mid"]

    def dummy_inputs(self, batch_size: int = 1, spatial: int | None = None) -> dict[str, Any]:
        """Smallest valid inputs (for ``init`` / ``jax.eval_shape``): keyword arguments of ``apply``."""
        r = self.resolved()
        s = spatial or self.downsample_factor
        out = dict(
            x=jnp.zeros((batch_size, s, s, self.in_channels), jnp.float32),
            t=jnp.zeros((batch_size,), jnp.float32),
        )
        if self.uses_cross_attention:
            dims = {c for c in r["cross"] if c is not None}
            out["context"] = jnp.zeros((batch_size, 1, max(dims)), jnp.float32)
        if r["class_rows"] is not None:
            out["class_labels"] = jnp.zeros((batch_size,), jnp.int32)
        if self.addition_embed_type == "text_time":
            k = self.num_time_ids
            width = self.projection_class_embeddings_input_dim - k * self.addition_time_embed_dim
            out["text_embeds"] = jnp.zeros((batch_size, width), jnp.float32)
            out["time_ids"] = jnp.zeros((batch_size, k), jnp.float32)
        return out

    def _check_text_time(self, batch: int, text_embeds, time_ids) -> None:
        if text_embeds is None or time_ids is None:
            raise ValueError(
                "this U-Net has addition_embed_type='text_time': text_embeds [B, D_pooled] and time_ids [B, N] "
                "are required (SDXL: pooled text embedding and original size, crop top-left, target size)"
            )
        if text_embeds.ndim != 2 or text_embeds.shape[0] != batch:
            raise ValueError(f"text_embeds must be [B={batch}, D], got shape {text_embeds.shape}")
        if time_ids.ndim != 2 or time_ids.shape[0] != batch:
            raise ValueError(f"time_ids must be [B={batch}, N], got shape {time_ids.shape}")
        width = text_embeds.shape[1] + time_ids.shape[1] * self.addition_time_embed_dim
        if width != self.projection_class_embeddings_input_dim:
            raise ValueError(
                f"text_embeds width {text_embeds.shape[1]} + {time_ids.shape[1]} time ids x addition_time_embed_dim "
                f"{self.addition_time_embed_dim} = {width} != projection_class_embeddings_input_dim "
                f"{self.projection_class_embeddings_input_dim}"
            )

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> "UNet":
        """Build from a diffusers ``UNet2DConditionModel`` config dict (``config.json``).

        ``overrides`` sets module-only attributes such as ``dtype``, ``param_dtype``, ``remat``,
        ``attention``. Options this module does not implement raise ValueError
        naming the option; unknown keys raise too, rather than being silently ignored.
        """
        return cls(**diffusers_config_to_kwargs(config), **overrides)

    def to_diffusers_config(self) -> dict[str, Any]:
        """A ``config.json`` dict that ``UNet2DConditionModel.from_config`` builds the same network from.

        ``num_classes`` is written as ``num_class_embeds = num_classes + 1`` plus the private key
        ``_ldm_jax_num_classes`` (diffusers ignores keys starting with "_") so that loading the
        folder back into ldm_jax restores the null label.
        """
        return unet_to_diffusers_config(self)

    # ----------------------------------------------------------------- forward

    @nn.compact
    def __call__(
        self,
        x,
        t,
        context=None,
        class_labels=None,
        train: bool = False,
        *,
        text_embeds=None,
        time_ids=None,
        down_block_additional_residuals=None,
        mid_block_additional_residual=None,
    ):
        # text_embeds / time_ids: SDXL's micro-conditioning (addition_embed_type="text_time").
        # The two residual arguments are ControlNet's outputs (already scaled), added as in
        # diffusers: one per skip connection, and one to the mid-block output.
        r = self.resolved()
        n = r["n"]
        channels = r["channels"]
        deterministic = not train
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x must be [B, H, W, {self.in_channels}] (NHWC), got shape {x.shape}")
        b, hgt, wid, _ = x.shape
        f = self.downsample_factor
        if hgt % f or wid % f:
            raise ValueError(f"x spatial size {(hgt, wid)} must be divisible by {f} (2 ** (levels - 1))")
        t = jnp.asarray(t)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (b,))
        if t.shape != (b,):
            raise ValueError(f"t must be a scalar or [B]=[{b}], got shape {t.shape}")
        if self.uses_cross_attention:
            if context is None:
                raise ValueError("this U-Net has cross-attention blocks: context [B, L, D] is required")
            if context.ndim != 3 or context.shape[0] != b:
                raise ValueError(f"context must be [B={b}, L, D], got shape {context.shape}")
            used = {r["cross"][i] for i in range(n) if r["attn_down"][i] or r["attn_up"][n - 1 - i]}
            if r["attn_mid"]:
                used.add(r["cross"][-1])
            if any(d != context.shape[-1] for d in used):
                raise ValueError(
                    f"context feature size {context.shape[-1]} != cross_attention_dim {self.cross_attention_dim}"
                )
        elif context is not None:
            raise ValueError("this U-Net has no cross-attention blocks; pass context=None")
        if r["class_rows"] is not None:
            if class_labels is None:
                hint = f" (use {self.null_class_label} for 'no class')" if self.num_classes is not None else ""
                raise ValueError(f"this U-Net is class-conditional: class_labels [B] are required{hint}")
            class_labels = jnp.asarray(class_labels)
            if class_labels.shape != (b,):
                raise ValueError(f"class_labels must be [B]=[{b}], got shape {class_labels.shape}")
        elif class_labels is not None:
            raise ValueError("class_labels given but the U-Net has no class embedding (set num_classes)")
        if self.addition_embed_type == "text_time":
            self._check_text_time(b, text_embeds, time_ids)
        elif text_embeds is not None or time_ids is not None:
            raise ValueError("text_embeds/time_ids given but the U-Net has no addition_embed_type='text_time'")

        # Time (and class) embedding shared by every ResnetBlock.
        temb = timestep_embedding(
            t, channels[0], flip_sin_to_cos=self.flip_sin_to_cos, downscale_freq_shift=self.freq_shift
        )
        emb = TimestepEmbedding(r["time_embed_dim"], name="time_embedding", **kw)(temb.astype(self.dtype))
        if r["class_rows"] is not None:
            class_emb = P.embed(r["class_rows"], r["time_embed_dim"], name="class_embedding", **kw)(class_labels)
            emb = emb + class_emb.astype(self.dtype)
        if self.addition_embed_type == "text_time":
            # SDXL micro-conditioning: each time id (sizes, crop, aesthetic score) gets its own
            # sinusoidal embedding, concatenated after the pooled text embedding.
            b_ids, k = time_ids.shape
            time_embeds = timestep_embedding(
                time_ids.reshape(-1),
                self.addition_time_embed_dim,
                flip_sin_to_cos=self.flip_sin_to_cos,
                downscale_freq_shift=self.freq_shift,
            ).reshape(b_ids, k * self.addition_time_embed_dim)
            add = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1).astype(self.dtype)
            emb = emb + TimestepEmbedding(r["time_embed_dim"], name="add_embedding", **kw)(add)

        pad = (self.conv_in_kernel - 1) // 2
        h = P.conv(
            channels[0], (self.conv_in_kernel,) * 2, padding=((pad, pad), (pad, pad)), name="conv_in",
            impl=self.conv_impl, **kw
        )(x.astype(self.dtype))

        block_kw = dict(
            use_linear_projection=self.use_linear_projection,
            norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps,
            dropout=self.dropout,
            time_embedding_norm=self.resnet_time_scale_shift,
            attention=self.attention,
            conv_impl=self.conv_impl,
            **kw,
        )
        down_cls, mid_cls, up_cls = DownBlock, MidBlock, UpBlock
        policy = checkpoint_policy(self.remat_policy) if self.remat else None  # validates the name
        if self.remat and self.remat_policy == "layer":
            block_kw["remat_layers"] = True
        elif self.remat:
            # static: the python bool `deterministic` (argument 0 is the module itself).
            down_cls = nn.remat(DownBlock, static_argnums=(4,), policy=policy)
            mid_cls = nn.remat(MidBlock, static_argnums=(4,), policy=policy)
            up_cls = nn.remat(UpBlock, static_argnums=(5,), policy=policy)

        skips = [h]
        for i in range(n):
            h, res = down_cls(
                out_channels=channels[i],
                num_layers=r["layers"][i],
                add_downsample=i < n - 1,
                has_attention=r["attn_down"][i],
                heads=r["heads"][i] or 1,
                transformer_depth=r["depth_down"][i],
                name=f"down_blocks_{i}",
                **block_kw,
            )(h, emb, context, deterministic)
            skips.extend(res)

        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"down_block_additional_residuals has {len(down_block_additional_residuals)} entries, "
                    f"the U-Net has {len(skips)} skip connections"
                )
            skips = [s + res.astype(s.dtype) for s, res in zip(skips, down_block_additional_residuals)]

        if self.mid_block_type is not None:
            h = mid_cls(
                has_attention=r["attn_mid"],
                heads=r["heads"][-1] or 1,
                transformer_depth=r["depth_mid"],
                output_scale_factor=self.mid_block_scale_factor,
                name="mid_block",
                **block_kw,
            )(h, emb, context, deterministic)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual.astype(h.dtype)

        rev_channels = channels[::-1]
        for i in range(n):
            num_layers = r["layers"][::-1][i] + 1
            res, skips = tuple(skips[-num_layers:]), skips[:-num_layers]
            h = up_cls(
                out_channels=rev_channels[i],
                num_layers=num_layers,
                add_upsample=i < n - 1,
                has_attention=r["attn_up"][i],
                heads=r["heads"][::-1][i] or 1,
                transformer_depth=r["depth_up"][i],
                name=f"up_blocks_{i}",
                **block_kw,
            )(h, res, emb, context, deterministic)

        h = P.group_norm(
            self.norm_num_groups, epsilon=self.norm_eps, param_dtype=self.param_dtype, name="conv_norm_out"
        )(h)
        h = nn.silu(h).astype(self.dtype)
        pad = (self.conv_out_kernel - 1) // 2
        return P.conv(
            self.out_channels, (self.conv_out_kernel,) * 2, padding=((pad, pad), (pad, pad)), name="conv_out",
            impl=self.conv_impl, **kw
        )(h)
