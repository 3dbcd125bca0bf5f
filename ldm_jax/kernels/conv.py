"""2-D convolution in several formulations, one interface: ``conv2d(x, w, ..., impl=...)``.

x [B, H, W, C] (NHWC), w [kh, kw, C, O] (HWIO, flax's ``nn.Conv`` kernel layout), explicit
padding ``((top, bottom), (left, right))``; returns [B, H', W', O]. Every formulation computes
the same sum over taps and input channels, so they agree to float32 rounding (the order of the
additions differs):

  ``xla``     ``lax.conv_general_dilated``: XLA picks the kernel (Eigen / oneDNN on CPU, cuDNN on
              GPU, the MXU on TPU). The reference, and the right choice off CPU.
  ``im2col``  pad, gather the kh*kw shifted (strided) windows into one [B*H'*W', kh*kw*C]
              patch matrix and multiply it by the [kh*kw*C, O] kernel: one GEMM forward; autodiff
              gives two GEMMs backward (patches^T @ g for the kernel, g @ w^T for the patches)
              and a sum of shifted pads for the input gradient, all of which XLA:CPU runs as
              plain dots and fused elementwise loops instead of its convolution emitters.
  ``taps``    the same as kh*kw GEMMs of [B*H'*W', C] x [C, O], one per tap, accumulated: no
              patch matrix is materialised (kh*kw times less memory than ``im2col``), more,
              smaller GEMMs.

1x1 convolutions with stride 1 and no padding are a single dot under ``im2col`` and ``taps``.
Which is fastest is shape- and platform-dependent; ``benchmarks/bench_conv.py`` measures the
shapes of the benchmark U-Nets and ``benchmarks/results/conv_cpu.md`` records the outcome.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("xla", "im2col", "taps")
CONV_IMPL_NAMES = ("auto",) + CONV_IMPLS

# Under "auto" on CPU: im2col (one GEMM) when the output map has at most this many pixels, where
# XLA:CPU's convolution emitter is slowest relative to a dot (benchmarks/results/conv_cpu.md),
# and for every 1x1 convolution; lax.conv otherwise and on every other platform.
AUTO_IM2COL_MAX_PIXELS = 16

Padding = Sequence[tuple[int, int]]


def _check(x, w, strides, padding) -> None:
    if x.ndim != 4 or w.ndim != 4:
        raise ValueError(f"conv2d takes x [B, H, W, C] and w [kh, kw, C, O], got shapes {x.shape}, {w.shape}")
    if x.shape[-1] != w.shape[2]:
        raise ValueError(f"conv2d: x has {x.shape[-1]} channels but the kernel expects {w.shape[2]}")
    if len(strides) != 2 or len(padding) != 2:
        raise ValueError(f"conv2d: strides {strides} and padding {padding} must each have two entries")


def _windows(x, kh: int, kw: int, strides, padding):
    """The kh*kw shifted windows of the padded x, each [B, H', W', C], in (i, j) row-major order
    (the order of the HWIO kernel's taps)."""
    (pt, pb), (pl, pr) = padding
    sh, sw = strides
    if pt or pb or pl or pr:
        x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    b, hp, wp, c = x.shape
    ho = (hp - kh) // sh + 1
    wo = (wp - kw) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"conv2d: kernel {kh}x{kw} is larger than the padded input {hp}x{wp}")
    out = []
    for i in range(kh):
        for j in range(kw):
            out.append(
                lax.slice(x, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
            )
    return out, (b, ho, wo)


def _dot(a, b, precision):
    return jnp.dot(a, b, precision=precision, preferred_element_type=jnp.result_type(a.dtype, b.dtype))


def conv2d_xla(x, w, *, strides=(1, 1), padding: Padding = ((1, 1), (1, 1)), precision=None):
    return lax.conv_general_dilated(
        x, w, tuple(strides), tuple(map(tuple, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision,
    )


def conv2d_im2col(x, w, *, strides=(1, 1), padding: Padding = ((1, 1), (1, 1)), precision=None):
    kh, kw, c, o = w.shape
    windows, (b, ho, wo) = _windows(x, kh, kw, strides, padding)
    patches = windows[0] if len(windows) == 1 else jnp.concatenate(windows, axis=-1)
    out = _dot(patches.reshape(b * ho * wo, kh * kw * c), w.reshape(kh * kw * c, o), precision)
    return out.reshape(b, ho, wo, o)


def conv2d_taps(x, w, *, strides=(1, 1), padding: Padding = ((1, 1), (1, 1)), precision=None):
    kh, kw, c, o = w.shape
    windows, (b, ho, wo) = _windows(x, kh, kw, strides, padding)
    out = None
    for tap, window in enumerate(windows):
        term = _dot(window.reshape(b * ho * wo, c), w[tap // kw, tap % kw], precision)
        out = term if out is None else out + term
    return out.reshape(b, ho, wo, o)


_IMPLS = {"xla": conv2d_xla, "im2col": conv2d_im2col, "taps": conv2d_taps}


def conv2d(x, w, *, strides=(1, 1), padding: Padding = ((1, 1), (1, 1)), impl: str = "xla", precision=None):
    """NHWC x HWIO convolution with explicit padding through formulation ``impl`` (``CONV_IMPLS``)."""
    if impl not in _IMPLS:
        raise ValueError(f"unknown conv impl {impl!r}; expected one of {CONV_IMPLS}")
    _check(x, w, strides, padding)
    return _IMPLS[impl](x, w, strides=strides, padding=padding, precision=precision)


def select_conv_impl(impl: str, x_shape, w_shape, strides=(1, 1), platform: str | None = None) -> str:
    """The concrete formulation for ``impl`` (``"auto"`` resolved by platform and shape)."""
    if impl not in CONV_IMPL_NAMES:
        raise ValueError(f"unknown conv impl {impl!r}; expected one of {CONV_IMPL_NAMES}")
    if impl != "auto":
        return impl
    if (platform or jax.default_backend()) != "cpu":
        return "xla"
    kh, kw = w_shape[:2]
    ho, wo = -(-x_shape[1] // strides[0]), -(-x_shape[2] // strides[1])
    if (kh, kw) == (1, 1) or ho * wo <= AUTO_IM2COL_MAX_PIXELS:
        return "im2col"
    return "xla"


def resolve_padding(padding, kernel_size, strides, in_size) -> tuple:
    """flax-style ``padding`` ("SAME", "VALID", an int or explicit pairs) as explicit pairs."""
    if isinstance(padding, str):
        if padding.upper() == "SAME":
            return same_padding(kernel_size, strides, in_size)
        if padding.upper() == "VALID":
            return ((0, 0), (0, 0))
        raise ValueError(f"unknown conv padding {padding!r}")
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    pairs = tuple((p, p) if isinstance(p, int) else tuple(p) for p in padding)
    if len(pairs) != 2 or any(len(p) != 2 for p in pairs):
        raise ValueError(f"conv padding must be two (low, high) pairs, got {padding!r}")
    return pairs


def same_padding(kernel_size: Sequence[int], strides: Sequence[int], in_size: Sequence[int]) -> tuple:
    """Explicit padding equal to XLA's / flax's ``"SAME"`` for these sizes."""
    pads = []
    for k, s, n in zip(kernel_size, strides, in_size):
        out = -(-n // s)
        total = max((out - 1) * s + k - n, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


__all__ = ["CONV_IMPLS", "CONV_IMPL_NAMES", "conv2d", "resolve_padding", "same_padding", "select_conv_impl"]
