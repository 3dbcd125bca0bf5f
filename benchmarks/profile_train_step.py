"""Where one train step spends its time, by category, for ours (jax.profiler) and torch (torch.profiler).

Builds the same two sides as ``bench_train_step.py`` (same U-Net, batch, AdamW, EMA) and profiles
``--steps`` steps of each after warm-up:

  ours   ``jax.profiler.trace``; every XLA:CPU thunk event on the host plane is an HLO instruction
         (a fusion, convolution, dot, copy, ...). Its category comes from the instruction itself
         (convolution / dot) or from the ``op_name`` metadata XLA keeps on it in the compiled
         HLO (``compiled.as_text()``): group_norm / layer_norm -> normalisation, attn -> attention,
         the optimizer / EMA / guard part of the step (outside the jvp of the loss) -> optimizer.
  torch  ``torch.profiler`` (CPU), self time per aten op, by op name.

Categories: convolution, matmul (dense layers), attention, normalisation, elementwise,
optimizer/EMA, data transfer (host<->device copies; for ours also the batch upload), other.
Both columns are fractions of the profiled wall time per step; wall times are shown too but are
only comparable when measured on an idle machine. Nothing is asserted.

    .venv/bin/python benchmarks/profile_train_step.py --config small
    .venv/bin/python benchmarks/profile_train_step.py --config large --batch 4 --steps 2
    .venv/bin/python benchmarks/profile_train_step.py --config small --out benchmarks/results/profile_small.json
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_train_step as bts  # noqa: E402

CATEGORIES = ("convolution", "matmul", "attention", "normalisation", "elementwise", "optimizer/EMA",
              "data transfer", "other")

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*)$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_OPCODE = re.compile(r"(?:^|\s)([a-z][\w\-]*)\(")  # after the (possibly tuple) shape: "f32[2]{0} fusion("


def hlo_categories(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> category, from the instruction and its fused computation."""
    fused_ops: dict[str, list[str]] = {}
    current = None
    info = {}
    for line in hlo_text.splitlines():
        if line and not line.startswith(" ") and "{" in line:
            name = line.split()[0].lstrip("%")
            current = name if name not in ("ENTRY", "HloModule") else line.split()[1].lstrip("%")
            fused_ops.setdefault(current, [])
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        name, rest = m.groups()
        opm = _OP_NAME.search(rest)
        op_name = opm.group(1) if opm else ""
        km = _OPCODE.search(rest)
        kind = km.group(1) if km else ""
        if current is not None:
            fused_ops[current].append(f"{kind} {op_name}")
        calls = re.search(r"calls=%?([\w.\-]+)", rest)
        info[name] = (kind, op_name, calls.group(1) if calls else None)
    out = {}
    for name, (kind, op_name, calls) in info.items():
        inner = " ".join(fused_ops.get(calls, [])) if calls else ""
        out[name] = _category(kind, op_name + " " + inner)
    return out


def _category(kind: str, text: str) -> str:
    t = text.lower()
    if kind in ("copy-start", "copy-done", "send", "recv", "infeed", "outfeed"):
        return "data transfer"
    in_model = "jvp(" in t or "transpose(" in t or "unet" in t
    if not in_model and any(s in t for s in ("adam", "ema", "clip", "optax", "where", "isfinite", "global_norm")):
        return "optimizer/EMA"
    if "attn" in t or "dot_product_attention" in t or "blockwise" in t or "softmax" in t:
        return "attention"
    if "conv" in t or kind == "convolution":
        return "convolution"
    if "norm" in t:
        return "normalisation"
    if kind == "dot" or "dot_general" in t or "dense" in t:
        return "matmul"
    if kind in ("fusion", "add", "multiply", "select", "broadcast", "reduce", "exponential", "convert"):
        return "elementwise"
    if not in_model:
        return "optimizer/EMA"
    return "other"


def profile_ours(ours, steps: int) -> dict:
    cats = hlo_categories(ours.compiled.as_text())
    with tempfile.TemporaryDirectory() as logdir:
        jax.profiler.start_trace(logdir)
        start = time.perf_counter()
        for _ in range(steps):
            ours.step()
        wall = (time.perf_counter() - start) / steps
        jax.profiler.stop_trace()
        path = glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0]
        data = jax.profiler.ProfileData.from_file(path)
    totals = collections.Counter()
    unknown = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                name = event.name.split(":")[0].strip().lstrip("%")
                if name in cats:
                    totals[cats[name]] += event.duration_ns
                elif re.match(r"^(fusion|copy|convolution|dot|custom-call|ynn|bitcast|transpose)", name):
                    totals["other"] += event.duration_ns
                    unknown[name] += event.duration_ns
                elif "TransferToDevice" in name or "BufferFromPyval" in name or "device_put" in name:
                    totals["data transfer"] += event.duration_ns
    return _summary(totals, wall, steps, extra={"unattributed_top": unknown.most_common(5)})


def _torch_category(name: str) -> str:
    n = name.lower()
    if "conv" in n:
        return "convolution"
    if "group_norm" in n or "layer_norm" in n or "native_batch_norm" in n:
        return "normalisation"
    if "scaled_dot_product" in n or "softmax" in n or "baddbmm" in n or "bmm" in n:
        return "attention"
    if "_foreach" in n or "adam" in n or "lerp" in n or "clip_grad" in n or "norm" == n.split("::")[-1]:
        return "optimizer/EMA"
    if "addmm" in n or "mm" in n or "linear" in n:
        return "matmul"
    if "copy_" in n or "to_copy" in n or "contiguous" in n:
        return "data transfer"
    if n.startswith("aten::"):
        return "elementwise"
    return "other"


def profile_torch(runner, steps: int) -> dict:
    import torch.profiler as tp

    with tp.profile(activities=[tp.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            runner.step()
        wall = (time.perf_counter() - start) / steps
    totals = collections.Counter()
    for evt in prof.key_averages():
        totals[_torch_category(evt.key)] += evt.self_cpu_time_total * 1e3  # us -> ns
    return _summary(totals, wall, steps)


def _summary(totals, wall: float, steps: int, extra=None) -> dict:
    busy = sum(totals.values())
    out = {
        "wall_ms_per_step": 1e3 * wall,
        "busy_ms_per_step": busy / 1e6 / steps,
        "ms_per_step": {c: totals.get(c, 0) / 1e6 / steps for c in CATEGORIES},
        "fraction_of_busy": {c: (totals.get(c, 0) / busy if busy else 0.0) for c in CATEGORIES},
    }
    if extra:
        out.update(extra)
    return out


def render(name: str, ours: dict, torch_: dict) -> str:
    lines = [
        f"### {name}: ours wall {ours['wall_ms_per_step']:.1f} ms/step, torch {torch_['wall_ms_per_step']:.1f} ms/step",
        "",
        "| category | ours ms (share) | torch ms (share) |",
        "|---|---|---|",
    ]
    for c in CATEGORIES:
        lines.append(
            f"| {c} | {ours['ms_per_step'][c]:.1f} ({100 * ours['fraction_of_busy'][c]:.0f}%) "
            f"| {torch_['ms_per_step'][c]:.1f} ({100 * torch_['fraction_of_busy'][c]:.0f}%) |"
        )
    lines.append("")
    lines.append("ours: busy time summed over XLA's thunk events on all threads; torch: self CPU time per op.")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=("small", "large"), default="small")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--out", default=None, help="JSON path; a .md table is written beside it")
    args = ap.parse_args(argv)
    cfg = bts.CONFIGS[args.config]()
    batch = args.batch or cfg.batch
    batch_np = bts.random_batch(cfg, batch)
    ours, state_dict = bts.build_ours(cfg, batch_np, args.dtype)
    runner = bts.build_torch(cfg, ours.unet, state_dict, batch_np, args.dtype)
    ours.step()
    runner.step()
    result = {"config": cfg.name, "batch": batch, "dtype": args.dtype, "steps": args.steps,
              "load_average": os.getloadavg(), "ours": profile_ours(ours, args.steps),
              "torch": profile_torch(runner, args.steps)}
    table = render(f"{cfg.name} (batch {batch}, {args.dtype})", result["ours"], result["torch"])
    print(table)
    print(json.dumps({"unattributed_top": result["ours"].get("unattributed_top")}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
