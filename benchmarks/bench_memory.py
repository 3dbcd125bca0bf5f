"""Activation memory of the SD-1.5-shaped U-Net's gradient, by XLA's own buffer assignment.

For each latent size, attention backend and remat policy this compiles ``jax.grad`` of the
eps-prediction MSE through ``UNet`` with SD 1.5's config (859,520,964 params, float32 params,
bfloat16 compute, batch 1, 77 x 768 text context) for this machine's backend and reports
``compiled.memory_analysis()``: temp (activations + backward temporaries), arguments, outputs.
Nothing runs: the params are abstract (``jax.eval_shape``), so no 3.4 GB of weights is needed,
and the numbers are deterministic (safe to produce on a loaded machine).

On CPU, remat is measured with ``ldm_jax.models.remat.CPU_REMAT_COMPILER_OPTIONS``: XLA:CPU's
``cse_barrier_expander`` would otherwise delete jax.checkpoint's barriers and CSE would merge
the recomputation into the forward pass (why "remat saves nothing" in issue #8's numbers).
``--keep-cpu-cse`` reproduces that behaviour. LLVM optimisation is turned down
(``xla_backend_optimization_level=0``) because it changes code, not buffers.

    .venv/bin/python benchmarks/bench_memory.py                       # full table (slow compiles)
    .venv/bin/python benchmarks/bench_memory.py --sizes 32 --backends blockwise --remat none layer
    .venv/bin/python benchmarks/bench_memory.py --tiny                # a 2-level toy U-Net, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

# The checkout's ldm_jax, not an installed copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ldm_jax.models.remat import CPU_REMAT_COMPILER_OPTIONS  # noqa: E402
from ldm_jax.models.unet import SD15_UNET_CONFIG, UNet  # noqa: E402

GiB = 2**30
TINY_CONFIG = dict(
    block_out_channels=[32, 32], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1, cross_attention_dim=768,
    attention_head_dim=8, norm_num_groups=8,
)


def measure(config, latent: int, backend: str, remat: str, keep_cpu_cse: bool = False) -> dict:
    kw = dict(dtype=jnp.bfloat16, attention=backend)
    if remat != "none":
        kw.update(remat=True, remat_policy=remat)
    unet = UNet.from_diffusers_config(config, **kw)
    x = jax.ShapeDtypeStruct((1, latent, latent, 4), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.int32)
    ctx = jax.ShapeDtypeStruct((1, 77, 768), jnp.float32)
    params = jax.eval_shape(
        lambda: unet.init(jax.random.PRNGKey(0), jnp.zeros(x.shape), jnp.zeros(t.shape, t.dtype), jnp.zeros(ctx.shape))
    )["params"]
    n_params = sum(leaf.size for leaf in jax.tree.leaves(params))

    def loss(p, x, t, ctx, noise):
        eps = unet.apply({"params": p}, x, t, ctx, train=True)
        return jnp.mean(jnp.square(eps.astype(jnp.float32) - noise))

    start = time.perf_counter()
    lowered = jax.jit(jax.grad(loss)).lower(params, x, t, ctx, x)
    options = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
    if jax.default_backend() == "cpu" and not keep_cpu_cse:
        options.update(CPU_REMAT_COMPILER_OPTIONS)
    mem = lowered.compile(compiler_options=options).memory_analysis()
    return dict(
        latent=latent, backend=backend, remat=remat, params=int(n_params),
        temp_gib=mem.temp_size_in_bytes / GiB, argument_gib=mem.argument_size_in_bytes / GiB,
        output_gib=mem.output_size_in_bytes / GiB, compile_s=time.perf_counter() - start,
        platform=jax.default_backend(), cpu_cse_barriers_kept=not keep_cpu_cse,
    )


def render(rows) -> str:
    lines = [
        "| latent | backend | remat | temp GiB | args GiB | out GiB | compile s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['latent']}x{r['latent']} | {r['backend']} | {r['remat']} | {r['temp_gib']:.2f} | "
            f"{r['argument_gib']:.2f} | {r['output_gib']:.2f} | {r['compile_s']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96])
    ap.add_argument("--backends", nargs="+", default=["xla", "blockwise"])
    ap.add_argument("--remat", nargs="+", default=["none", "block", "layer"],
                    help="none | block | layer | dots (offload needs TPU/GPU)")
    ap.add_argument("--tiny", action="store_true", help="a 2-level toy U-Net instead of SD 1.5 (smoke run)")
    ap.add_argument("--keep-cpu-cse", action="store_true", help="let XLA:CPU drop the remat barriers")
    ap.add_argument("--out", default=None, help="write JSON rows here (appends to an existing list)")
    args = ap.parse_args(argv)
    config = TINY_CONFIG if args.tiny else SD15_UNET_CONFIG
    rows = []
    if args.out and os.path.exists(args.out):
        with open(args.out) as f:
            rows = json.load(f)
    for size in args.sizes:
        for backend in args.backends:
            for remat in args.remat:
                row = measure(config, size, backend, remat, args.keep_cpu_cse)
                row["model"] = "tiny" if args.tiny else "sd15"
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "w") as f:
                        json.dump(rows, f, indent=1)
    print(render(rows))


if __name__ == "__main__":
    sys.exit(main())
