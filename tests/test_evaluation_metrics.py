"""FID / KID / IS / precision-recall against pytorch-fid, clean-fid, torch-fidelity and closed
forms; streaming statistics against np.cov; sharded extraction on 8 simulated devices."""

import importlib
import numpy as np
import pytest

from ldm_jax.evaluation import metrics, statistics


def _features(seed, n=300, d=16, shift=0.0):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


def test_fid_matches_closed_form_for_two_gaussians_with_commuting_covariances():
    rng = np.random.default_rng(0)
    d = 12
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    e1, e2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = q @ np.diag(e1) @ q.T, q @ np.diag(e2) @ q.T
    # Shared eigenvectors: tr(S1 + S2 - 2 sqrt(S1 S2)) = sum (sqrt(e1) - sqrt(e2))^2.
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(e1) - np.sqrt(e2)) ** 2)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_fid_eigh_method_matches_sqrtm_and_closed_form():
    a, b = _features(20, n=400, d=24), _features(21, n=400, d=24, shift=0.4)
    args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert metrics.frechet_distance(*args, method="eigh") == pytest.approx(metrics.frechet_distance(*args), rel=1e-9)
    rng = np.random.default_rng(22)
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    e1, e2 = rng.uniform(0.1, 2.0, 8), rng.uniform(0.1, 2.0, 8)
    expected = np.sum((np.sqrt(e1) - np.sqrt(e2)) ** 2)
    got = metrics.frechet_distance(np.zeros(8), q @ np.diag(e1) @ q.T, np.zeros(8), q @ np.diag(e2) @ q.T, method="eigh")
    assert got == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="unknown FID method 'svd'"):
        metrics.frechet_distance(*args, method="svd")


def test_fid_matches_pytorch_fid_calculate_frechet_distance():
    fid_score = importlib.import_module("pytorch_fid.fid_score")
    a, b = _features(1), _features(2, shift=0.3)
    args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    ours = metrics.frechet_distance(*args)
    theirs = fid_score.calculate_frechet_distance(*args)
    assert ours == pytest.approx(theirs, rel=1e-10)
    # Singular covariances (fewer samples than dims) take the eps-ridge branch in both.
    a, b = _features(3, n=10), _features(4, n=10)
    args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert metrics.frechet_distance(*args) == pytest.approx(fid_score.calculate_frechet_distance(*args), rel=1e-6)


def test_kid_matches_clean_fid_kernel_distance_same_seed():
    cleanfid_fid = importlib.import_module("cleanfid.fid")
    real, fake = _features(5, n=200), _features(6, n=150, shift=0.2)
    np.random.seed(7)
    theirs = cleanfid_fid.kernel_distance(real, fake, num_subsets=20, max_subset_size=100)
    ours = metrics.kernel_inception_distance(real, fake, num_subsets=20, max_subset_size=100,
                                             rng=np.random.RandomState(7))
    assert ours.mean == pytest.approx(theirs, rel=1e-10)


def test_kid_matches_torch_fidelity_unbiased_mmd_on_one_full_subset():
    torch = importlib.import_module("torch")
    kid_module = importlib.import_module("torch_fidelity.metric_kid")
    real, fake = _features(8, n=64), _features(9, n=64, shift=0.5)
    # One subset holding every sample: no sampling, so the estimators must agree exactly.
    k = lambda x, y: kid_module.kernel_poly(x, y, kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None,  # noqa: E731
                                            kid_kernel_poly_coef0=1)
    theirs = kid_module.mmd2(k(fake, fake), k(fake, real), k(real, real))
    ours = metrics.kernel_inception_distance(real, fake, num_subsets=1, max_subset_size=64)
    assert ours.mean == pytest.approx(float(theirs), rel=1e-10)
    assert ours.std == 0.0
    del torch


def test_inception_score_matches_torch_fidelity_isc():
    torch = importlib.import_module("torch")
    isc = importlib.import_module("torch_fidelity.metric_isc")
    logits = np.random.default_rng(10).normal(scale=3.0, size=(250, 30))
    theirs = isc.isc_features_to_metric(torch.from_numpy(logits), splits=5, shuffle=False)
    ours = metrics.inception_score(logits, splits=5)
    assert ours.mean == pytest.approx(theirs["inception_score_mean"], rel=1e-10)
    assert ours.std == pytest.approx(theirs["inception_score_std"], rel=1e-8)


def test_inception_score_closed_form_extremes():
    # Confident and uniform over C classes -> C; identical predictions -> 1.
    c = 7
    confident = np.eye(c)[np.arange(70) % c] * 100.0
    assert metrics.inception_score(confident, splits=1).mean == pytest.approx(c, rel=1e-6)
    assert metrics.inception_score(np.tile(np.arange(c, dtype=float), (20, 1)), splits=2).mean == pytest.approx(1.0)


def test_precision_recall_matches_torch_fidelity_prc():
    torch = importlib.import_module("torch")
    prc = importlib.import_module("torch_fidelity.metric_prc")
    real, fake = _features(11, n=120), _features(12, n=90, shift=0.8)
    precision, recall = prc.calculate_precision_recall_full(torch.from_numpy(fake), torch.from_numpy(real), 3)
    ours = metrics.precision_recall(real, fake, k=3, block_size=50)
    print(f"\nprecision/recall ours {ours}, torch-fidelity ({precision}, {recall})")
    assert 0.0 < ours.precision < 1.0 and 0.0 < ours.recall < 1.0
    # Same counts of points inside (torch-fidelity averages in float32; one point is 1/90 or 1/120).
    assert round(ours.precision * 90) == round(precision * 90)
    assert round(ours.recall * 120) == round(recall * 120)


def test_knn_radii_matches_brute_force_sort():
    x = _features(13, n=40, d=5)
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    expected = np.sort(d, axis=1)[:, 3]
    np.testing.assert_allclose(metrics.knn_radii(x, k=3, block_size=7), expected, rtol=1e-10, atol=1e-12)


def test_streaming_accumulator_matches_np_cov_and_merges():
    x = _features(14, n=1003, d=9, shift=50.0)  # a large mean: the naive sum-of-squares would lose digits
    acc = statistics.GaussianAccumulator(9)
    for lo in range(0, 700, 64):
        acc.update(x[lo:min(lo + 64, 700)])
    other = statistics.GaussianAccumulator(9).update(x[700:])
    stats = acc.merge(other).stats()
    assert stats.num_samples == 1003
    np.testing.assert_allclose(stats.mu, x.mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats.sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)


def test_stats_npz_is_readable_by_pytorch_fid(tmp_path):
    fid_score = importlib.import_module("pytorch_fid.fid_score")
    x, y = _features(15), _features(16, shift=0.1)
    sx = statistics.GaussianAccumulator(16).update(x).stats()
    sy = statistics.GaussianAccumulator(16).update(y).stats()
    statistics.save_stats(tmp_path / "x.npz", sx, {"source": "test"})
    statistics.save_stats(tmp_path / "y.npz", sy)
    # pytorch-fid's own reader of precomputed statistics.
    with np.load(tmp_path / "x.npz") as f:
        mu, sigma = f["mu"][:], f["sigma"][:]
    np.testing.assert_array_equal(mu, sx.mu)
    loaded = statistics.load_stats(tmp_path / "y.npz")
    theirs = fid_score.calculate_frechet_distance(mu, sigma, loaded.mu, loaded.sigma)
    assert metrics.frechet_distance(sx.mu, sx.sigma, sy.mu, sy.sigma) == pytest.approx(theirs, rel=1e-12)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        statistics.load_stats(tmp_path / "nope.npz")


def test_bad_inputs_name_the_value():
    with pytest.raises(ValueError, match="feature dims differ"):
        metrics.kernel_inception_distance(np.ones((5, 3)), np.ones((5, 4)))
    with pytest.raises(ValueError, match="splits"):
        metrics.inception_score(np.ones((3, 4)), splits=5)
    with pytest.raises(ValueError, match="mean vectors"):
        metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_sharded_feature_fn_splits_batch_over_8_devices_and_strips_padding():
    import jax
    import jax.numpy as jnp

    from ldm_jax.evaluation.features import ShardedFeatureFn, collect

    assert jax.device_count() == 8
    w = np.random.default_rng(17).normal(size=(12, 5)).astype(np.float32)
    seen_shardings = []

    def apply_fn(variables, images):
        jax.debug.inspect_array_sharding(images, callback=seen_shardings.append)
        flat = images.reshape(images.shape[0], -1)
        return {"feat": flat @ variables["w"], "mean": jnp.mean(flat, axis=1)}

    fn = ShardedFeatureFn(apply_fn, {"w": w}, local_batch_size=16)
    images = np.random.default_rng(18).integers(0, 256, size=(37, 2, 2, 3), dtype=np.uint8)
    batches = [images[i:i + 16] for i in range(0, 37, 16)]  # 16, 16, 5 (padded)
    out = collect(fn, batches, stats_key="feat", keep=("feat", "mean"))
    expected = (images.reshape(37, -1).astype(np.float32) / 255.0) @ w
    np.testing.assert_allclose(out["feat"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["stats"].sigma, np.cov(expected, rowvar=False), rtol=1e-4, atol=1e-5)
    assert out["stats"].num_samples == 37
    # Inside the compiled function the batch is split 8 ways (2 images per device).
    assert len(seen_shardings[0].device_set) == 8
    assert not seen_shardings[0].is_fully_replicated
    assert seen_shardings[0].shard_shape((16, 2, 2, 3)) == (2, 2, 2, 3)
    with pytest.raises(ValueError, match="multiple"):
        ShardedFeatureFn(apply_fn, {"w": w}, local_batch_size=12)
