"""Image editing with the samplers: img2img / SDEdit by ``strength``, and inpainting by
replacing the known region with the forward-noised original (RePaint, with optional
resampling jumps). Both reuse the sampler plans and the single ``lax.scan`` driver.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.samplers.base import take_rows
from ldm_jax.diffusion.samplers.driver import (
    Inpainting,
    ModelFn,
    Trajectory,
    batch_example_indices,
    resolve_sampler,
    run_plan,
)
from ldm_jax.diffusion.samplers.noise import STREAM_INITIAL, initial_noise, per_example_normal, stream_key
from ldm_jax.diffusion.schedules import Schedule
from ldm_jax.diffusion.timesteps import repaint_events


def img2img_start_step(num_steps: int, strength: float) -> int:
    """Number of the ``num_steps`` sampling steps that img2img skips (diffusers' ``t_start``):
    ``num_steps - min(int(num_steps * strength), num_steps)``."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating, np.integer)):
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    return num_steps - min(int(num_steps * strength), num_steps)


def img2img(
    model_fn: ModelFn,
    schedule: Schedule,
    init: jnp.ndarray,
    key,
    *,
    strength: float,
    sampler: str = "ddim",
    num_steps: int = 50,
    example_indices=None,
    return_trajectory: bool = False,
    **sampler_options,
):
    """SDEdit / img2img (Meng et al. 2022) with diffusers' ``strength`` semantics.

    The run skips the first ``num_steps - int(num_steps * strength)`` steps: ``init`` is
    noised to the level of the first remaining step (q(x_t | x0) with the sampler's own noise
    level, i.e. ``q_sample`` at that timestep for integer-timestep samplers) and the
    remaining steps are run. ``strength = 0`` returns ``init`` unchanged; ``strength = 1``
    starts from (almost pure) noise at the first timestep. Multistep samplers start their
    history afresh at the first remaining step, as diffusers' DPM-Solver++ does; PLMS runs
    its own start-up on the remaining timesteps (diffusers' PNDM instead keeps stepping from
    its internal counter, which is inconsistent with the sliced timesteps).

    Args:
      init: [B, ...] clean data (e.g. latents). strength: static float in [0, 1].
      sampler_options: as :func:`ldm_jax.diffusion.samplers.sample`.
    Returns: [B, ...] float32 (and a :class:`Trajectory` if requested).
    """
    spec, cfg = resolve_sampler(sampler, schedule, num_steps=num_steps, **sampler_options)
    start = img2img_start_step(cfg.num_steps, strength)
    init = jnp.asarray(init, jnp.float32)
    indices = batch_example_indices(example_indices, init.shape[0])
    if start == cfg.num_steps:
        if return_trajectory:
            empty = jnp.zeros((0,) + init.shape, jnp.float32)
            return init, Trajectory(x=empty, x0=empty, t=jnp.zeros((0,), jnp.int32))
        return init
    plan = spec.plan(schedule, cfg, start)
    noise = initial_noise(key, init.shape, indices)
    x_init = (plan.a[0] * init + plan.b[0] * noise) / plan.in_scale[0]
    return run_plan(model_fn, spec, cfg, plan, x_init, key, indices, return_trajectory=return_trajectory)


RANGE_INITS = ("noise", "data", "state")


def one_row_per_step(sampler: str, schedule, **sampler_options) -> bool:
    """Whether the sampler evaluates the model once per step (its plan has ``num_steps`` rows),
    which :func:`sample_range` needs to cut a run between steps."""
    spec, cfg = resolve_sampler(sampler, schedule, **sampler_options)
    return int(spec.plan(schedule, cfg, 0).t.shape[0]) == cfg.num_steps


def sample_range(
    model_fn: ModelFn,
    schedule: Schedule,
    x: jnp.ndarray | None,
    key,
    *,
    shape=None,
    start_step: int = 0,
    stop_step: int | None = None,
    init: str = "noise",
    sampler: str = "ddim",
    num_steps: int = 50,
    example_indices=None,
    **sampler_options,
):
    """Run only the sampling steps ``[start_step, stop_step)`` of a ``num_steps``-step run:
    diffusers' ``denoising_end`` (stop early, return the partly denoised state) and
    ``denoising_start`` (continue such a state), the SDXL base -> refiner hand-off.

    The plan is the full run's (``lower_order_final`` and the like decided by ``num_steps``),
    cut to the rows of those steps; multistep samplers start their history afresh at
    ``start_step``, as diffusers' schedulers after ``set_begin_index``.

    Args:
      x: by ``init``: ``"noise"`` - standard-normal x_T [B, ...] (None: the per-example noise
        of :func:`ldm_jax.diffusion.samplers.sample`, shape ``shape``), ``start_step`` 0;
        ``"data"`` - clean data, forward-noised to the level of ``start_step`` (img2img);
        ``"state"`` - a VP state at the noise level of ``start_step`` (what a run stopped at
        ``start_step`` returned).
      stop_step: None: ``num_steps`` (run to the end).
    Returns: [B, ...] float32, the VP state after the last step run (clean data when the run
      reaches ``num_steps``).
    """
    spec, cfg = resolve_sampler(sampler, schedule, num_steps=num_steps, **sampler_options)
    if init not in RANGE_INITS:
        raise ValueError(f"unknown init {init!r}; expected one of {RANGE_INITS}")
    stop_step = cfg.num_steps if stop_step is None else stop_step
    if not 0 <= start_step < stop_step <= cfg.num_steps:
        raise ValueError(f"need 0 <= start_step={start_step} < stop_step={stop_step} <= num_steps={cfg.num_steps}")
    if init == "noise" and start_step != 0:
        raise ValueError("init='noise' starts at step 0; continue a stopped run with init='state'")
    plan = spec.plan(schedule, cfg, start_step)
    if int(plan.t.shape[0]) != cfg.num_steps - start_step:
        raise ValueError(f"sampler {sampler!r} evaluates the model more than once per step: a run cannot be cut between steps")
    plan = take_rows(plan, np.arange(stop_step - start_step))
    if x is None:
        if init != "noise" or shape is None:
            raise ValueError("x is required unless init='noise' with a shape")
        indices = batch_example_indices(example_indices, int(shape[0]))
        x = initial_noise(key, tuple(int(s) for s in shape), indices)
    x = jnp.asarray(x, jnp.float32)
    indices = batch_example_indices(example_indices, x.shape[0])
    if init == "noise":
        x_init = plan.init_scale * x
    elif init == "data":
        noise = initial_noise(key, x.shape, indices)
        x_init = (plan.a[0] * x + plan.b[0] * noise) / plan.in_scale[0]
    else:
        x_init = x / plan.in_scale[0]
    return run_plan(model_fn, spec, cfg, plan, x_init, key, indices)


def inpaint(
    model_fn: ModelFn,
    schedule: Schedule,
    original: jnp.ndarray,
    known_mask: jnp.ndarray,
    key,
    *,
    sampler: str = "ddpm",
    num_steps: int = 50,
    jump_length: int = 1,
    jump_n_sample: int = 1,
    x_T: jnp.ndarray | None = None,
    example_indices=None,
    return_trajectory: bool = False,
    **sampler_options,
):
    """Inpainting by known-region replacement (RePaint, Lugmayr et al. 2022).

    After every sampling step the region where ``known_mask`` is 1 is overwritten by the
    original diffused to the noise level that step reached (fresh noise each step), so the
    model fills the rest consistently; the output's known region is exactly ``original``.
    With ``jump_n_sample > 1`` the chain is diffused back ``jump_length`` steps every
    ``jump_length`` steps and re-sampled, ``jump_n_sample - 1`` extra times, to harmonise the
    generated region with the known one (only for one-step samplers: "ddpm", "ddim", "euler").

    Args:
      original: [B, ...] data whose known region is kept.
      known_mask: broadcastable to ``original``; 1 = keep, 0 = generate (soft values blend).
      x_T: optional initial noise [B, ...]. sampler_options: as ``sample``.
    Returns: [B, ...] float32 (and a :class:`Trajectory` if requested; rows of resampling
      jumps have x0 = 0).
    """
    spec, cfg = resolve_sampler(sampler, schedule, num_steps=num_steps, **sampler_options)
    original = jnp.asarray(original, jnp.float32)
    known_mask = jnp.asarray(known_mask, jnp.float32)
    try:
        np.broadcast_shapes(known_mask.shape, original.shape)
    except ValueError:
        raise ValueError(
            f"known_mask shape {known_mask.shape} does not broadcast to original shape {original.shape}"
        ) from None
    if np.broadcast_shapes(known_mask.shape, original.shape) != original.shape:
        raise ValueError(f"known_mask shape {known_mask.shape} would enlarge original shape {original.shape}")
    events = repaint_events(cfg.num_steps, jump_length, jump_n_sample)
    if jump_n_sample > 1 and jump_length < cfg.num_steps:
        if not spec.memoryless:
            raise ValueError(f"resampling jumps need a one-step sampler, not {sampler!r} (it carries history)")
    else:
        events = None
    indices = batch_example_indices(example_indices, original.shape[0])
    if x_T is None:
        x_T = initial_noise(key, original.shape, indices)
    elif tuple(x_T.shape) != original.shape:
        raise ValueError(f"x_T shape {tuple(x_T.shape)} does not match original shape {original.shape}")
    plan = spec.plan(schedule, cfg, 0)
    x_init = plan.init_scale * jnp.asarray(x_T, jnp.float32)
    # The known region also starts at the first step's noise level.
    start_noise = per_example_normal(stream_key(key, STREAM_INITIAL, 1), indices, original.shape[1:])
    known = (plan.a[0] * original + plan.b[0] * start_noise) / plan.in_scale[0]
    x_init = known_mask * known + (1.0 - known_mask) * x_init
    return run_plan(
        model_fn,
        spec,
        cfg,
        plan,
        x_init,
        key,
        indices,
        events=events,
        inpainting=Inpainting(original, known_mask),
        return_trajectory=return_trajectory,
    )
