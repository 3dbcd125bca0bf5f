"""TrainState.model_state: non-trainable state the loss updates itself (what a VQ EMA codebook
needs), through the shared loop. A toy task keeps a running mean of its inputs in the model
state; checked against a float64 NumPy re-computation, threaded through microbatches in
order, and resumed from a checkpoint bit-identically to an uninterrupted run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.training.defaults import training_defaults
from ldm_jax.training.loop import Task, train

# Whole training runs in module fixtures: minutes on 2 cores; `make test-all` runs them.
pytestmark = pytest.mark.slow

DIM, BATCH = 4, 16


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The resumed runs' programs are the first run's: compiled once."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    previous = [getattr(jax.config, name) for name in names]
    for name, value in zip(names, (str(tmp_path_factory.mktemp("jax_cache")), 0.0, 0)):
        jax.config.update(name, value)
    yield
    for name, value in zip(names, previous):
        jax.config.update(name, value)


def _batch(position):
    rng = np.random.default_rng(1000 + position)
    x = rng.standard_normal((BATCH, DIM)).astype(np.float32)
    return {"x": x, "y": x @ np.arange(1, DIM + 1, dtype=np.float32)}


def _batches(position, rows):
    while True:
        yield jax.tree.map(lambda a: a[rows], _batch(position))
        position += 1


def _loss(params, model_state, batch, key):
    del key
    residual = batch["x"] @ params["w"] - batch["y"]
    count = model_state["count"] + 1.0
    mean = model_state["mean"] + (jnp.mean(batch["x"], axis=0) - model_state["mean"]) / count
    return jnp.mean(residual**2), ({"count": count}, {"count": count, "mean": mean})


TASK = Task(
    init_params=lambda key: {"w": jnp.zeros((DIM,), jnp.float32)},
    loss_fn=_loss,
    init_model_state=lambda key: {"count": jnp.zeros((), jnp.float32), "mean": jnp.zeros((DIM,), jnp.float32)},
)


def _config(num_steps, microbatches=1):
    c = training_defaults()
    c.train.global_batch_size = BATCH
    c.train.num_steps = num_steps
    c.train.num_microbatches = microbatches
    c.train.log_every = 100
    c.optimizer.warmup_steps = 0
    c.optimizer.schedule = "constant"
    c.optimizer.decay_steps = 4
    c.checkpoint.every_steps = 2
    c.checkpoint.async_save = False
    return c


@pytest.mark.parametrize("microbatches", [1, 2])
def test_model_state_is_updated_in_order_like_a_numpy_running_mean(tmp_path, microbatches):
    result = train(_config(3, microbatches), TASK, _batches, tmp_path / "ckpt", on_metrics=lambda *a: None)
    # Reference: microbatch i of a step holds rows i::k; the state sees them in order.
    count, mean = 0, np.zeros(DIM)
    for step in range(3):
        x = _batch(step)["x"].astype(np.float64)
        for i in range(microbatches):
            count += 1
            mean += (x[i::microbatches].mean(axis=0) - mean) / count
    state = jax.device_get(result.state.model_state)
    assert float(state["count"]) == count
    np.testing.assert_allclose(state["mean"], mean, rtol=1e-6, atol=1e-7)


def test_model_state_resumes_bit_identically(tmp_path):
    straight = train(_config(4), TASK, _batches, tmp_path / "straight", on_metrics=lambda *a: None)
    train(_config(2), TASK, _batches, tmp_path / "resumed", on_metrics=lambda *a: None)
    resumed = train(_config(4), TASK, _batches, tmp_path / "resumed", on_metrics=lambda *a: None)
    assert resumed.resumed_from == 2
    a, b = jax.device_get((straight.state.model_state, straight.state.params)), jax.device_get(
        (resumed.state.model_state, resumed.state.params))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert float(b[0]["count"]) == 4.0


def _vq_ema_config(num_steps):
    import ml_collections

    from ldm_jax.training.stages import autoencoder as A

    c = _config(num_steps)
    c.data = ml_collections.ConfigDict({"name": "digits", "resolution": 8, "channels": 1})
    c.autoencoder = A.autoencoder_defaults()
    c.autoencoder.update(kind="vq", vq_use_ema=True, block_out_channels=(8,), norm_num_groups=4,
                         layers_per_block=1, latent_channels=2, mid_block_add_attention=False, num_vq_embeddings=16)
    c.loss = A.loss_defaults()
    c.loss.disc_weight = 0.0
    c.preview = ml_collections.ConfigDict({"num_images": 0})
    return c


def test_vq_ema_codebook_trains_in_the_shared_loop_resumes_bit_identically_and_is_exported(tmp_path):
    from ldm_jax.data import build_dataset, build_loader, dataset_stats
    from ldm_jax.interop.diffusers_vae import load_diffusers_vq_model
    from ldm_jax.training.stages import autoencoder as A

    def run(num_steps, directory):
        config = _vq_ema_config(num_steps)
        source = build_dataset(config.data)
        stage = A.build_stage(config, dataset_stats(source))
        loader = build_loader(config.data, BATCH, source=source)

        def batches(position, rows):
            with loader.iterate(start_step=position) as iterator:
                for batch in iterator:
                    yield stage.host_batch(batch)

        return stage, train(config, stage.task, batches, directory, on_metrics=lambda *a: None)

    stage, straight = run(4, tmp_path / "straight")
    run(2, tmp_path / "resumed")
    _, resumed = run(4, tmp_path / "resumed")
    assert resumed.resumed_from == 2
    a, b = jax.device_get((straight.state.model_state, resumed.state.model_state))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    codebook = a["vq_ema"]["quantize"]["embedding"]
    initial = jax.device_get(nn_unbox(stage_init_codebook(stage)))
    assert not np.allclose(codebook, initial)  # the EMA update moved it
    assert "embedding" not in straight.state.params["autoencoder"].get("quantize", {})  # not a gradient param

    # The export carries the live codebook (what the decoder of a diffusion stage will use).
    params = {**jax.device_get(straight.state.ema_params), **a}
    stage.export(params, str(tmp_path / "export"))
    _, variables = load_diffusers_vq_model(str(tmp_path / "export"))
    np.testing.assert_array_equal(np.asarray(nn_unbox(variables)["params"]["quantize"]["embedding"]), codebook)


def nn_unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


def stage_init_codebook(stage):
    return stage.task.init_model_state(jax.random.split(jax.random.key(0))[0])["vq_ema"]["quantize"]["embedding"]
