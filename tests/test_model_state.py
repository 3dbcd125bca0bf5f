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

DIM, BATCH = 4, 16


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
