"""Convolution micro-benchmark over the exact conv shapes of the benchmark U-Nets.

The shapes are read off the U-Net's own forward (every ``conv_general_dilated`` in the jaxpr of
``UNet.apply`` for ``bench_train_step.CONFIGS[name]`` at its benchmark batch), so the table
follows the configs. For each distinct (input, kernel, stride, padding) it times, forward and
forward+backward (the VJP w.r.t. input and kernel for a random cotangent):

  our formulations  ``ldm_jax.kernels.conv.conv2d(impl=...)`` for every ``CONV_IMPLS`` entry
                    (``xla`` = ``lax.conv_general_dilated`` NHWC/HWIO as flax's nn.Conv), plus
                    ``xla_nchw``: the same conv with NCHW/OIHW operands (layout only);
  torch             ``torch.nn.functional.conv2d`` on NCHW (diffusers' layout; oneDNN).

Each case is one jitted function; the cases are timed interleaved (a few calls of each in turn,
repeated) so machine load hits all alike. Reported per shape: median wall ms per call and CPU
ms per call (``time.process_time``, all threads); per config: the totals weighted by how often
each shape occurs in one forward, i.e. the conv time one U-Net forward / forward+backward
implies. Nothing is asserted.

    .venv/bin/python benchmarks/bench_conv.py --config small --out benchmarks/results/conv_small.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import machine_peak  # noqa: E402
from bench_train_step import CONFIGS, random_batch  # noqa: E402

from ldm_jax.kernels.conv import CONV_IMPLS, conv2d  # noqa: E402
from ldm_jax.models.unet import UNet  # noqa: E402


def _walk(jaxpr, found: collections.Counter) -> None:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            dn = eqn.params["dimension_numbers"]
            if tuple(dn.lhs_spec) != (0, 3, 1, 2) or tuple(dn.rhs_spec) != (3, 2, 0, 1):
                raise ValueError(f"conv with dimension numbers {dn} (expected NHWC/HWIO)")
            found[(tuple(lhs), tuple(rhs), tuple(eqn.params["window_strides"]),
                   tuple(map(tuple, eqn.params["padding"])))] += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    _walk(getattr(inner, "jaxpr", inner), found)


def conv_shapes(name: str, batch: int | None = None) -> list[tuple[tuple, int]]:
    """[(x shape, w shape, strides, padding), count] for every conv of one U-Net forward."""
    cfg = CONFIGS[name]()
    batch = batch or cfg.batch
    unet = UNet(**{**cfg.unet, "conv_impl": "xla"})  # every conv a conv_general_dilated in the jaxpr
    data = random_batch(cfg, batch)
    params = jax.eval_shape(lambda k: unet.init(k, **unet.dummy_inputs())["params"], jax.random.key(0))

    def forward(p):
        return unet.apply(
            {"params": p}, jnp.asarray(data["latents"]), jnp.zeros((batch,), jnp.int32),
            context=jnp.asarray(data["context"]) if "context" in data else None,
            class_labels=jnp.asarray(data["labels"]) if "labels" in data else None,
        )

    found: collections.Counter = collections.Counter()
    _walk(jax.make_jaxpr(forward)(params).jaxpr, found)
    return sorted(found.items())


def _jax_cases(shape, impls, seed=0):
    (xs, ws, strides, padding) = shape
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(xs, dtype=np.float32))
    w = jnp.asarray(rng.standard_normal(ws, dtype=np.float32) / np.sqrt(np.prod(ws[:3])))
    out_shape = jax.eval_shape(lambda a, b: conv2d(a, b, strides=strides, padding=padding), x, w).shape
    g = jnp.asarray(rng.standard_normal(out_shape, dtype=np.float32))
    cases = {}
    for impl in impls:
        if impl == "xla_nchw":
            def fn(a, b):
                return jax.lax.conv_general_dilated(a, b, strides, padding, dimension_numbers=("NCHW", "OIHW", "NCHW"))
            args = (jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(w, (3, 2, 0, 1)))
            cot = jnp.transpose(g, (0, 3, 1, 2))
        else:
            def fn(a, b, impl=impl):
                return conv2d(a, b, strides=strides, padding=padding, impl=impl)
            args, cot = (x, w), g

        def fwdbwd(a, b, c, fn=fn):
            out, vjp = jax.vjp(fn, a, b)
            return out, vjp(c)

        fwd = jax.jit(fn).lower(*args).compile()
        both = jax.jit(fwdbwd).lower(*args, cot).compile()
        cases[impl] = {
            "fwd": (lambda fwd=fwd, args=args: jax.block_until_ready(fwd(*args))),
            "fwd+bwd": (lambda both=both, args=args, cot=cot: jax.block_until_ready(both(*args, cot))),
        }
    return cases


def _torch_cases(shape, seed=0):
    import torch
    import torch.nn.functional as F

    (xs, ws, strides, padding) = shape
    gen = torch.Generator().manual_seed(seed)
    b, h, w_, c = xs
    kh, kw, _, o = ws
    x = torch.randn(b, c, h, w_, generator=gen)
    w = (torch.randn(o, c, kh, kw, generator=gen) / float(np.sqrt(kh * kw * c)))
    (pt, pb), (pl, pr) = padding
    if pt != pb or pl != pr:
        raise ValueError(f"torch conv2d needs symmetric padding, got {padding}")
    pad = (pt, pl)
    out = F.conv2d(x, w, stride=strides, padding=pad)
    g = torch.randn(out.shape, generator=gen)

    def fwd():
        with torch.no_grad():
            F.conv2d(x, w, stride=strides, padding=pad)

    def both():
        xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
        F.conv2d(xr, wr, stride=strides, padding=pad).backward(g)

    return {"torch": {"fwd": fwd, "fwd+bwd": both}}


def time_interleaved(cases: dict, rounds: int, calls: int) -> dict:
    """{case: {mode: {"wall_ms": [...], "cpu_ms": [...]}}}, per-call times of each round."""
    out = {c: {m: {"wall_ms": [], "cpu_ms": []} for m in modes} for c, modes in cases.items()}
    for _ in range(2):  # warm-up
        for modes in cases.values():
            for f in modes.values():
                f()
    for _ in range(rounds):
        for case, modes in cases.items():
            for mode, f in modes.items():
                w0, c0 = time.perf_counter(), time.process_time()
                for _ in range(calls):
                    f()
                out[case][mode]["wall_ms"].append((time.perf_counter() - w0) / calls * 1e3)
                out[case][mode]["cpu_ms"].append((time.process_time() - c0) / calls * 1e3)
    return out


def _flops(shape) -> float:
    (xs, ws, strides, padding) = shape
    b, h, w, c = xs
    kh, kw, _, o = ws
    ho = (h + sum(padding[0]) - kh) // strides[0] + 1
    wo = (w + sum(padding[1]) - kw) // strides[1] + 1
    return 2.0 * b * ho * wo * kh * kw * c * o


def run(name: str, impls, rounds: int, calls: int, batch: int | None, torch_threads: int | None) -> dict:
    import torch

    if torch_threads:
        torch.set_num_threads(torch_threads)
    load_before = os.getloadavg()[0]
    rows = []
    for shape, count in conv_shapes(name, batch):
        cases = _jax_cases(shape, impls)
        cases.update(_torch_cases(shape))
        times = time_interleaved(cases, rounds, calls)
        row = {"x": shape[0], "w": shape[1], "strides": shape[2], "padding": shape[3], "count": count,
               "gflop_fwd": _flops(shape) / 1e9, "results": {}}
        for case, modes in times.items():
            row["results"][case] = {
                mode: {k: statistics.median(v) for k, v in t.items()} for mode, t in modes.items()
            }
        rows.append(row)
        print(json.dumps({k: row[k] for k in ("x", "w", "strides", "count")}),
              {c: round(r["fwd+bwd"]["wall_ms"], 2) for c, r in row["results"].items()}, flush=True)
    totals = {}
    for case in rows[0]["results"]:
        totals[case] = {
            mode: {k: sum(r["count"] * r["results"][case][mode][k] for r in rows) for k in ("wall_ms", "cpu_ms")}
            for mode in ("fwd", "fwd+bwd")
        }
    return {
        "config": name,
        "batch": batch or CONFIGS[name]().batch,
        "torch_threads": torch.get_num_threads(),
        "rounds": rounds,
        "calls": calls,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "machine": machine_peak.machine_description(),
        "rows": rows,
        "totals": totals,
    }


def render(result: dict) -> str:
    cases = list(result["totals"])
    lines = [
        f"### {result['config']} (batch {result['batch']}, float32), conv time per U-Net pass",
        "",
        f"1-min load average {result['load_before']:.1f} before, {result['load_after']:.1f} after; "
        f"XLA default threads, torch {result['torch_threads']} thread(s); median of {result['rounds']} "
        f"interleaved rounds x {result['calls']} calls.",
        "",
        "| formulation | fwd wall ms | fwd CPU ms | fwd+bwd wall ms | fwd+bwd CPU ms | fwd+bwd wall vs torch |",
        "|---|---|---|---|---|---|",
    ]
    t_ref = result["totals"]["torch"]["fwd+bwd"]["wall_ms"]
    for case in cases:
        t = result["totals"][case]
        lines.append(
            f"| {case} | {t['fwd']['wall_ms']:.1f} | {t['fwd']['cpu_ms']:.1f} | {t['fwd+bwd']['wall_ms']:.1f} | "
            f"{t['fwd+bwd']['cpu_ms']:.1f} | {t['fwd+bwd']['wall_ms'] / t_ref:.2f}x |"
        )
    lines += ["", "Per shape (x NHWC, w HWIO; count = occurrences in one forward), fwd+bwd wall ms per call:", "",
              "| x | w | stride | count | " + " | ".join(cases) + " |",
              "|---|---|---|---|" + "---|" * len(cases)]
    for r in result["rows"]:
        lines.append(
            f"| {'x'.join(map(str, r['x']))} | {'x'.join(map(str, r['w']))} | {r['strides'][0]} | {r['count']} | "
            + " | ".join(f"{r['results'][c]['fwd+bwd']['wall_ms']:.2f}" for c in cases) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--batch", type=int, default=None, help="default: the config's benchmark batch")
    parser.add_argument("--impls", nargs="+", default=[*CONV_IMPLS, "xla_nchw"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write JSON here (and the table beside it as .md)")
    args = parser.parse_args(argv)
    result = run(args.config, args.impls, args.rounds, args.calls, args.batch, args.torch_threads)
    text = render(result)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
