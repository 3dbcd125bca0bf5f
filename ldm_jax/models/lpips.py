"""LPIPS perceptual distance (Zhang et al. 2018, "lin" variant with VGG16), as used by the
taming / LDM first-stage losses.

    d(x, y) = sum_l mean_{h,w} < w_l, (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|)^2 >

with f_l the VGG16 activations after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, the norm
taken over channels at each position (plus 1e-10), and w_l >= 0 the learned 1x1 "lin"
weights. Inputs in [-1, 1] are first shifted/scaled by LPIPS' fixed per-channel constants.

There are no built-in weights: :func:`ldm_jax.interop.lpips_weights.load_lpips_params` reads
them from a local file. Module parameter names follow torchvision's ``vgg16().features``
indices (``features_0`` ... ``features_28``) and the lpips package (``lin0`` ... ``lin4``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models import partitioning as P

Dtype = Any

# torchvision vgg16().features: (index of each conv, its output channels); "M" is a 2x2 max-pool.
VGG16_FEATURES = (
    (0, 64), (2, 64), "M",
    (5, 128), (7, 128), "M",
    (10, 256), (12, 256), (14, 256), "M",
    (17, 512), (19, 512), (21, 512), "M",
    (24, 512), (26, 512), (28, 512),
)  # fmt: skip
# The ReLU outputs LPIPS compares: after these conv indices (relu1_2 ... relu5_3).
LPIPS_TAP_CONVS = (2, 7, 14, 21, 28)
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# lpips.pretrained_networks ScalingLayer constants (ImageNet statistics mapped to [-1, 1]).
LPIPS_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
LPIPS_SCALE = np.array([0.458, 0.448, 0.450], np.float32)
_NORM_EPS = 1e-10


class VGG16Features(nn.Module):
    """VGG16 conv trunk up to relu5_3. x [B, H, W, 3] -> the 5 LPIPS feature maps."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        taps = []
        h = x.astype(self.dtype)
        for layer in VGG16_FEATURES:
            if layer == "M":
                h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")
                continue
            index, channels = layer
            h = P.conv(channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                       param_dtype=self.param_dtype, name=f"features_{index}")(h)
            h = nn.relu(h)
            if index in LPIPS_TAP_CONVS:
                taps.append(h)
        return taps


def _unit_normalize(f):
    f = f.astype(jnp.float32)
    return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + _NORM_EPS)


class LPIPS(nn.Module):
    """LPIPS distance. x, y [B, H, W, 3] in [-1, 1] -> [B] (float32).

    Gradients flow to ``x`` and ``y``; the weights are meant to stay frozen (pass them with
    ``jax.lax.stop_gradient`` or simply never update them).
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, y):
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS needs two NHWC RGB batches of equal shape, got {x.shape} and {y.shape}")
        batch = x.shape[0]
        both = jnp.concatenate([x, y], axis=0).astype(jnp.float32)
        both = (both - LPIPS_SHIFT) / LPIPS_SCALE
        taps = VGG16Features(dtype=self.dtype, param_dtype=self.param_dtype, name="net")(both)
        total = jnp.zeros((batch,), jnp.float32)
        for k, f in enumerate(taps):
            f = _unit_normalize(f)
            diff = jnp.square(f[:batch] - f[batch:])
            lin = P.conv(1, (1, 1), padding="VALID", use_bias=False, dtype=jnp.float32,
                         param_dtype=self.param_dtype, name=f"lin{k}")
            total = total + jnp.mean(lin(diff)[..., 0], axis=(1, 2))
        return total


def lpips_distance(lpips_params, x, y, dtype: Dtype = jnp.float32):
    """Pure-function LPIPS: params (from ``load_lpips_params``) -> distance [B] between x and y.

    The params are treated as constants (no gradient flows into them).
    """
    return LPIPS(dtype=dtype).apply({"params": jax.lax.stop_gradient(lpips_params)}, x, y)
