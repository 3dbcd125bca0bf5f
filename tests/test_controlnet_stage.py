"""The ControlNet training stage through train.py's in-process entry, on a tiny frozen
pixel-space class-conditional base folder and the shapes data with masks as control images.

Truth: the train state (params, EMA, AdamW moments) holds only the ControlNet and training moves
every one of its params, the frozen U-Net is FSDP-sharded by the logical rules, a
SIGTERM-interrupted run resumes to the uninterrupted run's bits, and the exported folder loads
in diffusers' ``ControlNetModel`` with our EMA params (the from_unet initialisation itself is
checked against diffusers in test_controlnet.py).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from configs import controlnet_shapes  # noqa: E402
from ldm_jax.ldm.conditioning import ClassConditioner  # noqa: E402
from ldm_jax.models.unet import UNet  # noqa: E402
from ldm_jax.pipeline import LatentDiffusionPipeline, save_model_folder  # noqa: E402
from ldm_jax.training import workdir as wd  # noqa: E402
from ldm_jax.training.loop import Hook  # noqa: E402

# Whole training runs in module fixtures: minutes on 2 cores; `make test-all` runs them.
pytestmark = pytest.mark.slow

SIZE = 8


def _train_module():
    from cli_modules import load_cli

    return load_cli("train")


train_cli = _train_module()


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The resumed run's programs are the reference run's: compiled once."""
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


def _random_params(module, inputs, seed):
    abstract = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), **inputs)))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        name = path[-1].key
        if name == "kernel":
            return noise / np.sqrt(np.prod(leaf.shape[:-1]))
        return 1.0 + 0.05 * noise if name == "scale" else 0.05 * noise

    return jax.tree_util.tree_map_with_path(draw, abstract)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    conditioner = ClassConditioner(num_classes=5)
    unet = UNet(sample_size=SIZE, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
                mid_block_type="UNetMidBlock2D", norm_num_groups=4, num_classes=conditioner.unet_num_classes,
                cross_attention_dim=None)
    pipe = LatentDiffusionPipeline.from_components(
        unet=unet, unet_params=_random_params(unet, unet.dummy_inputs(1), 0), conditioner=conditioner,
        schedule={"kind": "linear", "num_timesteps": 1000}, prediction="eps",
    )
    return save_model_folder(pipe, tmp_path_factory.mktemp("base") / "model", step=1)


def _config(base, steps=3):
    c = controlnet_shapes.get_config("runlocal")
    c.data.resolution = SIZE
    c.data.shapes_num_examples = 64
    c.controlnet.base = str(base)
    c.train.num_steps = steps
    c.train.global_batch_size = 8
    c.optimizer.warmup_steps = 0
    c.optimizer.schedule = "constant"  # a non-zero rate at every step (cosine ends at 0)
    # Large, so three steps move every ControlNet param (zero convolutions pass gradients on
    # only once they are non-zero: the embedding's first convs move at step 3).
    c.optimizer.learning_rate = 1e-2
    c.checkpoint.every_steps = 1
    c.checkpoint.async_save = False
    c.logging.progress_bar = False
    c.logging.tensorboard = False
    c.preview.every_steps = -1
    c.mesh.shape = {"data": -1, "fsdp": 2, "tensor": 1}
    c.sharding.preset = "fsdp"
    return c


@pytest.fixture(scope="module")
def reference_run(base_folder, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("cn_reference")
    result = train_cli.run(_config(base_folder), str(workdir))
    return workdir, result


def test_controlnet_stage_trains_only_the_controlnet_on_the_sharded_frozen_unet(base_folder, reference_run):
    from ldm_jax.data import build_dataset, dataset_stats
    from ldm_jax.interop.diffusers_unet import load_diffusers_unet
    from ldm_jax.models.controlnet import controlnet_from_unet
    from ldm_jax.training import mesh as mesh_lib
    from ldm_jax.training.context import start_run
    from ldm_jax.training.stages import controlnet as stage_lib

    workdir, result = reference_run
    assert result.step == 3 and np.isfinite(result.last_metrics["loss"])
    state = result.state
    assert set(state.params) == {"controlnet"} and set(state.ema_params) == {"controlnet"}
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
    cn_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
    unet, unet_params = load_diffusers_unet(os.path.join(base_folder, "unet"))
    unet_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(unet_params))
    # AdamW: two moments of the ControlNet (plus scalar counts), nothing of the frozen U-Net.
    assert 2 * cn_bytes <= opt_bytes < 2 * cn_bytes + 1024
    print(f"optimizer state {opt_bytes} B = 2 x ControlNet {cn_bytes} B; frozen U-Net {unet_bytes} B not in it "
          f"(full fine-tuning would hold {2 * (cn_bytes + unet_bytes)} B)")

    # Training moved the ControlNet away from its from_unet initialisation (copied blocks and zero convs).
    key = jax.random.split(jax.random.key(_config(base_folder).seed))[0]  # as train_state._init_state
    options = dict(conditioning_channels=1, conditioning_embedding_out_channels=(16,))
    _, initial = controlnet_from_unet(unet, unet_params, key, **options)
    trained = jax.device_get(state.params["controlnet"])
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), trained, initial)
    assert min(jax.tree.leaves(moved)) > 0

    # The frozen U-Net is placed FSDP-sharded by the logical rules (not replicated) ...
    config = _config(base_folder)
    run = start_run(config)
    source = build_dataset(config.data)
    stage = stage_lib.build_stage(run.config, dataset_stats(source), source=source, run=run)
    frozen, shardings = mesh_lib.place_frozen(stage.task.frozen_params, run.mesh, run.rules)
    specs = [s.spec for s in jax.tree.leaves(shardings["unet"])]
    assert any("fsdp" in str(spec) for spec in specs)
    # ... and the init and the train step take it as an argument (Task flags read by the loop).
    assert stage.task.loss_takes_frozen and stage.task.init_takes_frozen
    batch = stage.host_batch(next(iter(_batches(source))))
    assert batch["control"].shape == (8, SIZE, SIZE, 1) and 0 < batch["control"].max() <= 1


def _batches(source):
    from ldm_jax.data import DataLoader

    yield DataLoader(source, 8, shuffle=False).get_batch(0)


def test_controlnet_stage_resumes_after_sigterm_to_the_same_bits(base_folder, reference_run, tmp_path):
    reference_dir, _ = reference_run
    sigterm_at_1 = Hook(1, lambda step, state: os.kill(os.getpid(), signal.SIGTERM), at_end=False)
    first = train_cli.run(_config(base_folder), str(tmp_path), extra_hooks=[sigterm_at_1])
    assert first.preempted and first.step == 1
    second = train_cli.run(_config(base_folder), str(tmp_path))
    assert second.resumed_from == 1 and second.step == 3
    resumed, _ = wd.restore_ema_params(tmp_path, 3)
    reference, _ = wd.restore_ema_params(reference_dir, 3)
    jax.tree.map(np.testing.assert_array_equal, resumed, reference)


def test_controlnet_stage_exports_a_diffusers_controlnet_folder(reference_run):
    from diffusers import ControlNetModel

    from ldm_jax.interop.diffusers_controlnet import load_diffusers_controlnet, params_to_diffusers_state_dict

    workdir, result = reference_run
    folder = os.path.join(workdir, "model")
    assert os.path.isfile(os.path.join(folder, "EXPORT_COMPLETE"))
    theirs = ControlNetModel.from_pretrained(folder).eval()
    controlnet, params = load_diffusers_controlnet(folder)
    ema = jax.device_get(result.state.ema_params["controlnet"])
    jax.tree.map(np.testing.assert_array_equal, params, ema)
    want = params_to_diffusers_state_dict(controlnet, ema)
    got = {k: v.numpy() for k, v in theirs.state_dict().items()}
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert theirs.config.conditioning_channels == 1 and tuple(theirs.config.conditioning_embedding_out_channels) == (16,)
