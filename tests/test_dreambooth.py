"""DreamBooth (``config.dreambooth``): class images from the base model, the prior-preservation
loss against a hand computation, and full fine-tuning through the shared loop, on a tiny
text-conditioned base (8x8 pixel space, ``tests/lora_helpers.py``)."""

from __future__ import annotations

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_helpers as H
from configs import base as config_base
from ldm_jax.diffusion import diffusion_loss
from ldm_jax.training.stages.finetune_sections import add_finetune_sections

# Whole training runs in module fixtures: minutes on 2 cores; `make test-all` runs them.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def db_config(base_dir, data_dir, class_dir, method="lora", prior_loss_weight=0.5):
    c = add_finetune_sections(config_base.get_base_config("finetune"))
    c.data = config_base.data_config("folder", 8, path=str(data_dir), shuffle=False)
    c.finetune.base = str(base_dir)
    c.finetune.method = method
    c.lora.rank = 2
    c.dreambooth.enabled = True
    c.dreambooth.instance_prompt = "a sks shape"
    c.dreambooth.class_prompt = "a shape"
    c.dreambooth.prior_loss_weight = prior_loss_weight
    c.dreambooth.num_class_images = 3  # fewer than the instances: example i takes class image i mod 3
    c.dreambooth.class_num_steps = 2
    c.dreambooth.class_batch_size = 4
    c.dreambooth.class_guidance_scale = 2.0
    c.dreambooth.class_dir = str(class_dir)
    c.train.global_batch_size = 8
    c.train.num_steps = 2
    c.train.log_every = 1
    c.checkpoint.every_steps = 2
    c.checkpoint.async_save = False
    c.optimizer.warmup_steps = 0
    c.optimizer.schedule = "constant"
    c.optimizer.learning_rate = 1e-2
    c.logging.progress_bar = False
    c.logging.tensorboard = False
    c.preview.every_steps = -1
    return c


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dreambooth")
    base_dir = H.save_tiny_base(str(root / "base"), seed=3)
    rng = np.random.default_rng(0)
    instances = (rng.random((8, 8, 8, 3)) * 255).astype(np.uint8)
    data_dir = H.write_image_folder(str(root / "instances"), instances)
    return dict(root=root, base=base_dir, data=data_dir, instances=instances)


def test_class_images_are_the_base_pipelines_images_deterministic_and_reused(setup, tmp_path):
    from ldm_jax.pipeline import load_model_folder
    from ldm_jax.training.stages.dreambooth import MANIFEST, class_images

    db = db_config(setup["base"], setup["data"], "").dreambooth
    pipe = load_model_folder(setup["base"])
    made = class_images(pipe, {"prompts": "a shape"}, 3, 8, db, str(tmp_path / "a"))
    # image i is the pipeline's image (class_seed, i), whatever the batch
    direct = pipe(["a shape"] * 3, seed=0, num_steps=2, sampler="ddim", guidance_scale=2.0, pad_batch_to=4)
    np.testing.assert_array_equal(made, direct)
    assert made.shape == (3, 8, 8, 3) and made.dtype == np.uint8 and len(np.unique(made.reshape(3, -1), axis=0)) == 3
    # read back from the folder (PNG round trip is exact for uint8), not generated again
    assert os.path.isfile(tmp_path / "a" / MANIFEST)
    pipe_calls = []
    counting = type("Counting", (), {"params_hash": pipe.params_hash,
                                     "__call__": lambda self, *a, **k: pipe_calls.append(1) or pipe(*a, **k)})()
    np.testing.assert_array_equal(class_images(counting, {"prompts": "a shape"}, 3, 8, db, str(tmp_path / "a")), made)
    assert pipe_calls == []
    # other settings: generated again
    db.class_seed = 1
    other = class_images(counting, {"prompts": "a shape"}, 3, 8, db, str(tmp_path / "a"))
    assert pipe_calls and np.abs(other.astype(int) - made).max() > 0


def test_prior_preservation_loss_is_instance_plus_weighted_prior_by_hand(setup):
    from ldm_jax.data import DataLoader, build_dataset, dataset_stats
    from ldm_jax.training.stages import finetune

    w = 0.5
    config = db_config(setup["base"], setup["data"], setup["root"] / "class_images", prior_loss_weight=w)
    source = build_dataset(config.data)
    stage = finetune.build_stage(config, dataset_stats(source), source=source)
    ft = stage.model
    db_source = stage.data_source
    assert len(db_source) == 8  # max(8 instances, 3 class images)
    batch = stage.host_batch(DataLoader(db_source, 8, shuffle=False).get_batch(0))
    frozen = nn.meta.unbox(stage.task.frozen_params)
    key = jax.random.key(7)
    prepared = stage.task.prepare_batch(frozen, jax.tree.map(jnp.asarray, batch), key)

    # instances first, then class images i mod 3, as the base model generated them
    from PIL import Image

    pipe_images = np.stack([np.asarray(Image.open(setup["root"] / "class_images" / f"{i:05d}.png")) for i in range(3)])
    expected = np.concatenate([setup["instances"], pipe_images[[0, 1, 2, 0, 1, 2, 0, 1]]]).astype(np.float64) / 127.5 - 1.0
    np.testing.assert_allclose(prepared["latents"], expected, atol=1e-6)  # pixel space: latents are the images

    trained = jax.tree.map(lambda x: x + 0.1, nn.meta.unbox(ft.init_params(jax.random.key(1))))  # B non-zero
    loss, _ = stage.task.loss_fn(trained, prepared, key, frozen=frozen)

    # by hand: the per-example denoising losses of the adapted model, then mean(instances) +
    # w * mean(class images), in float64
    model = ft.model
    params = ft.compose(trained, frozen["base"])
    _, loss_key, _ = jax.random.split(key, 3)
    prompts = ["a sks shape"] * 8 + ["a shape"] * 8
    context = model.conditioner.encode(params["text_encoder"], model.conditioner.host_inputs(prompts))["context"]
    per = diffusion_loss(
        model.schedule, lambda x, t: model.unet.apply({"params": params["unet"]}, x, t, context=context),
        prepared["latents"], loss_key, reduce="none",
        prediction=model.prediction, weighting=model.weighting, min_snr_gamma=model.min_snr_gamma,
    )
    per = np.asarray(per, np.float64)
    hand = per[:8].mean() + w * per[8:].mean()
    assert per[:8].mean() != pytest.approx(per[8:].mean(), rel=1e-3)  # the weight matters
    np.testing.assert_allclose(float(loss), hand, rtol=1e-6)


def test_full_finetune_dreambooth_trains_and_exports_a_model_folder(setup, tmp_path):
    from cli_modules import load_cli

    train_cli = load_cli("train")
    from ldm_jax.pipeline import load_model_folder
    from ldm_jax.training import workdir as wd

    config = db_config(setup["base"], setup["data"], setup["root"] / "class_images", method="full")
    result = train_cli.run(config, str(tmp_path / "wd"))
    assert result.step == 2 and np.isfinite(result.last_metrics["loss"])
    meta = wd.read_metadata(tmp_path / "wd", 2)
    assert meta["method"] == "full" and meta["optimizer_state_bytes"] == meta["full_finetune_optimizer_state_bytes"]
    base = load_model_folder(setup["base"])
    tuned = load_model_folder(tmp_path / "wd" / "model")
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), tuned.params["unet"], base.params["unet"]))
    assert max(moved) > 1e-3
    # the text encoder was not trained (train_conditioner=False)
    jax.tree.map(np.testing.assert_array_equal, tuned.params["conditioner"], base.params["conditioner"])
