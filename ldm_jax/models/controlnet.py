"""ControlNet (Zhang et al. 2023), mirroring diffusers' ``ControlNetModel``.

A trainable copy of the U-Net's encoder (``conv_in``, time/class embedding, down blocks, mid
block; the block modules of ``ldm_jax.models.unet``, so the copied params have the U-Net's
names) reads the noisy latent plus an embedded control image, and "zero convolutions" (1x1
convs initialised to zero) turn each skip connection and the mid-block output into residuals
that the frozen U-Net adds (``UNet.__call__(..., down_block_additional_residuals=...,
mid_block_additional_residual=...)``). Parameter names follow diffusers
(``controlnet_cond_embedding/blocks_3``, ``controlnet_down_blocks_4``, ``controlnet_mid_block``).

    controlnet, cn_params = controlnet_from_unet(unet, unet_params, jax.random.PRNGKey(0))
    down, mid = controlnet.apply({"params": cn_params}, x, t, context, control_image, conditioning_scale=1.0)
    eps = unet.apply({"params": unet_params}, x, t, context,
                     down_block_additional_residuals=down, mid_block_additional_residual=mid)

Several ControlNets: add their (each scaled) residuals, :func:`sum_residuals`, as diffusers'
``MultiControlNetModel`` does. :class:`ControlledUNet` is the pair (or the U-Net and several
ControlNets) as one denoiser, called like the U-Net with an extra ``control`` input; training
(``ldm_jax.training.stages.controlnet``) and the one generation program both call it.

``control_image`` is NHWC at ``2 ** (len(conditioning_embedding_out_channels) - 1)`` times the
latent size (8x for SD's default ``(16, 32, 96, 256)``), values in [0, 1] as diffusers' pipelines
feed it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from ldm_jax.models import partitioning as P
from ldm_jax.models.embeddings import TimestepEmbedding, timestep_embedding
from ldm_jax.models.unet import DownBlock, MidBlock, UNet, diffusers_config_to_kwargs

Dtype = Any

# ControlNet config keys that the U-Net does not have.
_CONTROLNET_KEYS = (
    "conditioning_channels",
    "conditioning_embedding_out_channels",
    "controlnet_conditioning_channel_order",
    "global_pool_conditions",
)
# U-Net attributes a ControlNet copies (the encoder half of the U-Net's config).
_SHARED = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type", "block_out_channels",
    "layers_per_block", "mid_block_scale_factor", "norm_num_groups", "norm_eps", "cross_attention_dim",
    "transformer_layers_per_block", "attention_head_dim", "num_attention_heads", "use_linear_projection",
    "upcast_attention", "num_class_embeds", "num_classes", "resnet_time_scale_shift", "attention",
    "conv_impl", "dtype", "param_dtype",
)
# U-Net config keys of SDXL's micro-conditioning, which this ControlNet does not have.
_SDXL_KEYS = ("addition_embed_type", "addition_time_embed_dim", "projection_class_embeddings_input_dim")
_COPIED_FROM_UNET = ("conv_in", "time_embedding", "class_embedding", "down_blocks_", "mid_block")


def _zero_conv(features: int, name: str, **kw) -> nn.Conv:
    return P.conv(features, (1, 1), padding="VALID", kernel_init=nn.initializers.zeros_init(), name=name, **kw)


class ControlNetConditioningEmbedding(nn.Module):
    """diffusers ``ControlNetConditioningEmbedding``: conv3x3 -> SiLU, then per step
    (conv3x3 -> SiLU -> stride-2 conv3x3 -> SiLU), then a zero-initialised conv3x3 to
    ``conditioning_embedding_channels``. Shapes: [B, H, W, C] -> [B, H / 2**(n-1), W / 2**(n-1), D]."""

    conditioning_embedding_channels: int
    block_out_channels: Sequence[int] = (16, 32, 96, 256)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, cond):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, padding=((1, 1), (1, 1)))
        ch = tuple(self.block_out_channels)
        h = nn.silu(P.conv(ch[0], (3, 3), name="conv_in", **kw)(cond.astype(self.dtype)))
        for i in range(len(ch) - 1):
            h = nn.silu(P.conv(ch[i], (3, 3), name=f"blocks_{2 * i}", **kw)(h))
            h = nn.silu(P.conv(ch[i + 1], (3, 3), strides=(2, 2), name=f"blocks_{2 * i + 1}", **kw)(h))
        return P.conv(
            self.conditioning_embedding_channels, (3, 3), kernel_init=nn.initializers.zeros_init(),
            name="conv_out", **kw,
        )(h)


class ControlNet(nn.Module):
    """diffusers ``ControlNetModel`` (SD 1.x/2.x options; fields as in :class:`UNet`).

    ``apply(params, x, t, context, control_image, conditioning_scale=1.0, class_labels=None,
    guess_mode=False, train=False)`` -> ``(down_residuals, mid_residual)``: one [B, h, w, c]
    residual per U-Net skip connection (``conv_in`` output, each resnet/attention layer and each
    downsampler, in order) and one for the mid block, all multiplied by ``conditioning_scale``
    (``guess_mode``: by ``logspace(-1, 0)`` ramps times the scale, as diffusers).
    """

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: Sequence[str] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D",
    )
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
    layers_per_block: int | Sequence[int] = 2
    mid_block_scale_factor: float = 1.0
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
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: Sequence[int] = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    attention: str = "auto"  # attention backend (ldm_jax.kernels)
    # ldm_jax.kernels.conv formulation of the encoder's and zero convolutions (as UNet.conv_impl;
    # same parameters whichever runs). The conditioning embedding keeps lax.conv.
    conv_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        super().__post_init__()
        if self.mid_block_type not in ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"):
            raise ValueError(f"unsupported ControlNet mid_block_type {self.mid_block_type!r}")
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(
                f"controlnet_conditioning_channel_order must be 'rgb' or 'bgr', "
                f"got {self.controlnet_conditioning_channel_order!r}"
            )
        if not self.conditioning_embedding_out_channels:
            raise ValueError("conditioning_embedding_out_channels must not be empty")
        self.encoder_config().resolved()  # validates the shared U-Net options

    def encoder_config(self) -> UNet:
        """A U-Net with the same encoder (up blocks mirrored): resolves per-block settings with
        the U-Net's rules, so both networks agree on heads, depths and skip counts."""
        up = tuple(
            "CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D"
            for t in reversed(self.down_block_types)
        )
        # parent=None: a detached config object, not a submodule of this ControlNet.
        return UNet(up_block_types=up, parent=None, **{k: getattr(self, k) for k in _SHARED})

    @property
    def control_downsample_factor(self) -> int:
        """The control image is this many times the latent's spatial size."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_unet(cls, unet: UNet, **controlnet_options) -> "ControlNet":
        """The ControlNet matching ``unet``'s encoder (diffusers ``ControlNetModel.from_unet``)."""
        return cls(**{k: getattr(unet, k) for k in _SHARED}, **controlnet_options)

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], **overrides) -> "ControlNet":
        """From a diffusers ``ControlNetModel`` ``config.json`` dict (unsupported options raise)."""
        config = dict(config)
        class_name = config.pop("_class_name", "ControlNetModel")
        if class_name != "ControlNetModel":
            raise ValueError(f"config _class_name={class_name!r} is not 'ControlNetModel'")
        own = {k: config.pop(k) for k in _CONTROLNET_KEYS if k in config}
        if own.get("conditioning_embedding_out_channels") is not None:
            own["conditioning_embedding_out_channels"] = tuple(own["conditioning_embedding_out_channels"])
        kwargs = diffusers_config_to_kwargs({**config, "_class_name": "UNet2DConditionModel"})
        kwargs.pop("reverse_transformer_layers_per_block", None)  # up blocks only: a ControlNet has none
        # SDXL's micro-conditioning keys: a ControlNet for an SDXL U-Net is not built yet.
        for key in _SDXL_KEYS:
            value = kwargs.pop(key, None)
            if value is not None:
                raise ValueError(f"unsupported ControlNetModel option {key}={value!r} (SDXL ControlNets are not supported yet)")
        return cls(**kwargs, **own, **overrides)

    def to_diffusers_config(self) -> dict[str, Any]:
        """A ``config.json`` dict that ``ControlNetModel.from_config`` builds the same network from."""
        unet_cfg = self.encoder_config().to_diffusers_config()
        drop = ("up_block_types", "out_channels", "sample_size", "dropout", "time_embedding_type",
                "time_embedding_dim", "conv_in_kernel", "conv_out_kernel", "center_input_sample", "_class_name",
                "dual_cross_attention", "reverse_transformer_layers_per_block",
                "_ldm_jax_num_classes")
        cfg = {k: v for k, v in unet_cfg.items() if k not in drop}
        cfg.update(
            _class_name="ControlNetModel",
            conditioning_channels=self.conditioning_channels,
            conditioning_embedding_out_channels=list(self.conditioning_embedding_out_channels),
            controlnet_conditioning_channel_order=self.controlnet_conditioning_channel_order,
            global_pool_conditions=self.global_pool_conditions,
        )
        if self.num_classes is not None:
            cfg["_ldm_jax_num_classes"] = self.num_classes
        return cfg

    def dummy_inputs(self, batch_size: int = 1) -> dict[str, Any]:
        """Smallest valid inputs (for ``init`` / ``jax.eval_shape``): keyword arguments of ``apply``."""
        unet = self.encoder_config()
        out = unet.dummy_inputs(batch_size)
        out.pop("x")
        s = unet.downsample_factor
        out["x"] = jnp.zeros((batch_size, s, s, self.in_channels), jnp.float32)
        c = s * self.control_downsample_factor
        out["control_image"] = jnp.zeros((batch_size, c, c, self.conditioning_channels), jnp.float32)
        return out

    @nn.compact
    def __call__(
        self, x, t, context=None, control_image=None, conditioning_scale=1.0, class_labels=None,
        guess_mode: bool = False, train: bool = False,
    ):
        unet = self.encoder_config()
        r = unet.resolved()
        n, channels = r["n"], r["channels"]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"x must be [B, H, W, {self.in_channels}] (NHWC), got shape {x.shape}")
        b, hgt, wid, _ = x.shape
        f = self.control_downsample_factor
        want = (b, hgt * f, wid * f, self.conditioning_channels)
        if control_image is None or tuple(control_image.shape) != want:
            got = None if control_image is None else tuple(control_image.shape)
            raise ValueError(
                f"control_image must be [B, H*{f}, W*{f}, {self.conditioning_channels}] = {want}, got {got}"
            )
        t = jnp.asarray(t)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (b,))

        temb = timestep_embedding(
            t, channels[0], flip_sin_to_cos=self.flip_sin_to_cos, downscale_freq_shift=self.freq_shift
        )
        emb = TimestepEmbedding(r["time_embed_dim"], name="time_embedding", **kw)(temb.astype(self.dtype))
        if r["class_rows"] is not None:
            if class_labels is None:
                raise ValueError("this ControlNet is class-conditional: class_labels [B] are required")
            class_emb = P.embed(r["class_rows"], r["time_embed_dim"], name="class_embedding", **kw)(class_labels)
            emb = emb + class_emb.astype(self.dtype)

        if self.controlnet_conditioning_channel_order == "bgr":
            control_image = control_image[..., ::-1]
        h = P.conv(
            channels[0], (3, 3), padding=((1, 1), (1, 1)), name="conv_in", impl=self.conv_impl, **kw
        )(x.astype(self.dtype))
        h = h + ControlNetConditioningEmbedding(
            channels[0], tuple(self.conditioning_embedding_out_channels), name="controlnet_cond_embedding", **kw
        )(control_image)

        block_kw = dict(
            use_linear_projection=self.use_linear_projection,
            norm_num_groups=self.norm_num_groups,
            norm_eps=self.norm_eps,
            time_embedding_norm=self.resnet_time_scale_shift,
            attention=self.attention,
            conv_impl=self.conv_impl,
            **kw,
        )
        deterministic = not train
        skips = [h]
        for i in range(n):
            h, res = DownBlock(
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
        h = MidBlock(
            has_attention=r["attn_mid"],
            heads=r["heads"][-1] or 1,
            transformer_depth=r["depth_mid"],
            output_scale_factor=self.mid_block_scale_factor,
            name="mid_block",
            **block_kw,
        )(h, emb, context, deterministic)

        zkw = dict(impl=self.conv_impl, **kw)
        down = [_zero_conv(s.shape[-1], f"controlnet_down_blocks_{j}", **zkw)(s) for j, s in enumerate(skips)]
        mid = _zero_conv(h.shape[-1], "controlnet_mid_block", **zkw)(h)
        scale = jnp.asarray(conditioning_scale, jnp.float32)  # scalar or per example [B, 1, 1, 1]
        if guess_mode and not self.global_pool_conditions:
            # the ramp is per residual, the scale per example: multiply them one residual at a time
            ramp = jnp.logspace(-1.0, 0.0, len(down) + 1)
            down = [d * (ramp[j] * scale).astype(d.dtype) for j, d in enumerate(down)]
            mid = mid * (ramp[-1] * scale).astype(mid.dtype)
        else:
            down = [d * scale.astype(d.dtype) for d in down]
            mid = mid * scale.astype(mid.dtype)
        if self.global_pool_conditions:
            down = [jnp.mean(d, axis=(1, 2), keepdims=True) for d in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return tuple(down), mid


def sum_residuals(outputs: Sequence[tuple[Sequence[jax.Array], jax.Array]]):
    """Residuals of several ControlNets (each already scaled) added up, as diffusers'
    ``MultiControlNetModel``: ``[(down, mid), ...]`` -> ``(down, mid)``."""
    if not outputs:
        raise ValueError("sum_residuals needs at least one ControlNet output")
    down, mid = outputs[0]
    down = list(down)
    for other_down, other_mid in outputs[1:]:
        if len(other_down) != len(down):
            raise ValueError(f"ControlNet outputs have {len(down)} and {len(other_down)} down residuals")
        down = [a + b for a, b in zip(down, other_down)]
        mid = mid + other_mid
    return tuple(down), mid


@dataclasses.dataclass(frozen=True)
class ControlledUNet:
    """A frozen-or-not U-Net under ControlNets, with the U-Net's ``apply`` signature plus
    ``control``; every other attribute (``in_channels``, ``sample_size``, ...) is the U-Net's.

    ``apply({"params": {"unet": ..., "controlnets": (p_1, ..., p_k)}}, x, t, context,
    class_labels, control=((image_1, scale_1), ...), train=False, rngs=None)``: ControlNet i
    reads ``image_i`` [B, H, W, C] in [0, 1] and its residuals are multiplied by ``scale_i``
    (a scalar or per-example [B]); the summed residuals go into the U-Net (diffusers'
    ``StableDiffusionControlNetPipeline`` denoiser). ``guess_mode=True`` ramps each
    ControlNet's residuals (diffusers' guess mode; the pipeline also zeroes the scales of the
    unconditional guidance branch, see ``ldm_jax.ldm.generation``).
    """

    unet: UNet
    controlnets: tuple[ControlNet, ...]

    def __post_init__(self):
        if not self.controlnets:
            raise ValueError("ControlledUNet needs at least one ControlNet")
        for i, cn in enumerate(self.controlnets):
            if cn.in_channels != self.unet.in_channels:
                raise ValueError(
                    f"ControlNet {i} reads {cn.in_channels} input channels, the U-Net {self.unet.in_channels}"
                )

    def __getattr__(self, name):
        if name in ("unet", "controlnets") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.unet, name)

    def residuals(
        self, controlnet_params, x, t, context, class_labels, control, train=False, rngs=None, guess_mode=False
    ):
        """The summed, scaled residuals ``(down, mid)`` of every ControlNet (``guess_mode``:
        each ControlNet's residuals ramped by ``logspace(-1, 0)`` from the first to the mid
        block, as diffusers' ``ControlNetModel(guess_mode=True)``)."""
        if len(control) != len(self.controlnets) or len(controlnet_params) != len(self.controlnets):
            raise ValueError(
                f"{len(self.controlnets)} ControlNets but {len(control)} control inputs and "
                f"{len(controlnet_params)} parameter trees"
            )
        outputs = []
        for cn, params, (image, scale) in zip(self.controlnets, controlnet_params, control):
            scale = jnp.asarray(scale, jnp.float32)
            if scale.ndim == 1:  # per example
                scale = scale[:, None, None, None]
            outputs.append(cn.apply(
                {"params": params}, x, t, context, image, conditioning_scale=scale, class_labels=class_labels,
                guess_mode=guess_mode, train=train, rngs=rngs,
            ))
        return sum_residuals(outputs)

    def apply(
        self, variables, x, t, context=None, class_labels=None, train=False, *, control, rngs=None, guess_mode=False
    ):
        params = variables["params"]
        down, mid = self.residuals(
            params["controlnets"], x, t, context, class_labels, control, train, rngs, guess_mode=guess_mode
        )
        return self.unet.apply(
            {"params": params["unet"]}, x, t, context, class_labels, train,
            down_block_additional_residuals=down, mid_block_additional_residual=mid, rngs=rngs,
        )


@functools.partial(jax.jit, static_argnums=1)
def _torch_default_init(key, shapes):
    """torch's default Conv2d init (what diffusers' from_unet leaves on the conditioning
    embedding): weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = in * kh * kw.
    Biases follow their kernel in ``shapes`` (sorted paths: ``bias`` before ``kernel``)."""
    u = jax.random.uniform(key, (sum(math.prod(s) for s in shapes),), jnp.float32, -1.0, 1.0)
    fan_in = {}
    for i, s in enumerate(shapes):
        if len(s) == 4:
            fan_in[i] = math.prod(s[:-1])
    out, offset = [], 0
    for i, s in enumerate(shapes):
        fan = fan_in[i] if len(s) == 4 else fan_in[i + 1]  # a bias is listed right before its kernel
        out.append((u[offset:offset + math.prod(s)] / math.sqrt(fan)).reshape(s))
        offset += math.prod(s)
    return out


def controlnet_from_unet(
    unet: UNet, unet_params, key: jax.Array, **controlnet_options
) -> tuple[ControlNet, dict]:
    """``(controlnet, params)`` initialised as diffusers' ``ControlNetModel.from_unet``: conv_in,
    time/class embedding, down blocks and mid block copied from ``unet_params``; zero
    convolutions (and the embedding's ``conv_out``) zero; the conditioning embedding's other
    convs drawn from ``key`` with torch's default Conv2d init, as diffusers leaves them."""
    controlnet = ControlNet.from_unet(unet, **controlnet_options)
    boxed = jax.eval_shape(lambda: controlnet.init(jax.random.PRNGKey(0), **controlnet.dummy_inputs()))
    abstract = nn.meta.unbox(boxed)["params"]
    emb_paths = tuple(
        (p, tuple(leaf.shape)) for p, leaf in sorted(traverse_util.flatten_dict(abstract).items())
        if p[0] == "controlnet_cond_embedding"
    )
    emb_flat = dict(zip((p for p, _ in emb_paths), _torch_default_init(key, tuple(s for _, s in emb_paths))))
    src = traverse_util.flatten_dict(nn.meta.unbox(unet_params))
    out = {}
    for path, leaf in traverse_util.flatten_dict(abstract).items():
        if path[0].startswith(_COPIED_FROM_UNET):
            value = src[path]
        elif path[0] == "controlnet_cond_embedding" and path[1] != "conv_out":
            value = emb_flat[path]
        else:  # zero convolutions
            value = jnp.zeros(leaf.shape, leaf.dtype)
        if tuple(value.shape) != tuple(leaf.shape):
            raise ValueError(f"{'/'.join(path)}: U-Net param has shape {value.shape}, ControlNet expects {leaf.shape}")
        out[path] = jnp.asarray(value, leaf.dtype)
    return controlnet, traverse_util.unflatten_dict(out)
