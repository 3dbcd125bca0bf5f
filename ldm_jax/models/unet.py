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
  * channel concatenation (inpainting, super-resolution, depth): set ``in_channels`` to the total
    and concatenate along the last axis before calling.
A learned-variance model (improved DDPM) is ``out_channels = 2 * latent_channels``; the caller
splits the output.

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

Dtype = Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None)

# Stable Diffusion v1.x (runwayml/stable-diffusion-v1-5 unet/config.json, model-defining keys).
SD15_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "center_input_sample": False,
}

# Stable Diffusion v2.x (stabilityai/stable-diffusion-2-1 unet/config.json, model-defining keys).
SD2_UNET_CONFIG: dict[str, Any] = {
    **SD15_UNET_CONFIG,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
    "upcast_attention": True,
}


def _per_block(value, n: int, name: str) -> tuple:
    """An int/None broadcast to n blocks, or a sequence of length n."""
    if value is None or isinstance(value, (int, float)):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name}={value!r} must have one entry per block ({n})")
    for v in value:
        if isinstance(v, (list, tuple)):
            raise ValueError(f"{name}={value!r}: nested per-layer lists are not supported")
    return value


def _jsonable(value):
    return list(value) if isinstance(value, (list, tuple)) else value


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
        name=name,
    )


def _transformer(block: nn.Module, channels: int, name: str) -> Transformer2D:
    """The spatial transformer every cross-attention U-Net block builds, from the block's fields."""
    return Transformer2D(
        heads=block.heads,
        head_dim=channels // block.heads,
        depth=block.transformer_depth,
        use_linear_projection=block.use_linear_projection,
        norm_num_groups=block.norm_num_groups,
        attention=block.attention,
        remat=block.remat_layers,
        dtype=block.dtype,
        param_dtype=block.param_dtype,
        name=name,
    )


class DownBlock(nn.Module):
    """diffusers ``DownBlock2D`` (``has_attention=False``) or ``CrossAttnDownBlock2D``:
    ``num_layers`` x (ResnetBlock [-> Transformer2D]) then an optional stride-2 Downsample.

    Shapes: x [B, H, W, C_in], temb [B, D_t], context [B, S, D_ctx] or None ->
    (x [B, H', W', out_channels], skips: one [B, ., ., out_channels] per layer and downsample).
    """

    out_channels: int
    num_layers: int
    add_downsample: bool
    has_attention: bool
    heads: int = 1
    transformer_depth: int = 1
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0
    time_embedding_norm: str = "default"
    attention: str = "auto"
    remat_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        skips = []
        for i in range(self.num_layers):
            x = _resnet(self, self.out_channels, f"resnets_{i}")(x, temb, deterministic)
            if self.has_attention:
                x = _transformer(self, self.out_channels, f"attentions_{i}")(x, context, deterministic)
            skips.append(x)
        if self.add_downsample:
            x = Downsample(self.out_channels, padding="symmetric", name="downsamplers_0", **kw)(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(nn.Module):
    """diffusers ``UNetMidBlock2DCrossAttn`` (ResnetBlock -> Transformer2D -> ResnetBlock) or,
    with ``has_attention=False``, ``UNetMidBlock2D`` as UNet2DConditionModel builds it (a single
    ResnetBlock). Shapes: x [B, H, W, C] -> [B, H, W, C]."""

    has_attention: bool
    heads: int = 1
    transformer_depth: int = 1
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0
    output_scale_factor: float = 1.0
    time_embedding_norm: str = "default"
    attention: str = "auto"
    remat_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, context, deterministic: bool = True):
        channels = x.shape[-1]
        x = _resnet(self, channels, "resnets_0", self.output_scale_factor)(x, temb, deterministic)
        if self.has_attention:
            x = _transformer(self, channels, "attentions_0")(x, context, deterministic)
            x = _resnet(self, channels, "resnets_1", self.output_scale_factor)(x, temb, deterministic)
        return x


class UpBlock(nn.Module):
    """diffusers ``UpBlock2D`` / ``CrossAttnUpBlock2D``: ``num_layers`` x (concat the last skip on
    channels -> ResnetBlock [-> Transformer2D]) then an optional nearest x2 Upsample.

    Shapes: x [B, H, W, C], skips: ``num_layers`` maps consumed last-first ->
    [B, H', W', out_channels].
    """

    out_channels: int
    num_layers: int
    add_upsample: bool
    has_attention: bool
    heads: int = 1
    transformer_depth: int = 1
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    dropout: float = 0.0
    time_embedding_norm: str = "default"
    attention: str = "auto"
    remat_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

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
                x = _transformer(self, self.out_channels, f"attentions_{i}")(x, context, deterministic)
        if self.add_upsample:
            x = Upsample(self.out_channels, name="upsamplers_0", **kw)(x)
        return x


class UNet(nn.Module):
    """Conditional U-Net with diffusers ``UNet2DConditionModel`` structure, names and config.

    ``apply(params, x, t, context=None, class_labels=None, train=False)``:
      x [B, H, W, in_channels] (NHWC; H and W divisible by 2**(number of levels - 1)),
      t [B] or scalar, integer or fractional timesteps,
      context [B, L, cross_attention_dim] when any block has cross-attention, else None,
      class_labels [B] int when the model is class-conditional, else None,
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
    transformer_layers_per_block: int | Sequence[int] = 1
    attention_head_dim: int | Sequence[int] = 8
    num_attention_heads: int | Sequence[int] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    num_class_embeds: int | None = None
    num_classes: int | None = None
    resnet_time_scale_shift: str = "default"
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    attention: str = "auto"
    remat: bool = False
    remat_policy: str = "block"  # ldm_jax.models.remat.REMAT_POLICIES; used when remat=True
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
        depth = _per_block(self.transformer_layers_per_block, n, "transformer_layers_per_block")
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
            depth=depth,
            attn_down=attn_down,
            attn_up=attn_up,
            attn_mid=attn_mid,
            class_rows=class_rows,
            time_embed_dim=self.time_embedding_dim or 4 * channels[0],
        )

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
        return out

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
        r = self.resolved()
        cfg: dict[str, Any] = {
            "_class_name": "UNet2DConditionModel",
            "sample_size": self.sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "center_input_sample": False,
            "flip_sin_to_cos": self.flip_sin_to_cos,
            "freq_shift": self.freq_shift,
            "down_block_types": list(self.down_block_types),
            "mid_block_type": self.mid_block_type,
            "up_block_types": list(self.up_block_types),
            "only_cross_attention": False,
            "block_out_channels": list(r["channels"]),
            "layers_per_block": _jsonable(self.layers_per_block),
            "downsample_padding": 1,
            "mid_block_scale_factor": self.mid_block_scale_factor,
            "dropout": self.dropout,
            "act_fn": "silu",
            "norm_num_groups": self.norm_num_groups,
            "norm_eps": self.norm_eps,
            "cross_attention_dim": _jsonable(self.cross_attention_dim),
            "transformer_layers_per_block": _jsonable(self.transformer_layers_per_block),
            # diffusers refuses num_attention_heads; its attention_head_dim means "heads" anyway.
            "attention_head_dim": _jsonable(
                self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
            ),
            "num_attention_heads": None,
            "dual_cross_attention": False,
            "use_linear_projection": self.use_linear_projection,
            "class_embed_type": None,
            "num_class_embeds": r["class_rows"],
            "upcast_attention": self.upcast_attention,
            "resnet_time_scale_shift": self.resnet_time_scale_shift,
            "time_embedding_type": "positional",
            "time_embedding_dim": self.time_embedding_dim,
            "conv_in_kernel": self.conv_in_kernel,
            "conv_out_kernel": self.conv_out_kernel,
        }
        if self.num_classes is not None:
            cfg["_ldm_jax_num_classes"] = self.num_classes
        return cfg

    # ----------------------------------------------------------------- forward

    @nn.compact
    def __call__(self, x, t, context=None, class_labels=None, train: bool = False):
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

        # Time (and class) embedding shared by every ResnetBlock.
        temb = timestep_embedding(
            t, channels[0], flip_sin_to_cos=self.flip_sin_to_cos, downscale_freq_shift=self.freq_shift
        )
        emb = TimestepEmbedding(r["time_embed_dim"], name="time_embedding", **kw)(temb.astype(self.dtype))
        if r["class_rows"] is not None:
            class_emb = P.embed(r["class_rows"], r["time_embed_dim"], name="class_embedding", **kw)(class_labels)
            emb = emb + class_emb.astype(self.dtype)

        pad = (self.conv_in_kernel - 1) // 2
        h = P.conv(
            channels[0], (self.conv_in_kernel,) * 2, padding=((pad, pad), (pad, pad)), name="conv_in", **kw
        )(x.astype(self.dtype))

        block_kw = dict(
            use_linear_projection=self.use_linear_projection,
            norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps,
            dropout=self.dropout,
            time_embedding_norm=self.resnet_time_scale_shift,
            attention=self.attention,
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
                transformer_depth=r["depth"][i],
                name=f"down_blocks_{i}",
                **block_kw,
            )(h, emb, context, deterministic)
            skips.extend(res)

        if self.mid_block_type is not None:
            h = mid_cls(
                has_attention=r["attn_mid"],
                heads=r["heads"][-1] or 1,
                transformer_depth=r["depth"][-1],
                output_scale_factor=self.mid_block_scale_factor,
                name="mid_block",
                **block_kw,
            )(h, emb, context, deterministic)

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
                transformer_depth=r["depth"][::-1][i],
                name=f"up_blocks_{i}",
                **block_kw,
            )(h, res, emb, context, deterministic)

        h = P.group_norm(
            self.norm_num_groups, epsilon=self.norm_eps, param_dtype=self.param_dtype, name="conv_norm_out"
        )(h)
        h = nn.silu(h).astype(self.dtype)
        pad = (self.conv_out_kernel - 1) // 2
        return P.conv(
            self.out_channels, (self.conv_out_kernel,) * 2, padding=((pad, pad), (pad, pad)), name="conv_out", **kw
        )(h)


# --------------------------------------------------------------------- diffusers config parsing

# Options this module implements, mapped to UNet attribute names (identity).
_SUPPORTED_KEYS = (
    "sample_size",
    "in_channels",
    "out_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "mid_block_type",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "mid_block_scale_factor",
    "dropout",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "upcast_attention",
    "num_class_embeds",
    "resnet_time_scale_shift",
    "time_embedding_dim",
    "conv_in_kernel",
    "conv_out_kernel",
)

# Options accepted only at the value(s) that mean "feature off" (the diffusers defaults).
_ONLY_VALUES: dict[str, tuple] = {
    "center_input_sample": (False,),
    "only_cross_attention": (False,),
    "mid_block_only_cross_attention": (None, False),
    "downsample_padding": (1,),
    "act_fn": ("silu", "swish"),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "resnet_skip_time_act": (False,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
}

# Options that only affect block types / embeddings this module rejects anyway, so any value builds
# the same network (diffusers passes resnet_out_scale_factor only to ResnetDownsampleBlock2D and
# SimpleCrossAttn blocks; addition_embed_type_num_heads only to addition_embed_type="text_image").
_IRRELEVANT_KEYS = ("resnet_out_scale_factor", "addition_embed_type_num_heads")


def diffusers_config_to_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """UNet keyword arguments from a diffusers ``UNet2DConditionModel`` config dict.

    Keys starting with "_" are metadata and skipped, except ``_ldm_jax_num_classes`` (written by
    :meth:`UNet.to_diffusers_config`), which restores ``num_classes``.
    """
    kwargs: dict[str, Any] = {}
    num_classes = config.get("_ldm_jax_num_classes")
    class_name = config.get("_class_name", "UNet2DConditionModel")
    if class_name != "UNet2DConditionModel":
        raise ValueError(f"config _class_name={class_name!r} is not 'UNet2DConditionModel'")
    for key, value in config.items():
        if key.startswith("_") or key in _IRRELEVANT_KEYS:
            continue
        if key in _ONLY_VALUES:
            if value not in _ONLY_VALUES[key]:
                raise ValueError(
                    f"unsupported UNet2DConditionModel option {key}={value!r} "
                    f"(ldm_jax supports only {_ONLY_VALUES[key]})"
                )
            continue
        if key not in _SUPPORTED_KEYS:
            raise ValueError(f"unknown UNet2DConditionModel config key {key!r}={value!r}")
        if isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    if kwargs.get("norm_num_groups", 32) is None:
        raise ValueError("unsupported UNet2DConditionModel option norm_num_groups=None (no output norm)")
    if num_classes is not None:
        rows = kwargs.pop("num_class_embeds", None)
        if rows is not None and rows != num_classes + 1:
            raise ValueError(f"_ldm_jax_num_classes={num_classes} disagrees with num_class_embeds={rows}")
        kwargs["num_classes"] = num_classes
    return kwargs
