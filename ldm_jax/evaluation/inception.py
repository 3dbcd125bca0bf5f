"""Inception-v3 in the FID variant: the TensorFlow graph ``inception-2015-12-05`` that FID, KID,
Inception Score and precision/recall papers report with, as ported to PyTorch by pytorch-fid
(``pytorch_fid.inception.fid_inception_v3``) and used by clean-fid and torch-fidelity. NHWC.

It differs from torchvision's ImageNet Inception-v3 in four places, all reproduced here:
  * 1008 output classes (the 2015 graph's softmax), not 1000;
  * the average-pool branches of the A, C and E blocks exclude the zero padding from the
    average (TensorFlow's ``avg_pool``; ``count_include_pad=False``);
  * the last E block (``Mixed_7c``) pools its pool branch with a 3x3 *max* pool;
  * BatchNorm epsilon 1e-3 (inference statistics only).

Input convention (pytorch-fid's ``InceptionV3(resize_input=True, normalize_input=True)``):
float RGB in [0, 1], any size; resized to 299x299 with bilinear interpolation, half-pixel
centres and *no* antialiasing (``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)``), then mapped to [-1, 1] by ``2x - 1``. This is the protocol of
pytorch-fid's published statistics (and clean-fid's ``mode="legacy_pytorch"``). clean-fid's
default ``mode="clean"`` instead resizes with PIL bicubic before the network and normalises by
``(x - 128) / 128``; it is not reproduced here, and its numbers are not comparable with these.

Outputs: ``pool3`` [B, 2048] (the FID / KID / precision-recall feature, after the global
average pool), ``logits`` [B, 1008] (``fc`` with bias) and ``logits_unbiased`` [B, 1008]
(``fc`` without bias: the original Inception Score code multiplies pool3 by the softmax
weight matrix only, and torch-fidelity follows it).

Parameter names follow the torch state dict (``Conv2d_1a_3x3/conv``, ``Mixed_5b/branch1x1/bn``,
``fc``), so :mod:`ldm_jax.evaluation.inception_weights` converts by renaming. There are no
built-in weights.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models import partitioning as P

Dtype = Any

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008
BN_EPSILON = 1e-3
# Smallest square input the un-resized network accepts (five VALID stride-2 reductions).
MIN_INPUT_SIZE = 75


class InceptionOutput(NamedTuple):
    pool3: jax.Array  # [B, 2048]
    logits: jax.Array  # [B, 1008]
    logits_unbiased: jax.Array  # [B, 1008]


def resize_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """[B, H, W, C] -> [B, size, size, C]: torch ``F.interpolate(mode="bilinear",
    align_corners=False)`` (half-pixel centres, edge clamp, no antialias when downsampling)."""
    b, h, w, c = images.shape
    if (h, w) == (size, size):
        return images
    return jax.image.resize(images, (b, size, size, c), method="linear", antialias=False)


class BasicConv(nn.Module):
    """conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU (torchvision BasicConv2d)."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: Any = "VALID"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = P.conv(self.features, self.kernel_size, strides=self.strides, padding=self.padding, use_bias=False,
                   dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)
        x = nn.BatchNorm(
            use_running_average=True, epsilon=BN_EPSILON, dtype=jnp.float32, param_dtype=self.param_dtype,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
            name="bn",
        )(x)
        return jax.nn.relu(x).astype(self.dtype)


def _pad(kernel_size):
    return tuple(((k - 1) // 2, (k - 1) // 2) for k in kernel_size)


def _avg_pool_same(x):
    # TensorFlow's avg_pool: the zero padding is not counted in the average.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_same(x):
    return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_reduce(x):
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
    """Shared helper: ``self.conv(name, features, kernel, strides)`` builds a named BasicConv with
    'same' padding for stride 1 and VALID padding for stride 2 (as torchvision's blocks)."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def conv(self, name, features, kernel_size=(1, 1), strides=(1, 1), padding=None):
        if padding is None:
            padding = "VALID" if strides != (1, 1) else _pad(kernel_size)
        return BasicConv(features, kernel_size, strides, padding, dtype=self.dtype, param_dtype=self.param_dtype,
                         name=name)


class InceptionA(_Block):
    """Mixed_5b/5c/5d (FIDInceptionA): 64 + 64 + 96 + pool_features channels."""

    pool_features: int = 32

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 64)(x)
        b5 = self.conv("branch5x5_2", 64, (5, 5))(self.conv("branch5x5_1", 48)(x))
        b3 = self.conv("branch3x3dbl_1", 64)(x)
        b3 = self.conv("branch3x3dbl_3", 96, (3, 3))(self.conv("branch3x3dbl_2", 96, (3, 3))(b3))
        bp = self.conv("branch_pool", self.pool_features)(_avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    """Mixed_6a (torchvision InceptionB): grid reduction 35 -> 17, 384 + 96 + in channels."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3", 384, (3, 3), (2, 2))(x)
        bd = self.conv("branch3x3dbl_2", 96, (3, 3))(self.conv("branch3x3dbl_1", 64)(x))
        bd = self.conv("branch3x3dbl_3", 96, (3, 3), (2, 2))(bd)
        return jnp.concatenate([b3, bd, _max_pool_reduce(x)], axis=-1)


class InceptionC(_Block):
    """Mixed_6b..6e (FIDInceptionC): factorised 7x7 branches, 4 x 192 channels."""

    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = self.conv("branch1x1", 192)(x)
        b7 = self.conv("branch7x7_1", c7)(x)
        b7 = self.conv("branch7x7_2", c7, (1, 7))(b7)
        b7 = self.conv("branch7x7_3", 192, (7, 1))(b7)
        bd = self.conv("branch7x7dbl_1", c7)(x)
        bd = self.conv("branch7x7dbl_2", c7, (7, 1))(bd)
        bd = self.conv("branch7x7dbl_3", c7, (1, 7))(bd)
        bd = self.conv("branch7x7dbl_4", c7, (7, 1))(bd)
        bd = self.conv("branch7x7dbl_5", 192, (1, 7))(bd)
        bp = self.conv("branch_pool", 192)(_avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    """Mixed_7a (torchvision InceptionD): grid reduction 17 -> 8, 320 + 192 + in channels."""

    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3_2", 320, (3, 3), (2, 2))(self.conv("branch3x3_1", 192)(x))
        b7 = self.conv("branch7x7x3_1", 192)(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1))(b7)
        b7 = self.conv("branch7x7x3_4", 192, (3, 3), (2, 2))(b7)
        return jnp.concatenate([b3, b7, _max_pool_reduce(x)], axis=-1)


class InceptionE(_Block):
    """Mixed_7b (FIDInceptionE_1, average pool) and Mixed_7c (FIDInceptionE_2, max pool): 2048 channels."""

    max_pool_branch: bool = False

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 320)(x)
        b3 = self.conv("branch3x3_1", 384)(x)
        b3 = jnp.concatenate(
            [self.conv("branch3x3_2a", 384, (1, 3))(b3), self.conv("branch3x3_2b", 384, (3, 1))(b3)], axis=-1
        )
        bd = self.conv("branch3x3dbl_2", 384, (3, 3))(self.conv("branch3x3dbl_1", 448)(x))
        bd = jnp.concatenate(
            [self.conv("branch3x3dbl_3a", 384, (1, 3))(bd), self.conv("branch3x3dbl_3b", 384, (3, 1))(bd)], axis=-1
        )
        # The 2015 graph max-pools here in its last block (pytorch-fid's FIDInceptionE_2 patch).
        pooled = _max_pool_same(x) if self.max_pool_branch else _avg_pool_same(x)
        bp = self.conv("branch_pool", 192)(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3 (module docstring).

    Call: ``(images float [B, H, W, 3] in [0, 1], resize=True)`` -> :class:`InceptionOutput`.
    With ``resize=False`` the images are used at their own size (>= 75 px; the features then no
    longer follow the published protocol: for tests and for inputs already at 299).

    Variables: ``params`` and ``batch_stats`` (BatchNorm ``mean`` / ``var``).
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images, resize: bool = True) -> InceptionOutput:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be [batch, height, width, 3], got shape {images.shape}")
        x = images.astype(jnp.float32)
        if resize:
            x = resize_bilinear(x)
        if min(x.shape[1:3]) < MIN_INPUT_SIZE:
            raise ValueError(f"Inception needs inputs of at least {MIN_INPUT_SIZE} px, got {x.shape[1:3]}")
        x = (2.0 * x - 1.0).astype(self.dtype)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        conv = lambda name, f, k, s=(1, 1), p="VALID": BasicConv(f, k, s, p, name=name, **kw)  # noqa: E731
        x = conv("Conv2d_1a_3x3", 32, (3, 3), (2, 2))(x)
        x = conv("Conv2d_2a_3x3", 32, (3, 3))(x)
        x = conv("Conv2d_2b_3x3", 64, (3, 3), p=((1, 1), (1, 1)))(x)
        x = _max_pool_reduce(x)
        x = conv("Conv2d_3b_1x1", 80, (1, 1))(x)
        x = conv("Conv2d_4a_3x3", 192, (3, 3))(x)
        x = _max_pool_reduce(x)
        x = InceptionA(pool_features=32, name="Mixed_5b", **kw)(x)
        x = InceptionA(pool_features=64, name="Mixed_5c", **kw)(x)
        x = InceptionA(pool_features=64, name="Mixed_5d", **kw)(x)
        x = InceptionB(name="Mixed_6a", **kw)(x)
        x = InceptionC(channels_7x7=128, name="Mixed_6b", **kw)(x)
        x = InceptionC(channels_7x7=160, name="Mixed_6c", **kw)(x)
        x = InceptionC(channels_7x7=160, name="Mixed_6d", **kw)(x)
        x = InceptionC(channels_7x7=192, name="Mixed_6e", **kw)(x)
        x = InceptionD(name="Mixed_7a", **kw)(x)
        x = InceptionE(max_pool_branch=False, name="Mixed_7b", **kw)(x)
        x = InceptionE(max_pool_branch=True, name="Mixed_7c", **kw)(x)
        pool3 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        logits, logits_unbiased = _Classifier(NUM_CLASSES, param_dtype=self.param_dtype, name="fc")(pool3)
        return InceptionOutput(pool3, logits, logits_unbiased)


class _Classifier(nn.Module):
    """torch ``nn.Linear`` returning both ``x W + b`` and ``x W`` (Inception Score uses the latter)."""

    features: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "vocab")),
                            (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vocab",)),
                          (self.features,), self.param_dtype)
        unbiased = x @ jnp.asarray(kernel, jnp.float32)
        return unbiased + jnp.asarray(bias, jnp.float32), unbiased
