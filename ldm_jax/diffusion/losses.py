"""Training losses and the variational bound of discrete-time Gaussian diffusion.

* :func:`diffusion_loss`: DDPM's L_simple (Ho et al. 2020) for eps-, x0- or v-prediction,
  optional Min-SNR-gamma weighting (Hang et al. 2023), and the hybrid loss of improved DDPM
  (Nichol & Dhariwal 2021) for models that also output a learned-range variance.
* :func:`vlb_bits_per_dim`: the full variational bound -log p(x0) <= L_0 + sum_t L_t + L_T,
  in bits per dimension, for likelihood evaluation.
* Building blocks: :func:`normal_kl`, :func:`discretized_gaussian_log_likelihood`,
  :func:`p_mean_variance` (also what an ancestral DDPM sampler needs), :func:`snr`,
  :func:`min_snr_weight`, :func:`prior_bits_per_dim`.

Conventions. Timesteps are integers in [0, T) as in :mod:`ldm_jax.diffusion.schedules`.
``model_fn(x_t, t) -> output`` takes x_t [B, ...] and t int [B]; close over parameters and
conditioning so that ``jax.grad`` with respect to the parameters flows through the closure.
A learned-variance model returns twice the channels of x_t along the LAST axis (channels-last,
NHWC): ``output[..., :C]`` is the prediction, ``output[..., C:]`` the variance interpolation
``v`` in [-1, 1]. Everything is pure and works under ``jit``, ``vmap`` and ``grad``.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr

from ldm_jax.diffusion.forward import (
    PREDICTION_TYPES,
    q_posterior,
    q_sample,
    to_eps_and_x0,
    training_target,
)
from ldm_jax.diffusion.schedules import Schedule, extract
from ldm_jax.diffusion.thresholding import static_clip

WEIGHTINGS = ("simple", "min_snr")
FIXED_VARIANCES = ("fixed_small", "fixed_large")
REDUCTIONS = ("mean", "none")

_LOG2 = math.log(2.0)


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {choices}")


def _mean_over_non_batch(x: jnp.ndarray) -> jnp.ndarray:
    """[B, ...] -> [B]."""
    return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


# ---------------------------------------------------------------------------------------------
# Gaussian building blocks


def normal_kl(mean1, logvar1, mean2, logvar2) -> jnp.ndarray:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats.

    Arguments broadcast against each other; the result has the broadcast shape.
    """
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + jnp.exp(logvar1 - logvar2)
        + jnp.square(mean1 - mean2) * jnp.exp(-logvar2)
    )


def _log_normal_mass(lo: jnp.ndarray, hi: jnp.ndarray) -> jnp.ndarray:
    """log(Phi(hi) - Phi(lo)) for standardised lo < hi, accurate in both tails.

    Both ends are reflected into the lower tail when the interval lies above 0, so the
    difference is taken between two small CDF values instead of two values close to 1; the
    difference itself is formed in log space, log Phi(b) + log(1 - exp(log Phi(a) - log Phi(b))).
    """
    upper = lo > 0
    a = jnp.where(upper, -hi, lo)
    b = jnp.where(upper, -lo, hi)
    log_b = log_ndtr(b)
    # min(..., -1e-30) keeps log(-expm1(.)) finite if float32 rounds the two log-CDFs together.
    diff = jnp.minimum(log_ndtr(a) - log_b, -1e-30)
    return log_b + jnp.log(-jnp.expm1(diff))


def discretized_gaussian_log_likelihood(x, mean, log_variance, *, num_bins: int = 256) -> jnp.ndarray:
    """log P(x) of data quantised to ``num_bins`` levels on [-1, 1] under N(mean, exp(log_variance)).

    The data values are ``2 k / (num_bins - 1) - 1``; each bin is the interval of width
    ``2 / (num_bins - 1)`` centred on its value, except that the first bin extends to -inf and
    the last to +inf (Ho et al. 2020, eq. 13), so the bins partition the real line.

    Args:
      x: data on the grid [B, ...] (8-bit images scaled to [-1, 1]).
      mean, log_variance: broadcastable to x.
    Returns: elementwise log-probabilities in nats, float32, shape of the broadcast.
    """
    if num_bins < 2:
        raise ValueError(f"num_bins must be >= 2, got {num_bins!r}")
    x = jnp.asarray(x, jnp.float32)
    half_width = 1.0 / (num_bins - 1)
    inv_std = jnp.exp(-0.5 * jnp.asarray(log_variance, jnp.float32))
    centred = x - mean
    hi = (centred + half_width) * inv_std
    lo = (centred - half_width) * inv_std
    # The edge tests use half a bin of slack so they do not depend on x being exactly +-1.
    return jnp.where(
        x < -1.0 + half_width,
        log_ndtr(hi),
        jnp.where(x > 1.0 - half_width, log_ndtr(-lo), _log_normal_mass(lo, hi)),
    )


# ---------------------------------------------------------------------------------------------
# The reverse-process Gaussian p(x_{t-1} | x_t)


class PMeanVariance(NamedTuple):
    """Parameters of p(x_{t-1} | x_t) = N(mean, variance).

    ``mean`` and ``x0_hat`` have the shape of x_t; ``variance`` and ``log_variance`` have the
    shape of x_t for a learned variance and [B, 1, ..., 1] (broadcastable) for a fixed one.
    """

    mean: jnp.ndarray
    variance: jnp.ndarray
    log_variance: jnp.ndarray
    x0_hat: jnp.ndarray


def split_learned_variance(model_output: jnp.ndarray, x_t: jnp.ndarray):
    """Split a [..., 2C] output of a learned-variance model into (prediction, v_interp), each [..., C]."""
    if model_output.shape[:-1] != x_t.shape[:-1] or model_output.shape[-1] != 2 * x_t.shape[-1]:
        raise ValueError(
            f"learned-variance model output shape {model_output.shape} must be x_t shape {x_t.shape} "
            "with twice the channels on the last axis"
        )
    channels = x_t.shape[-1]
    return model_output[..., :channels], model_output[..., channels:]


def _fixed_log_variance(schedule: Schedule, t, ndim: int, variance: str):
    if variance == "fixed_small":
        # The posterior variance beta~_t (log clipped at t = 0, where beta~_0 = 0).
        return extract(schedule.posterior_log_variance_clipped, t, ndim)
    # "fixed_large" is beta_t, except at t = 0 where DDPM uses beta~_1 so that the decoder
    # L_0 is not scored with the (larger) beta_0 (Ho et al. 2020 code; improved DDPM).
    large = jnp.concatenate([schedule.posterior_variance[1:2], schedule.betas[1:]])
    return extract(jnp.log(large), t, ndim)


def p_mean_variance(
    schedule: Schedule,
    model_output: jnp.ndarray,
    x_t: jnp.ndarray,
    t: jnp.ndarray,
    *,
    prediction: str = "eps",
    learned_variance: bool = False,
    variance: str = "fixed_small",
    clip_denoised: bool = False,
    denoised_fn: Callable[[jnp.ndarray], jnp.ndarray] | None = None,
) -> PMeanVariance:
    """Mean and variance of the model's reverse step p(x_{t-1} | x_t).

    The mean is the posterior mean of q(x_{t-1} | x_t, x0) with x0 replaced by the model's
    x0_hat (Ho et al. 2020, eq. 11 for eps-prediction; the same for x0 and v).

    Args:
      model_output: [B, ...] like x_t, or [..., 2C] with ``learned_variance``.
      x_t: [B, ...]. t: int timesteps [B] or scalar.
      prediction: how to read the prediction channels: "eps", "x0" or "v".
      learned_variance: the model also outputs v in [-1, 1] and the log-variance is
        ``frac * log(beta_t) + (1 - frac) * log(beta~_t)`` with ``frac = (v + 1) / 2``
        (improved DDPM, eq. 15; beta~ log clipped at t = 0). ``variance`` is then ignored.
      variance: fixed choice when not learned: "fixed_small" (beta~_t, the posterior
        variance) or "fixed_large" (beta_t, with beta~_1 at t = 0).
      clip_denoised: clip x0_hat to [-1, 1] before forming the mean.
      denoised_fn: optional map applied to x0_hat (after clipping), e.g. dynamic thresholding.

    Returns: a :class:`PMeanVariance` (mean, variance, log_variance, x0_hat).
    """
    _check_choice("prediction type", prediction, PREDICTION_TYPES)
    _check_choice("variance", variance, FIXED_VARIANCES)
    if learned_variance:
        model_output, v_interp = split_learned_variance(model_output, x_t)
        min_log = extract(schedule.posterior_log_variance_clipped, t, x_t.ndim)
        max_log = extract(jnp.log(schedule.betas), t, x_t.ndim)
        frac = (v_interp.astype(jnp.float32) + 1.0) / 2.0
        log_variance = frac * max_log + (1.0 - frac) * min_log
    else:
        log_variance = _fixed_log_variance(schedule, t, x_t.ndim, variance)
    _, x0_hat = to_eps_and_x0(schedule, model_output, x_t, t, prediction)
    if clip_denoised:
        x0_hat = static_clip(x0_hat)
    if denoised_fn is not None:
        x0_hat = denoised_fn(x0_hat)
    mean, _, _ = q_posterior(schedule, x0_hat, x_t, t)
    return PMeanVariance(mean, jnp.exp(log_variance), log_variance, x0_hat)


# ---------------------------------------------------------------------------------------------
# Signal-to-noise ratio and Min-SNR weighting


def snr(schedule: Schedule, t: jnp.ndarray) -> jnp.ndarray:
    """SNR(t) = abar_t / (1 - abar_t), float32 of t's shape.

    With a zero-terminal-SNR schedule the last value uses the floored abar of the schedule
    (tiny but positive), so the weights below stay finite.
    """
    return jnp.exp(schedule.log_snr[jnp.asarray(t)])


def min_snr_weight(schedule: Schedule, t: jnp.ndarray, prediction: str = "eps", gamma: float = 5.0):
    """Per-example loss weight of Min-SNR-gamma (Hang et al. 2023), shape of t.

    The paper's weight is min(SNR, gamma) on the x0-space MSE. An eps-space MSE equals SNR
    times the x0-space one and a v-space MSE (SNR + 1) times it, so the same weighting of the
    x0 error is min(SNR, gamma) / SNR for eps and min(SNR, gamma) / (SNR + 1) for v.
    """
    _check_choice("prediction type", prediction, PREDICTION_TYPES)
    ratio = snr(schedule, t)
    clipped = jnp.minimum(ratio, gamma)
    if prediction == "eps":
        return clipped / ratio
    if prediction == "v":
        return clipped / (ratio + 1.0)
    return clipped


# ---------------------------------------------------------------------------------------------
# Per-timestep variational-bound terms


def _vlb_term_bits(schedule, x0, x_t, t, model_output, prediction, learned_variance, variance, clip_denoised):
    """L_t in bits/dim for each example, [B]: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) for t > 0
    and the discretized decoder NLL -log p(x0 | x_1) at t = 0 (t = 0 indexes x_1 in paper terms)."""
    pmv = p_mean_variance(
        schedule,
        model_output,
        x_t,
        t,
        prediction=prediction,
        learned_variance=learned_variance,
        variance=variance,
        clip_denoised=clip_denoised,
    )
    true_mean, _, true_log_variance = q_posterior(schedule, x0, x_t, t)
    kl = _mean_over_non_batch(normal_kl(true_mean, true_log_variance, pmv.mean, pmv.log_variance))
    nll = -_mean_over_non_batch(discretized_gaussian_log_likelihood(x0, pmv.mean, pmv.log_variance))
    t = jnp.broadcast_to(t, (x0.shape[0],))
    return jnp.where(t == 0, nll, kl) / _LOG2


def prior_bits_per_dim(schedule: Schedule, x0: jnp.ndarray) -> jnp.ndarray:
    """L_T = KL(q(x_T | x0) || N(0, I)) in bits/dim, [B]. Not trainable; near 0 for good schedules."""
    last = schedule.num_timesteps - 1
    mean = schedule.sqrt_alphas_cumprod[last] * x0.astype(jnp.float32)
    return _mean_over_non_batch(normal_kl(mean, schedule.log_one_minus_alphas_cumprod[last], 0.0, 0.0)) / _LOG2


# ---------------------------------------------------------------------------------------------
# Training loss


def _check_batch(x0, t, noise):
    if x0.ndim < 1:
        raise ValueError(f"x0 must have a batch axis, got shape {x0.shape}")
    if t.shape != (x0.shape[0],):
        raise ValueError(f"timesteps t of shape {t.shape} must have shape ({x0.shape[0]},) to match x0 {x0.shape}")
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {noise.shape} does not match x0 shape {x0.shape}")


def diffusion_loss_terms(
    schedule: Schedule,
    model_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
    x0: jnp.ndarray,
    key: jax.Array,
    *,
    prediction: str = "eps",
    weighting: str = "simple",
    min_snr_gamma: float = 5.0,
    learned_variance: bool = False,
    vlb_weight: float = 1e-3,
    t: jnp.ndarray | None = None,
    noise: jnp.ndarray | None = None,
) -> dict:
    """Per-example terms of :func:`diffusion_loss`, each of shape [B] (see there for the loss).

    Returns a dict with ``"loss"`` (what :func:`diffusion_loss` averages), ``"mse"`` (unweighted
    MSE to the target, mean over non-batch axes), ``"weight"``, ``"vlb"`` (L_t in bits/dim from
    a single timestep, zeros unless ``learned_variance``) and ``"t"``. Arguments as in
    :func:`diffusion_loss`.
    """
    _check_choice("prediction type", prediction, PREDICTION_TYPES)
    _check_choice("weighting", weighting, WEIGHTINGS)
    if weighting == "min_snr" and not min_snr_gamma > 0:
        raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma!r}")
    x0 = jnp.asarray(x0)
    t_key, noise_key = jax.random.split(key)
    batch = x0.shape[0] if x0.ndim else 0
    if t is None:
        t = jax.random.randint(t_key, (batch,), 0, schedule.num_timesteps)
    if noise is None:
        noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
    t = jnp.asarray(t)
    _check_batch(x0, t, noise)

    x_t = q_sample(schedule, x0, t, noise.astype(x0.dtype))
    output = model_fn(x_t, t)
    if learned_variance:
        prediction_out, v_interp = split_learned_variance(output, x_t)
    else:
        if output.shape != x0.shape:
            raise ValueError(f"model output shape {output.shape} does not match x0 shape {x0.shape}")
        prediction_out = output
    # Loss arithmetic in float32 even for a bfloat16 model.
    target = training_target(schedule, x0.astype(jnp.float32), noise.astype(jnp.float32), t, prediction)
    mse = _mean_over_non_batch(jnp.square(prediction_out.astype(jnp.float32) - target))

    if weighting == "min_snr":
        weight = min_snr_weight(schedule, t, prediction, min_snr_gamma)
    else:
        weight = jnp.ones_like(mse)
    loss = weight * mse

    if learned_variance:
        # The VLB term trains only the variance: its gradient must not reach the mean, which
        # L_simple already trains (improved DDPM, sec. 3.1).
        frozen = jnp.concatenate([jax.lax.stop_gradient(prediction_out), v_interp], axis=-1)
        vlb = _vlb_term_bits(
            schedule,
            x0.astype(jnp.float32),
            x_t.astype(jnp.float32),
            t,
            frozen.astype(jnp.float32),
            prediction,
            True,
            "fixed_small",
            False,
        )
        # L_vlb = sum_t L_t is estimated by T * L_t for uniform t, so lambda * L_vlb becomes
        # vlb_weight * T * L_t, which for lambda = 1e-3 is improved DDPM's RESCALED_MSE (L_t * T / 1000).
        loss = loss + vlb_weight * schedule.num_timesteps * vlb
    else:
        vlb = jnp.zeros_like(mse)
    return {"loss": loss, "mse": mse, "weight": weight, "vlb": vlb, "t": t}


def diffusion_loss(
    schedule: Schedule,
    model_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
    x0: jnp.ndarray,
    key: jax.Array,
    *,
    reduce: str = "mean",
    **options,
) -> jnp.ndarray:
    """The denoising training loss for one batch: :func:`diffusion_loss_terms`' ``"loss"``,
    averaged (``reduce="mean"``) or per example (``reduce="none"``).

    Per example: draw t ~ U{0, ..., T-1} and eps ~ N(0, I), form x_t = q_sample(x0, t, eps)
    and regress the model output onto the target of ``prediction`` (eps, x0 or
    v = sqrt(abar) eps - sqrt(1 - abar) x0). The MSE is the mean over all non-batch axes
    (L_simple), multiplied by the per-example weight:

    * ``"simple"``: 1.
    * ``"min_snr"``: Min-SNR-gamma, see :func:`min_snr_weight`.

    With ``learned_variance`` the model outputs 2C channels (see module docstring) and the
    hybrid loss of improved DDPM is returned: ``weight * mse + vlb_weight * T * L_t``, where
    L_t (bits/dim; the discretized decoder NLL at t = 0) is computed with the prediction
    channels under ``stop_gradient``. ``T * L_t`` is the single-sample estimate of
    L_vlb = sum_t L_t, so ``vlb_weight`` is the paper's lambda (sec. 3.1, 1e-3). The default
    reproduces improved DDPM's code with ``RESCALED_MSE`` (vb * num_timesteps / 1000, for any T);
    its plain ``MSE`` loss type corresponds to ``vlb_weight = 1 / T``. The t = 0 term
    assumes 8-bit data in [-1, 1]; it has no meaning for latents (where learned variances are
    uncommon anyway).

    Args:
      model_fn: ``(x_t [B, ...], t int32 [B]) -> output [B, ...]`` (or [..., 2C]).
      x0: clean data [B, ...]. key: PRNG key for t and noise.
      options: those of :func:`diffusion_loss_terms`: prediction ("eps" | "x0" | "v"),
        weighting ("simple" | "min_snr"), min_snr_gamma, learned_variance, vlb_weight, and
        t [B] / noise (shape of x0) to fix the timesteps / noise instead of sampling them.
      reduce: "mean" for a scalar, "none" for the per-example losses [B].

    Returns: float32 scalar, or [B] with ``reduce="none"``.
    """
    _check_choice("reduce", reduce, REDUCTIONS)
    loss = diffusion_loss_terms(schedule, model_fn, x0, key, **options)["loss"]
    return loss.mean() if reduce == "mean" else loss


# ---------------------------------------------------------------------------------------------
# Likelihood evaluation


def vlb_bits_per_dim(
    schedule: Schedule,
    model_fn: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray],
    x0: jnp.ndarray,
    key: jax.Array,
    *,
    prediction: str = "eps",
    learned_variance: bool = False,
    variance: str = "fixed_small",
    clip_denoised: bool = False,
) -> dict:
    """The variational upper bound on -log2 p(x0) per dimension, one x_t sample per timestep.

    -log p(x0) <= L_T + sum_{t=1}^{T-1} L_t + L_0 where L_T = KL(q(x_T|x0) || N(0, I)),
    L_t = KL(q(x_{t-1}|x_t, x0) || p(x_{t-1}|x_t)) and L_0 = -log p(x0|x_1) with the
    discretized Gaussian decoder (x0 must be 8-bit data scaled to [-1, 1]). Each term uses an
    independent noise sample. The T timesteps are a ``lax.map`` (the model is traced once), so
    wrap the call in ``jax.jit`` (with ``model_fn`` and the keyword options closed over).

    Args:
      model_fn: ``(x_t [B, ...], t int32 [B]) -> output``, see :func:`p_mean_variance`.
      x0: data [B, ...] on the 256-level grid of [-1, 1].

    Returns: dict of float32 bits/dim: ``"total"`` [B], ``"prior"`` [B] (L_T), ``"decoder"``
    [B] (L_0, also ``terms[:, 0]``) and ``"terms"`` [B, T] (entry t is the term whose model
    call sees x_t at integer timestep t).
    """
    _check_choice("prediction type", prediction, PREDICTION_TYPES)
    _check_choice("variance", variance, FIXED_VARIANCES)
    x0 = jnp.asarray(x0, jnp.float32)
    if x0.ndim < 1:
        raise ValueError(f"x0 must have a batch axis, got shape {x0.shape}")
    batch = x0.shape[0]

    def term(args):
        timestep, step_key = args
        t = jnp.full((batch,), timestep, jnp.int32)
        noise = jax.random.normal(step_key, x0.shape, jnp.float32)
        x_t = q_sample(schedule, x0, t, noise)
        output = model_fn(x_t, t).astype(jnp.float32)
        return _vlb_term_bits(schedule, x0, x_t, t, output, prediction, learned_variance, variance, clip_denoised)

    steps = jnp.arange(schedule.num_timesteps, dtype=jnp.int32)
    terms = jax.lax.map(term, (steps, jax.random.split(key, schedule.num_timesteps))).T
    prior = prior_bits_per_dim(schedule, x0)
    return {"total": terms.sum(axis=1) + prior, "prior": prior, "decoder": terms[:, 0], "terms": terms}
