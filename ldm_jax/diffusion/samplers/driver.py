"""The one sampling driver: the whole reverse process as a single ``lax.scan``.

``sample`` builds the sampler's plan (static length, one row per model evaluation), then
scans over the rows; the model is traced once, whatever the number of steps, so a
``jax.jit`` of ``sample`` (with the sampler options static, e.g. closed over) compiles once
per input shape. Editing (img2img, inpainting) reuses :func:`run_plan`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.flow import FlowSchedule
from ldm_jax.diffusion.samplers.base import (
    FLOW_PREDICTIONS,
    OBJECTIVES,
    PREDICTIONS,
    THRESHOLDINGS,
    VARIANCES,
    Plan,
    SamplerConfig,
    SamplerSpec,
    apply_thresholding,
    eps_and_x0,
    take_rows,
)
from ldm_jax.diffusion.samplers.noise import (
    STREAM_KNOWN,
    STREAM_RENOISE,
    STREAM_STEP,
    initial_noise,
    per_example_normal,
    stream_key,
)
from ldm_jax.diffusion.samplers.flow import FLOW_SPACINGS
from ldm_jax.diffusion.samplers.registry import SAMPLERS
from ldm_jax.diffusion.schedules import Schedule
from ldm_jax.diffusion.timesteps import SPACINGS

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


class Trajectory(NamedTuple):
    """Per-evaluation outputs of a run with ``return_trajectory=True``.

    Attributes:
      x: [N, B, ...] the state after each model evaluation, in the schedule's coordinates
        (VP scale for DDPM schedules, the interpolant x_t for flow ones: a sample at the noise
        level ``(out_a, out_b)`` of that evaluation; clean data after the last one).
      x0: [N, B, ...] the (thresholded) predicted clean sample at each evaluation.
      t: [N] the timestep the model saw.
    """

    x: jnp.ndarray
    x0: jnp.ndarray
    t: jnp.ndarray


class Inpainting(NamedTuple):
    """Known data for inpainting: ``original`` [B, ...] and ``known_mask`` broadcastable to
    it, 1 where the original is kept and 0 where it is generated."""

    original: jnp.ndarray
    known_mask: jnp.ndarray


# Options with a default that every sampler accepts; any other option must be listed in the
# sampler's ``SamplerSpec.options`` to be set to a non-default value.
_COMMON_OPTIONS = ("num_steps", "spacing", "steps_offset", "prediction", "variance", "threshold_max", "threshold_percentile")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplerConfig) if f.default is not dataclasses.MISSING}
_DEFAULTS.update(num_steps=50, spacing=None, prediction=None)
_CASTS = dict(lcm_timestep_scaling=float, eta=float, set_alpha_to_one=bool, karras_sigmas=bool, lower_order_final=bool, threshold_max=float,
              threshold_percentile=float)


def schedule_objective(schedule) -> str:
    """"flow" for a :class:`FlowSchedule`, "ddpm" for a :class:`Schedule` (or a timestep count)."""
    return "flow" if isinstance(schedule, FlowSchedule) else "ddpm"


def check_objective(spec: SamplerSpec, name: str, objective: str) -> None:
    """One-line ValueError when a sampler meets a schedule of the other objective."""
    if spec.objective == objective:
        return
    kind = {"flow": "a flow-matching", "ddpm": "a DDPM (noise-prediction)"}
    raise ValueError(
        f"sampler {name} integrates {kind[spec.objective]} model and cannot run {kind[objective]} schedule; "
        f"use one of {sampler_names(objective)}"
    )


def _check_int(name, value, minimum):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        kind = "a positive" if minimum == 1 else "a non-negative"
        raise ValueError(f"{name} must be {kind} integer, got {value!r}")


def resolve_sampler(sampler: str | SamplerSpec, schedule, **options) -> tuple[SamplerSpec, SamplerConfig]:
    """Validate the options and return (spec, static config). See :func:`sample` for the options.

    ``schedule`` is the :class:`Schedule` or :class:`FlowSchedule` the sampler will run (an int
    is the timestep count of a DDPM schedule), so a sampler of the other objective is refused.
    """
    if isinstance(sampler, SamplerSpec):
        spec, name = sampler, "custom sampler"
    else:
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
        spec, name = SAMPLERS[sampler], repr(sampler)
    objective = schedule_objective(schedule)
    check_objective(spec, name, objective)
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown sampler option {unknown[0]!r}; expected one of {sorted(_DEFAULTS)}")
    opts = {**_DEFAULTS, **options}
    flow = objective == "flow"
    if flow and opts["sigmas"] is not None:
        sigmas = tuple(float(v) for v in np.asarray(opts["sigmas"], np.float64).reshape(-1))
        if not sigmas or any(not 0.0 < v <= 1.0 for v in sigmas) or any(np.diff(sigmas) >= 0):
            raise ValueError(f"sigmas must be a non-empty decreasing sequence in (0, 1], got {opts['sigmas']!r}")
        if "num_steps" in options and options["num_steps"] != len(sigmas):
            raise ValueError(f"num_steps={options['num_steps']!r} does not match the {len(sigmas)} sigmas given")
        opts.update(sigmas=sigmas, num_steps=len(sigmas))
    _check_int("num_steps", opts["num_steps"], 1)
    _check_int("steps_offset", opts["steps_offset"], 0)
    if not flow and opts["num_steps"] > int(getattr(schedule, "num_timesteps", schedule)):
        raise ValueError(
            f"num_steps={opts['num_steps']} exceeds the schedule's num_timesteps={int(getattr(schedule, 'num_timesteps', schedule))}"
        )
    spacings = FLOW_SPACINGS if flow else SPACINGS
    opts["spacing"] = spec.default_spacing if opts["spacing"] is None else opts["spacing"]
    if opts["spacing"] not in spacings:
        raise ValueError(f"unknown timestep spacing {opts['spacing']!r}; expected one of {spacings}")
    predictions = FLOW_PREDICTIONS if flow else PREDICTIONS
    opts["prediction"] = predictions[0] if opts["prediction"] is None else opts["prediction"]
    if opts["prediction"] not in predictions:
        raise ValueError(f"unknown prediction type {opts['prediction']!r} for a {objective} model; expected one of {predictions}")
    if opts["variance"] not in VARIANCES:
        raise ValueError(f"unknown variance {opts['variance']!r}; expected one of {VARIANCES}")
    if opts["variance"] == "fixed_large" and "variance" not in spec.options:
        raise ValueError(f"variance='fixed_large' only applies to 'ddpm', not to {name}")
    if opts["thresholding"] not in THRESHOLDINGS:
        raise ValueError(f"unknown thresholding {opts['thresholding']!r}; expected one of {THRESHOLDINGS}")
    if not opts["eta"] >= 0.0:
        raise ValueError(f"eta must be >= 0, got {opts['eta']!r}")
    for option, cast in _CASTS.items():
        opts[option] = cast(opts[option])
    for option, value in opts.items():
        if option not in _COMMON_OPTIONS and value != _DEFAULTS[option] and option not in spec.options:
            raise ValueError(f"option {option}={value!r} is not supported by sampler {name}")
    thresholding, threshold_max = opts["thresholding"], opts["threshold_max"]
    if thresholding is not None and not threshold_max >= (1.0 if thresholding == "dynamic" else 0.0):
        raise ValueError(f"threshold_max={threshold_max!r} is out of range for {thresholding!r} thresholding")
    if thresholding == "dynamic" and not 0.0 < opts["threshold_percentile"] <= 1.0:
        raise ValueError(f"threshold_percentile must be in (0, 1], got {opts['threshold_percentile']!r}")
    if spec.solver_types:
        opts["solver_type"] = spec.solver_types[0] if opts["solver_type"] is None else opts["solver_type"]
        if opts["solver_type"] not in spec.solver_types:
            raise ValueError(f"unknown solver_type {opts['solver_type']!r} for sampler {name}; expected one of {spec.solver_types}")
    if flow and schedule.dynamic_shifting and opts["mu"] is None and opts["image_seq_len"] is None:
        raise ValueError("this flow schedule uses dynamic shifting: pass mu or image_seq_len to the sampler")
    if opts["image_seq_len"] is not None:
        _check_int("image_seq_len", opts["image_seq_len"], 1)
    if opts["mu"] is not None:
        opts["mu"] = float(opts["mu"])
    return spec, SamplerConfig(**opts)


def batch_example_indices(example_indices, batch: int):
    """[B] example ids: ``example_indices`` checked against the batch size, or arange(B)."""
    if example_indices is None:
        return jnp.arange(batch)
    example_indices = jnp.asarray(example_indices)
    if example_indices.shape != (batch,):
        raise ValueError(f"example_indices shape {example_indices.shape} does not match batch size {batch}")
    return example_indices


def run_plan(
    model_fn: ModelFn,
    spec: SamplerSpec,
    cfg: SamplerConfig,
    plan: Plan,
    x_init: jnp.ndarray,
    key,
    example_indices,
    *,
    events: Sequence[tuple[str, int]] | None = None,
    inpainting: Inpainting | None = None,
    return_trajectory: bool = False,
):
    """Run ``plan`` from the carried state ``x_init`` in one ``lax.scan``.

    Args:
      events: optional static list of ``("denoise" | "renoise", k)`` over plan rows (RePaint
        jumps); default: every row once, in order.
      inpainting: replace the known region by the forward-noised original after every step.
    Returns: the final sample [B, ...] in VP scale, and a :class:`Trajectory` if requested.
    """
    x_init = jnp.asarray(x_init, jnp.float32)
    batch, example_shape = x_init.shape[0], x_init.shape[1:]
    num_rows = int(plan.t.shape[0])
    if events is None:
        events = [("denoise", k) for k in range(num_rows)]
    rows = take_rows(plan, np.array([k for _, k in events], np.int64))
    is_denoise = np.array([kind == "denoise" for kind, _ in events])
    has_renoise = not is_denoise.all()
    stochastic = spec.stochastic(cfg)
    learned = cfg.variance == "learned"
    channels = x_init.shape[-1]
    expected = x_init.shape[:-1] + (2 * channels,) if learned else x_init.shape
    if inpainting is not None:
        original = jnp.asarray(inpainting.original, jnp.float32)
        mask = jnp.asarray(inpainting.known_mask, jnp.float32)

    def normal(stream, event):
        return per_example_normal(stream_key(key, stream, event), example_indices, example_shape)

    def denoise(x, state, row, event):
        x_in = row.in_scale * x
        out = jnp.asarray(model_fn(x_in, jnp.broadcast_to(row.t, (batch,))))
        if out.shape != expected:
            raise ValueError(
                f"model output shape {out.shape} does not match the expected {expected} "
                f"(x shape {x_init.shape}, variance={cfg.variance!r})"
            )
        out = out.astype(jnp.float32)
        var_param = None
        if learned:
            out, var_param = out[..., :channels], out[..., channels:]
        eps, x0 = eps_and_x0(out, x_in, row.a, row.b, cfg.prediction)
        x0 = apply_thresholding(x0, cfg)
        noise = normal(STREAM_STEP, event) if stochastic else None
        x_next, state = spec.step(cfg, row, state, x, eps, x0, var_param, noise)
        if inpainting is not None:
            known = (row.out_a * original + row.out_b * normal(STREAM_KNOWN, event)) / row.out_scale
            x_next = mask * known + (1.0 - mask) * x_next
        return x_next.astype(jnp.float32), state, x0, row.out_scale * x_next

    def renoise(x, state, row, event):
        # Diffuse forward from the level step k reached back to the level it started from:
        # x_in = (a_in / a_out) x_out + sqrt(b_in^2 - (a_in / a_out)^2 b_out^2) z, which for VP
        # scales is sqrt(1 - ratio^2), formed from the summed log-alphas for accuracy.
        log_alpha = row.log_alpha_step
        if spec.objective == "flow":
            ratio = row.a / row.out_a
            std = jnp.sqrt(jnp.maximum(row.b**2 - (ratio * row.out_b) ** 2, 0.0))
        else:
            ratio, std = jnp.exp(0.5 * log_alpha), jnp.sqrt(-jnp.expm1(log_alpha))
        x_vp = ratio * (row.out_scale * x) + std * normal(STREAM_RENOISE, event)
        return x_vp / row.in_scale, state, jnp.zeros_like(x), x_vp

    def body(carry, xs):
        x, state = carry
        row, denoise_flag, event = xs
        if has_renoise:
            x, state, x0, x_vp = jax.lax.cond(denoise_flag, denoise, renoise, x, state, row, event)
        else:
            x, state, x0, x_vp = denoise(x, state, row, event)
        return (x, state), ((x_vp, x0) if return_trajectory else None)

    # init_scale is a scalar, not per-row; None is an empty pytree leaf for scan.
    xs = (rows._replace(init_scale=None), jnp.asarray(is_denoise), jnp.arange(len(events)))
    (x, _), ys = jax.lax.scan(body, (x_init, spec.init_state(x_init)), xs)
    out = rows.out_scale[-1] * x
    if inpainting is not None:
        out = mask * original + (1.0 - mask) * out
    if return_trajectory:
        return out, Trajectory(x=ys[0], x0=ys[1], t=jnp.asarray(rows.t))
    return out


def sample(
    model_fn: ModelFn,
    schedule: Schedule | FlowSchedule,
    shape: Sequence[int],
    key,
    *,
    sampler: str | SamplerSpec = "ddim",
    x_T: jnp.ndarray | None = None,
    example_indices=None,
    return_trajectory: bool = False,
    **options,
):
    """Generate samples by running the reverse process with the chosen sampler.

    Args:
      model_fn: ``(x_t [B, ...], t [B]) -> prediction [B, ...]`` (``[..., 2C]`` when
        ``variance="learned"``, channels last). ``t`` is int32, or float32 (fractional) for
        the Karras-sigma samplers; for flow samplers the float timestep ``N t`` in [0, N].
      schedule: the training noise schedule (may be a traced argument of an outer ``jit``):
        a :class:`Schedule` for the DDPM family, a :class:`FlowSchedule` for "flow_*".
      shape: [B, ...] output shape (static).
      key: PRNG key; example i's noise comes from ``fold_in(., example_indices[i])``, so an
        image does not depend on the batch size.
      sampler: a name from :func:`sampler_names` or a :class:`SamplerSpec`.
      x_T: optional initial noise [B, ...] (standard normal; scaled as the sampler needs).
      example_indices: [B] example ids for the per-example noise (default arange(B)).
      return_trajectory: also return a :class:`Trajectory`.

    Options (static; each sampler honours the ones in its ``SamplerSpec.options``, others raise):
      num_steps: number of sampling steps (default 50; 1..T for DDPM schedules). Heun
        evaluates the model 2n - 1 times and PLMS n + 1 times.
      spacing: DDPM: "leading" / "trailing" / "linspace" (default: diffusers' default for
        the scheduler); flow: "linspace" (default) / "trailing" (1 .. 1/n, as Flux).
      steps_offset: added to "leading" timesteps (Stable Diffusion configs use 1).
      prediction: DDPM: "eps" (default), "x0" or "v"; flow: "velocity" (default) or "x0".
      eta: DDIM's noise scale (0 = deterministic, 1 = DDPM-like).
      variance: DDPM's "fixed_small" (posterior variance), "fixed_large" (beta), or "learned"
        (improved-DDPM learned range; the model outputs 2C channels; other samplers drop the
        extra channels).
      thresholding: None, "static" (clip x0_hat to +-threshold_max) or "dynamic" (Imagen;
        percentile ``threshold_percentile``, ceiling ``threshold_max``).
      set_alpha_to_one: DDIM / PLMS final level is clean data (True) or abar[0] (False, as
        Stable Diffusion's scheduler config).
      karras_sigmas: Karras rho = 7 noise levels.
      lower_order_final: multistep solvers lower the order of the last steps when n < 15.
      mu / image_seq_len: the shift of a dynamic-shifting flow schedule, or the token count it
        is computed from (:func:`ldm_jax.diffusion.flow.dynamic_shift_mu`).
      sigmas: flow: an explicit decreasing time sequence in (0, 1] (few-step schedules),
        shifted by the schedule as diffusers' ``set_timesteps(sigmas=...)``.

    Returns:
      samples [B, ...] float32, or (samples, Trajectory).
    """
    spec, cfg = resolve_sampler(sampler, schedule, **options)
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"shape must be [B, ...] with at least one example axis, got {shape}")
    indices = batch_example_indices(example_indices, shape[0])
    if x_T is None:
        x_T = initial_noise(key, shape, indices)
    elif tuple(x_T.shape) != shape:
        raise ValueError(f"x_T shape {tuple(x_T.shape)} does not match shape {shape}")
    plan = spec.plan(schedule, cfg, 0)
    return run_plan(
        model_fn,
        spec,
        cfg,
        plan,
        plan.init_scale * jnp.asarray(x_T, jnp.float32),
        key,
        indices,
        return_trajectory=return_trajectory,
    )


def sampler_names(objective: str | None = None) -> list[str]:
    """Registered sampler names, optionally only those of one objective ("ddpm" or "flow")."""
    if objective is not None and objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
    return sorted(name for name, spec in SAMPLERS.items() if objective in (None, spec.objective))

