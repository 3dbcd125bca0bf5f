"""Rematerialisation (activation checkpointing) policies, by name, for the U-Net's ``remat_policy``.

  ``block``    checkpoint each down/mid/up block, save nothing inside it: the backward pass
               recomputes one whole block at a time (fewest saved values, largest recompute peak).
  ``layer``    checkpoint each ResnetBlock and each transformer block instead: the recompute peak
               is one layer, at the price of saving every layer's input.
  ``dots``     block granularity, but keep the outputs of weight matmuls (``dot_general`` without
               batch dimensions) so the backward pass recomputes only convolutions, norms,
               attention and elementwise ops.
  ``offload``  as ``dots``, with the saved matmul outputs moved to pinned host memory; needs a
               platform with a host memory space (TPU, GPU), refused on CPU.

Measuring remat on XLA:CPU: the CPU compiler runs ``cse_barrier_expander``, which deletes the
optimisation barriers that ``jax.checkpoint`` places around the recomputation; CSE then merges the
recomputation with the forward pass and the forward's values (the [B, H, T, S] attention logits
among them) stay alive until the backward pass, so remat saves nothing on CPU. TPU and GPU keep the
barriers. ``benchmarks/bench_memory.py`` therefore compiles with that pass disabled
(``CPU_REMAT_COMPILER_OPTIONS``) to report what an accelerator would keep.
"""

from __future__ import annotations

from typing import Callable

import jax

REMAT_POLICIES = ("block", "layer", "dots", "offload")
# XLA:CPU compiler options that keep jax.checkpoint's optimisation barriers (see module docstring).
CPU_REMAT_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def checkpoint_policy(name: str) -> Callable | None:
    """The ``jax.checkpoint`` policy of a block-granularity remat policy (None = save nothing)."""
    if name not in REMAT_POLICIES:
        raise ValueError(f"unknown remat_policy {name!r}; expected one of {REMAT_POLICIES}")
    if name in ("block", "layer"):
        return None
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if jax.default_backend() == "cpu":
        raise ValueError("remat_policy 'offload' needs a platform with pinned host memory (TPU/GPU); this is cpu")
    return jax.checkpoint_policies.offload_dot_with_no_batch_dims(offload_src="device", offload_dst="pinned_host")
