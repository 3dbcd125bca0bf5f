"""Attention micro-benchmark: forward + backward of self-attention, our backends vs torch SDPA.

For T in {256, 1024, 4096}, 8 heads, head dim 40 and 64, batch 1, float32 (``--dtype`` to
change): the time of one jitted ``jax.grad`` (w.r.t. q, k, v) of ``sum(attention(q, k, v) * w)``
for each backend in ``ldm_jax.kernels.BACKENDS``, and XLA's temp memory of that compiled
function (``memory_analysis``); against ``torch.nn.functional.scaled_dot_product_attention``
forward + ``backward`` on the same shapes. Ours and torch are timed interleaved (one call each,
repeated) so machine load hits both alike; medians are reported. Nothing is asserted.

``splash`` off TPU runs in Pallas *interpret* mode: its time measures the interpreter, not the
kernel, so it is only compiled for memory (time column "interp") unless ``--time-splash``.
``cudnn`` off GPU falls back to blockwise and is skipped. On a GPU / TPU the same script times
those kernels for real.

    .venv/bin/python benchmarks/bench_attention.py                 # full table
    .venv/bin/python benchmarks/bench_attention.py --quick         # T = 64, 128: a smoke run
    .venv/bin/python benchmarks/bench_attention.py --out benchmarks/results/attention.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ldm_jax.kernels import BACKENDS  # noqa: E402

MiB = 2**20


def _jax_case(backend: str, q, k, v, w):
    fn = BACKENDS[backend]

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) * w)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    start = time.perf_counter()
    compiled = grad.lower(q, k, v).compile()
    compile_s = time.perf_counter() - start
    temp = compiled.memory_analysis().temp_size_in_bytes
    return compiled, compile_s, temp


def _torch_case(shape, dtype: str, seed: int):
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    b, t, h, d = shape
    q, k, v = (torch.randn(b, h, t, d, generator=gen, dtype=tdtype).requires_grad_() for _ in range(3))
    w = torch.randn(b, h, t, d, generator=gen, dtype=tdtype)

    def step():
        for x in (q, k, v):
            x.grad = None
        out = F.scaled_dot_product_attention(q, k, v)
        out.backward(w)
        return q.grad

    return step


def run(lengths, head_dims, heads, dtype, reps, backends, time_splash):
    rows = []
    jdtype = jnp.dtype(dtype)
    platform = jax.default_backend()
    for t in lengths:
        for d in head_dims:
            shape = (1, t, heads, d)
            rng = np.random.default_rng(t * 1000 + d)
            q, k, v, w = (jnp.asarray(rng.standard_normal(shape), jdtype) for _ in range(4))
            torch_step = _torch_case(shape, dtype, seed=t + d)
            torch_step()  # warm-up
            cases = {}
            for name in backends:
                if name == "cudnn" and platform not in ("gpu", "cuda"):
                    continue
                compiled, compile_s, temp = _jax_case(name, q, k, v, w)
                timed = not (name == "splash" and platform != "tpu" and not time_splash)
                if timed:
                    jax.block_until_ready(compiled(q, k, v))  # warm-up
                cases[name] = dict(compiled=compiled, compile_s=compile_s, temp=temp, timed=timed, times=[])
            torch_times = []
            for _ in range(reps):
                for case in cases.values():
                    if case["timed"]:
                        start = time.perf_counter()
                        jax.block_until_ready(case["compiled"](q, k, v))
                        case["times"].append(time.perf_counter() - start)
                start = time.perf_counter()
                torch_step()
                torch_times.append(time.perf_counter() - start)
            torch_ms = 1e3 * statistics.median(torch_times)
            for name, case in cases.items():
                ms = 1e3 * statistics.median(case["times"]) if case["timed"] else None
                rows.append(dict(
                    T=t, head_dim=d, heads=heads, dtype=dtype, backend=name, platform=platform,
                    interpret=(name == "splash" and platform != "tpu"), ms=ms, torch_ms=torch_ms,
                    torch_over_ours=(torch_ms / ms) if ms else None, temp_mib=case["temp"] / MiB,
                    compile_s=case["compile_s"],
                ))
                print(json.dumps(rows[-1]), flush=True)
    return rows


def render(rows) -> str:
    lines = [
        "| T | head dim | backend | ours ms | torch SDPA ms | torch/ours | XLA temp MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ms = f"{r['ms']:.2f}" if r["ms"] is not None else ("interp" if r["interpret"] else "-")
        ratio = f"{r['torch_over_ours']:.2f}" if r["torch_over_ours"] else "-"
        name = r["backend"] + (" (interpret)" if r["interpret"] else "")
        lines.append(
            f"| {r['T']} | {r['head_dim']} | {name} | {ms} | {r['torch_ms']:.2f} | {ratio} | {r['temp_mib']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[40, 64])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS))
    ap.add_argument("--time-splash", action="store_true", help="also time splash in interpret mode")
    ap.add_argument("--quick", action="store_true", help="T = 64, 128, 2 reps: checks the script end to end")
    ap.add_argument("--out", default=None, help="write the rows as JSON (and a .md table beside it)")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.reps = [64, 128], 2
    rows = run(args.lengths, args.head_dims, args.heads, args.dtype, args.reps, args.backends, args.time_splash)
    table = render(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    sys.exit(main())
