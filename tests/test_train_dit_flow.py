"""DiT denoisers and the rectified-flow objective in the diffusion stage, end to end on tiny
configs: ``configs/digits_dit_flow.py:runlocal`` (class-label DiT, flow) on a 2-step digits
autoencoder and ``configs/shapes_dit_flow.py:runlocal`` (text-conditioned PixArt DiT, flow) in
pixel space; the exported model folder loads into the pipeline, which reproduces the training
preview, and samplers of the other objective are refused in one line (pipeline and sample.py).
"""

from __future__ import annotations

import importlib.util
import json
import os
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

from configs import digits_autoencoder, digits_dit_flow, digits_ldm, shapes_dit_flow  # noqa: E402
from ldm_jax.training import workdir as wd  # noqa: E402

# Whole training runs in module fixtures: minutes on 2 cores; `make test-all` runs them.
pytestmark = pytest.mark.slow


def _load_train_module():
    from cli_modules import load_cli

    return load_cli("train")


train_cli = _load_train_module()


def _quiet(config):
    config.optimizer.warmup_steps = 1
    config.logging.progress_bar = False
    config.checkpoint.async_save = False
    return config


def _dit_config(ae_workdir):
    c = _quiet(digits_dit_flow.get_config("runlocal"))
    c.first_stage.workdir = str(ae_workdir)
    c.train.num_steps = 4
    c.checkpoint.every_steps = 4
    c.train.log_every = 2
    c.preview.every_steps = 0  # only after the last step
    return c


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
    """A 2-step digits autoencoder and a 4-step class-conditional DiT + flow run on it."""
    root = tmp_path_factory.mktemp("dit_flow")
    ae = _quiet(digits_autoencoder.get_config("runlocal"))
    ae.train.num_steps = 2
    ae.checkpoint.every_steps = 2
    ae.preview.every_steps = -1
    ae.export.enabled = False
    train_cli.run(ae, str(root / "ae"))
    config = _dit_config(root / "ae")
    result = train_cli.run(config, str(root / "dit"))
    return root / "ae", root / "dit", config, result


def _grid_tiles(path, rows, columns, size, padding=2):
    grid = np.asarray(Image.open(path))
    grid = grid[..., None] if grid.ndim == 2 else grid
    scale = grid.shape[0] // (rows * (size + padding) + padding)
    grid = grid[::scale, ::scale]
    tiles = [grid[padding + r * (size + padding):][:size, padding + c * (size + padding):][:, :size]
             for r in range(rows) for c in range(columns)]
    return np.stack(tiles)


def test_digits_dit_flow_trains_exports_and_the_pipeline_reproduces_the_preview(dit_run):
    from ldm_jax.diffusion.flow import FlowSchedule
    from ldm_jax.models.dit import DiT
    from ldm_jax.pipeline import load_model_folder

    _, dit_dir, config, result = dit_run
    assert result.step == 4 and np.isfinite(result.last_metrics["loss"])
    folder = os.path.join(dit_dir, "model")
    spec = json.load(open(os.path.join(folder, "ldm_jax.json")))
    assert spec["denoiser"] == "dit" and spec["objective"] == "flow" and spec["prediction"] == "velocity"
    scheduler = json.load(open(os.path.join(folder, "scheduler", "scheduler_config.json")))
    assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 1.0
    assert not os.path.exists(os.path.join(folder, "unet"))

    pipe = load_model_folder(folder)
    assert isinstance(pipe.unet, DiT) and isinstance(pipe.schedule, FlowSchedule)
    assert pipe.unet.num_classes == 10 and pipe.default_sampler == "flow_euler"
    ema, _ = wd.restore_ema_params(dit_dir, 4)
    jax.tree.map(np.testing.assert_array_equal, pipe.params["unet"], jax.tree.map(np.asarray, ema["unet"]))

    rows, columns = config.preview.max_rows, config.preview.columns
    labels = [r for r in range(rows) for _ in range(columns)]
    images = pipe(
        class_labels=labels, sampler=config.preview.sampler, num_steps=config.preview.num_steps,
        guidance_scale=config.preview.guidance_scale, seed=config.preview.seed,
    )
    tiles = _grid_tiles(os.path.join(dit_dir, "samples", "samples_0000004.png"), rows, columns, 16)
    assert images.shape == tiles.shape == (rows * columns, 16, 16, 1)
    diff = np.abs(images.astype(int) - tiles.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.02  # batched preview vs per-image pipeline: rounding only
    assert images.std() > 0


def test_flow_model_refuses_ddpm_samplers_in_one_line_naming_the_valid_ones(dit_run):
    from ldm_jax.diffusion.samplers import sampler_names
    from ldm_jax.pipeline import load_model_folder

    pipe = load_model_folder(os.path.join(dit_run[1], "model"))
    with pytest.raises(ValueError) as info:
        pipe.validate(class_labels=[1], sampler="ddim", num_steps=4)
    message = str(info.value)
    assert "\n" not in message and "'ddim'" in message
    assert all(name in message for name in sampler_names("flow"))
    # and the CLI: one line on stderr, exit status 2, nothing written
    out = os.path.join(dit_run[1], "cli_out")
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "sample.py"), "--model_dir", os.path.join(dit_run[1], "model"),
         "--class", "1", "--sampler", "dpmpp_2m", "--steps", "3", "--out", out],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "'dpmpp_2m'" in lines[0] and "flow_heun" in lines[0], proc.stderr
    assert not os.path.exists(out)


def test_sample_cli_runs_the_flow_dit_with_its_default_sampler(dit_run, tmp_path):
    out = tmp_path / "samples"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "sample.py"), "--model_dir", os.path.join(dit_run[1], "model"),
         "--class", "3", "--num_samples", "2", "--steps", "3", "--batch_size", "2", "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr
    sidecar = json.load(open(out / "000000.json"))
    assert sidecar["sampler"] == "flow_euler" and sidecar["class_label"] == 3
    assert np.asarray(Image.open(out / "000001.png")).shape == (16, 16)


def test_ddpm_model_refuses_flow_samplers_in_one_line():
    from ldm_jax.ldm.model import build_model
    from ldm_jax.pipeline import pipeline_from_model

    config = digits_ldm.get_config("runlocal")
    config.first_stage.source = "identity"
    model = build_model(config, {"num_classes": 10, "resolution": 16, "channels": 1})
    params = model.init_params(jax.random.key(0))
    pipe = pipeline_from_model(model, params)
    assert pipe.objective == "ddpm" and pipe.default_sampler == "ddim"
    with pytest.raises(ValueError, match=r"sampler 'flow_heun' .*use one of \[.*'ddim'.*\]$"):
        pipe.validate(class_labels=[0], sampler="flow_heun", num_steps=3)


def test_stage_refuses_a_ddpm_preview_sampler_for_a_flow_model_at_start_up(dit_run, tmp_path):
    config = _dit_config(dit_run[0])
    config.preview.sampler = "ddpm"
    # train.py reports start-up errors as StartupError (its one-line CLI error), message intact
    with pytest.raises(train_cli.StartupError, match=r"^config.preview.sampler: sampler 'ddpm' .*flow_euler"):
        train_cli.run(config, str(tmp_path / "bad"))


def test_flow_loss_of_the_model_is_flow_loss_with_the_configured_t_density():
    """DiffusionModel.loss_fn with objective="flow" is ldm_jax.diffusion.flow_loss of the
    network at the configured density; an independent float64 check of one term: with t and
    noise fixed, the loss is mean((v_hat - (eps - x0))^2)."""
    from ldm_jax.diffusion.flow import flow_interpolate, flow_loss
    from ldm_jax.ldm.model import build_model

    config = digits_dit_flow.get_config("runlocal")
    config.first_stage.source = "identity"
    config.conditioning.drop_prob = 0.0
    info = {"num_classes": 10, "resolution": 16, "channels": 1}
    model = build_model(config, info)
    assert model.objective == "flow" and model.flow_options["time_density"] == "logit_normal"
    params = nn.unbox(model.init_params(jax.random.key(1)))
    # a non-zero output layer (adaLN-Zero starts at 0)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)
    x0 = jax.random.normal(jax.random.key(3), (4, 16, 16, 1))
    batch = {"latents": x0, "labels": jnp.array([0, 1, 2, 3], jnp.int32)}
    key = jax.random.key(4)
    loss, _ = model.loss_fn(params, batch, key)

    _, loss_key, dropout_key = jax.random.split(key, 3)

    def net(x, t):
        return model.unet.apply({"params": params["unet"]}, x, t, class_labels=batch["labels"])

    expected = flow_loss(model.schedule, net, x0, loss_key, time_density="logit_normal")
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
    uniform = flow_loss(model.schedule, net, x0, loss_key, time_density="uniform")
    assert abs(float(uniform) - float(loss)) > 1e-6  # the density option reaches the loss

    t = jnp.array([0.1, 0.4, 0.7, 0.95])
    noise = jax.random.normal(jax.random.key(5), x0.shape)
    fixed = flow_loss(model.schedule, net, x0, loss_key, t=t, noise=noise)
    x_t = flow_interpolate(x0, noise, t)
    v_hat = np.asarray(net(x_t, 1000.0 * t), np.float64)
    reference = np.mean((v_hat - (np.asarray(noise, np.float64) - np.asarray(x0, np.float64))) ** 2)
    np.testing.assert_allclose(float(fixed), reference, rtol=1e-5)


def test_dit_section_is_one_hop_and_bad_keys_fail_in_one_line():
    from ldm_jax.ldm.model import build_model
    from ldm_jax.models.dit import DiT
    from ldm_jax.models.pixart import PixArtDiT

    config = digits_dit_flow.get_config("runlocal")
    config.first_stage.source = "identity"
    info = {"num_classes": 10, "resolution": 16, "channels": 1}
    config.dit.norm_eps = 1e-4  # any DiT field passes through
    model = build_model(config, info)
    assert isinstance(model.unet, DiT) and model.unet.norm_eps == 1e-4 and model.unet.sample_size == 16
    assert model.unet.in_channels == model.unet.out_channels == 1 and model.unet.num_classes == 10
    config.conditioning.class_as_context = True  # the labels become a context: PixArt
    assert isinstance(build_model(config, info).unet, PixArtDiT)
    config.conditioning.class_as_context = False
    with config.unlocked():
        config.dit.num_classes = 3
    with pytest.raises(ValueError, match=r"config.dit keys \['num_classes'\] are derived"):
        build_model(config, info)
    del config.dit["num_classes"]
    config.dit.patch_size = 3
    with pytest.raises(ValueError, match="config.dit: sample_size=16 is not divisible by patch_size=3"):
        build_model(config, info)
    config.dit.patch_size = 2
    config.diffusion.flow_time_density = "logitnormal"
    with pytest.raises(ValueError, match="unknown config.diffusion.flow_time_density 'logitnormal'"):
        build_model(config, info)
    config.diffusion.flow_time_density = "uniform"
    config.diffusion.objective = "flw"
    with pytest.raises(ValueError, match="unknown config.diffusion.objective 'flw'; choose one of ddpm, flow"):
        build_model(config, info)


def test_shapes_pixart_flow_trains_and_its_folder_samples(tmp_path):
    from ldm_jax.models.pixart import PixArtDiT
    from ldm_jax.pipeline import load_model_folder

    config = _quiet(shapes_dit_flow.get_config("runlocal"))
    config.first_stage.source = "identity"
    config.train.num_steps = 2
    config.preview.every_steps = -1
    result = train_cli.run(config, str(tmp_path))
    assert result.step == 2 and np.isfinite(result.last_metrics["loss"])
    pipe = load_model_folder(os.path.join(tmp_path, "model"))
    assert isinstance(pipe.unet, PixArtDiT) and pipe.objective == "flow" and pipe.conditioner.kind == "text"
    trained, _ = wd.restore_ema_params(tmp_path)
    np.testing.assert_array_equal(
        pipe.params["unet"]["scale_shift_table"], np.asarray(trained["unet"]["scale_shift_table"])
    )
    images = pipe(["a small red circle"], sampler="flow_heun", num_steps=2, guidance_scale=2.0)
    assert images.shape == (1, 16, 16, 3) and images.dtype == np.uint8
