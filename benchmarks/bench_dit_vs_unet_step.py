#!/usr/bin/env python
"""CPU time of one training gradient step: the digits U-Net/DDPM (configs/digits_ldm.py) vs the
digits DiT/flow (configs/digits_dit_flow.py), on their 8x8x4 latents at batch 64, interleaved in
one process (the machine is shared: compare CPU time and the ratio, not wall clock).

    python benchmarks/bench_dit_vs_unet_step.py [--rounds 3 --steps 5]

Sets the DiT step budget for an equal-training-compute comparison: DiT steps = U-Net steps x
(U-Net step CPU time / DiT step CPU time).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from configs import digits_dit_flow, digits_ldm  # noqa: E402
from ldm_jax.ldm.model import build_model  # noqa: E402


def grad_step(config, batch_size):
    config.first_stage.source = "identity"  # the latents as "pixels": 8x8x4, as the digits autoencoder gives
    model = build_model(config, {"num_classes": 10, "resolution": 8, "channels": 4})
    params = nn.unbox(model.init_params(jax.random.key(0)))
    batch = {"latents": jax.random.normal(jax.random.key(1), (batch_size, 8, 8, 4)),
             "labels": jnp.arange(batch_size, dtype=jnp.int32) % 10}
    fn = jax.jit(jax.grad(lambda p, b, k: model.loss_fn(p, b, k)[0]))
    jax.block_until_ready(fn(params, batch, jax.random.key(2)))  # compile
    count = sum(x.size for x in jax.tree.leaves(params))
    return (lambda i: jax.block_until_ready(fn(params, batch, jax.random.key(i)))), count


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    steps = {"unet_ddpm": grad_step(digits_ldm.get_config(), args.batch),
             "dit_flow": grad_step(digits_dit_flow.get_config(), args.batch)}
    cpu = {k: 0.0 for k in steps}
    for r in range(args.rounds):
        for name, (fn, _) in steps.items():
            start = time.process_time()
            for i in range(args.steps):
                fn(100 * r + i)
            cpu[name] += time.process_time() - start
    n = args.rounds * args.steps
    result = {
        "cpu_s_per_step": {k: v / n for k, v in cpu.items()},
        "params": {k: c for k, (_, c) in steps.items()},
        "ratio_dit_over_unet": cpu["dit_flow"] / cpu["unet_ddpm"],
        "batch": args.batch, "steps_each": n, "loadavg_1min": os.getloadavg()[0],
        "devices": jax.device_count(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
