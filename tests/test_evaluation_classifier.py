"""The digits classifier as a feature network (ldm_jax.evaluation.classifier) and the training
loop's evaluation hook (ldm_jax.training.eval_hook, config.eval).

Independent truths: the held-out split's labels (the classifier is a valid feature network
only if it classifies unseen real digits), the real images themselves (two halves of one set
are close, uniform noise is far), and a float64 NumPy Frechet distance of the features.
"""

import importlib.util
import json
import logging
import os

import numpy as np
import pytest

from ldm_jax.data import build_dataset
from ldm_jax.evaluation import classifier as C

# Whole training runs in module fixtures: minutes on 2 cores; `make test-all` runs them.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = {"name": "digits", "resolution": 32, "channels": 1}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cache = tmp_path_factory.mktemp("classifier_cache")
    return C.train_or_load_classifier(DIGITS, cache_dir=str(cache)), str(cache)


def _arrays(split):
    return C._source_arrays(build_dataset({**DIGITS, "split": split}))


def test_classifier_classifies_held_out_real_digits(trained):
    classifier, _ = trained
    images, labels = _arrays("test")
    accuracy = float(np.mean(classifier.predict(images) == labels))
    assert accuracy == pytest.approx(classifier.test_accuracy)
    assert accuracy >= 0.92, accuracy  # chance is 0.1


def test_classifier_is_cached_and_reloads_without_training(trained, monkeypatch):
    classifier, cache = trained
    monkeypatch.setattr(C, "train_classifier", lambda *a, **k: pytest.fail("retrained despite the cache"))
    again = C.train_or_load_classifier(DIGITS, cache_dir=cache)
    assert again.key == classifier.key and again.test_accuracy == classifier.test_accuracy
    images, _ = _arrays("test")
    np.testing.assert_array_equal(again.features(images[:16]), classifier.features(images[:16]))


def test_training_is_deterministic(tmp_path):
    spec = C.ClassifierSpec(steps=3, batch_size=8)
    images, labels = _arrays("test")
    a = C.train_classifier(images, labels, 10, spec)
    b = C.train_classifier(images, labels, 10, spec)
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_frechet_distance_real_vs_real_is_small_and_noise_is_far(trained):
    classifier, _ = trained
    train_images, train_labels = _arrays("train")
    reference = C.real_reference(classifier, train_images)
    # the same distance by hand, in float64 NumPy (scipy's sqrtm as pytorch-fid)
    import scipy.linalg

    feats = classifier.features(train_images).astype(np.float64)
    order = np.random.RandomState(0).permutation(len(feats))
    half = len(feats) // 2
    a, b = feats[order[:half]], feats[order[half : 2 * half]]
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(ca + cb - 2 * scipy.linalg.sqrtm(ca @ cb).real)
    assert reference.fd_real_vs_real == pytest.approx(expected, rel=1e-6)

    test_images, test_labels = _arrays("test")
    held_out = C.classifier_quality(classifier, test_images, test_labels, reference)
    noise = np.random.RandomState(1).uniform(-1, 1, test_images.shape).astype(np.float32)
    noisy = C.classifier_quality(classifier, noise, test_labels, reference)
    assert held_out["accuracy"] > 0.9 and noisy["accuracy"] < 0.3
    assert reference.fd_real_vs_real < 0.1 * noisy["fd"]
    assert held_out["fd"] < 0.1 * noisy["fd"]
    assert noisy["fd_ratio"] > 50


def test_digits_quality_matches_classifier_quality(trained):
    classifier, cache = trained
    images, labels = _arrays("test")
    quick = C.digits_quality(images, labels, cache_dir=cache)
    reference = C.reference_for_data(classifier, DIGITS)
    full = C.classifier_quality(classifier, images, labels, reference)
    for k, v in full.items():
        assert quick[k] == pytest.approx(v)
    assert quick["classifier_test_accuracy"] == classifier.test_accuracy


# ----------------------------------------------------------------------------- the eval hook


def _train_cli():
    from cli_modules import load_cli

    return load_cli("train")


def _quiet(c):
    c.optimizer.warmup_steps = 1
    c.logging.progress_bar = False
    c.checkpoint.async_save = False
    return c


def test_eval_hook_logs_metrics_and_keeps_the_best_checkpoint(tmp_path, caplog):
    from configs import digits_autoencoder, digits_ldm
    from ldm_jax.training import eval_hook

    train_cli = _train_cli()
    ae = _quiet(digits_autoencoder.get_config("runlocal"))
    ae.train.num_steps, ae.checkpoint.every_steps, ae.preview.every_steps, ae.export.enabled = 2, 2, -1, False
    train_cli.run(ae, str(tmp_path / "ae"))

    c = _quiet(digits_ldm.get_config("runlocal"))
    c.first_stage.workdir = str(tmp_path / "ae")
    c.train.num_steps, c.checkpoint.every_steps, c.train.log_every = 4, 2, 2
    c.preview.every_steps = -1
    c.eval.every_steps = 2
    c.eval.classifier_cache_dir = str(tmp_path / "cache")
    c.eval.grid_columns, c.eval.grid_rows = 2, 3  # 16 samples: classes 0-2 have 2 each
    workdir = tmp_path / "ldm"
    with caplog.at_level(logging.INFO):
        train_cli.run(c, str(workdir))

    records = [json.loads(line) for line in open(workdir / eval_hook.METRICS_FILE)]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["fd"] > 0 and r["num_samples"] == 16
    lines = [m for m in caplog.messages if m.startswith("eval step")]
    assert any("eval/accuracy=" in m and "eval/fd=" in m for m in lines), lines
    from tb_events import read_events

    scalars, _ = read_events(workdir / "tensorboard")
    assert [s for s, _ in scalars["eval/fd"]] == [2, 4]
    best_fd = min(r["fd"] for r in records)
    best_step = [r["step"] for r in records if r["fd"] == best_fd][0]
    steps = [d for d in os.listdir(workdir / eval_hook.BEST_DIR) if d.isdigit()]
    assert steps == [str(best_step)]
    assert eval_hook._stored_best(str(workdir / eval_hook.BEST_DIR), "fd") == pytest.approx(best_fd)
    from PIL import Image

    # 3 rows x 2 columns of 16-pixel samples with 2-pixel padding (56 x 38), saved at 4x
    for step in (2, 4):
        with Image.open(workdir / "samples" / f"eval_{step:07d}.png") as grid:
            assert grid.size == (38 * 4, 56 * 4)


@pytest.mark.parametrize("override, message", [
    ({"features": "vgg"}, "config.eval.features"),
    ({"best_metric": "loss"}, "config.eval.best_metric"),
    ({"features": "inception"}, "inception_path"),
    ({"num_samples": 1}, "num_samples"),
    ({"guidance_interval": (600.0, 100.0)}, r"config.eval.guidance_interval must be finite with t_low <= t_high"),
])
def test_bad_eval_settings_fail_with_one_line(override, message):
    from configs import digits_ldm
    from ldm_jax.training.eval_hook import eval_settings

    c = digits_ldm.get_config("runlocal")
    for k, v in override.items():
        c.eval[k] = v
    with pytest.raises(ValueError, match=message) as info:
        eval_settings(c)
    assert "\n" not in str(info.value)


def test_evaluate_cli_scores_an_image_folder_with_the_digits_classifier(trained, tmp_path):
    from PIL import Image

    from ldm_jax.evaluation.features import quantize

    classifier, cache = trained
    images, _ = _arrays("test")
    pixels = quantize(images[:40])
    folder = tmp_path / "digits"
    folder.mkdir()
    for i, image in enumerate(pixels):
        Image.fromarray(image[..., 0]).save(folder / f"{i:03d}.png")
    spec = importlib.util.spec_from_file_location("evaluate_cli", os.path.join(ROOT, "evaluate.py"))
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    out = tmp_path / "results.json"
    assert evaluate.main(["--features", "digits_classifier", "--images", str(folder), "--classifier_cache_dir", cache,
                          "--out", str(out), "--no_progress"]) == 0
    results = json.loads(out.read_text())
    expected = C.classifier_quality(classifier, pixels, np.zeros(len(pixels)), C.reference_for_data(classifier, DIGITS))
    assert results["metrics"]["fd"] == pytest.approx(expected["fd"], rel=1e-9)
    assert "accuracy" not in results["metrics"] and results["num_images"] == 40
    assert evaluate.main(["--features", "digits_classifier", "--images", str(folder), "--metrics", "fid"]) == 2
