"""train.py end to end on tiny configs: both digits stages, a text-conditional shapes run, tfds
(mock data), an image folder with a corrupt file, start-up errors, resume after preemption, the
workdir -> pipeline round trip, and the SD 1.5 config's shapes and sharding on 8 devices.

Every run is in-process through ``train.run`` (one subprocess checks the command-line error
path); runs share a persistent compilation cache so identical programs compile once.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from configs import digits_autoencoder, digits_ldm, mnist_ldm, sd15, shapes_ldm  # noqa: E402
from ldm_jax.pipeline import from_workdir  # noqa: E402
from ldm_jax.training import workdir as wd  # noqa: E402
from tb_events import read_events as _read_events  # noqa: E402
from ldm_jax.training.loop import Hook  # noqa: E402


def _load_train_module():
    """train.py as a module, loaded once per process (it defines absl flags; test files share it)."""
    from cli_modules import load_cli

    return load_cli("train")


train_cli = _load_train_module()


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Identical programs of different runs (e.g. a resumed run) compile once."""
    previous = (
        jax.config.jax_compilation_cache_dir,
        jax.config.jax_persistent_cache_min_compile_time_secs,
        jax.config.jax_persistent_cache_min_entry_size_bytes,
    )
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", previous[2])


def _quiet(config):
    config.optimizer.warmup_steps = 1
    config.logging.progress_bar = False
    config.checkpoint.async_save = False
    return config


def _ae_config():
    c = _quiet(digits_autoencoder.get_config("runlocal"))
    c.train.num_steps = 2
    c.optimizer.warmup_steps = 1
    c.checkpoint.every_steps = 2
    c.preview.every_steps = -1
    c.export.enabled = False
    return c


def _ldm_config(ae_workdir):
    c = _quiet(digits_ldm.get_config("runlocal"))
    c.first_stage.workdir = str(ae_workdir)
    c.first_stage.sample_posterior = False  # deterministic latents: the scale check below is exact
    c.train.num_steps = 4
    c.checkpoint.every_steps = 2
    c.train.log_every = 2
    c.preview.every_steps = 0  # only after the last step
    return c


@pytest.fixture(scope="module")
def digits_runs(tmp_path_factory):
    """A tiny autoencoder run and a tiny class-conditional LDM on it (4 steps)."""
    root = tmp_path_factory.mktemp("digits")
    ae_dir, ldm_dir = root / "ae", root / "ldm"
    train_cli.run(_ae_config(), str(ae_dir))
    result = train_cli.run(_ldm_config(ae_dir), str(ldm_dir))
    return ae_dir, ldm_dir, result


# ----------------------------------------------------------------------------- helpers


def _grid_tiles(path, rows, columns, size, padding=2):
    """The tiles of a grid PNG written by RunLogger (nearest-upscaled by an integer factor)."""
    grid = np.asarray(Image.open(path))
    if grid.ndim == 2:
        grid = grid[..., None]
    height = rows * (size + padding) + padding
    scale = grid.shape[0] // height
    grid = grid[::scale, ::scale]
    tiles = []
    for r in range(rows):
        for c in range(columns):
            top, left = padding + r * (size + padding), padding + c * (size + padding)
            tiles.append(grid[top : top + size, left : left + size])
    return np.stack(tiles)


# ----------------------------------------------------------------------------- two digits stages


def test_digits_stages_train_checkpoint_log_and_export(digits_runs):
    from ldm_jax.data import DataLoader
    from ldm_jax.pipeline import load_model_folder

    ae_dir, ldm_dir, result = digits_runs
    assert wd.checkpoint_steps(ae_dir) == [2] and wd.checkpoint_steps(ldm_dir) == [2, 4]
    assert result.step == 4 and np.isfinite(result.last_metrics["loss"])
    saved = json.load(open(os.path.join(wd.checkpoint_dir(ldm_dir), "config.json")))
    assert saved["mesh"]["shape"] == {"data": 8, "fsdp": 1, "tensor": 1}  # the resolved wildcard
    assert saved["first_stage"]["workdir"] == str(ae_dir)

    # scale_factor = 1 / std of the first batch of latents, recomputed in float64 from the cache
    meta = wd.read_metadata(ldm_dir, 4)
    cache = np.load(os.path.join(ldm_dir, "latent_cache", "latents.npy"))
    labels = np.load(os.path.join(ldm_dir, "latent_cache", "labels.npy"))
    assert cache.shape == (1617, 8, 8, 8) and labels.min() == 0 and labels.max() == 9
    first = DataLoader(_FakeLen(len(cache)), 8, seed=0, shuffle=True).sampler.global_batch_indices(0)
    mean = cache[first][..., :4].astype(np.float64)
    assert meta["scale_factor"] == pytest.approx(1.0 / mean.std(), rel=1e-5)
    assert meta["first_stage"] == {"source": "workdir", "workdir": str(ae_dir), "step": 2}
    assert meta["data"]["num_classes"] == 10

    scalars, images = _read_events(os.path.join(ldm_dir, "tensorboard"))
    for tag in ("train/loss", "train/lr", "train/grad_norm", "perf/images_per_sec", "data/skipped_images"):
        assert tag in scalars, tag
    assert [step for step, _ in scalars["train/loss"]] == [2, 4]
    assert "samples" in images
    assert os.path.isfile(os.path.join(ldm_dir, "samples", "samples_0000004.png"))

    pipe = load_model_folder(os.path.join(ldm_dir, "model"))
    assert pipe.conditioner.kind == "class" and pipe.conditioner.num_classes == 10
    assert pipe.first_stage.module.scale_factor == pytest.approx(meta["scale_factor"])
    ema, _ = wd.restore_ema_params(ldm_dir, 4)
    np.testing.assert_array_equal(
        pipe.params["unet"]["conv_in"]["kernel"], ema["unet"]["conv_in"]["kernel"]
    )


class _FakeLen:
    """A source of a given length (only the sampler's index order is needed)."""

    resolution, channels, num_classes, has_captions = 1, 1, None, False

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {}


def test_from_workdir_pipeline_reproduces_the_training_preview(digits_runs):
    """The preview grid written by the trainer (batched jitted sampling in the training
    process) equals what the pipeline rebuilt from the workdir's checkpoint generates."""
    _, ldm_dir, _ = digits_runs
    config = _ldm_config("unused")
    pipe = from_workdir(ldm_dir)
    rows, columns = config.preview.max_rows, config.preview.columns
    labels = [r for r in range(rows) for _ in range(columns)]
    images = pipe(
        class_labels=labels, sampler=config.preview.sampler, num_steps=config.preview.num_steps,
        guidance_scale=config.preview.guidance_scale, seed=config.preview.seed,
    )
    tiles = _grid_tiles(os.path.join(ldm_dir, "samples", "samples_0000004.png"), rows, columns, 16)
    assert images.shape == tiles.shape == (rows * columns, 16, 16, 1)
    diff = np.abs(images.astype(int) - tiles.astype(int))
    # batched vs per-image sampling differ in float rounding only: at most one 8-bit level
    assert diff.max() <= 1 and diff.mean() < 0.02
    assert images.std() > 0  # not a constant image


def test_frozen_first_stage_is_an_argument_not_a_compiled_constant(digits_runs):
    from ldm_jax.data import DataLoader, build_dataset, dataset_stats
    from ldm_jax.training import mesh as mesh_lib
    from ldm_jax.training.loop import compile_prepare_batch, place_frozen
    from ldm_jax.training.stages import diffusion

    ae_dir, ldm_dir, _ = digits_runs
    config = _ldm_config(ae_dir)
    config.first_stage.cache_latents = False
    config.workdir = str(ldm_dir)  # resumes the stored scale factor instead of estimating
    source = build_dataset(config.data)
    stage = diffusion.build_stage(config, dataset_stats(source), source=source)
    mesh = mesh_lib.make_mesh({"shape": {"data": -1}})
    frozen, shardings = place_frozen(stage.task.frozen_params, mesh, ())
    batch = stage.host_batch(DataLoader(source, 8).get_batch(0))
    text = compile_prepare_batch(stage.task, shardings, mesh).lower(frozen, batch, jax.random.key(0)).as_text()
    sizes = [math.prod(int(d) for d in dims.split("x")[:-1] if d) for dims in
             re.findall(r"stablehlo\.constant dense<[^>]*> : tensor<([0-9x]*[a-z0-9]+)>", text)]
    num_params = sum(x.size for x in jax.tree.leaves(frozen))
    assert num_params > 10_000 and max(sizes, default=0) < 64
    assert stage.metadata["scale_factor"] == wd.read_metadata(ldm_dir)["scale_factor"]


def test_evaluation_samples_are_the_same_set_whatever_the_batch(digits_runs):
    """The evaluation hook draws its samples in batches (config.eval.batch_size) with noise
    streams offset by the batch's start: 16 images in one call equal two calls of 8 at offsets
    0 and 8 (the truth: the same program per image, independent of its batch-mates)."""
    import ml_collections

    from ldm_jax.data import build_dataset, dataset_stats
    from ldm_jax.training.stages import diffusion

    ae_dir, ldm_dir, result = digits_runs
    config = _ldm_config(ae_dir)
    config.first_stage.cache_latents = False
    config.workdir = str(ldm_dir)
    source = build_dataset(config.data)
    stage = diffusion.build_stage(config, dataset_stats(source), source=source)
    settings = ml_collections.ConfigDict({"sampler": "ddpm", "num_steps": 3, "guidance_scale": 2.0,
                                          "guidance_interval": (), "num_images": 0})
    labels = np.arange(16, dtype=np.int32) % 10
    key = jax.random.PRNGKey(7)
    params = result.state.ema_params
    whole = stage.sample(params, labels, key, settings).astype(np.int16)
    halves = np.concatenate([stage.sample(params, labels[:8], key, settings, offset=0),
                             stage.sample(params, labels[8:], key, settings, offset=8)]).astype(np.int16)
    assert whole.shape == (16, 16, 16, 1)
    assert np.abs(whole - halves).max() <= 1  # uint8 rounding of batch-dependent float sums
    # the offset is what moves the noise: the second half drawn at offset 0 is other images
    unshifted = stage.sample(params, labels[8:], key, settings, offset=0).astype(np.int16)
    assert np.abs(unshifted - whole[8:]).mean() > 5


def test_resume_after_preemption_reproduces_the_uninterrupted_run(digits_runs, tmp_path):
    ae_dir, reference_dir, _ = digits_runs
    config = _ldm_config(ae_dir)
    config.preview.every_steps = -1
    config.export.enabled = False
    sigterm_at_2 = Hook(2, lambda step, state: os.kill(os.getpid(), signal.SIGTERM), at_end=False)
    first = train_cli.run(config, str(tmp_path / "ldm"), extra_hooks=[sigterm_at_2])
    assert first.preempted and first.step == 2 and wd.checkpoint_steps(tmp_path / "ldm") == [2]
    second = train_cli.run(_ldm_config(ae_dir), str(tmp_path / "ldm"))
    assert second.resumed_from == 2 and second.step == 4
    resumed, _ = wd.restore_ema_params(tmp_path / "ldm", 4)
    reference, _ = wd.restore_ema_params(reference_dir, 4)
    jax.tree.map(np.testing.assert_array_equal, resumed, reference)


# ----------------------------------------------------------------------------- other data


@pytest.mark.slow  # run by `make test-all` (a whole text-conditional training run: 109 s here)
def test_text_conditional_shapes_run_trains_the_text_encoder(tmp_path):
    from ldm_jax.data import build_dataset
    from ldm_jax.pipeline import load_model_folder
    from ldm_jax.ldm.model import build_model
    from ldm_jax.training.stages import diffusion

    config = _quiet(shapes_ldm.get_config("runlocal"))
    config.first_stage.source = "identity"
    config.train.num_steps = 2
    config.preview.every_steps = -1  # sampling is covered by the digits run
    result = train_cli.run(config, str(tmp_path))
    assert result.step == 2 and np.isfinite(result.last_metrics["loss"])

    # the jointly trained text encoder moved away from its initialisation
    model = build_model(wd.read_config(tmp_path), wd.read_metadata(tmp_path)["data"])
    params_key = jax.random.split(jax.random.key(config.seed))[0]  # as train_state._init_state
    initial = jax.tree.map(np.asarray, nn.unbox(model.init_params(params_key)))
    trained, _ = wd.restore_ema_params(tmp_path)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), trained["text_encoder"], initial["text_encoder"])
    assert min(jax.tree.leaves(moved)) > 0

    # preview rows are the first distinct training captions, each sampled `columns` times,
    # with the empty caption as the guidance null condition
    source = build_dataset(config.data)
    cond, uncond, n, rows = diffusion.preview_conditions(model, config.preview, source)
    captions = []
    for i in range(len(source)):
        if source[i]["caption"] not in captions:
            captions.append(source[i]["caption"])
    assert rows == captions[: config.preview.max_rows] and n == len(rows) * config.preview.columns
    tokenizer = model.conditioner.tokenizer
    np.testing.assert_array_equal(cond["ids"], tokenizer([r for r in rows for _ in range(config.preview.columns)]).ids)
    np.testing.assert_array_equal(uncond["ids"], tokenizer([""] * n).ids)

    pipe = load_model_folder(os.path.join(tmp_path, "model"))
    assert pipe.conditioner.kind == "text" and type(pipe.conditioner.encoder).__name__ == "TextTransformer"
    np.testing.assert_array_equal(
        pipe.params["conditioner"]["embeddings"]["token_embedding"]["embedding"],
        trained["text_encoder"]["embeddings"]["token_embedding"]["embedding"],
    )


def _latent_config_on(ae_dir, data):
    """The tiny digits LDM (same model, optimizer and batch as the fixture run, so its
    programs come from the compilation cache) on other data."""
    config = _ldm_config(ae_dir)
    config.data = data
    config.train.num_steps = 2
    config.preview.every_steps = -1
    config.export.enabled = False
    return config


def test_tfds_mnist_data_trains_on_mock_data(digits_runs, tmp_path):
    import tensorflow_datasets as tfds

    data = mnist_ldm.get_config("runlocal").data  # tfds:mnist, 16x16x1
    data.data_dir = str(tmp_path / "no_tfds_here")
    config = _latent_config_on(digits_runs[0], data)
    with tfds.testing.mock_data(num_examples=16):
        result = train_cli.run(config, str(tmp_path / "run"))
    assert result.step == 2 and np.isfinite(result.last_metrics["loss"])
    meta = wd.read_metadata(tmp_path / "run")
    assert (meta["data"]["num_classes"], meta["data"]["channels"], meta["data"]["resolution"]) == (10, 1, 16)
    assert np.load(os.path.join(tmp_path, "run", "latent_cache", "latents.npy")).shape[0] == 16


def test_image_folder_with_a_corrupt_file_trains_and_reports_the_skip(digits_runs, tmp_path, caplog):
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for label in range(10):
        (folder / str(label)).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (20, 20), dtype=np.uint8)).save(folder / str(label) / "a.png")
    (folder / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    data = {"name": "folder", "path": str(folder), "resolution": 16, "channels": 1, "folder_labels": True}
    config = _latent_config_on(digits_runs[0], data)
    with caplog.at_level("WARNING"):
        result = train_cli.run(config, str(tmp_path / "run"))
    assert result.step == 2 and np.isfinite(result.last_metrics["loss"])
    scalars, _ = _read_events(os.path.join(tmp_path, "run", "tensorboard"))
    assert scalars["data/skipped_images"] == [(2, 1.0)]
    assert any("skipped 1 unreadable images" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["mnist_ldm", "cifar10_ldm", "celeba64_ldm", "shapes_ldm"])
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_example_configs_build_their_models(name, arg):
    """Every example config builds a consistent model (U-Net, conditioning) for its data."""
    from ldm_jax.ldm.model import build_model

    module = __import__(f"configs.{name}", fromlist=["get_config"])
    config = module.get_config(arg)
    config.first_stage.source = "identity"
    channels = config.data.channels or 3
    info = {"num_classes": 10 if config.conditioning.kind == "class" else None,
            "has_captions": config.conditioning.kind == "text", "resolution": config.data.resolution,
            "channels": channels}
    model = build_model(config, info)
    params = jax.eval_shape(lambda: nn.unbox(model.init_params(jax.random.key(0))))
    assert model.unet.in_channels == channels and model.latent_size == config.data.resolution
    assert ("text_encoder" in params) == (config.conditioning.kind == "text")


# ----------------------------------------------------------------------------- start-up errors


@pytest.mark.parametrize(
    "override, message",
    [
        (lambda c: c.data.update(name="mnistt"), "unknown dataset name 'mnistt'"),
        (lambda c: c.train.update(global_batch_size=12), "global_batch_size=12 is not divisible"),
        (lambda c: c.mesh.update(shape={"data": 16}), "needs 16 devices but only 8"),
        (lambda c: c.update(stage="difusion"), "unknown config.stage 'difusion'"),
        (lambda c: c.conditioning.update(kind="txt"), "unknown config.conditioning.kind 'txt'"),
        (lambda c: c.preview.update(guidance_interval=(700.0, 200.0)),
         "config.preview.guidance_interval must be finite with t_low <= t_high"),
        (lambda c: (c.conditioning.update(kind="none"), c.preview.update(guidance_interval=(300.0, 999.0))),
         "config.preview.guidance_interval=(300.0, 999.0) needs classifier-free guidance"),
        (lambda c: (c.conditioning.update(kind="none"), c.eval.update(every_steps=2, guidance_interval=(300.0, 999.0))),
         "config.eval.guidance_interval=(300.0, 999.0) needs classifier-free guidance"),
    ],
)
def test_bad_config_fails_at_start_up_with_one_line(tmp_path, override, message):
    config = _quiet(digits_ldm.get_config("runlocal"))
    config.first_stage.source = "identity"
    override(config)
    with pytest.raises(train_cli.StartupError) as error:
        train_cli.run(config, str(tmp_path))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not os.path.exists(wd.checkpoint_dir(tmp_path))


def test_command_line_bad_config_prints_one_line_and_exits_nonzero(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    command = [
        sys.executable, os.path.join(ROOT, "train.py"),
        "--config", os.path.join(ROOT, "configs", "digits_ldm.py:runlocal"),
        "--workdir", str(tmp_path), "--config.data.name=nope", "--config.first_stage.source=identity",
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1] == ("train.py: error: unknown dataset name 'nope'; expected one of "
                         "('digits', 'shapes', 'folder', 'tfds:<name>')")
    assert sum(line.startswith("train.py:") for line in lines) == 1


# ----------------------------------------------------------------------------- SD 1.5 config


def test_sd15_config_shapes_and_fsdp_sharding_on_8_devices(capsys):
    from ldm_jax.models.clip import CLIPTextConfig, CLIPTextEncoder
    from ldm_jax.training import mesh as mesh_lib
    from ldm_jax.training.config import resolve_config
    from ldm_jax.training.optimizer import make_optimizer
    from ldm_jax.ldm.conditioning import TextConditioner
    from ldm_jax.ldm.model import build_unet
    from ldm_jax.training.train_state import state_shardings

    config = resolve_config(sd15.get_config(), 8)
    assert dict(config.mesh.shape) == {"data": 1, "fsdp": 8, "tensor": 1}
    conditioning = TextConditioner(None, CLIPTextEncoder(CLIPTextConfig()), drop_prob=0.1)  # a frozen CLIP text encoder
    unet = build_unet(config.unet, 4, 64, conditioning)
    assert unet.cross_attention_dim == 768 and unet.dtype == jnp.bfloat16 and unet.remat

    def init_params(key):
        return {"unet": unet.init(key, **unet.dummy_inputs(1))["params"]}

    mesh = mesh_lib.make_mesh(config.mesh)
    tx, _ = make_optimizer(config.optimizer)
    abstract, shardings = state_shardings(init_params, tx, mesh, mesh_lib.logical_axis_rules(config.sharding))
    leaves = jax.tree.leaves(abstract.params)
    total = sum(math.prod(a.shape) for a in leaves)
    assert total == 859_520_964  # diffusers' SD 1.5 UNet2DConditionModel parameter count

    def per_device(tree, tree_shardings):
        return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
                   for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(tree_shardings)))

    sharded = replicated = 0
    for a, s in zip(leaves, jax.tree.leaves(shardings.params)):
        if math.prod(s.shard_shape(a.shape)) * 8 == math.prod(a.shape):
            sharded += math.prod(a.shape)
        else:
            assert math.prod(s.shard_shape(a.shape)) == math.prod(a.shape)
            assert a.ndim == 1  # only biases / norm scales stay replicated
            replicated += math.prod(a.shape)
    params_mb = per_device(abstract.params, shardings.params) / 2**20
    opt_mb = per_device(abstract.opt_state, shardings.opt_state) / 2**20
    assert params_mb == pytest.approx((sharded / 8 + replicated) * 4 / 2**20)
    assert opt_mb == pytest.approx(2 * params_mb, rel=1e-3)  # AdamW mu and nu
    assert replicated < 0.001 * total
    with capsys.disabled():
        print(f"\nSD1.5 U-Net on 8 devices (fsdp=8): {total:,} params, {sharded:,} sharded 8-way, "
              f"{replicated:,} replicated; per device: params {params_mb:.1f} MB, AdamW {opt_mb:.1f} MB, "
              f"EMA {params_mb:.1f} MB (total {2 * params_mb + opt_mb:.1f} MB vs "
              f"{total * 16 / 2**20:.1f} MB unsharded)")


# ----------------------------------------------------------------------------- frozen diffusers VAE + CLIP


def _tiny_sd_folder(root):
    """A random-weight diffusers AutoencoderKL + transformers CLIPTextModel + tokenizer, saved
    in the Stable Diffusion folder layout (vae/, text_encoder/, tokenizer/)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers import CLIPTokenizer as HFCLIPTokenizer

    torch.manual_seed(0)
    chars = [chr(b) for b in range(33, 127)]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    vocab_dir = os.path.join(root, "vocab")
    os.makedirs(vocab_dir)
    with open(os.path.join(vocab_dir, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(vocab_dir, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = HFCLIPTokenizer(os.path.join(vocab_dir, "vocab.json"), os.path.join(vocab_dir, "merges.txt"),
                                model_max_length=16)
    n = len(tokenizer)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1,
    )).eval()
    vae = AutoencoderKL(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2).eval()
    folder = os.path.join(root, "sd")
    vae.save_pretrained(os.path.join(folder, "vae"))
    text.save_pretrained(os.path.join(folder, "text_encoder"))
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    for name in ("vocab.json", "merges.txt"):  # the files of SD's tokenizer/ (transformers 5 writes tokenizer.json)
        shutil.copy(os.path.join(vocab_dir, name), os.path.join(folder, "tokenizer", name))
    return folder, vae, text, tokenizer


def test_frozen_diffusers_vae_and_clip_prepare_batches_like_the_torch_models(tmp_path):
    """prepare_batch (jitted, frozen params as arguments) gives scale * posterior mean of the
    diffusers VAE and, per example, either CLIP(caption) or CLIP("") (condition dropout),
    checked against the torch models."""
    import torch

    from ldm_jax.data import DataLoader, build_dataset, dataset_stats
    from ldm_jax.training import mesh as mesh_lib
    from ldm_jax.training.loop import compile_prepare_batch, place_frozen
    from ldm_jax.training.stages import diffusion

    folder, vae, text, tokenizer = _tiny_sd_folder(str(tmp_path))
    config = _quiet(shapes_ldm.get_config("runlocal"))
    config.first_stage.update(source="diffusers", path=folder, sample_posterior=False, scale_factor=-1.0)
    config.conditioning.update(kind="clip", clip_path=folder, drop_prob=0.5)
    config.unet.cross_attention_dim = 0  # take CLIP's width (32)
    config.workdir = str(tmp_path / "run")
    source = build_dataset(config.data)
    stage = diffusion.build_stage(config, dataset_stats(source), source=source)
    model = stage.model
    assert model.unet.cross_attention_dim == 32 and model.latent_shape == (8, 8, 4)

    host = DataLoader(source, 8).get_batch(0)
    batch = stage.host_batch(host)
    mesh = mesh_lib.make_mesh({"shape": {"data": -1}})
    frozen, shardings = place_frozen(stage.task.frozen_params, mesh, ())
    prepared = jax.device_get(compile_prepare_batch(stage.task, shardings, mesh)(frozen, batch, jax.random.key(3)))

    scale = stage.metadata["scale_factor"]
    with torch.no_grad():
        images = torch.from_numpy(np.ascontiguousarray(host["image"].transpose(0, 3, 1, 2)))
        mean = vae.encode(images).latent_dist.mean.numpy().transpose(0, 2, 3, 1)
        ids = tokenizer(host["caption"], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        with_caption = text(ids.input_ids).last_hidden_state.numpy()
        empty = tokenizer([""], padding="max_length", max_length=16, return_tensors="pt")
        without = text(empty.input_ids).last_hidden_state.numpy()[0]
    # float32 convolutions of XLA vs torch: relative error ~1e-4 (as in tests/test_autoencoder.py)
    np.testing.assert_allclose(prepared["latents"], scale * mean, rtol=0, atol=3e-4 * scale * np.abs(mean).max())
    tol = 1e-4 * np.abs(with_caption).max()
    dropped = [np.allclose(c, without, rtol=0, atol=tol) for c in prepared["context"]]
    kept = [np.allclose(c, w, rtol=0, atol=tol) for c, w in zip(prepared["context"], with_caption)]
    assert all(d or k for d, k in zip(dropped, kept)) and any(dropped) and any(kept)
    loss = jax.eval_shape(stage.task.loss_fn, nn.unbox(jax.eval_shape(model.init_params, jax.random.key(0))),
                          prepared, jax.random.key(0))
    assert loss[0].shape == ()


def test_command_line_refuses_a_locked_workdir_with_one_line_and_writes_nothing(tmp_path):
    from ldm_jax.training.workdir_lock import WorkdirLock

    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    command = [
        sys.executable, os.path.join(ROOT, "train.py"),
        "--config", os.path.join(ROOT, "configs", "digits_ldm.py:runlocal"),
        "--workdir", str(tmp_path), "--config.first_stage.source=identity",
    ]
    with WorkdirLock(tmp_path):  # another run holds the workdir
        before = sorted(os.listdir(tmp_path))
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        after = sorted(os.listdir(tmp_path))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("train.py: error: ") and str(os.getpid()) in lines[-1], lines[-1]
    assert sum(line.startswith("train.py:") for line in lines) == 1
    assert before == after  # nothing written beside the lock
