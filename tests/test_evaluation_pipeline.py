"""Image sets -> sharded Inception features -> statistics, against pytorch-fid's own
``calculate_activation_statistics`` on the same files (random weights, 75 px, no resize)."""

import importlib
import numpy as np
import pytest
from PIL import Image

torch = importlib.import_module("torch")
pytorch_fid_inception = importlib.import_module("pytorch_fid.inception")

from ldm_jax.evaluation import inception_metrics as IM  # noqa: E402
from ldm_jax.evaluation.images import ImageFiles, SourceImages, process_batches  # noqa: E402
from ldm_jax.evaluation.inception import FIDInceptionV3  # noqa: E402
from ldm_jax.evaluation.inception_weights import random_state_dict, variables_from_state_dict  # noqa: E402

SIZE = 75  # the smallest input the network takes; resize off (tests only)


@pytest.fixture(scope="module")
def state():
    return random_state_dict(seed=0)


@pytest.fixture(scope="module")
def feature_fn(state):
    return IM.inception_feature_fn(FIDInceptionV3(), variables_from_state_dict(state), local_batch_size=8,
                                   resize=False)


@pytest.fixture(scope="module")
def torch_wrapper(state):
    from test_evaluation_inception import _reference_fid_network

    net = _reference_fid_network(state)
    original = pytorch_fid_inception.fid_inception_v3
    pytorch_fid_inception.fid_inception_v3 = lambda: net
    try:
        return pytorch_fid_inception.InceptionV3([3], resize_input=False, normalize_input=True).eval()
    finally:
        pytorch_fid_inception.fid_inception_v3 = original


def _write_images(folder, n, seed, size=SIZE):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        # Smooth random colour fields (noise would put every image at the same features).
        coarse = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(folder / f"{i:03d}.png")
    return folder


def test_folder_statistics_match_pytorch_fid_calculate_activation_statistics(tmp_path, feature_fn, torch_wrapper):
    fid_score = importlib.import_module("pytorch_fid.fid_score")
    folder = _write_images(tmp_path / "real", 11, seed=0)
    ours = IM.inception_features(feature_fn, ImageFiles(folder), keep=("pool3",))
    files = sorted(str(p) for p in folder.glob("*.png"))
    mu, sigma = fid_score.calculate_activation_statistics(files, torch_wrapper, batch_size=4, dims=2048,
                                                          device="cpu", num_workers=0)
    rel_mu = np.max(np.abs(ours["stats"].mu - mu)) / np.max(np.abs(mu))
    rel_sigma = np.max(np.abs(ours["stats"].sigma - sigma)) / np.max(np.abs(sigma))
    print(f"\nfolder stats vs pytorch-fid: mu rel {rel_mu:.2e}, sigma rel {rel_sigma:.2e}")
    assert ours["pool3"].shape == (11, 2048) and ours["stats"].num_samples == 11
    assert rel_mu < 1e-4 and rel_sigma < 1e-4


def test_data_source_images_are_quantized_rgb_and_match_torch(feature_fn, torch_wrapper):
    from ldm_jax.data import build_dataset

    source = build_dataset(dict(name="digits", resolution=SIZE, split="test"))  # grey, [-1, 1]
    images = SourceImages(source, limit=5)
    first = images[0]
    expected = np.clip(np.round((np.asarray(source[0]["image"]) + 1) * 127.5), 0, 255).astype(np.uint8)
    assert first.dtype == np.uint8 and first.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(first, np.repeat(expected, 3, axis=-1))
    ours = IM.inception_features(feature_fn, images, keep=("pool3",))["pool3"]
    batch = np.stack([images[i] for i in range(5)]).astype(np.float32) / 255.0
    with torch.no_grad():
        theirs = torch_wrapper(torch.from_numpy(batch).permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()
    assert np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)) < 1e-4


def test_compare_metrics_are_the_metric_functions_of_the_features():
    """``compare`` is plumbing: each value is the metric function of the right features (synthetic,
    16-d: a 2048-d scipy sqrtm alone takes a minute on this CPU)."""
    from ldm_jax.evaluation import metrics as M
    from ldm_jax.evaluation.features import Collected
    from ldm_jax.evaluation.statistics import GaussianAccumulator

    rng = np.random.default_rng(4)
    real_pool3, fake_pool3 = rng.normal(size=(40, 16)), rng.normal(size=(30, 16)) + 0.2
    logits = rng.normal(size=(30, 10))
    real = Collected(stats=GaussianAccumulator(16).update(real_pool3).stats(), pool3=real_pool3)
    fake = Collected(stats=GaussianAccumulator(16).update(fake_pool3).stats(), pool3=fake_pool3,
                     logits_unbiased=logits)
    out = IM.compare(real, fake, ("fid", "kid", "is", "precision_recall"), kid_subsets=5, kid_subset_size=8,
                     is_splits=2, seed=3)
    rs, fs = real["stats"], fake["stats"]
    assert out["fid"] == M.frechet_distance(rs.mu, rs.sigma, fs.mu, fs.sigma) and out["fid"] > 0
    kid = M.kernel_inception_distance(real_pool3, fake_pool3, 5, 8, rng=np.random.RandomState(3))
    assert (out["kid_mean"], out["kid_std"]) == (kid.mean, kid.std)
    assert out["is_mean"] == M.inception_score(logits, splits=2).mean
    assert (out["precision"], out["recall"]) == tuple(M.precision_recall(real_pool3, fake_pool3))
    assert out["num_real"] == 40 and out["num_fake"] == 30
    with pytest.raises(ValueError, match="kid needs reference features"):
        IM.compare(rs, fake, ("fid", "kid"))
    with pytest.raises(ValueError, match="unknown metric 'fd'"):
        IM.compare(rs, fake, ("fd",))


def test_image_files_reject_empty_folders_and_mixed_sizes(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .* images in"):
        ImageFiles(tmp_path / "empty")
    folder = _write_images(tmp_path / "mixed", 2, seed=0)
    _write_images(tmp_path / "mixed" / "sub", 1, seed=0, size=80)
    with pytest.raises(ValueError, match="images differ in size: .* is 75x75, .*sub/000.png is 80x80"):
        ImageFiles(folder)


def test_process_batches_partition_images_with_equal_batch_counts():
    class Fake:
        size = (2, 2)

        def __len__(self):
            return 23

        def __getitem__(self, i):
            return np.full((2, 2, 3), i, np.uint8)

    per_process = [list(process_batches(Fake(), 4, p, 3)) for p in range(3)]
    assert len({len(b) for b in per_process}) == 1  # same number of collective calls
    seen = sorted(int(img[0, 0, 0]) for batches in per_process for b in batches for img in b)
    assert seen == list(range(23))
