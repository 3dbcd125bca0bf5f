"""Reconstruction metrics of an autoencoder: PSNR, SSIM, LPIPS and rFID.

Images are NHWC floats in [-1, 1] (the project's convention), so ``data_range`` defaults to 2.

* :func:`psnr` -- ``10 log10(data_range^2 / MSE)`` per image (skimage's
  ``peak_signal_noise_ratio`` on each image, all channels pooled).
* :func:`ssim` -- per image, the mean over channels of the mean SSIM map, with Wang et al.'s
  settings: an 11-tap Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, population
  (not sample) covariances, and the 5-pixel border dropped. That is
  ``skimage.metrics.structural_similarity(x, y, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=2.0, channel_axis=-1)``. Images need >= 11 px.
* LPIPS -- :func:`ldm_jax.models.lpips.lpips_distance` (weights from a local file).
* rFID -- FID between the Inception statistics of the inputs and of their reconstructions
  (both quantized to 8 bits, as image files would be): :func:`reconstruction_metrics`.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.evaluation.features import quantize
from ldm_jax.evaluation.metrics import frechet_distance
from ldm_jax.evaluation.statistics import GaussianAccumulator, allgather_merge

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(truncate 3.5 * sigma 1.5 + 0.5): scipy's gaussian_filter window, 11 taps
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(x, y, data_range: float = 2.0) -> jax.Array:
    """[B, H, W, C] x2 -> [B] dB (inf where the images are equal)."""
    mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=(1, 2, 3))
    return 10.0 * jnp.log10(data_range**2 / mse)


def _gaussian_window() -> np.ndarray:
    t = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    w = np.exp(-0.5 * (t / SSIM_SIGMA) ** 2)
    return (w / w.sum()).astype(np.float32)


def _filter_valid(x: jax.Array) -> jax.Array:
    """Separable Gaussian over H and W of [B, H, W, C], 'valid' region only (the border that
    skimage crops after filtering is never computed)."""
    w = jnp.asarray(_gaussian_window())
    c = x.shape[-1]
    rows = jnp.tile(w.reshape(-1, 1, 1, 1), (1, 1, 1, c))  # [kh, 1, in/groups=1, C]
    cols = jnp.tile(w.reshape(1, -1, 1, 1), (1, 1, 1, c))
    dn = ("NHWC", "HWIO", "NHWC")
    prec = jax.lax.Precision.HIGHEST
    x = jax.lax.conv_general_dilated(x, rows, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c,
                                     precision=prec)
    return jax.lax.conv_general_dilated(x, cols, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c,
                                        precision=prec)


def ssim(x, y, data_range: float = 2.0) -> jax.Array:
    """[B, H, W, C] x2 -> [B] mean SSIM (module docstring for the exact settings)."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim needs two [B, H, W, C] batches of one shape, got {x.shape} and {y.shape}")
    if min(x.shape[1:3]) < 2 * SSIM_RADIUS + 1:
        raise ValueError(f"ssim needs images of at least {2 * SSIM_RADIUS + 1} px, got {x.shape[1:3]}")
    x, y = x.astype(jnp.float32), y.astype(jnp.float32)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mu_x, mu_y = _filter_valid(x), _filter_valid(y)
    var_x = _filter_valid(x * x) - mu_x**2
    var_y = _filter_valid(y * y) - mu_y**2
    cov = _filter_valid(x * y) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return jnp.mean(s, axis=(1, 2, 3))


def reconstruction_metrics(
    reconstruct: Callable[[np.ndarray], np.ndarray],
    batches: Iterable[np.ndarray],
    feature_fn: Callable[[np.ndarray], dict] | None = None,
    lpips_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    progress=None,
) -> dict[str, float]:
    """Mean PSNR / SSIM (/ LPIPS with ``lpips_fn``) over this process's images and rFID (with a
    sharded Inception ``feature_fn``, merged over processes) of ``reconstruct`` on ``batches``
    of float [-1, 1] images. PSNR / SSIM / LPIPS are computed on the float images; rFID on their
    8-bit quantizations."""
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    count = 0
    acc_in = acc_out = None
    psnr_fn, ssim_fn = jax.jit(psnr), jax.jit(ssim)
    for batch in batches:
        batch = np.asarray(batch, np.float32)
        recon = np.clip(np.asarray(reconstruct(batch), np.float32), -1.0, 1.0)
        if recon.shape != batch.shape:
            raise ValueError(f"reconstruction has shape {recon.shape}, input {batch.shape}")
        n = batch.shape[0]
        if n:
            sums["psnr"] += float(jnp.sum(psnr_fn(batch, recon)))
            sums["ssim"] += float(jnp.sum(ssim_fn(batch, recon)))
            if lpips_fn is not None:
                sums["lpips"] += float(np.sum(lpips_fn(batch, recon)))
        count += n
        if feature_fn is not None:
            rgb = lambda im: np.repeat(im, 3, -1) if im.shape[-1] == 1 else im  # noqa: E731
            f_in = feature_fn(rgb(quantize(batch)))["pool3"]
            f_out = feature_fn(rgb(quantize(recon)))["pool3"]
            acc_in = GaussianAccumulator(f_in.shape[-1]) if acc_in is None else acc_in
            acc_out = GaussianAccumulator(f_out.shape[-1]) if acc_out is None else acc_out
            acc_in.update(f_in)
            acc_out.update(f_out)
        if progress is not None:
            progress.update(n)
    if count == 0:
        raise ValueError("no images to evaluate")
    out = {"psnr": sums["psnr"] / count, "ssim": sums["ssim"] / count, "num_images": count}
    if lpips_fn is not None:
        out["lpips"] = sums["lpips"] / count
    if feature_fn is not None:
        s_in, s_out = allgather_merge(acc_in).stats(), allgather_merge(acc_out).stats()
        out["rfid"] = frechet_distance(s_in.mu, s_in.sigma, s_out.mu, s_out.sigma)
    return out
