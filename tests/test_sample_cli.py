"""sample.py end to end on a tiny random-weight ldm_jax model folder (byte-tokenizer text
transformer, KL autoencoder, cross-attention U-Net): outputs, sidecars, bit-identical
regeneration from a sidecar's command, refusal to overwrite, and one-line errors."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

from ldm_jax.models.autoencoder import AutoencoderKL
from ldm_jax.models.conditioning import TextTransformer
from ldm_jax.models.tokenizers import ByteTokenizer
from ldm_jax.models.unet import UNet
from ldm_jax.pipeline import KLFirstStage, LatentDiffusionPipeline, TextConditioner, save_model_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import sample  # noqa: E402

SIZE = 16


def _init(module, *args, seed=0):
    """Random params of ``module`` drawn with NumPy on its abstract parameter tree (a Flax init
    with JAX's RNG compiles slowly on CPU): kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.05^2),
    biases ~ N(0, 0.05^2), embeddings ~ N(0, 1)."""
    abstract = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args)))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "kernel":
            return noise / np.sqrt(np.prod(leaf.shape[:-1]))
        if name == "scale":
            return 1.0 + 0.05 * noise
        return noise if name == "embedding" else 0.05 * noise

    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    unet = UNet(
        sample_size=SIZE // 2, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4, mid_block_type=None,
    )
    vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        mid_block_add_attention=False)
    text = TextTransformer(max_length=16, width=32, depth=1, num_heads=4)
    pipe = LatentDiffusionPipeline.from_components(
        unet=unet,
        unet_params=_init(unet, *unet.dummy_inputs().values()),
        first_stage=KLFirstStage(vae),
        first_stage_variables={"params": _init(vae, jnp.zeros((1, SIZE, SIZE, 3)))},
        conditioner=TextConditioner(ByteTokenizer(16), text),
        conditioner_params=_init(text, jnp.zeros((1, 16), jnp.int32)),
        schedule={"kind": "linear", "num_timesteps": 1000},
    )
    return save_model_folder(pipe, tmp_path_factory.mktemp("model") / "tiny", step=42)


def _run_in_process(args, capsys):
    code = sample.main([str(a) for a in args])
    return code, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("sample.py: error: ") and "Traceback" not in err
    return lines[0]


def test_cli_end_to_end_writes_images_grid_sidecars_and_regenerates_bit_identically(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n\n  a blue circle  \n", encoding="utf-8")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "sample.py"), "--model_dir", model_dir, "--prompts", prompts,
         "--num_samples", "2", "--batch_size", "3", "--steps", "3", "--guidance_scale", "3", "--seed", "11",
         "--out", out, "--compilation_cache", tmp_path / "xla_cache"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    assert "sampling" in proc.stderr  # the progress bar over batches
    names = sorted(os.listdir(out))
    assert names == [f"{i:06d}.{ext}" for i in range(4) for ext in ("json", "png")] + ["grid.png"]
    images = [np.asarray(Image.open(out / f"{i:06d}.png")) for i in range(4)]
    assert all(im.shape == (SIZE, SIZE, 3) and im.dtype == np.uint8 for im in images)
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 * SIZE, 2 * SIZE, 3)  # one row per prompt
    np.testing.assert_array_equal(grid[SIZE:, SIZE:], images[3])
    assert os.listdir(tmp_path / "xla_cache")  # the persistent compilation cache was written

    sidecar = json.loads((out / "000003.json").read_text())
    assert sidecar["prompt"] == "a blue circle" and sidecar["image_index"] == 3 and sidecar["seed"] == 11
    assert sidecar["sampler"] == "ddim" and sidecar["num_steps"] == 3 and sidecar["guidance_scale"] == 3.0
    assert (sidecar["height"], sidecar["width"]) == (SIZE, SIZE)
    model = sidecar["model"]
    assert model["checkpoint_step"] == 42 and model["format"] == "ldm_jax" and len(model["params_hash"]) == 16
    assert json.loads((out / "000000.json").read_text())["prompt"] == "a red square"

    # The sidecar's command regenerates the image alone (in a batch of its own, padded to the
    # eight devices): same bits. The program is the same as the first run's, so this process
    # loads it from the persistent compilation cache instead of compiling.
    cached = set(os.listdir(tmp_path / "xla_cache"))
    argv = shlex.split(sidecar["command"])
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    proc = subprocess.run([sys.executable, *argv[1:], "--compilation_cache", str(tmp_path / "xla_cache")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "again" / "000003.png")), images[3])
    assert not np.array_equal(images[2], images[3])
    assert set(os.listdir(tmp_path / "xla_cache")) == cached  # a cache hit wrote no new entry

    # Refuses to overwrite, in one line, before loading anything.
    code, err = _run_in_process(["--model_dir", model_dir, "--prompts", prompts, "--num_samples", "2", "--out", out], capsys)
    assert code == 2 and "--overwrite" in _one_error_line(err)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    Image.fromarray(np.zeros((SIZE, SIZE, 3), np.uint8)).save(d / "init.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(d / "small_mask.png")
    (d / "empty.txt").write_text("\n  \n", encoding="utf-8")
    return d


@pytest.mark.parametrize(
    "case, expected",
    [
        (["--model_dir", "{tmp}/nope", "--prompt", "x"], "model directory not found"),
        (["--model_dir", "{model}", "--prompt", "x", "--height", "18", "--width", "16"], "height=18 is not a positive multiple of 4"),
        (["--model_dir", "{model}", "--prompts", "{files}/empty.txt"], "holds no prompts"),
        (["--model_dir", "{model}", "--prompt", "x", "--init_image", "{files}/init.png", "--mask", "{files}/small_mask.png"],
         "mask size 8x8 does not match init image size 16x16"),
        (["--model_dir", "{model}", "--prompt", "x", "--sampler", "nope"], "unknown sampler 'nope'"),
        (["--workdir", "{tmp}", "--prompt", "x"], "not a training workdir"),
        (["--model_dir", "{model}", "--prompt", "x", "--strength", "0.5"], "--strength needs --init_image"),
        (["--model_dir", "{model}", "--prompt", "x", "--init_image", "{files}/missing.png"], "init image not found"),
        (["--model_dir", "{model}", "--class", "1"], "class_labels given to a text-conditioned model"),
        (["--model_dir", "{model}", "--prompt", "x", "--steps", "0"], "--steps must be >= 1"),
        (["--prompt", "x", "--out", "o"], "one of the arguments --model_dir --workdir is required"),
    ],
)
def test_cli_bad_input_gives_one_line_and_exit_status_2(model_dir, files, tmp_path, capsys, case, expected):
    args = [a.format(tmp=tmp_path, model=model_dir, files=files) for a in case]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    code, err = _run_in_process(args, capsys)
    assert code == 2
    assert expected in _one_error_line(err)
    assert not os.path.exists(tmp_path / "out")


def test_cli_process_reports_bad_input_without_traceback(model_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "sample.py"), "--model_dir", model_dir, "--prompt", "x",
         "--sampler", "nope", "--out", tmp_path / "out"],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "unknown sampler 'nope'" in _one_error_line(proc.stderr)
