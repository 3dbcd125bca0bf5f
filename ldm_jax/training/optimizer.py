"""Optimizer and learning-rate schedule from ``config.optimizer``.

AdamW with global-norm gradient clipping and a warmup + (cosine | constant) schedule.
Gradient accumulation is *not* an optax wrapper here: the train step scans over
microbatches and makes one optimizer update per step (``ldm_jax.training.step``), so the
optimizer's step count, the schedule and the checkpoint step always agree.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import optax

from ldm_jax.training.defaults import OPTIMIZER_DEFAULTS

Schedule = Callable[[Any], Any]

SCHEDULES = ("cosine", "constant")


def make_lr_schedule(opt_config: Mapping[str, Any]) -> Schedule:
    """Learning rate as a function of the update count (0 for the first update).

    ``cosine``: linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then cosine
    decay to ``learning_rate * end_lr_ratio`` at ``decay_steps`` (total steps, warmup
    included), constant afterwards. ``constant``: linear warmup, then ``learning_rate``
    (the LDM recipe).
    """
    opt_config = {**OPTIMIZER_DEFAULTS, **dict(opt_config)}
    kind = opt_config["schedule"]
    peak = float(opt_config["learning_rate"])
    warmup = int(opt_config["warmup_steps"])
    if peak < 0:
        raise ValueError(f"config.optimizer.learning_rate must be >= 0, got {peak}")
    if warmup < 0:
        raise ValueError(f"config.optimizer.warmup_steps must be >= 0, got {warmup}")
    if kind == "cosine":
        decay_steps = int(opt_config["decay_steps"])
        if decay_steps <= warmup:
            raise ValueError(
                f"config.optimizer.decay_steps ({decay_steps}) must exceed warmup_steps ({warmup})"
            )
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=warmup,
            decay_steps=decay_steps,
            end_value=peak * float(opt_config["end_lr_ratio"]),
        )
    if kind == "constant":
        if warmup == 0:
            return optax.constant_schedule(peak)
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
        )
    raise ValueError(f"unknown config.optimizer.schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")


def _matrices_only(params: Any) -> Any:
    # Weight decay on kernels and embeddings only: decaying norm scales and biases toward 0
    # fights the normalisation rather than regularising.
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(opt_config: Mapping[str, Any]) -> tuple[optax.GradientTransformation, Schedule]:
    """``(tx, lr_schedule)``: clip_by_global_norm(grad_clip_norm) -> adamw(lr_schedule, ...).

    ``grad_clip_norm`` <= 0 or None disables clipping. ``weight_decay_on`` is ``"all"`` (as
    diffusers' training scripts) or ``"matrices"`` (kernels/embeddings only).
    """
    opt_config = {**OPTIMIZER_DEFAULTS, **dict(opt_config)}
    name = opt_config["name"]
    if name != "adamw":
        raise ValueError(f"unknown config.optimizer.name {name!r}; only 'adamw' is provided")
    schedule = make_lr_schedule(opt_config)
    decay_on = opt_config["weight_decay_on"]
    if decay_on not in ("all", "matrices"):
        raise ValueError(f"config.optimizer.weight_decay_on must be 'all' or 'matrices', got {decay_on!r}")
    adamw = optax.adamw(
        schedule,
        b1=float(opt_config["b1"]),
        b2=float(opt_config["b2"]),
        eps=float(opt_config["eps"]),
        weight_decay=float(opt_config["weight_decay"]),
        mask=_matrices_only if decay_on == "matrices" else None,
    )
    clip = opt_config["grad_clip_norm"]
    if clip is None or float(clip) <= 0:
        return adamw, schedule
    return optax.chain(optax.clip_by_global_norm(float(clip)), adamw), schedule
