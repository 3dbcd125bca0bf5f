"""What this machine can do: a description for benchmark reports and its measured matmul peak.

The peak is the best float32 FLOP/s of one large square matrix product, measured in the
same process as the benchmark that divides by it (so it sees the same load from whatever
else runs on the machine). Two libraries are measured because their BLAS back ends differ:
``jnp.dot`` (XLA:CPU, Eigen/oneDNN) and ``torch.mm`` (oneDNN/MKL). A benchmark's
"fraction of peak" uses the larger of the two, i.e. the best this CPU was seen to do.

Run ``python benchmarks/machine_peak.py`` to print the description and both peaks.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import time
from typing import Sequence

import numpy as np

DEFAULT_SIZES = (2048, 4096)


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the host's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    """``model name`` from /proc/cpuinfo, or platform.processor() elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_vector_flags() -> list[str]:
    """The SIMD extensions that decide CPU matmul speed (avx2, avx512f, avx512_bf16, amx...)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
    except OSError:
        pass
    return []


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_description() -> dict:
    """JSON-able facts about the machine and the software versions."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "nproc": cpu_count(),
        "vector_flags": cpu_vector_flags(),
        "python": platform.python_version(),
        "jax": _version("jax"),
        "jaxlib": _version("jaxlib"),
        "flax": _version("flax"),
        "optax": _version("optax"),
        "torch": _version("torch"),
        "diffusers": _version("diffusers"),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def describe_markdown(machine: dict) -> str:
    """The machine description as a markdown bullet list."""
    flags = ", ".join(machine["vector_flags"]) or "n/a"
    return "\n".join(
        [
            f"- date: {machine['date']}",
            f"- CPU: {machine['cpu_model']}, {machine['nproc']} cores available (nproc); SIMD: {flags}",
            f"- python {machine['python']}, jax {machine['jax']} (jaxlib {machine['jaxlib']}), flax {machine['flax']}, "
            f"optax {machine['optax']}, torch {machine['torch']}, diffusers {machine['diffusers']}",
            f"- 1-min load average when the run started: {machine['load_average_1min']:.1f} "
            f"(processes wanting a core; above {machine['nproc']} the cores are shared)",
        ]
    )


def _best_seconds(run, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def jax_matmul_peak(sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 5) -> dict[int, float]:
    """Best float32 FLOP/s of ``jnp.dot`` on [n, n] x [n, n] (2 n^3 FLOPs), per size n.

    The product is jitted and run once untimed first, so compilation and first-touch
    allocation are not measured.
    """
    import jax
    import jax.numpy as jnp

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dot = jax.jit(jnp.dot)
    out = {}
    for n in sizes:
        rng = np.random.default_rng(n)
        a = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
        b = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
        jax.block_until_ready(dot(a, b))
        seconds = _best_seconds(lambda: jax.block_until_ready(dot(a, b)), repeats)
        out[int(n)] = 2.0 * n**3 / seconds
    return out


def torch_matmul_peak(sizes: Sequence[int] = DEFAULT_SIZES, repeats: int = 5) -> dict[int, float]:
    """Best float32 FLOP/s of ``torch.mm`` on [n, n] x [n, n] with the current
    ``torch.get_num_threads()``, per size n (one untimed warm-up product first)."""
    import torch

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    out = {}
    for n in sizes:
        gen = torch.Generator().manual_seed(n)
        a = torch.randn(n, n, generator=gen)
        b = torch.randn(n, n, generator=gen)
        result = torch.empty(n, n)
        torch.mm(a, b, out=result)
        seconds = _best_seconds(lambda: torch.mm(a, b, out=result), repeats)
        out[int(n)] = 2.0 * n**3 / seconds
    return out


def main() -> None:
    import argparse

    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(cpu_count())
    print(describe_markdown(machine_description()))
    for name, peaks in (
        ("jnp.dot", jax_matmul_peak(args.sizes, args.repeats)),
        ("torch.mm", torch_matmul_peak(args.sizes, args.repeats)),
    ):
        for n, flops in peaks.items():
            print(f"{name} float32 {n}x{n}: {flops / 1e9:.1f} GFLOP/s (best of {args.repeats})")


if __name__ == "__main__":
    main()
