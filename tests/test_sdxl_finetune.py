"""SDXL fine-tuning from a diffusers SDXL folder (``config.diffusion.init_from``) and SDXL's
micro-conditioning from the image folder, on a tiny SDXL-shaped folder that diffusers itself
saves (``test_sdxl_pipeline.make_sdxl_folders``) and 8 simulated devices (FSDP 8-way).

Truths: diffusers' own ``UNet2DConditionModel`` loaded from the folder (its forward pass on the
initial params), the pipeline's loader (``load_diffusers_unet``, exact equality), the planned
shardings (``state_shardings``), and diffusers' ``StableDiffusionXLPipeline._get_add_time_ids``
for each image's recorded original size and crop corner (those are checked against hand
computations in tests/test_folder_micro_conditioning.py).
"""

from __future__ import annotations

import shutil
import types

import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.numpy import load_file, save_file
from test_folder_micro_conditioning import IMAGES, folder  # noqa: F401  (a module fixture)

from configs import base
from ldm_jax.data import DataLoader, build_dataset, dataset_stats
from ldm_jax.interop.diffusers_unet import load_diffusers_unet
from ldm_jax.interop.torch_weights import WeightsError
from ldm_jax.training.context import start_run
from ldm_jax.training.loop import compile_prepare_batch, create_initial_state
from ldm_jax.training.optimizer import make_optimizer
from ldm_jax.training.stages import diffusion
from ldm_jax.training.train_state import state_shardings

RES = 32


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from test_sdxl_pipeline import make_sdxl_folders

    base_dir, _, base_pipe, _ = make_sdxl_folders(tmp_path_factory.mktemp("sdxl_finetune"))
    return base_dir, base_pipe


def _config(sdxl_dir, image_dir):
    from test_sdxl_train import _tiny_config

    config = _tiny_config(sdxl_dir)
    config.data = base.data_config("folder", RES, path=str(image_dir))
    config.data.folder_random_crop = True
    config.data.seed = 4
    config.unet.layers_per_block = 1  # the folder's U-Net
    config.diffusion.init_from = str(sdxl_dir)
    config.mesh.shape = {"data": 1, "fsdp": 8, "tensor": 1}
    return config


@pytest.fixture(scope="module")
def fine_tune(sdxl, folder):  # noqa: F811
    sdxl_dir, _ = sdxl
    run = start_run(_config(sdxl_dir, folder))
    source = build_dataset(run.config.data)
    stage = diffusion.build_stage(run.config, dataset_stats(source), source=source, run=run)
    tx, _ = make_optimizer(run.config.optimizer)
    abstract, shardings = state_shardings(stage.task.init_params, tx, run.mesh, run.rules, run.config.seed)
    state = create_initial_state(stage.task, tx, abstract, shardings, run.config.seed)  # what the loop does
    return types.SimpleNamespace(run=run, source=source, stage=stage, tx=tx, abstract=abstract,
                                 shardings=shardings, state=state)


def _flat(tree):
    return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_fresh_state_holds_the_folders_unet_sharded_over_8_devices(fine_tune, sdxl):
    sdxl_dir, _ = sdxl
    state, shardings = fine_tune.state, fine_tune.shardings
    assert [x.sharding for x in jax.tree.leaves(state)] == jax.tree.leaves(shardings)
    unet = _flat(state.params["unet"])
    split = [k for k, x in unet.items() if len(x.sharding.device_set) == 8 and x.sharding.shard_shape(x.shape) != x.shape]
    assert len(split) > len(unet) // 2  # FSDP: most tensors 8-way, none gathered on one device
    assert all(len(x.sharding.device_set) == 8 for x in unet.values())
    _, want = load_diffusers_unet(sdxl_dir / "unet")
    want, ema = _flat(want), _flat(state.ema_params["unet"])
    assert unet.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_array_equal(np.asarray(unet[key]), np.asarray(value), err_msg=key)
        np.testing.assert_array_equal(np.asarray(ema[key]), np.asarray(value), err_msg=f"ema {key}")


def test_the_loader_places_each_tensor_with_its_params_sharding(fine_tune):
    loaded = fine_tune.stage.task.load_params(fine_tune.abstract.params, fine_tune.shardings.params)
    assert set(loaded) == {"unet"}
    got = [x.sharding for x in jax.tree.leaves(loaded["unet"])]
    assert got == jax.tree.leaves(fine_tune.shardings.params["unet"])


def test_initial_unet_matches_diffusers_forward_on_the_folders_weights(fine_tune, sdxl):
    sdxl_dir, _ = sdxl
    reference = UNet2DConditionModel.from_pretrained(sdxl_dir / "unet").eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([10, 700], np.int64)
    context = rng.standard_normal((2, 7, 80)).astype(np.float32)
    pooled = rng.standard_normal((2, 16)).astype(np.float32)
    time_ids = np.array([[48, 64, 0, 5, 32, 32], [98, 64, 8, 0, 32, 32]], np.float32)
    with torch.no_grad():
        want = reference(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(context), added_cond_kwargs={
            "text_embeds": torch.from_numpy(pooled), "time_ids": torch.from_numpy(time_ids)}).sample.numpy()
    unet = fine_tune.stage.model.unet
    got = jax.jit(lambda p: unet.apply({"params": p}, x.transpose(0, 2, 3, 1), t.astype(np.float32), context,
                                       text_embeds=pooled, time_ids=time_ids))(fine_tune.state.ema_params["unet"])
    want = want.transpose(0, 2, 3, 1)
    err = float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())
    assert err <= 1e-5, err


def test_micro_conditioning_reaching_the_unet_matches_diffusers_time_ids(fine_tune, sdxl):
    _, pipe = sdxl
    stage, run = fine_tune.stage, fine_tune.run
    host = DataLoader(fine_tune.source, len(IMAGES), shuffle=False).get_batch(0)
    batch = stage.host_batch(host)
    frozen, frozen_shardings = run.place(stage.task.frozen_params)
    prepared = jax.device_get(compile_prepare_batch(stage.task, frozen_shardings, run.mesh)(
        frozen, run.batch(batch), jax.random.key(0)))
    # What the loss hands the U-Net (DiffusionModel.loss_fn passes prepared time_ids through).
    assert set(prepared) >= {"latents", "context", "text_embeds", "time_ids"}
    for i in range(len(IMAGES)):
        original = tuple(int(v) for v in host["original_size"][i])
        corner = tuple(int(v) for v in host["crop_top_left"][i])
        want = pipe._get_add_time_ids(original, corner, (RES, RES), dtype=torch.float32,
                                      text_encoder_projection_dim=16).numpy()[0]
        np.testing.assert_array_equal(prepared["time_ids"][i], want, err_msg=f"image {i}")
    assert len({tuple(r) for r in prepared["time_ids"]}) == len(IMAGES)  # really per image


def test_folder_for_another_unet_is_one_line_naming_the_setting(sdxl, folder, tmp_path, capsys):  # noqa: F811
    from cli_modules import load_cli

    sdxl_dir, _ = sdxl
    config = _config(sdxl_dir, folder)
    config.unet.layers_per_block = 2
    config.checkpoint.async_save = False
    code = load_cli("train").run_command(config, str(tmp_path / "run"))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train.py:")]
    assert code == 2 and len(lines) == 1
    assert "config.unet.layers_per_block is 2 but" in lines[0] and "unet/config.json has 1" in lines[0]


def test_folder_with_a_wrong_tensor_is_one_line_naming_the_key(fine_tune, sdxl, tmp_path):
    sdxl_dir, _ = sdxl
    bad = tmp_path / "unet"
    shutil.copytree(sdxl_dir / "unet", bad)
    weights = bad / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["conv_in.weight"] = tensors["conv_in.weight"][:, :3]
    save_file(tensors, weights)
    load = diffusion.unet_loader(fine_tune.stage.model, str(bad))
    with pytest.raises(WeightsError, match=r"shape mismatch for key 'conv_in.weight'.*checkpoint has \(32, 3, 3, 3\)"):
        load(fine_tune.abstract.params, fine_tune.shardings.params)
    with pytest.raises(ValueError, match="config.diffusion.init_from: no config.json in"):
        diffusion.unet_loader(fine_tune.stage.model, str(tmp_path / "missing"))(
            fine_tune.abstract.params, fine_tune.shardings.params)


def test_sdxl_config_unet_is_the_released_sdxl_base_architecture():
    from test_sdxl_unet import SDXL_BASE_UNET_CONFIG

    from configs import sdxl as sdxl_config
    from ldm_jax.interop.diffusers_unet import architecture_mismatch
    from ldm_jax.ldm.model import build_unet
    from ldm_jax.models.unet import UNet

    config = sdxl_config.get_config()
    conditioner = types.SimpleNamespace(kind="sdxl", context_dim=2048, unet_num_classes=None)  # CLIP-L + bigG
    ours = build_unet(config.unet, 4, 128, conditioner)
    released = UNet.from_diffusers_config(SDXL_BASE_UNET_CONFIG)
    assert architecture_mismatch(ours, released) is None  # so init_from accepts the released unet/
    other = UNet.from_diffusers_config({**SDXL_BASE_UNET_CONFIG, "attention_head_dim": [5, 10, 10]})
    assert architecture_mismatch(ours, other) == ("attention_head_dim", (5, 10, 20), (5, 10, 10))
    assert config.diffusion.init_from == "" and sdxl_config.get_config("scratch").diffusion.init_from is None
    empty = sdxl_config.get_config("runlocal")
    empty.diffusion.init_from = ""  # the full config's default: the folder must be given
    with pytest.raises(ValueError, match="config.diffusion.init_from is empty"):
        diffusion.build_stage(empty, None, run=object())  # refused before anything is loaded


def test_latent_cache_keeps_each_images_micro_conditioning(fine_tune, tmp_path):
    from ldm_jax.training.stages.latents import FirstStageEncoder, build_latent_cache

    stage, run, source = fine_tune.stage, fine_tune.run, fine_tune.source
    cache = build_latent_cache(run.config, stage.model, source, FirstStageEncoder(run, stage.model), str(tmp_path / "c"))
    for i in range(len(source)):
        for key in ("original_size", "crop_top_left"):
            np.testing.assert_array_equal(cache[i][key], source[i][key], err_msg=f"{key} {i}")
    batch = stage.host_batch(DataLoader(cache, len(IMAGES), shuffle=False).get_batch(0))
    want = stage.host_batch(DataLoader(source, len(IMAGES), shuffle=False).get_batch(0))
    np.testing.assert_array_equal(batch["time_ids"], want["time_ids"])
