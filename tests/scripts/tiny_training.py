"""A tiny stand-in denoiser and a training script around ``ldm_jax.training.train``.

Used by the training-infrastructure tests, in-process and as a subprocess (kill -9 / SIGTERM /
two-process jax.distributed runs). The model is built only from the shared layers
(ResnetBlock, P.conv, P.dense, P.embed), so its params carry the logical axis names that any
ldm_jax model carries.

    python tests/scripts/tiny_training.py --ckpt_dir DIR --steps 40 --out params.npz \
        [--every 4] [--sleep 0.05] [--nan_at 7] [--preset fsdp] [--mesh data=2,fsdp=4]
        [--coordinator 127.0.0.1:PORT --num_processes 2 --process_id 0]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from ldm_jax.models import partitioning as P  # noqa: E402
from ldm_jax.models.layers import ResnetBlock  # noqa: E402
from ldm_jax.training import Task, train, training_defaults  # noqa: E402

IMAGE = (8, 8, 4)
NUM_CLASSES = 10


class TinyDenoiser(nn.Module):
    """eps-prediction on [B, 8, 8, 4] with a timestep in [0, 1] and a class label."""

    channels: int = 16
    temb_dim: int = 32
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, t, label):
        kw = dict(dtype=self.dtype)
        freqs = jnp.arange(1, self.temb_dim // 2 + 1, dtype=jnp.float32)
        temb = jnp.concatenate([jnp.sin(t[:, None] * freqs), jnp.cos(t[:, None] * freqs)], axis=-1)
        temb = P.dense(self.temb_dim, name="time_proj", **kw)(temb)
        temb = temb + P.embed(NUM_CLASSES, self.temb_dim, name="class_embed", **kw)(label)
        h = P.conv(self.channels, name="conv_in", **kw)(x)
        h = ResnetBlock(self.channels, groups=4, name="block", **kw)(h, temb)
        h = nn.silu(P.group_norm(4, name="norm_out")(h)).astype(self.dtype)
        return P.conv(IMAGE[-1], name="conv_out", **kw)(h)


def tiny_task(dtype=jnp.float32) -> Task:
    model = TinyDenoiser(dtype=dtype)

    def init_params(key):
        dummy = jnp.zeros((1, *IMAGE), jnp.float32)
        return model.init(key, dummy, jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.int32))["params"]

    def loss_fn(params, batch, key):
        x0, t = batch["image"], batch["t"]
        # A batch may carry its noise, making the loss a deterministic function of the batch.
        noise = batch["noise"] if "noise" in batch else jax.random.normal(key, x0.shape, jnp.float32)
        a = jnp.sqrt(1.0 - t)[:, None, None, None]
        s = jnp.sqrt(t)[:, None, None, None]
        pred = model.apply({"params": params}, a * x0 + s * noise, t, batch["label"]).astype(jnp.float32)
        err = pred - noise
        return jnp.mean(err**2), {"abs_err": jnp.mean(jnp.abs(err))}

    return Task(init_params, loss_fn)


def global_batch(position: int, batch_size: int, nan_at: int = -1) -> dict[str, np.ndarray]:
    """Global batch number ``position``: a pure function of it, so any resume replays it."""
    rng = np.random.default_rng([1234, position])
    image = rng.standard_normal((batch_size, *IMAGE)).astype(np.float32)
    if position == nan_at:
        image[0, 0, 0, 0] = np.nan
    return {
        "image": image,
        "t": rng.uniform(0.02, 0.98, (batch_size,)).astype(np.float32),
        "label": rng.integers(0, NUM_CLASSES, (batch_size,)).astype(np.int32),
    }


def batch_source(batch_size: int, nan_at: int = -1, sleep: float = 0.0):
    def batches(position: int, rows: slice):
        print(f"process {jax.process_index()} loads rows {rows.start}:{rows.stop} from position {position}", flush=True)
        while True:
            if sleep:
                time.sleep(sleep)
            yield {k: v[rows] for k, v in global_batch(position, batch_size, nan_at).items()}
            position += 1

    return batches


def tiny_config(steps: int, every: int = 4, preset: str = "dp", mesh: dict | None = None, batch_size: int = 16):
    config = training_defaults()
    config.seed = 7
    config.mesh.shape = mesh or {"data": -1, "fsdp": 1, "tensor": 1}
    config.sharding.preset = preset
    config.optimizer.learning_rate = 3e-3
    config.optimizer.warmup_steps = 3
    config.ema.decay = 0.9
    config.train.global_batch_size = batch_size
    config.train.num_steps = steps
    config.train.log_every = 1000
    config.checkpoint.every_steps = every
    config.checkpoint.max_to_keep = 2
    return config


def flat_params(tree) -> dict[str, np.ndarray]:
    """Host copies of every leaf, keyed by path (gathers sharded arrays first)."""
    gathered = jax.jit(lambda x: x, out_shardings=jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.devices()), ("all",)), jax.sharding.PartitionSpec()))(tree)
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(gathered)[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ckpt_dir", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--nan_at", type=int, default=-1)
    parser.add_argument("--preset", default="dp")
    parser.add_argument("--mesh", default="")
    parser.add_argument("--out", default="")
    parser.add_argument("--coordinator", default="")
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--process_id", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout, force=True)
    logging.getLogger("ldm_jax").setLevel(logging.INFO)

    mesh = None
    if args.mesh:
        mesh = {k: int(v) for k, v in (item.split("=") for item in args.mesh.split(","))}
    config = tiny_config(args.steps, args.every, args.preset, mesh)
    if args.coordinator:
        config.distributed.coordinator_address = args.coordinator
        config.distributed.num_processes = args.num_processes
        config.distributed.process_id = args.process_id

    result = train(config, tiny_task(), batch_source(16, args.nan_at, args.sleep), args.ckpt_dir)
    print(f"finished step={result.step} preempted={result.preempted} resumed_from={result.resumed_from}", flush=True)
    if args.out:
        params = flat_params({"params": result.state.params, "ema": result.state.ema_params})
        if jax.process_index() == 0 or args.num_processes > 1:
            np.savez(args.out, **params)
    return 0


if __name__ == "__main__":
    sys.exit(main())
