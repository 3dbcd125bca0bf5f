"""``Conv``: flax ``nn.Conv``'s parameters (``kernel`` [kh, kw, in, out], ``bias`` [out]) computed
through one of the formulations of :mod:`ldm_jax.kernels.conv` (``impl``).

Same parameter names, shapes and initialisers as ``nn.Conv``, so a checkpoint, a weight
converter or a parity test does not see which formulation ran; ``impl`` is a module-only
attribute. ``impl="xla"`` is ``lax.conv_general_dilated`` as in ``nn.Conv``; ``"auto"`` resolves
per call by platform and shape (:func:`ldm_jax.kernels.conv.select_conv_impl`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.kernels.conv import conv2d, resolve_padding, select_conv_impl

Dtype = Any


class Conv(nn.Module):
    """NHWC 2-D convolution: x [B, H, W, in] -> [B, H', W', features]."""

    features: int
    kernel_size: Sequence[int] = (3, 3)
    strides: Sequence[int] = (1, 1)
    padding: Any = "SAME"
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()
    impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        if x.ndim != 4:
            raise ValueError(f"Conv takes NHWC inputs, got shape {x.shape}")
        kh, kw = tuple(self.kernel_size)
        kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), self.param_dtype)
        padding = resolve_padding(self.padding, (kh, kw), tuple(self.strides), x.shape[1:3])
        x, kernel = x.astype(self.dtype), jnp.asarray(kernel, self.dtype)
        impl = select_conv_impl(self.impl, x.shape, kernel.shape, tuple(self.strides))
        y = conv2d(x, kernel, strides=tuple(self.strides), padding=padding, impl=impl)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + jnp.asarray(bias, self.dtype)
        return y
