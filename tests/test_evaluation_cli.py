"""evaluate.py end to end with a random-weight Inception file made in tmp_path: folder vs
folder, vs a stats file, vs a data source, a model's samples, and one-line errors."""

from __future__ import annotations

import importlib
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import evaluate  # noqa: E402

from ldm_jax.evaluation.inception_weights import random_state_dict  # noqa: E402
from ldm_jax.evaluation.statistics import load_stats  # noqa: E402
from ldm_jax.interop.torch_weights import save_state_dict  # noqa: E402


def _folder(path, n, seed, size=16):
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        coarse = rng.integers(0, 256, size=(3, 3, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BILINEAR).save(path / f"{i:03d}.png")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    weights = root / "inception.safetensors"
    save_state_dict(random_state_dict(seed=0), weights)
    return dict(weights=weights, real=_folder(root / "real", 6, seed=0), fake=_folder(root / "fake", 6, seed=1),
                root=root)


def _run(args, capsys):
    code = evaluate.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _closed_form_fid(a, b):
    """FID of two feature sets with fewer samples than dimensions, without a matrix square root:
    the non-zero eigenvalues of S_a S_b are the squared singular values of
    C_a C_b^T / sqrt((n_a - 1)(n_b - 1)) (C: centred features)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    ca, cb = a - a.mean(0), b - b.mean(0)
    na, nb = len(a) - 1, len(b) - 1
    trace_sqrt = np.linalg.svd(ca @ cb.T / np.sqrt(na * nb), compute_uv=False).sum()
    diff = a.mean(0) - b.mean(0)
    return diff @ diff + (ca**2).sum() / na + (cb**2).sum() / nb - 2 * trace_sqrt


def test_cli_folder_vs_folder_saves_stats_and_fid_against_them_matches_closed_form(files, tmp_path, capsys):
    from ldm_jax.evaluation import inception_metrics as IM
    from ldm_jax.evaluation.images import ImageFiles
    from ldm_jax.evaluation.inception_weights import load_inception

    out = tmp_path / "results.json"
    code, _, err = _run(["--inception", files["weights"], "--images", files["fake"], "--ref_images", files["real"],
                         "--metrics", "kid", "is", "precision_recall", "--kid_subsets", 3, "--kid_subset_size", 4,
                         "--is_splits", 2, "--batch_size", 8, "--out", out, "--save_stats", tmp_path / "fake.npz",
                         "--save_ref_stats", tmp_path / "real.npz", "--no_progress"], capsys)
    assert code == 0, err
    results = json.loads(out.read_text())
    m = results["metrics"]
    assert set(m) >= {"kid_mean", "kid_std", "is_mean", "is_std", "precision", "recall"}
    assert m["num_fake"] == 6 and m["num_real"] == 6 and len(results["inception"]["sha256"]) == 64
    real = load_stats(tmp_path / "real.npz")
    with np.load(tmp_path / "fake.npz") as f:  # pytorch-fid's keys
        assert f["mu"].shape == (2048,) and f["sigma"].shape == (2048, 2048) and f["sigma"].dtype == np.float64
    # FID against the saved reference statistics (one 2048-d FID: ~15 CPU-s here).
    code, stdout, err = _run(["--inception", files["weights"], "--images", files["fake"], "--ref_stats",
                              tmp_path / "real.npz", "--batch_size", 8, "--fid_method", "eigh", "--no_progress"], capsys)
    assert code == 0, err
    fid = json.loads(stdout)["metrics"]["fid"]
    # Independent check: features of both folders (the same compiled network), closed-form FID.
    module, variables = load_inception(files["weights"])
    fn = IM.inception_feature_fn(module, variables, local_batch_size=8)
    feats = {k: IM.inception_features(fn, ImageFiles(files[k]), keep=("pool3",))["pool3"] for k in ("real", "fake")}
    np.testing.assert_allclose(real.mu, feats["real"].mean(0), rtol=1e-5, atol=1e-6)
    expected = _closed_form_fid(feats["real"], feats["fake"])
    print(f"\nCLI FID {fid:.6f} vs closed form {expected:.6f}")
    assert fid == pytest.approx(expected, rel=1e-5)


def test_cli_reference_from_a_data_source(files, capsys):
    code, stdout, err = _run(["--inception", files["weights"], "--images", files["fake"], "--ref_data", "digits",
                              "--ref_split", "test", "--num_ref", 8, "--batch_size", 8, "--metrics", "kid",
                              "--kid_subsets", 2, "--kid_subset_size", 4, "--no_progress"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["metrics"]["num_real"] == 8 and np.isfinite(result["metrics"]["kid_mean"])


@pytest.mark.parametrize(
    "case, expected",
    [
        (lambda f: ["--inception", f["root"] / "missing.pth", "--images", f["fake"], "--ref_images", f["real"]],
         "Inception weights not found"),
        (lambda f: ["--inception", f["weights"], "--images", f["mixed"], "--ref_images", f["real"]],
         "images differ in size"),
        (lambda f: ["--inception", f["weights"], "--images", f["empty"], "--ref_images", f["real"]],
         "no .png/.jpg/.jpeg/.webp images in"),
        (lambda f: ["--inception", f["weights"], "--images", f["fake"]], "fid needs a reference"),
        (lambda f: ["--inception", f["weights"], "--images", f["fake"], "--ref_images", f["real"], "--metrics", "fd"],
         "unknown metric 'fd'"),
        (lambda f: ["--inception", f["weights"], "--images", f["fake"], "--ref_stats", f["weights"], "--metrics",
                    "kid"], "kid and precision_recall need reference images"),
        (lambda f: ["--inception", f["weights"], "--images", f["fake"], "--ref_images", f["real"], "--num_samples",
                    50], "fewer than the 50 requested"),
    ],
)
def test_cli_bad_input_gives_one_line_and_exit_status_2(files, case, expected, capsys):
    _folder(files["root"] / "mixed", 1, seed=0, size=16)
    _folder(files["root"] / "mixed" / "b", 1, seed=0, size=20)
    (files["root"] / "empty").mkdir(exist_ok=True)
    f = dict(files, mixed=files["root"] / "mixed", empty=files["root"] / "empty")
    code, _, err = _run(case(f), capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("evaluate.py: error: ") and __import__("re").search(expected, lines[0]), lines[0]


def test_cli_evaluates_a_model_sampled_on_the_fly(files, tmp_path, capsys):
    importlib.import_module("diffusers")
    model = _tiny_model(tmp_path)
    code, stdout, err = _run(["--inception", files["weights"], "--model_dir", model, "--num_samples", 4,
                              "--prompts", _prompts(tmp_path), "--steps", 2, "--batch_size", 8, "--fid_method", "eigh",
                              "--metrics", "is", "--is_splits", 2, "--save_samples", tmp_path / "samples",
                              "--no_progress"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert result["metrics"]["num_fake"] == 4 and np.isfinite(result["metrics"]["is_mean"])
    assert sorted(os.listdir(tmp_path / "samples")) == [f"{i:06d}.png" for i in range(4)]
    # The saved samples evaluated as a folder give the same score (the same 8-bit images).
    code, stdout, err = _run(["--inception", files["weights"], "--images", tmp_path / "samples", "--metrics", "is",
                              "--is_splits", 2, "--batch_size", 8, "--no_progress"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["metrics"]["is_mean"] == pytest.approx(result["metrics"]["is_mean"], rel=1e-5)


def _prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\n")
    return path


def _tiny_model(tmp_path):
    import test_sample_cli as t

    import jax.numpy as jnp

    unet = t.UNet(sample_size=t.SIZE // 2, block_out_channels=(32, 64), layers_per_block=1,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8, cross_attention_dim=32,
                  attention_head_dim=4, mid_block_type=None)
    vae = t.AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                          mid_block_add_attention=False)
    text = t.TextTransformer(max_length=16, width=32, depth=1, num_heads=4)
    pipe = t.LatentDiffusionPipeline.from_components(
        unet=unet, unet_params=t._init(unet, *unet.dummy_inputs().values()), first_stage=t.KLFirstStage(vae),
        first_stage_variables={"params": t._init(vae, jnp.zeros((1, t.SIZE, t.SIZE, 3)))},
        conditioner=t.TextConditioner(t.ByteTokenizer(16), text),
        conditioner_params=t._init(text, jnp.zeros((1, 16), jnp.int32)),
        schedule={"kind": "linear", "num_timesteps": 1000},
    )
    return t.save_model_folder(pipe, tmp_path / "tiny", step=1)


def test_cli_reference_from_a_tfds_dataset_in_a_data_dir(files, tmp_path, capsys):
    """--ref_data tfds:<name> goes through ldm_jax.data.build_dataset (tfds mock data stands in
    for a prepared data_dir); its statistics file is written."""
    tfds = importlib.import_module("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=8):
        code, stdout, err = _run(["--inception", files["weights"], "--images", files["fake"], "--ref_data",
                                  "tfds:mnist", "--ref_data_dir", tmp_path / "tfds", "--num_ref", 6, "--metrics",
                                  "kid", "--kid_subsets", 2, "--kid_subset_size", 4, "--batch_size", 8,
                                  "--save_ref_stats", tmp_path / "mnist.npz", "--no_progress"], capsys)
    assert code == 0, err
    assert json.loads(stdout)["metrics"]["num_real"] == 6
    assert load_stats(tmp_path / "mnist.npz").num_samples == 6
