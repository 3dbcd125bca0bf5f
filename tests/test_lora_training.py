"""LoRA training through the shared loop (``config.stage = "finetune"``), its export and loading.

One tiny text-conditioned base (8x8 pixel space, ``tests/lora_helpers.py``) and one 2-step
DreamBooth-LoRA run serve every test; the run's LoRA file is checked against diffusers + peft
(``load_lora_into_unet`` on the base U-Net as diffusers loads it), against our merged export,
and through ``sample.py --lora``.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import lora_helpers as H
from configs import base as config_base
from ldm_jax.training import workdir as wd
from ldm_jax.training.loop import Hook
from ldm_jax.training.stages.finetune_sections import add_finetune_sections

# Whole training runs in module fixtures: minutes on 2 cores; `make test-all` runs them.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from cli_modules import load_cli  # noqa: E402

train_cli = load_cli("train")


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The resumed run compiles nothing again."""
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


def lora_config(base_dir, data_dir, class_dir):
    c = add_finetune_sections(config_base.get_base_config("finetune"))
    c.data = config_base.data_config("folder", 8, path=str(data_dir))
    c.finetune.base = str(base_dir)
    c.lora.rank = 2
    c.lora.target_modules = ("to_q", "to_k", "to_v", "to_out.0", "conv1")
    c.dreambooth.enabled = True
    c.dreambooth.instance_prompt = "a sks shape"
    c.dreambooth.class_prompt = "a shape"
    c.dreambooth.num_class_images = 4
    c.dreambooth.class_num_steps = 2
    c.dreambooth.class_batch_size = 4
    c.dreambooth.class_dir = str(class_dir)
    c.mesh.shape = {"data": 2, "fsdp": 4, "tensor": 1}  # the frozen base and the factors FSDP-sharded
    c.sharding.preset = "fsdp"
    c.train.global_batch_size = 8
    c.train.num_steps = 2
    c.train.log_every = 1
    c.checkpoint.every_steps = 1
    c.checkpoint.async_save = False
    # A large constant rate: two Adam steps move B far from zero, so the parity checks below
    # compare outputs that the LoRA changes visibly.
    c.optimizer.schedule = "constant"
    c.optimizer.warmup_steps = 0
    c.optimizer.learning_rate = 0.05
    c.optimizer.weight_decay = 0.0
    c.ema.decay = 0.0  # the EMA is the trained factors
    c.ema.warmup = False
    c.logging.progress_bar = False
    c.logging.tensorboard = False
    c.preview.every_steps = -1
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base_dir = H.save_tiny_base(str(root / "base"))
    rng = np.random.default_rng(0)
    data_dir = H.write_image_folder(str(root / "instances"), (rng.random((4, 8, 8, 3)) * 255).astype(np.uint8))
    config = lora_config(base_dir, data_dir, root / "class_images")
    result = train_cli.run(config, str(root / "wd"))
    return dict(root=root, base=base_dir, data=data_dir, config=config, result=result, workdir=str(root / "wd"))


def test_lora_run_trains_only_the_factors_and_reports_state_bytes(run):
    result = run["result"]
    assert result.step == 2 and np.isfinite(result.last_metrics["loss"])
    ema, _ = wd.restore_ema_params(run["workdir"], 2)
    flat = traverse_util.flatten_dict(ema)
    assert set(k[0] for k in flat) == {"unet"} and all(k[-1] in ("lora_A", "lora_B") for k in flat)
    assert max(float(np.abs(v).max()) for k, v in flat.items() if k[-1] == "lora_B") > 1e-2  # B left zero
    meta = wd.read_metadata(run["workdir"], 2)
    # AdamW: two float32 moments per trained value (+ int32 step counts), none for the frozen base.
    assert 0 < meta["optimizer_state_bytes"] - 2 * meta["trained_bytes"] <= 16
    from ldm_jax.pipeline import load_model_folder

    unet_values = sum(np.size(x) for x in jax.tree.leaves(load_model_folder(run["base"]).params["unet"]))
    assert 0 < meta["full_finetune_optimizer_state_bytes"] - 2 * 4 * unet_values <= 16
    assert meta["full_finetune_optimizer_state_bytes"] > 5 * meta["optimizer_state_bytes"]
    assert meta["stage"] == "finetune" and meta["method"] == "lora"


def test_frozen_base_is_a_step_argument_not_a_compiled_constant(run):
    from ldm_jax.data import DataLoader, build_dataset, dataset_stats
    from ldm_jax.training import mesh as mesh_lib
    from ldm_jax.training.loop import place_frozen
    from ldm_jax.training.optimizer import make_optimizer
    from ldm_jax.training.stages import finetune
    from ldm_jax.training.step import compile_train_step, make_train_step
    from ldm_jax.training.train_state import abstract_with_shardings, state_shardings

    config = run["config"]
    source = build_dataset(config.data)
    stage = finetune.build_stage(config, dataset_stats(source), source=source)
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = mesh_lib.logical_axis_rules(config.sharding)
    tx, schedule = make_optimizer(config.optimizer)
    abstract, shardings = state_shardings(stage.task.init_params, tx, mesh, rules)
    frozen, frozen_shardings = place_frozen(stage.task.frozen_params, mesh, rules)
    step = compile_train_step(make_train_step(stage.task.loss_fn, tx, schedule, config.train, config.ema),
                              shardings, mesh, frozen_shardings)
    prepared = jax.eval_shape(stage.task.prepare_batch, frozen, stage.host_batch(
        DataLoader(stage.data_source, 8).get_batch(0)), jax.random.key(0))
    text = step.lower(abstract_with_shardings(abstract, shardings), prepared, jax.random.key(0), frozen).as_text()
    constants = {tuple(int(d) for d in dims.split("x")[:-1] if d) for dims in
                 re.findall(r"stablehlo\.constant dense<[^>]*> : tensor<([0-9x]*[a-z0-9]+)>", text)}
    base_shapes = {tuple(x.shape) for x in jax.tree.leaves(frozen["base"]) if x.size >= 64}
    assert sum(x.size for x in jax.tree.leaves(frozen["base"])) > 10_000 and len(base_shapes) > 5
    # (the step's only large constants are the noise schedule's [T] tables, built in the trace)
    assert not constants & base_shapes, constants & base_shapes
    assert max((math.prod(c) for c in constants), default=0) <= 1000
    # The base U-Net is FSDP-sharded like trained params (some kernel split over devices).
    specs = [s.spec for s in jax.tree.leaves(frozen_shardings["base"])]
    assert any(any(axis is not None for axis in spec) for spec in specs)


def test_resume_after_sigterm_reproduces_the_uninterrupted_run(run, tmp_path):
    config = lora_config(run["base"], run["data"], run["root"] / "class_images")
    config.export.enabled = False
    sigterm_at_1 = Hook(1, lambda step, state: os.kill(os.getpid(), signal.SIGTERM), at_end=False)
    first = train_cli.run(config, str(tmp_path / "wd"), extra_hooks=[sigterm_at_1])
    assert first.preempted and first.step == 1 and wd.checkpoint_steps(tmp_path / "wd") == [1]
    second = train_cli.run(lora_config(run["base"], run["data"], run["root"] / "class_images"), str(tmp_path / "wd"))
    assert second.resumed_from == 1 and second.step == 2
    resumed, _ = wd.restore_ema_params(tmp_path / "wd", 2)
    reference, _ = wd.restore_ema_params(run["workdir"], 2)
    jax.tree.map(np.testing.assert_array_equal, resumed, reference)


def _torch_unet_outputs(unet_dir, lora_dir):
    """diffusers: the base U-Net as saved, then with our LoRA file loaded as
    ``pipe.load_lora_weights`` loads it (state dict + adapter metadata -> peft)."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as LoraLoader

    model = UNet2DConditionModel.from_pretrained(unet_dir).eval()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 3, 8, 8)).astype(np.float32)
    t = np.array([5.0, 600.0], np.float32)
    ctx = rng.standard_normal((2, 8, model.config.cross_attention_dim)).astype(np.float32)
    with torch.no_grad():
        before = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
        state_dict, alphas, metadata = LoraLoader.lora_state_dict(str(lora_dir), return_lora_metadata=True)
        LoraLoader.load_lora_into_unet(state_dict, alphas, model, metadata=metadata)
        after = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
    nhwc = lambda a: a.transpose(0, 2, 3, 1)  # noqa: E731
    return (x, t, ctx), nhwc(before), nhwc(after)


def _rel(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def test_trained_lora_loads_in_diffusers_and_with_loras_with_the_same_output(run):
    from ldm_jax.pipeline import load_model_folder

    export = os.path.join(run["workdir"], "model")
    assert os.path.isfile(os.path.join(export, "pytorch_lora_weights.safetensors"))
    (x, t, ctx), before, after = _torch_unet_outputs(os.path.join(run["base"], "unet"), export)
    base = load_model_folder(run["base"])
    adapted = base.with_loras([export])
    merged = load_model_folder(os.path.join(export, "merged"))
    fwd = jax.jit(lambda p, x, t, c: base.unet.apply({"params": p}, x, t, c))
    args = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx))
    ours = np.asarray(fwd(adapted.params["unet"], *args))
    assert _rel(after, before) > 1e-2  # the LoRA changes the output: the parity below means something
    assert _rel(ours, after) <= 1e-5
    assert _rel(np.asarray(fwd(merged.params["unet"], *args)), after) <= 1e-5
    assert _rel(np.asarray(fwd(base.params["unet"], *args)), before) <= 1e-5
    # scale 0 is the base; two halves are one whole
    half = base.with_loras([(export, 0.5), (export, 0.5)])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
                 half.params["unet"], adapted.params["unet"])
    jax.tree.map(np.testing.assert_array_equal, base.with_loras([(export, 0.0)]).params["unet"], base.params["unet"])


def test_sample_cli_lora_flag_matches_the_merged_model(run, tmp_path):
    spec = importlib.util.spec_from_file_location("sample_cli", os.path.join(ROOT, "sample.py"))
    sample_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample_cli)
    lora_file = os.path.join(run["workdir"], "model", "pytorch_lora_weights.safetensors")
    common = ["--prompt", "a sks shape", "--num_samples", "2", "--steps", "2", "--guidance_scale", "1"]
    assert sample_cli.main(["--model_dir", run["base"], "--lora", f"{lora_file}:1.0", "--out", str(tmp_path / "a"), *common]) == 0
    assert sample_cli.main(["--model_dir", os.path.join(run["workdir"], "model", "merged"), "--out", str(tmp_path / "b"), *common]) == 0
    from PIL import Image

    for name in ("000000.png", "000001.png"):
        a = np.asarray(Image.open(tmp_path / "a" / name), np.int32)
        b = np.asarray(Image.open(tmp_path / "b" / name), np.int32)
        assert np.abs(a - b).max() <= 1  # merged in the same float32 arithmetic; at most rounding
    assert sample_cli.main(["--model_dir", run["base"], "--lora", str(tmp_path / "missing.safetensors"),
                            "--out", str(tmp_path / "c"), *common]) == 2


def test_lora_sd15_config_on_a_diffusers_folder_adapts_the_clip_text_encoder_in_the_loss(tmp_path):
    """configs/lora_sd15.py:runlocal,text_encoder on a tiny random diffusers SD folder: the CLIP
    text encoder is encoded inside the loss (its LoRA B factors get gradients), the first stage
    and the base stay frozen arguments."""
    from configs import lora_sd15
    from ldm_jax.data import DataLoader, build_dataset, dataset_stats
    from ldm_jax.training.stages import finetune

    folder = H.save_tiny_sd_folder(str(tmp_path / "sd"))
    rng = np.random.default_rng(0)
    data_dir = H.write_image_folder(str(tmp_path / "data"), (rng.random((4, 16, 16, 3)) * 255).astype(np.uint8))
    for i in range(4):
        (tmp_path / "data" / f"{i:04d}.txt").write_text(f"a photo number {i}")
    config = lora_sd15.get_config("runlocal,text_encoder")
    config.finetune.base = folder
    config.data.path = data_dir
    config.data.resolution = 16
    source = build_dataset(config.data)
    stage = finetune.build_stage(config, dataset_stats(source), source=source)
    ft = stage.model
    assert ft.trained == ("unet", "text_encoder") and not ft.model.conditioner_is_frozen
    assert set(stage.task.frozen_params) == {"first_stage", "base"}
    frozen = nn.meta.unbox(stage.task.frozen_params)
    batch = jax.tree.map(jnp.asarray, stage.host_batch(DataLoader(source, 4).get_batch(0)))
    key = jax.random.key(0)
    prepared = stage.task.prepare_batch(frozen, batch, key)
    assert prepared["latents"].shape == (4, 8, 8, 4) and "ids" in prepared  # tokens: encoded in the loss
    params = nn.meta.unbox(ft.init_params(jax.random.key(1)))
    (loss, _), grads = jax.value_and_grad(stage.task.loss_fn, has_aux=True)(params, prepared, key, frozen=frozen)
    assert np.isfinite(float(loss))
    flat = traverse_util.flatten_dict(grads["text_encoder"])
    assert flat and all(float(np.abs(g).max()) > 0 for k, g in flat.items() if k[-1] == "lora_B")
    assert all(k[-2] in ("q_proj", "k_proj", "v_proj", "out_proj") for k in flat)
