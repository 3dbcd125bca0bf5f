"""SD-1.5-shaped U-Net forward, one classifier-free-guidance step: ours vs diffusers on this CPU.

One call = the U-Net forward on latents [2, 64, 64, 4] (512 px; batch 2 = the conditional and
unconditional halves of one CFG step), timestep [2], context [2, 77, 768], random weights
(859,520,964 parameters; ours: normal(0, 0.02) per leaf, diffusers: its own init: the values do
not matter for time or memory). Each side runs in its own child process so its peak RSS
(``ru_maxrss``) is its own; reported per side: compile / first-call time, median wall and CPU
(``process_time``, all threads) seconds per call, RSS once the weights are resident and the
peak RSS of the process. The sides alternate (ours, torch, ours, torch, ... for ``--rounds``)
so machine load hits both alike; on a loaded machine only the ratios mean anything.

  ours   ``UNet.from_diffusers_config(SD15_UNET_CONFIG, dtype=..., attention=...)``, jitted
         ``apply`` (params float32, compute ``--dtype``), default attention backend ``auto``.
  torch  diffusers ``UNet2DConditionModel.from_config(...)`` in ``eval()`` under
         ``torch.inference_mode()``, weights and compute in ``--dtype``, default threads.

    .venv/bin/python benchmarks/bench_sd15_forward.py --calls 3 --out benchmarks/results/sd15_forward.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2**30


def _rss_now_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _time_calls(fn, calls: int) -> dict:
    walls, cpus = [], []
    for _ in range(calls):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return {"wall_s": walls, "cpu_s": cpus}


def run_ours(args) -> dict:
    sys.path.insert(0, REPO_ROOT)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ldm_jax.models.unet import SD15_UNET_CONFIG, UNet

    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    unet = UNet.from_diffusers_config(SD15_UNET_CONFIG, dtype=dtype, attention=args.attention)
    b, size = 2, args.latent
    x = jnp.asarray(np.random.default_rng(0).standard_normal((b, size, size, 4), dtype=np.float32))
    t = jnp.asarray([500, 500], jnp.int32)
    ctx = jnp.asarray(np.random.default_rng(1).standard_normal((b, 77, 768), dtype=np.float32))
    abstract = jax.eval_shape(lambda k: unet.init(k, x, t, ctx)["params"], jax.random.key(0))
    rng = np.random.default_rng(2)
    params = jax.tree.map(
        lambda s: jax.device_put((rng.standard_normal(s.shape, dtype=np.float32) * 0.02)), abstract
    )
    jax.block_until_ready(params)
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    rss_weights = _rss_now_bytes()
    fwd = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
    start = time.perf_counter()
    compiled = fwd.lower(params, x, t, ctx).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, x, t, ctx))
    first_s = time.perf_counter() - start
    times = _time_calls(lambda: jax.block_until_ready(compiled(params, x, t, ctx)), args.calls)
    mem = compiled.memory_analysis()
    return {
        "side": "ours", "num_params": num_params, "compile_s": compile_s, "first_call_s": first_s,
        "rss_weights_bytes": rss_weights, "peak_rss_bytes": _peak_rss_bytes(),
        "xla_temp_bytes": int(getattr(mem, "temp_size_in_bytes", -1)), **times,
    }


def run_torch(args) -> dict:
    import torch
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, REPO_ROOT)
    from ldm_jax.models.unet_config import SD15_UNET_CONFIG

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    model = UNet2DConditionModel.from_config(SD15_UNET_CONFIG).to(dtype).eval()
    num_params = sum(p.numel() for p in model.parameters())
    rss_weights = _rss_now_bytes()
    b, size = 2, args.latent
    x = torch.randn(b, 4, size, size, dtype=dtype)
    t = torch.tensor([500, 500])
    ctx = torch.randn(b, 77, 768, dtype=dtype)

    def call():
        with torch.inference_mode():
            model(x, t, encoder_hidden_states=ctx)

    start = time.perf_counter()
    call()
    first_s = time.perf_counter() - start
    times = _time_calls(call, args.calls)
    return {
        "side": "torch", "num_params": num_params, "threads": torch.get_num_threads(), "first_call_s": first_s,
        "rss_weights_bytes": rss_weights, "peak_rss_bytes": _peak_rss_bytes(), **times,
    }


def _child(side: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--dtype", args.dtype,
           "--latent", str(args.latent), "--calls", str(args.calls), "--attention", args.attention]
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{side} child failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def render(result: dict) -> str:
    a = result["args"]
    lines = [
        f"# SD-1.5 U-Net forward, one CFG step (batch 2, {a['latent']}x{a['latent']} latents, {a['dtype']})",
        "",
        f"Written by `benchmarks/bench_sd15_forward.py` on {result['date']}; 1-min load average "
        f"{result['load_before']:.1f} before, {result['load_after']:.1f} after ({result['cpus']} cores). "
        f"{a['rounds']} alternating round(s) per side, {a['calls']} timed calls each after one untimed call; "
        "medians over all timed calls. Our attention backend: "
        f"`{a['attention']}`.",
        "",
        "| side | params | first call s | wall s/call | CPU s/call | RSS with weights GiB | peak RSS GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for side in ("ours", "torch"):
        runs = result["runs"][side]
        wall = statistics.median([w for r in runs for w in r["wall_s"]])
        cpu = statistics.median([c for r in runs for c in r["cpu_s"]])
        first = statistics.median([r["first_call_s"] for r in runs])
        lines.append(
            f"| {side} | {runs[0]['num_params']:,} | {first:.1f} | {wall:.2f} | {cpu:.2f} | "
            f"{max(r['rss_weights_bytes'] for r in runs) / GiB:.2f} | {max(r['peak_rss_bytes'] for r in runs) / GiB:.2f} |"
        )
    ours, torch_ = result["runs"]["ours"], result["runs"]["torch"]
    ratio = statistics.median([w for r in torch_ for w in r["wall_s"]]) / statistics.median(
        [w for r in ours for w in r["wall_s"]])
    lines += ["", f"torch/ours wall time per call: **{ratio:.2f}** (> 1: ours faster). Our compile: "
              f"{statistics.median([r['compile_s'] for r in ours]):.0f} s; XLA temp "
              f"{ours[0]['xla_temp_bytes'] / GiB:.2f} GiB."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--attention", default="auto", help="our attention backend (ldm_jax.kernels)")
    parser.add_argument("--out", default=None, help="write JSON here and the table beside it as .md")
    parser.add_argument("--child", choices=["ours", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.calls < 1 or args.rounds < 1 or args.latent < 8 or args.latent % 8:
        parser.error(f"--calls/--rounds must be >= 1 and --latent a multiple of 8, got {args.calls}, {args.rounds}, {args.latent}")
    if args.child:
        print(json.dumps(run_ours(args) if args.child == "ours" else run_torch(args)))
        return
    import datetime

    load_before = os.getloadavg()[0]
    runs = {"ours": [], "torch": []}
    for _ in range(args.rounds):
        for side in ("ours", "torch"):
            runs[side].append(_child(side, args))
            print(side, json.dumps({k: v for k, v in runs[side][-1].items() if not isinstance(v, list)}), flush=True)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_before": load_before, "load_after": os.getloadavg()[0], "cpus": len(os.sched_getaffinity(0)),
        "args": vars(args), "runs": runs,
    }
    text = render(result)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
