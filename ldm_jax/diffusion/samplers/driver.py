"""The one sampling driver: the whole reverse process as a single ``lax.scan``.

``sample`` builds the sampler's plan (static length, one row per model evaluation), then
scans over the rows; the model is traced once, whatever the number of steps, so a
``jax.jit`` of ``sample`` (with the sampler options static, e.g. closed over) compiles once
per input shape. Editing (img2img, inpainting) reuses :func:`run_plan`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.samplers.base import (
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
from ldm_jax.diffusion.samplers.registry import SAMPLERS
from ldm_jax.diffusion.schedules import Schedule
from ldm_jax.diffusion.timesteps import SPACINGS

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


class Trajectory(NamedTuple):
    """Per-evaluation outputs of a run with ``return_trajectory=True``.

    Attributes:
      x: [N, B, ...] the state after each model evaluation, in VP scale (a sample at the
        noise level ``(out_a, out_b)`` of that evaluation; clean data after the last one).
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


_OPTION_DEFAULTS = dict(
    eta=0.0, thresholding=None, set_alpha_to_one=True, karras_sigmas=False, lower_order_final=True
)


def resolve_sampler(
    sampler: str | SamplerSpec,
    num_train_timesteps: int,
    *,
    num_steps: int = 50,
    spacing: str | None = None,
    steps_offset: int = 0,
    prediction: str = "eps",
    eta: float = 0.0,
    variance: str = "fixed_small",
    thresholding: str | None = None,
    threshold_max: float = 1.0,
    threshold_percentile: float = 0.995,
    set_alpha_to_one: bool = True,
    karras_sigmas: bool = False,
    lower_order_final: bool = True,
) -> tuple[SamplerSpec, SamplerConfig]:
    """Validate the options and return (spec, static config). See :func:`sample`."""
    if isinstance(sampler, SamplerSpec):
        spec, name = sampler, "custom sampler"
    else:
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
        spec, name = SAMPLERS[sampler], repr(sampler)
    if not isinstance(num_steps, (int, np.integer)) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if num_steps > num_train_timesteps:
        raise ValueError(f"num_steps={num_steps} exceeds the schedule's num_timesteps={num_train_timesteps}")
    spacing = spec.default_spacing if spacing is None else spacing
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; expected one of {SPACINGS}")
    if not isinstance(steps_offset, (int, np.integer)) or steps_offset < 0:
        raise ValueError(f"steps_offset must be a non-negative integer, got {steps_offset!r}")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; expected one of {PREDICTIONS}")
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; expected one of {VARIANCES}")
    if variance == "fixed_large" and "variance" not in spec.options:
        raise ValueError(f"variance='fixed_large' only applies to 'ddpm', not to {name}")
    if thresholding not in THRESHOLDINGS:
        raise ValueError(f"unknown thresholding {thresholding!r}; expected one of {THRESHOLDINGS}")
    if not eta >= 0.0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    given = dict(
        eta=float(eta),
        thresholding=thresholding,
        set_alpha_to_one=bool(set_alpha_to_one),
        karras_sigmas=bool(karras_sigmas),
        lower_order_final=bool(lower_order_final),
    )
    for option, value in given.items():
        if value != _OPTION_DEFAULTS[option] and option not in spec.options:
            raise ValueError(f"option {option}={value!r} is not supported by sampler {name}")
    cfg = SamplerConfig(
        num_steps=int(num_steps),
        spacing=spacing,
        steps_offset=int(steps_offset),
        prediction=prediction,
        variance=variance,
        threshold_max=float(threshold_max),
        threshold_percentile=float(threshold_percentile),
        **given,
    )
    if thresholding is not None and not threshold_max >= (1.0 if thresholding == "dynamic" else 0.0):
        raise ValueError(f"threshold_max={threshold_max!r} is out of range for {thresholding!r} thresholding")
    if thresholding == "dynamic" and not 0.0 < threshold_percentile <= 1.0:
        raise ValueError(f"threshold_percentile must be in (0, 1], got {threshold_percentile!r}")
    return spec, cfg


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
        # Diffuse forward from the level step k reached back to the level it started from.
        log_alpha = row.log_alpha_step
        x_vp = jnp.exp(0.5 * log_alpha) * (row.out_scale * x) + jnp.sqrt(-jnp.expm1(log_alpha)) * normal(
            STREAM_RENOISE, event
        )
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
    schedule: Schedule,
    shape: Sequence[int],
    key,
    *,
    sampler: str | SamplerSpec = "ddim",
    num_steps: int = 50,
    spacing: str | None = None,
    steps_offset: int = 0,
    prediction: str = "eps",
    eta: float = 0.0,
    variance: str = "fixed_small",
    thresholding: str | None = None,
    threshold_max: float = 1.0,
    threshold_percentile: float = 0.995,
    set_alpha_to_one: bool = True,
    karras_sigmas: bool = False,
    lower_order_final: bool = True,
    x_T: jnp.ndarray | None = None,
    example_indices=None,
    return_trajectory: bool = False,
):
    """Generate samples by running the reverse process with the chosen sampler.

    Args:
      model_fn: ``(x_t [B, ...], t [B]) -> prediction [B, ...]`` (``[..., 2C]`` when
        ``variance="learned"``, channels last). ``t`` is int32, or float32 (fractional) for
        "euler" / "heun".
      schedule: the training noise schedule (may be a traced argument of an outer ``jit``).
      shape: [B, ...] output shape (static).
      key: PRNG key; example i's noise comes from ``fold_in(., example_indices[i])``, so an
        image does not depend on the batch size.
      sampler: "ddpm", "ddim", "plms", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "euler",
        "heun", or a :class:`SamplerSpec`.
      num_steps: number of sampling steps (1..T). Heun evaluates the model 2n - 1 times and
        PLMS n + 1 times.
      spacing: "leading" / "trailing" / "linspace"; default: diffusers' default for the
        scheduler ("leading" for ddpm/ddim/plms, "linspace" otherwise).
      steps_offset: added to "leading" timesteps (Stable Diffusion configs use 1).
      prediction: what the model predicts: "eps", "x0" or "v".
      eta: DDIM's noise scale (0 = deterministic, 1 = DDPM-like).
      variance: DDPM's "fixed_small" (posterior variance), "fixed_large" (beta), or "learned"
        (improved-DDPM learned range; the model outputs 2C channels; other samplers drop the
        extra channels).
      thresholding: None, "static" (clip x0_hat to +-threshold_max) or "dynamic" (Imagen;
        percentile ``threshold_percentile``, ceiling ``threshold_max``). Not for "plms".
      set_alpha_to_one: DDIM / PLMS final level is clean data (True) or abar[0] (False, as
        Stable Diffusion's scheduler config).
      karras_sigmas: Karras rho = 7 sigmas for "dpmpp_*", "euler", "heun".
      lower_order_final: DPM-Solver++ lowers the order of the last steps when n < 15.
      x_T: optional initial noise [B, ...] (standard normal; scaled as the sampler needs).
      example_indices: [B] example ids for the per-example noise (default arange(B)).
      return_trajectory: also return a :class:`Trajectory`.

    Returns:
      samples [B, ...] float32, or (samples, Trajectory).
    """
    spec, cfg = resolve_sampler(
        sampler,
        schedule.num_timesteps,
        num_steps=num_steps,
        spacing=spacing,
        steps_offset=steps_offset,
        prediction=prediction,
        eta=eta,
        variance=variance,
        thresholding=thresholding,
        threshold_max=threshold_max,
        threshold_percentile=threshold_percentile,
        set_alpha_to_one=set_alpha_to_one,
        karras_sigmas=karras_sigmas,
        lower_order_final=lower_order_final,
    )
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


def sampler_names() -> list[str]:
    """Registered sampler names."""
    return sorted(SAMPLERS)

