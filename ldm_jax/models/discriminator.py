"""PatchGAN discriminator (pix2pix's ``NLayerDiscriminator`` as used by taming / LDM).

Layout, with kernel 4 and padding 1 everywhere::

    conv(ndf, stride 2) -> LeakyReLU(0.2)
    n_layers - 1 times: conv(ndf * min(2**n, 8), stride 2) -> norm -> LeakyReLU(0.2)
    conv(ndf * min(2**n_layers, 8), stride 1) -> norm -> LeakyReLU(0.2)
    conv(1, stride 1)                                   -> per-patch logits

Normalisation: taming uses BatchNorm (or ActNorm). BatchNorm needs mutable running
statistics, which complicate a pure jitted train step and behave differently at
train/eval time and across data-parallel shards; ActNorm needs a data-dependent first
call. We use GroupNorm by default (``norm="group"``): per-sample, no state, identical under
any sharding. ``norm="none"`` removes the norm layers (convs then carry a bias). With a norm
the convs before it have no bias, which the norm's mean subtraction would cancel anyway.

Parameter names are ``main_{i}`` with ``i`` the index in taming's ``nn.Sequential``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models import partitioning as P

Dtype = Any


def patch_logits_size(size: int, n_layers: int) -> int:
    """Spatial size of the logits map for an input of ``size`` pixels."""
    for _ in range(n_layers):
        size = (size + 2 - 4) // 2 + 1
    return size - 2


class NLayerDiscriminator(nn.Module):
    """x [B, H, W, C] -> logits [B, h, w, 1], h = H / 2**n_layers - 2 (for H divisible)."""

    ndf: int = 64
    n_layers: int = 3
    norm: str = "group"
    norm_num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.norm not in ("group", "none"):
            raise ValueError(f"unknown discriminator norm {self.norm!r} (use 'group' or 'none')")
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
        if x.ndim != 4:
            raise ValueError(f"expected NHWC images, got shape {x.shape}")
        for size in x.shape[1:3]:
            if patch_logits_size(size, self.n_layers) < 1:
                raise ValueError(f"image size {size} is too small for a {self.n_layers}-layer PatchGAN")
        use_norm = self.norm == "group"
        init = nn.initializers.normal(stddev=0.02)  # pix2pix / taming weights_init
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=init, padding=((1, 1), (1, 1)))

        index = 0

        def conv(features, stride, bias):
            nonlocal index
            layer = P.conv(features, (4, 4), strides=(stride, stride), use_bias=bias, name=f"main_{index}", **kw)
            index += 1
            return layer

        def norm(h):
            nonlocal index
            if use_norm:
                channels = h.shape[-1]
                if channels % self.norm_num_groups:
                    raise ValueError(
                        f"discriminator width {channels} is not a multiple of norm_num_groups={self.norm_num_groups}"
                    )
                h = P.group_norm(self.norm_num_groups, param_dtype=self.param_dtype, name=f"main_{index}")(h)
                h = h.astype(self.dtype)
                index += 1
            return h

        def act(h):
            nonlocal index
            index += 1
            return nn.leaky_relu(h, negative_slope=0.2)

        h = act(conv(self.ndf, 2, True)(x.astype(self.dtype)))
        mult = 1
        for n in range(1, self.n_layers):
            mult = min(2**n, 8)
            h = act(norm(conv(self.ndf * mult, 2, not use_norm)(h)))
        mult = min(2**self.n_layers, 8)
        h = act(norm(conv(self.ndf * mult, 1, not use_norm)(h)))
        return conv(1, 1, True)(h)
