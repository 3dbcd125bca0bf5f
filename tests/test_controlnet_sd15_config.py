"""configs/controlnet_sd15.py (a ControlNet on a diffusers Stable Diffusion folder), which no
other test loads (issue 12).

Truths: the section defaults are the keys the code reads (``merge_section`` and
``build_dataset`` refuse any other; the trainer's own sections are read by name, so a key the
defaults lack would be silently ignored -- hence the subset check); diffusers'
``ControlNetModel.from_unet`` on the same diffusers U-Net folder is the reference of the
stage's initialisation.
"""

from __future__ import annotations

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import lora_helpers as H  # noqa: E402
from configs import base, controlnet_sd15  # noqa: E402
from ldm_jax.data import DataLoader, build_dataset, dataset_stats  # noqa: E402
from ldm_jax.ldm.sections import merge_section  # noqa: E402
from ldm_jax.training.cli import config_keys  # noqa: E402
from ldm_jax.training.stages.sections import (  # noqa: E402
    add_controlnet_sections,
    controlnet_defaults,
    controlnet_preview_defaults,
)

# data keys beyond configs.base.data_config's: read by the shapes source (build_dataset checks them)
DATA_EXTRA = {"data.shapes_control"}


@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_controlnet_sd15_config_sets_only_keys_the_stage_and_trainer_read(arg):
    c = controlnet_sd15.get_config(arg)
    assert c.stage == "controlnet"
    reference = add_controlnet_sections(base.get_base_config("controlnet"))
    unread = set(config_keys(c)) - set(config_keys(reference)) - DATA_EXTRA
    assert not unread, f"keys no section default has: {sorted(unread)}"
    merge_section(controlnet_defaults(), c.controlnet, "controlnet")  # raises on a key the stage does not know
    merge_section(controlnet_preview_defaults(), c.preview, "preview")
    example = build_dataset(c.data)[0]  # raises on an unknown data key
    size = int(c.data.resolution)
    assert example["control"].shape == (size, size, 1) and example["image"].shape == (size, size, 3)
    assert "caption" in example  # the SD base is text-conditioned
    assert (size, c.train.global_batch_size) == ((64, 8) if arg else (512, 256))


def test_a_misspelled_controlnet_key_is_refused_in_one_line():
    c = controlnet_sd15.get_config("runlocal")
    c.controlnet.drop_prb = 0.5
    with pytest.raises(ValueError, match="drop_prb") as info:
        merge_section(controlnet_defaults(), c.controlnet, "controlnet")
    assert "\n" not in str(info.value)


def test_an_unknown_controlnet_conv_impl_is_refused_in_one_line_before_loading_the_base(tmp_path):
    from ldm_jax.training.context import start_run
    from ldm_jax.training.stages import controlnet as stage_lib

    c = controlnet_sd15.get_config("runlocal")
    c.controlnet.base = str(tmp_path / "no_such_folder")  # never read: the setting is checked first
    c.controlnet.conv_impl = "im2cl"
    with pytest.raises(ValueError, match="config.controlnet.conv_impl.*'im2cl'") as info:
        stage_lib.build_stage(c, None, run=start_run(c))
    assert "\n" not in str(info.value)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return H.save_tiny_sd_folder(str(tmp_path_factory.mktemp("sd") / "sd"))


# Builds and differentiates the whole stage (84 CPU-s, 6 min wall on the loaded 2-core machine).
@pytest.mark.slow
def test_controlnet_sd15_runlocal_builds_on_a_diffusers_sd_folder_and_matches_from_unet(sd_folder):
    """:runlocal with only ``controlnet.base`` set: the stage reads the diffusers folder, its
    ControlNet initialisation is diffusers' ``ControlNetModel.from_unet`` of that U-Net, and
    one loss on a shapes batch (mask controls, captions through the frozen CLIP) is finite with
    gradients on the zero convolutions of the residuals only (every other ControlNet param is
    behind them, and they are zero at initialisation)."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from ldm_jax.interop.diffusers_controlnet import params_to_diffusers_state_dict
    from ldm_jax.training.context import start_run
    from ldm_jax.training.stages import controlnet as stage_lib

    config = controlnet_sd15.get_config("runlocal")
    config.controlnet.base = sd_folder
    run = start_run(config)
    source = build_dataset(run.config.data)
    stage = stage_lib.build_stage(run.config, dataset_stats(source), source=source, run=run)
    (controlnet,) = stage.model.controlnets
    assert stage.task.loss_takes_frozen and stage.task.init_takes_frozen
    assert stage.metadata["base"] == sd_folder and stage.metadata["control_channels"] == 1

    frozen = nn.meta.unbox(stage.task.frozen_params)
    params = nn.meta.unbox(stage.task.init_params(jax.random.key(0), frozen))
    assert set(params) == {"controlnet"}

    unet = UNet2DConditionModel.from_pretrained(os.path.join(sd_folder, "unet"))
    theirs = ControlNetModel.from_unet(unet, conditioning_channels=1,
                                       conditioning_embedding_out_channels=controlnet.conditioning_embedding_out_channels)
    theirs = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    ours = params_to_diffusers_state_dict(controlnet, jax.device_get(params["controlnet"]))
    assert ours.keys() == theirs.keys()
    copied = [k for k in ours if not k.startswith("controlnet_cond_embedding.")
              or k.startswith("controlnet_cond_embedding.conv_out")]
    assert len(copied) > 20
    for k in copied:  # the U-Net encoder copy and the zero convolutions (the embedding's inner convs are random)
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)

    batch = jax.tree.map(jnp.asarray, stage.host_batch(DataLoader(source, 8, shuffle=False).get_batch(0)))
    key = jax.random.key(1)
    prepared = stage.task.prepare_batch(frozen, batch, key)
    assert prepared["latents"].shape == (8, 32, 32, 4) and prepared["control"].shape == (8, 64, 64, 1)
    (loss, _), grads = jax.value_and_grad(stage.task.loss_fn, has_aux=True)(params, prepared, key, frozen=frozen)
    assert np.isfinite(float(loss))
    flat = params_to_diffusers_state_dict(controlnet, jax.device_get(grads["controlnet"]))
    assert all(np.isfinite(v).all() for v in flat.values())
    zero_convs = {k for k in flat if k.startswith(("controlnet_down_blocks.", "controlnet_mid_block."))}
    moving = {k for k, v in flat.items() if np.abs(v).max() > 0}
    assert len(zero_convs) >= 4 and moving == zero_convs, sorted(moving ^ zero_convs)[:5]
