"""Convolutional building blocks shared by the U-Net and the autoencoders.

Parameter names follow diffusers (``norm1``, ``conv1``, ``time_emb_proj``, ...), which keeps
the weight converters in ``ldm_jax.interop`` a plain renaming. Inputs are NHWC.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models import partitioning as P

Dtype = Any


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> (+time) -> GroupNorm -> SiLU -> dropout -> conv3x3, plus a
    skip connection (1x1 conv when the channel count changes).

    ``time_embedding_norm="default"`` adds a projection of the time embedding after the first
    conv (Stable Diffusion); ``"scale_shift"`` uses it as ``norm2(h) * (1 + scale) + shift``
    (improved DDPM / ADM). With ``temb=None`` (autoencoders) there is no time projection.

    Shapes: x [B, H, W, C_in], temb [B, D] or None -> [B, H, W, out_channels].
    """

    out_channels: int | None = None
    groups: int = 32
    groups_out: int | None = None
    eps: float = 1e-6
    dropout: float = 0.0
    time_embedding_norm: str = "default"
    use_time_embedding: bool = True
    output_scale_factor: float = 1.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: str = "xla"  # ldm_jax.kernels.conv formulation of the convolutions

    @nn.compact
    def __call__(self, x, temb=None, deterministic: bool = True):
        if self.time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"unknown time_embedding_norm {self.time_embedding_norm!r}")
        in_channels = x.shape[-1]
        out_channels = self.out_channels or in_channels
        groups_out = self.groups_out or self.groups
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, impl=self.conv_impl)

        h = P.group_norm(self.groups, epsilon=self.eps, param_dtype=self.param_dtype, name="norm1")(x)
        h = nn.silu(h).astype(self.dtype)
        h = P.conv(out_channels, (3, 3), name="conv1", **kw)(h)

        scale_shift = None
        if self.use_time_embedding and temb is not None:
            proj_dim = out_channels * (2 if self.time_embedding_norm == "scale_shift" else 1)
            t = P.dense(proj_dim, name="time_emb_proj", dtype=self.dtype, param_dtype=self.param_dtype)(nn.silu(temb).astype(self.dtype))
            t = t[:, None, None, :]
            if self.time_embedding_norm == "default":
                h = h + t
            else:
                scale_shift = jnp.split(t, 2, axis=-1)

        h = P.group_norm(groups_out, epsilon=self.eps, param_dtype=self.param_dtype, name="norm2")(h)
        if scale_shift is not None:
            scale, shift = scale_shift
            h = h * (1 + scale.astype(h.dtype)) + shift.astype(h.dtype)
        h = nn.silu(h).astype(self.dtype)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = P.conv(out_channels, (3, 3), name="conv2", **kw)(h)

        if in_channels != out_channels:
            x = P.conv(out_channels, (1, 1), padding="VALID", name="conv_shortcut", **kw)(x)
        out = x.astype(self.dtype) + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv.

    ``padding="symmetric"`` pads 1 on every side (U-Net); ``"asymmetric"`` pads only the
    bottom/right by 1 and then convolves with no padding (the LDM/SD autoencoder encoder).
    """

    out_channels: int | None = None
    padding: str = "symmetric"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        if self.padding == "symmetric":
            pad = ((1, 1), (1, 1))
        elif self.padding == "asymmetric":
            pad = ((0, 1), (0, 1))
        else:
            raise ValueError(f"unknown Downsample padding {self.padding!r}")
        return P.conv(
            self.out_channels or x.shape[-1],
            (3, 3),
            strides=(2, 2),
            padding=pad,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
            impl=self.conv_impl,
        )(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 conv."""

    out_channels: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    conv_impl: str = "xla"

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        # repeat (not jax.image.resize) so it is exactly nearest-neighbour, like torch's interpolate.
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return P.conv(
            self.out_channels or c, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype, name="conv",
            impl=self.conv_impl,
        )(x)
