"""The pieces every sampler shares: its static configuration, its per-evaluation plan, and
the registry entry type.

A sampler is two functions:

* ``plan(schedule, cfg, start_step) -> Plan``: everything that depends only on the schedule
  and the static configuration, precomputed for every model evaluation as [N] arrays
  (timesteps, noise levels, update coefficients). Written with jnp on the schedule's arrays
  and NumPy indices, so it works when the schedule is a traced ``jit`` argument.
* ``step(cfg, row, state, x, eps, x0, var_param, noise) -> (x_next, state)``: one update,
  given one row of the plan, the sampler's carried state (e.g. previous model outputs), the
  current state x and the model's prediction already converted to both ``eps`` and ``x0``.

The driver (:mod:`ldm_jax.diffusion.samplers.driver`) runs ``step`` inside one ``lax.scan``.

Coordinates: most samplers carry the variance-preserving (VP) variable
``x = a x0 + b eps`` with ``a^2 + b^2 = 1``. The Karras samplers (Euler, Heun) carry the
variance-exploding variable ``x / a = x0 + sigma eps``. A plan records, per evaluation, the
scale ``in_scale`` that maps the carried state to the VP model input, and the same for the
state after the update (``out_scale``), so the driver, inpainting and trajectories can work
in VP terms for every sampler.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.schedules import Schedule
from ldm_jax.diffusion.thresholding import dynamic_threshold, static_clip

PREDICTIONS = ("eps", "x0", "v")  # of DDPM-family samplers
FLOW_PREDICTIONS = ("velocity", "x0")  # of flow samplers (eps is singular at t = 1)
OBJECTIVES = ("ddpm", "flow")
VARIANCES = ("fixed_small", "fixed_large", "learned")
THRESHOLDINGS = (None, "static", "dynamic")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Static sampler options (hashable; every field is a Python scalar or string).

    ``variance="learned"`` means the model outputs 2C channels (last axis): the first C are
    the ``prediction`` and the last C are improved-DDPM's learned-range interpolation
    parameter in [-1, 1] (diffusers' ``variance_type="learned_range"``). Only DDPM uses
    that parameter; the other samplers drop it.

    Flow samplers also read ``mu`` / ``image_seq_len`` (dynamic shifting) and ``sigmas`` (an
    explicit descending time sequence); the DDPM family reads ``solver_type``, ``lcm_*`` etc.
    as listed in each :class:`SamplerSpec`'s ``options``.
    """

    num_steps: int
    spacing: str
    steps_offset: int = 0
    prediction: str = "eps"
    eta: float = 0.0
    variance: str = "fixed_small"
    thresholding: str | None = None
    threshold_max: float = 1.0
    threshold_percentile: float = 0.995
    set_alpha_to_one: bool = True
    karras_sigmas: bool = False
    lower_order_final: bool = True
    mu: float | None = None
    image_seq_len: int | None = None
    sigmas: tuple | None = None
    solver_type: str | None = None
    lcm_original_steps: int = 50
    lcm_timestep_scaling: float = 10.0


class Plan(NamedTuple):
    """Per-model-evaluation quantities, each an array of shape [N] (N evaluations).

    Attributes:
      t: the timestep passed to the model (int32, or float32 for Euler / Heun).
      a, b: VP signal and noise scales of the evaluation point (x_vp = a x0 + b eps).
      in_scale: carried state -> VP model input (1 for VP samplers, a for Euler / Heun).
      out_a, out_b: VP scales of the noise level the update lands on.
      out_scale: carried state after the update -> VP.
      log_alpha_step: log(a^2 / out_a^2) <= 0, used to diffuse back (RePaint jumps).
      coef: dict of [N] sampler-specific coefficients.
      init_scale: scalar; the initial carried state is ``init_scale * x_T``.
    """

    t: Any
    a: Any
    b: Any
    in_scale: Any
    out_a: Any
    out_b: Any
    out_scale: Any
    log_alpha_step: Any
    coef: dict
    init_scale: Any


class SamplerSpec(NamedTuple):
    """A registry entry.

    Attributes:
      plan: ``(schedule, cfg, start_step) -> Plan``; ``start_step`` > 0 skips that many of
        the ``num_steps`` sampling steps (img2img).
      step: ``(cfg, row, state, x, eps, x0, var_param, noise) -> (x_next, state)``.
      init_state: ``x -> state`` (the carried pytree; ``()`` for one-step methods).
      default_spacing: diffusers' default ``timestep_spacing`` for the scheduler.
      options: names of the non-default options the sampler honours (others raise).
      stochastic: ``cfg -> bool``: whether ``step`` consumes noise.
      memoryless: True when ``state`` carries nothing across steps, so RePaint can jump back.
      solver_types: the ``solver_type`` values the sampler accepts, its default first.
      objective: "ddpm" (the sampler needs a :class:`Schedule`) or "flow" (a
        :class:`~ldm_jax.diffusion.flow.FlowSchedule`).
    """

    plan: Callable[..., Plan]
    step: Callable[..., Any]
    init_state: Callable[[Any], Any] = lambda x: ()
    default_spacing: str = "leading"
    options: frozenset = frozenset()
    stochastic: Callable[[SamplerConfig], bool] = lambda cfg: False
    memoryless: bool = True
    objective: str = "ddpm"
    solver_types: tuple = ()


def eps_and_x0(model_output, x_vp, a, b, prediction: str):
    """(eps_hat, x0_hat) from a model output at a noise level with scales (a, b): VP, or
    (1 - t, t) for flow models (``prediction="velocity"``).

    Unlike :func:`ldm_jax.diffusion.forward.to_eps_and_x0` this takes the scales directly,
    so it also works at the fractional noise levels of the Karras samplers.
    """
    if prediction == "eps":
        return model_output, (x_vp - b * model_output) / a
    if prediction == "x0":
        return (x_vp - a * model_output) / b, model_output
    if prediction == "velocity":
        # Flow matching (a = 1 - t, b = t): v = eps - x0 and x = a x0 + b eps with a + b = 1.
        return x_vp + a * model_output, x_vp - b * model_output
    return b * x_vp + a * model_output, a * x_vp - b * model_output


def apply_thresholding(x0, cfg: SamplerConfig):
    """Clip or dynamically threshold x0_hat as configured (identity when disabled)."""
    if cfg.thresholding is None:
        return x0
    if cfg.thresholding == "static":
        return static_clip(x0, cfg.threshold_max)
    return dynamic_threshold(x0, cfg.threshold_percentile, cfg.threshold_max)


def schedule_namespace(schedule: Schedule):
    """(xp, schedule) for building a plan: NumPy in float64 when the schedule is concrete
    (plans are then exact to float32 rounding and cost no device compilation), jax.numpy
    when it is traced (``sample`` inside a ``jit`` that takes the schedule as an argument)."""
    if any(isinstance(leaf, jax.core.Tracer) for leaf in schedule):
        return jnp, schedule
    return np, Schedule(*(np.asarray(leaf, np.float64) for leaf in schedule))


def vp_scales(xp, schedule: Schedule, index: np.ndarray):
    """VP scales (sqrt(abar), sqrt(1 - abar)) at integer timesteps; index -1 is clean data
    (abar = 1), as diffusers' ``set_alpha_to_one`` final level."""
    index = np.asarray(index)
    safe = np.maximum(index, 0)
    clean = index < 0
    a = xp.where(clean, 1.0, schedule.sqrt_alphas_cumprod[safe])
    b = xp.where(clean, 0.0, schedule.sqrt_one_minus_alphas_cumprod[safe])
    return a, b


def log_alpha_span(xp, schedule: Schedule, t_from: np.ndarray, t_to: np.ndarray):
    """sum_{t_to < j <= t_from} log(1 - beta_j) = log(abar[t_from] / abar[t_to]) for each pair.

    Summing per-step log-alphas keeps ``1 - abar[t] / abar[t_to]`` accurate when the two
    levels are close (as ``-expm1`` of this), where the ratio of two cumulative products
    would cancel. A masked sum rather than a matmul, so no accelerator runs it at reduced
    precision. Returns: [N], <= 0.
    """
    t_from = np.asarray(t_from)[:, None]
    t_to = np.asarray(t_to)[:, None]
    j = np.arange(schedule.num_timesteps)[None, :]
    mask = (j > t_to) & (j <= t_from)
    log_alphas = xp.log1p(-schedule.betas)
    return xp.sum(xp.where(mask, log_alphas[None, :], 0.0), axis=1)


def ve_to_vp(xp, sigma):
    """VP scales (a, b) = (1, sigma) / sqrt(1 + sigma^2) of a VE noise level sigma >= 0."""
    a = 1.0 / xp.sqrt(1.0 + sigma**2)
    return a, sigma * a


def finish_plan(xp, t, a, b, in_scale, out_a, out_b, out_scale, log_alpha_step, coef, init_scale) -> Plan:
    """Assemble a Plan with float32 coefficient arrays (and int32 or float32 timesteps)."""
    f32 = lambda v: xp.asarray(v, dtype=xp.float32)  # noqa: E731
    t_dtype = xp.int32 if np.issubdtype(np.dtype(t.dtype), np.integer) else xp.float32
    n = t.shape[0]
    full = lambda v: f32(xp.broadcast_to(v, (n,)))  # noqa: E731
    return Plan(
        t=xp.asarray(t, dtype=t_dtype),
        a=full(a),
        b=full(b),
        in_scale=full(in_scale),
        out_a=full(out_a),
        out_b=full(out_b),
        out_scale=full(out_scale),
        log_alpha_step=full(log_alpha_step),
        coef={k: full(v) for k, v in coef.items()},
        init_scale=f32(init_scale),
    )


def take_rows(plan: Plan, index: np.ndarray) -> Plan:
    """The plan restricted to the evaluations ``index`` (static NumPy ints); init_scale kept."""
    index = np.asarray(index)
    fields = {
        name: getattr(plan, name)[index]
        for name in ("t", "a", "b", "in_scale", "out_a", "out_b", "out_scale", "log_alpha_step")
    }
    return Plan(**fields, coef={k: v[index] for k, v in plan.coef.items()}, init_scale=plan.init_scale)

