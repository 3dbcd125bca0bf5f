"""Flow matching / rectified flow (Lipman et al. 2023; Liu et al. 2023; SD3, Esser et al. 2024):
the interpolant, its velocity, conversions, time shifting and the training-time ``t`` densities.

Conventions (diffusers' ``FlowMatchEulerDiscreteScheduler``): time ``t`` (diffusers' "sigma") runs
from 0 (data) to 1 (noise), the interpolant is ``x_t = (1 - t) x0 + t eps`` and the velocity
``dx_t/dt = v = eps - x0``. A model sees the timestep ``num_train_timesteps * t`` (float, in
[0, 1000] by default, as SD3 / Flux transformers), so one timestep embedding serves DDPM and
flow models alike. Sampling integrates dx/dt = v from t = 1 down to 0
(:mod:`ldm_jax.diffusion.samplers.flow`).

In DDPM terms x_t is a scaled VP sample with a = 1 - t, b = t (SNR = ((1 - t) / t)^2), so the
eps / x0 / velocity conversions are the usual ones with those scales.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

TIME_SHIFT_TYPES = ("exponential", "linear")
TIME_DENSITIES = ("uniform", "logit_normal", "mode", "cosmap")
FLOW_PREDICTIONS = ("velocity", "eps", "x0")


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
    """The (tiny) schedule of a flow-matching model: a pytree, passed into ``jit`` as an argument.

    Numeric fields are float32 scalars (leaves; a traced schedule works); the rest are static.

    Attributes:
      shift: SD3's resolution shift s: t' = s t / (1 + (s - 1) t) (1 = none). Ignored when
        ``dynamic_shifting``.
      base_shift, max_shift, base_seq_len, max_seq_len: Flux's dynamic shifting: mu is linear in
        the image token count, from ``base_shift`` at ``base_seq_len`` to ``max_shift`` at
        ``max_seq_len`` (:func:`dynamic_shift_mu`), and t' = e^mu / (e^mu + 1 / t - 1).
      num_train_timesteps: the model sees ``num_train_timesteps * t``; also sets the training
        grid's smallest t, 1 / N (shifted), where diffusers' default sampling ends.
      dynamic_shifting: use mu (given per call) instead of ``shift``.
      time_shift_type: "exponential" (Flux) or "linear" (t' = mu / (mu + 1 / t - 1)).
      shift_terminal: stretch a sampling sequence so that it ends at this t (LTX-Video), or None.
    """

    shift: jax.Array
    base_shift: jax.Array
    max_shift: jax.Array
    base_seq_len: jax.Array
    max_seq_len: jax.Array
    num_train_timesteps: int = 1000
    dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None

    @property
    def num_timesteps(self) -> int:
        return self.num_train_timesteps


jax.tree_util.register_dataclass(
    FlowSchedule,
    data_fields=["shift", "base_shift", "max_shift", "base_seq_len", "max_seq_len"],
    meta_fields=["num_train_timesteps", "dynamic_shifting", "time_shift_type", "shift_terminal"],
)


def make_flow_schedule(
    shift: float = 1.0,
    *,
    num_train_timesteps: int = 1000,
    dynamic_shifting: bool = False,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    time_shift_type: str = "exponential",
    shift_terminal: float | None = None,
) -> FlowSchedule:
    """A :class:`FlowSchedule`; the defaults are diffusers' ``FlowMatchEulerDiscreteScheduler``'s.
    SD3: ``make_flow_schedule(3.0)``; Flux: ``make_flow_schedule(dynamic_shifting=True)``."""
    if not isinstance(num_train_timesteps, (int, np.integer)) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    if time_shift_type not in TIME_SHIFT_TYPES:
        raise ValueError(f"unknown time_shift_type {time_shift_type!r}; expected one of {TIME_SHIFT_TYPES}")
    if not max_seq_len > base_seq_len:
        raise ValueError(f"max_seq_len={max_seq_len!r} must exceed base_seq_len={base_seq_len!r}")
    if shift_terminal is not None and not 0.0 <= shift_terminal < 1.0:
        raise ValueError(f"shift_terminal must be in [0, 1), got {shift_terminal!r}")
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    return FlowSchedule(
        shift=f32(shift),
        base_shift=f32(base_shift),
        max_shift=f32(max_shift),
        base_seq_len=f32(base_seq_len),
        max_seq_len=f32(max_seq_len),
        num_train_timesteps=int(num_train_timesteps),
        dynamic_shifting=bool(dynamic_shifting),
        time_shift_type=time_shift_type,
        shift_terminal=None if shift_terminal is None else float(shift_terminal),
    )


def is_flow_schedule(schedule) -> bool:
    return isinstance(schedule, FlowSchedule)


def flow_schedule_config(schedule: FlowSchedule) -> dict:
    """The :func:`make_flow_schedule` keyword arguments that rebuild ``schedule`` (JSON-ready,
    for model folders and checkpoints)."""
    return dict(
        shift=float(np.asarray(schedule.shift)),
        num_train_timesteps=schedule.num_train_timesteps,
        dynamic_shifting=schedule.dynamic_shifting,
        base_shift=float(np.asarray(schedule.base_shift)),
        max_shift=float(np.asarray(schedule.max_shift)),
        base_seq_len=int(np.asarray(schedule.base_seq_len)),
        max_seq_len=int(np.asarray(schedule.max_seq_len)),
        time_shift_type=schedule.time_shift_type,
        shift_terminal=schedule.shift_terminal,
    )


# ------------------------------------------------------------------------ time shifting


def shift_time(t, shift):
    """SD3's resolution shift t' = s t / (1 + (s - 1) t): s > 1 spends more time at high noise."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def _xp(*values):
    return jnp if any(isinstance(v, jax.Array) for v in values) else np


def time_shift(t, mu, kind: str = "exponential"):
    """Flux's shift by mu: e^mu / (e^mu + 1/t - 1) ("exponential": :func:`shift_time` with
    s = e^mu) or mu / (mu + 1/t - 1) ("linear"). Works on NumPy or JAX arrays."""
    if kind not in TIME_SHIFT_TYPES:
        raise ValueError(f"unknown time shift type {kind!r}; expected one of {TIME_SHIFT_TYPES}")
    return shift_time(t, _xp(t, mu).exp(mu) if kind == "exponential" else mu)


def dynamic_shift_mu(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    """Flux's mu: linear in the number of image tokens (diffusers' ``calculate_shift``)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def schedule_mu(schedule: FlowSchedule, image_seq_len):
    """:func:`dynamic_shift_mu` with the schedule's parameters (float64 for a concrete schedule)."""
    leaves = [schedule.base_seq_len, schedule.max_seq_len, schedule.base_shift, schedule.max_shift]
    if not any(isinstance(v, jax.core.Tracer) for v in leaves):
        leaves = [float(np.asarray(v)) for v in leaves]
    return dynamic_shift_mu(image_seq_len, *leaves)


def apply_schedule_shift(schedule: FlowSchedule, t, mu=None):
    """The schedule's shift applied to times t: by mu when ``dynamic_shifting`` (mu required),
    else by ``schedule.shift``. Works on NumPy (float64 for a concrete schedule) or JAX arrays."""
    if schedule.dynamic_shifting:
        if mu is None:
            raise ValueError("this flow schedule uses dynamic shifting: pass mu (or image_seq_len)")
        return time_shift(t, mu, schedule.time_shift_type)
    shift = schedule.shift
    if not isinstance(shift, jax.core.Tracer) and not isinstance(t, jax.Array):
        shift = float(np.asarray(shift))
    return shift_time(t, shift)


def stretch_to_terminal(t, terminal: float):
    """Stretch a descending time sequence so that 1 - t scales to end at ``terminal`` (LTX-Video)."""
    one_minus = 1.0 - t
    return 1.0 - one_minus * (1.0 - terminal) / one_minus[-1]


# ------------------------------------------------------------------------ the interpolant


def _per_example(t, ndim: int):
    t = jnp.asarray(t, jnp.float32)
    if t.ndim > 1:
        raise ValueError(f"flow times t must be a scalar or a [B] vector, got shape {t.shape}")
    return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def flow_interpolate(x0, noise, t):
    """x_t = (1 - t) x0 + t eps for t [B] (or scalar) in [0, 1]."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {noise.shape} does not match x0 shape {x0.shape}")
    t = _per_example(t, x0.ndim)
    return ((1.0 - t) * x0 + t * noise).astype(x0.dtype)


def velocity_target(x0, noise):
    """The rectified-flow regression target v = eps - x0 (= dx_t / dt)."""
    return noise - x0


def x0_from_velocity(x_t, t, v):
    """x0 = x_t - t v."""
    return x_t - _per_example(t, x_t.ndim) * v


def eps_from_velocity(x_t, t, v):
    """eps = x_t + (1 - t) v."""
    return x_t + (1.0 - _per_example(t, x_t.ndim)) * v


def velocity_from_eps(x_t, t, eps):
    """v = (eps - x_t) / (1 - t) (singular at t = 1)."""
    return (eps - x_t) / (1.0 - _per_example(t, x_t.ndim))


def velocity_from_x0(x_t, t, x0):
    """v = (x_t - x0) / t (singular at t = 0)."""
    return (x_t - x0) / _per_example(t, x_t.ndim)


def flow_eps_and_x0(model_output, x_t, t, prediction: str = "velocity"):
    """(eps_hat, x0_hat) from a flow model's output ("velocity", "eps" or "x0")."""
    tt = _per_example(t, x_t.ndim)
    if prediction == "velocity":
        return x_t + (1.0 - tt) * model_output, x_t - tt * model_output
    if prediction == "eps":
        return model_output, (x_t - tt * model_output) / (1.0 - tt)
    if prediction == "x0":
        return (x_t - (1.0 - tt) * model_output) / tt, model_output
    raise ValueError(f"unknown flow prediction {prediction!r}; expected one of {FLOW_PREDICTIONS}")



# ------------------------------------------------------------------------ training-time t


def sample_flow_time(
    key,
    batch: int,
    *,
    density: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
):
    """[B] training times in (0, 1), before any shift (SD3, sec. 3.1 and eq. 19-21):

    * ``"uniform"``: U(0, 1) (rectified flow).
    * ``"logit_normal"``: sigmoid(N(logit_mean, logit_std^2)) (SD3's choice, (0, 1) at defaults).
    * ``"mode"``: 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1), ``s = mode_scale`` in
      [-1, 2/(pi - 2)] (SD3's mode sampling with heavy tails; 1.29 as diffusers' scripts).
    * ``"cosmap"``: 1 - 1 / (tan(pi u / 2) + 1).
    """
    if density not in TIME_DENSITIES:
        raise ValueError(f"unknown time density {density!r}; expected one of {TIME_DENSITIES}")
    if density == "logit_normal":
        if not logit_std > 0:
            raise ValueError(f"logit_std must be > 0, got {logit_std!r}")
        return jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(key, (batch,), jnp.float32))
    u = jax.random.uniform(key, (batch,), jnp.float32)
    if density == "mode":
        if not -1.0 <= mode_scale <= 2.0 / (math.pi - 2.0):
            raise ValueError(f"mode_scale must be in [-1, {2 / (math.pi - 2):.4f}] (a monotone map), got {mode_scale!r}")
        return 1.0 - u - mode_scale * (jnp.cos(0.5 * math.pi * u) ** 2 - 1.0 + u)
    if density == "cosmap":
        return 1.0 - 1.0 / (jnp.tan(0.5 * math.pi * u) + 1.0)
    return u


# ------------------------------------------------------------------------ training loss

FLOW_WEIGHTINGS = ("simple", "min_snr", "sigma_sqrt", "cosmap")


def flow_snr(t):
    """SNR of the interpolant, ((1 - t) / t)^2."""
    return jnp.square((1.0 - t) / t)


def flow_loss_weight(t, weighting: str = "simple", prediction: str = "velocity", gamma: float = 5.0):
    """Per-example loss weight at flow times t [B].

    * ``"simple"``: 1.
    * ``"min_snr"``: Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) on the x0-space MSE,
      converted to the regressed quantity: an eps error e means an x0 error t e / (1 - t), a
      velocity error e an x0 error t e, so the weights are min(SNR, gamma) / SNR (eps),
      min(SNR, gamma) t^2 (velocity) and min(SNR, gamma) (x0).
    * ``"sigma_sqrt"``: t^-2, ``"cosmap"``: 2 / (pi (1 - 2t + 2t^2)) (diffusers' SD3 training
      script ``compute_loss_weighting_for_sd3``).
    """
    if weighting not in FLOW_WEIGHTINGS:
        raise ValueError(f"unknown flow weighting {weighting!r}; expected one of {FLOW_WEIGHTINGS}")
    t = jnp.asarray(t, jnp.float32)
    if weighting == "simple":
        return jnp.ones_like(t)
    if weighting == "sigma_sqrt":
        return t**-2.0
    if weighting == "cosmap":
        return 2.0 / (math.pi * (1.0 - 2.0 * t + 2.0 * t**2))
    if not gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {gamma!r}")
    ratio = flow_snr(t)
    clipped = jnp.minimum(ratio, gamma)
    if prediction == "eps":
        return clipped / ratio
    if prediction == "velocity":
        return clipped * t**2
    return clipped


def flow_training_target(x0, noise, prediction: str = "velocity"):
    """The regression target of a flow model: v = eps - x0, eps or x0."""
    if prediction not in FLOW_PREDICTIONS:
        raise ValueError(f"unknown flow prediction {prediction!r}; expected one of {FLOW_PREDICTIONS}")
    return {"velocity": noise - x0, "eps": noise, "x0": x0}[prediction]


def flow_loss_terms(
    schedule: FlowSchedule,
    model_fn,
    x0,
    key,
    *,
    prediction: str = "velocity",
    weighting: str = "simple",
    min_snr_gamma: float = 5.0,
    time_density: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    mu=None,
    t=None,
    noise=None,
) -> dict:
    """Per-example terms of :func:`flow_loss`, each [B]: ``"loss"``, ``"mse"``, ``"weight"``, ``"t"``."""
    if not isinstance(schedule, FlowSchedule):
        raise ValueError(f"flow_loss needs a FlowSchedule, got {type(schedule).__name__} (use diffusion_loss for DDPM)")
    if prediction not in FLOW_PREDICTIONS:
        raise ValueError(f"unknown flow prediction {prediction!r}; expected one of {FLOW_PREDICTIONS}")
    x0 = jnp.asarray(x0)
    if x0.ndim < 1:
        raise ValueError(f"x0 must have a batch axis, got shape {x0.shape}")
    batch = x0.shape[0]
    t_key, noise_key = jax.random.split(key)
    if t is None:
        u = sample_flow_time(
            t_key, batch, density=time_density, logit_mean=logit_mean, logit_std=logit_std, mode_scale=mode_scale
        )
        t = apply_schedule_shift(schedule, u, mu)
    t = jnp.asarray(t, jnp.float32)
    if t.shape != (batch,):
        raise ValueError(f"flow times t of shape {t.shape} must have shape ({batch},) to match x0 {x0.shape}")
    if noise is None:
        noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {noise.shape} does not match x0 shape {x0.shape}")
    x_t = flow_interpolate(x0, noise.astype(x0.dtype), t)
    output = model_fn(x_t, schedule.num_train_timesteps * t)
    if output.shape != x0.shape:
        raise ValueError(f"model output shape {output.shape} does not match x0 shape {x0.shape}")
    target = flow_training_target(x0.astype(jnp.float32), noise.astype(jnp.float32), prediction)
    err = jnp.square(output.astype(jnp.float32) - target)
    mse = jnp.mean(err.reshape(batch, -1), axis=1)
    weight = flow_loss_weight(t, weighting, prediction, min_snr_gamma)
    return {"loss": weight * mse, "mse": mse, "weight": weight, "t": t}


def flow_loss(schedule: FlowSchedule, model_fn, x0, key, *, reduce: str = "mean", **options):
    """The rectified-flow training loss for one batch (SD3, Esser et al. 2024, sec. 2-3).

    Per example: t from ``time_density`` (then the schedule's shift; by ``mu`` for a dynamic
    schedule), eps ~ N(0, I), x_t = (1 - t) x0 + t eps; the model output at
    ``(x_t, num_train_timesteps * t)`` is regressed onto v = eps - x0 (or eps / x0 for
    ``prediction``), mean over non-batch axes, times :func:`flow_loss_weight`.

    Options (as :func:`flow_loss_terms`): prediction ("velocity" | "eps" | "x0"), weighting
    ("simple" | "min_snr" | "sigma_sqrt" | "cosmap"), min_snr_gamma, time_density ("uniform" |
    "logit_normal" | "mode" | "cosmap") with logit_mean / logit_std / mode_scale, mu, and t
    [B] (flow times, used as given) / noise to fix them. Reflow trains with ``noise`` = the
    paired noise (:func:`ldm_jax.diffusion.reflow.reflow_pairs`).

    Returns: float32 scalar, or [B] with ``reduce="none"``.
    """
    if reduce not in ("mean", "none"):
        raise ValueError(f"unknown reduce {reduce!r}; expected one of ('mean', 'none')")
    loss = flow_loss_terms(schedule, model_fn, x0, key, **options)["loss"]
    return loss.mean() if reduce == "mean" else loss
