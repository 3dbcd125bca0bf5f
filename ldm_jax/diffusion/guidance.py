"""Classifier-free guidance (Ho & Salimans 2022) with one batched model call per step.

:func:`cfg_model_fn` wraps a conditional ``model_fn(x_t, t, cond)`` into an unconditional-
looking ``guided(x_t, t)`` that any sampler can use: it evaluates the conditional and the
unconditional branch as a single batch of 2B ([cond; uncond] along the batch axis) and combines
them with the diffusers convention ``out = out_u + w (out_c - out_u)``, so ``w = 1`` is the
conditional model and ``w = 0`` the unconditional one. A negative prompt is simply passed as
``uncond``. Guidance rescale (Lin et al. 2023, sec. 3.4) is optional.

Conditioning is any pytree whose leaves have the batch on axis 0: text embeddings [B, L, D],
pooled embeddings [B, D], class ids [B], or a dict of these (SDXL's added conditions).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp


def check_guidance_interval(value) -> tuple[float, float]:
    """``(t_low, t_high)`` of :func:`cfg_model_fn`'s ``guidance_interval`` as two floats; a
    one-line ValueError naming ``value`` unless it is two finite numbers with t_low <= t_high."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be two numbers (t_low, t_high), got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low <= high):
        raise ValueError(f"guidance_interval must be finite with t_low <= t_high, got {value!r}")
    return low, high


def _per_example(value, ndim: int) -> jnp.ndarray:
    """A scalar or [B] value reshaped to broadcast against a rank-``ndim`` [B, ...] array."""
    value = jnp.asarray(value, jnp.float32)
    if value.ndim > 1:
        raise ValueError(f"expected a scalar or a [B] vector, got shape {value.shape}")
    return value.reshape(value.shape + (1,) * (ndim - value.ndim))


def apply_guidance(
    out_cond: jnp.ndarray,
    out_uncond: jnp.ndarray,
    guidance_scale,
    guidance_rescale=0.0,
) -> jnp.ndarray:
    """Combine the two branches: ``g = u + w (c - u)``, optionally rescaled.

    With ``guidance_rescale = phi > 0``, ``g`` is rescaled per example to the standard deviation
    of the conditional output (over all non-batch axes) and mixed back:
    ``phi * g * std(c) / std(g) + (1 - phi) * g``. This counters the over-exposure of large
    scales (Lin et al. 2023, sec. 3.4); like diffusers it is applied to whatever the model
    outputs (eps or v).

    Args:
      out_cond, out_uncond: [B, ...] model outputs of the two branches.
      guidance_scale, guidance_rescale: Python or traced scalars, or per-example [B] vectors.
    Returns: [B, ...] in the dtype of ``out_cond``.
    """
    if out_cond.shape != out_uncond.shape:
        raise ValueError(
            f"conditional output shape {out_cond.shape} does not match unconditional {out_uncond.shape}"
        )
    cond = out_cond.astype(jnp.float32)
    uncond = out_uncond.astype(jnp.float32)
    w = _per_example(guidance_scale, cond.ndim)
    guided = uncond + w * (cond - uncond)
    # A Python 0.0 skips the std reductions entirely; a traced value always computes them.
    if not (isinstance(guidance_rescale, (int, float)) and guidance_rescale == 0):
        phi = _per_example(guidance_rescale, cond.ndim)
        axes = tuple(range(1, cond.ndim))
        # The ratio of two std's is the same with or without Bessel's correction.
        std_cond = jnp.std(cond, axis=axes, keepdims=True)
        # The floor only matters for a constant guided output, which would otherwise give 0/0.
        std_guided = jnp.maximum(jnp.std(guided, axis=axes, keepdims=True), 1e-12)
        guided = phi * guided * (std_cond / std_guided) + (1.0 - phi) * guided
    return guided.astype(out_cond.dtype)


def _concat_conditioning(cond, uncond, batch: int):
    cond_leaves, cond_tree = jax.tree_util.tree_flatten(cond)
    uncond_leaves, uncond_tree = jax.tree_util.tree_flatten(uncond)
    if cond_tree != uncond_tree:
        raise ValueError(f"cond and uncond have different structures: {cond_tree} vs {uncond_tree}")
    joined = []
    for c, u in zip(cond_leaves, uncond_leaves):
        c, u = jnp.asarray(c), jnp.asarray(u)
        if c.ndim == 0 or c.shape[0] != batch:
            raise ValueError(f"conditioning leaf of shape {c.shape} does not have the batch size {batch} of x_t")
        if u.ndim == 0 or u.shape[1:] != c.shape[1:] or u.shape[0] not in (1, batch):
            raise ValueError(
                f"unconditional leaf of shape {u.shape} must have shape {c.shape} "
                f"(or a batch of 1, broadcast) to match the conditional leaf"
            )
        # A single negative/empty-prompt embedding [1, ...] serves the whole batch.
        u = jnp.broadcast_to(u, c.shape).astype(c.dtype)
        joined.append(jnp.concatenate([c, u], axis=0))
    return jax.tree_util.tree_unflatten(cond_tree, joined)


def cfg_model_fn(
    model_fn: Callable[[jnp.ndarray, jnp.ndarray, Any], jnp.ndarray],
    cond: Any,
    uncond: Any,
    guidance_scale,
    guidance_rescale=0.0,
    *,
    guided_channels: int | None = None,
    guidance_interval: tuple[float, float] | None = None,
) -> Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]:
    """Wrap ``model_fn(x_t, t, cond)`` into a classifier-free-guided ``guided(x_t, t)``.

    Each call of ``guided`` makes ONE call of ``model_fn`` on a batch of 2B (but see
    ``guidance_interval``):
    ``x = [x_t; x_t]``, ``t = [t; t]``, conditioning ``[cond; uncond]`` leaf by leaf.

    Args:
      model_fn: ``(x [2B, ...], t int [2B], cond pytree with leaves [2B, ...]) -> [2B, ...]``.
      cond: conditioning pytree, leaves [B, ...].
      uncond: the same structure; leaves [B, ...] or [1, ...] (broadcast). Empty-prompt
        embeddings, a negative prompt's embeddings, or :func:`null_class_labels`.
      guidance_scale: w (diffusers' ``guidance_scale``); a Python float, a traced scalar
        (changing it does not recompile a jitted sampler) or a per-example [B] vector.
      guidance_rescale: phi of :func:`apply_guidance`; 0 disables it.
      guided_channels: guide only the first ``guided_channels`` channels of the last axis and
        take the rest from the conditional branch (the variance channels of a learned-variance
        model, as diffusers does for DiT / DeepFloyd IF). None guides everything.
      guidance_interval: ``(t_low, t_high)``: guide only the examples whose timestep (in the
        units ``model_fn`` receives) lies in ``[t_low, t_high]``; elsewhere the output is the
        conditional branch's (guidance in a limited interval, Kynkaanniemi et al. 2024, who
        found guidance at high noise levels costly for diversity on ImageNet; on the digits
        demo it was the low-noise steps, see the README). None guides at every timestep.
        A call where no example's timestep is inside makes one ``model_fn`` call on the B
        conditional inputs instead of the 2B call.

    Returns: ``guided(x_t [B, ...], t [B] or scalar) -> [B, ...]``.
    """
    if guided_channels is not None and guided_channels < 1:
        raise ValueError(f"guided_channels must be a positive int or None, got {guided_channels!r}")
    if guidance_interval is not None:
        low, high = check_guidance_interval(guidance_interval)

    def guided(x_t: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
        batch = x_t.shape[0]
        t = jnp.asarray(t)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != batch):
            raise ValueError(f"timesteps t of shape {t.shape} do not match the batch of x_t with shape {x_t.shape}")
        t = jnp.broadcast_to(t, (batch,))
        both = _concat_conditioning(cond, uncond, batch)

        def guide_all():
            out = model_fn(jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([t, t], axis=0), both)
            out_cond, out_uncond = out[:batch], out[batch:]
            if guided_channels is None:
                return out_cond, apply_guidance(out_cond, out_uncond, guidance_scale, guidance_rescale)
            if guided_channels > out_cond.shape[-1]:
                raise ValueError(f"guided_channels {guided_channels} exceeds the {out_cond.shape[-1]} output channels")
            head = apply_guidance(
                out_cond[..., :guided_channels], out_uncond[..., :guided_channels], guidance_scale, guidance_rescale
            )
            return out_cond, jnp.concatenate([head, out_cond[..., guided_channels:]], axis=-1)

        if guidance_interval is None:
            return guide_all()[1]
        inside = (t >= low) & (t <= high)

        def guide_inside():
            out_cond, guided_out = guide_all()
            return jnp.where(inside.reshape((batch,) + (1,) * (out_cond.ndim - 1)), guided_out, out_cond)

        # A step where no example is inside the interval needs only the conditional branch: one
        # model call on B instead of 2B (samplers share t across the batch, so outside the
        # interval each step costs half). lax.cond runs one branch on CPU/GPU/TPU; under vmap
        # it becomes a select of both, still the same values.
        return jax.lax.cond(jnp.any(inside), guide_inside, lambda: model_fn(x_t, t, cond))

    return guided


def null_class_labels(labels: jnp.ndarray, num_classes: int) -> jnp.ndarray:
    """The unconditional labels for a class-conditional model: the extra "null" class id
    ``num_classes`` (ids 0..num_classes-1 are real classes; the embedding table has
    num_classes + 1 rows, as in DiT). Returns an int array shaped like ``labels``."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
    return jnp.full(jnp.shape(labels), num_classes, dtype=jnp.asarray(labels).dtype)


def drop_conditioning(key: jax.Array, cond: Any, uncond: Any, drop_prob: float) -> Any:
    """Training-time counterpart of CFG: replace each example's conditioning by ``uncond``
    with probability ``drop_prob`` (the same draw for every leaf of an example).

    Args:
      cond: pytree with leaves [B, ...]. uncond: same structure, leaves [B, ...] or [1, ...]
        (e.g. the empty-prompt embedding, or :func:`null_class_labels`).
      drop_prob: in [0, 1]; 0.1 is the usual value.
    Returns: a pytree like ``cond``.
    """
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"drop_prob must be in [0, 1], got {drop_prob!r}")
    cond_leaves, cond_tree = jax.tree_util.tree_flatten(cond)
    uncond_leaves, uncond_tree = jax.tree_util.tree_flatten(uncond)
    if cond_tree != uncond_tree:
        raise ValueError(f"cond and uncond have different structures: {cond_tree} vs {uncond_tree}")
    if not cond_leaves:
        return cond
    if any(jnp.ndim(c) == 0 for c in cond_leaves):
        raise ValueError(f"every conditioning leaf needs a batch axis, got shapes {[jnp.shape(c) for c in cond_leaves]}")
    batch = jnp.shape(cond_leaves[0])[0]
    drop = jax.random.bernoulli(key, drop_prob, (batch,))
    out = []
    for c, u in zip(cond_leaves, uncond_leaves):
        c, u = jnp.asarray(c), jnp.asarray(u)
        if c.shape[0] != batch or u.shape[1:] != c.shape[1:] or u.shape[0] not in (1, batch):
            raise ValueError(f"conditioning leaf {c.shape} and unconditional leaf {u.shape} are incompatible")
        mask = drop.reshape((batch,) + (1,) * (c.ndim - 1))
        out.append(jnp.where(mask, jnp.broadcast_to(u, c.shape).astype(c.dtype), c))
    return jax.tree_util.tree_unflatten(cond_tree, out)
