"""PSNR / SSIM against scikit-image; rFID plumbing against the FID of independently collected
statistics."""

import importlib
import numpy as np
import pytest

skimage_metrics = importlib.import_module("skimage.metrics")

import jax  # noqa: E402

from ldm_jax.evaluation import autoencoder_metrics as AM  # noqa: E402


def _pair(seed, shape=(3, 24, 19, 3)):
    rng = np.random.default_rng(seed)
    x = np.tanh(rng.normal(size=shape)).astype(np.float32)
    y = np.clip(x + rng.normal(scale=0.2, size=shape), -1, 1).astype(np.float32)
    return x, y


def test_ssim_matches_skimage_structural_similarity_gaussian_settings():
    x, y = _pair(0)
    ours = np.asarray(jax.jit(AM.ssim)(x, y))
    theirs = [skimage_metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5,
                                                    use_sample_covariance=False, data_range=2.0, channel_axis=-1)
              for a, b in zip(x, y)]
    print(f"\nSSIM vs skimage: max abs {np.max(np.abs(ours - theirs)):.2e} (values {np.round(theirs, 4)})")
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    gray_x, gray_y = x[..., :1], y[..., :1]
    theirs = skimage_metrics.structural_similarity(gray_x[0, ..., 0], gray_y[0, ..., 0], gaussian_weights=True,
                                                   sigma=1.5, use_sample_covariance=False, data_range=2.0)
    assert float(AM.ssim(gray_x, gray_y)[0]) == pytest.approx(theirs, abs=1e-5)
    with pytest.raises(ValueError, match="at least 11 px"):
        AM.ssim(x[:, :8], y[:, :8])


def test_psnr_matches_skimage_peak_signal_noise_ratio():
    x, y = _pair(1)
    theirs = [skimage_metrics.peak_signal_noise_ratio(a, b, data_range=2.0) for a, b in zip(x, y)]
    np.testing.assert_allclose(np.asarray(AM.psnr(x, y)), theirs, rtol=1e-5)


def test_reconstruction_metrics_rfid_is_fid_of_input_and_reconstruction_statistics():
    from ldm_jax.evaluation.features import ShardedFeatureFn, quantize
    from ldm_jax.evaluation.metrics import frechet_distance
    from ldm_jax.evaluation.statistics import GaussianAccumulator

    w = np.random.default_rng(2).normal(size=(16 * 16 * 3, 6)).astype(np.float32)
    fn = ShardedFeatureFn(lambda v, im: {"pool3": im.reshape(im.shape[0], -1) @ v}, w, local_batch_size=8)
    x = np.tanh(np.random.default_rng(3).normal(size=(20, 16, 16, 3))).astype(np.float32)
    reconstruct = lambda b: b * 0.9 + 0.05  # noqa: E731
    batches = [x[i:i + 8] for i in range(0, 20, 8)]
    out = AM.reconstruction_metrics(reconstruct, batches, feature_fn=fn, lpips_fn=lambda a, b: np.abs(a - b).mean((1, 2, 3)))
    feats = lambda im: (quantize(im).reshape(20, -1).astype(np.float64) / 255.0) @ w  # noqa: E731
    s_in = GaussianAccumulator(6).update(feats(x)).stats()
    s_out = GaussianAccumulator(6).update(feats(np.clip(reconstruct(x), -1, 1))).stats()
    assert out["rfid"] == pytest.approx(frechet_distance(s_in.mu, s_in.sigma, s_out.mu, s_out.sigma), rel=1e-4)
    expected_psnr = np.mean([skimage_metrics.peak_signal_noise_ratio(a, reconstruct(a), data_range=2.0) for a in x])
    assert out["psnr"] == pytest.approx(expected_psnr, rel=1e-5)
    assert out["lpips"] == pytest.approx(np.abs(x - reconstruct(x)).mean(), rel=1e-5)
    assert out["num_images"] == 20
