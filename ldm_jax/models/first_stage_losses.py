"""Losses for training the first-stage autoencoders (taming-transformers' ``VQLPIPSWithDiscriminator``
and LDM's ``LPIPSWithDiscriminator``), as pure functions.

Generator (autoencoder) step, per batch of images x and reconstructions x^::

    rec      = |x - x^| (or (x - x^)^2)  + perceptual_weight * LPIPS(x, x^)     per pixel
    nll      = KL models: sum(rec / exp(logvar) + logvar) / B   (LDM; logvar a learned scalar)
               VQ models: mean(rec)                             (taming)
    g_loss   = -mean(D(x^))
    lambda   = clip(|grad_W nll| / (|grad_W g_loss| + 1e-4), 0, 1e4) * disc_weight
               (W = the decoder's last conv kernel; treated as a constant)
    factor   = disc_factor if step >= disc_start else 0                  (adopt_weight)
    loss     = nll + kl_weight * mean_b KL_b   (or + codebook_weight * vq_loss)
                   + lambda * factor * g_loss

Discriminator step::

    d_loss = factor * disc_loss(D(x), D(sg[x^]))      hinge or vanilla (non-saturating)

How a train step composes them (see :func:`generator_loss`, :func:`discriminator_loss`)::

    h, posterior = ae.apply({"params": p}, x, key, return_last_layer_input=True)
    loss, metrics, x_rec = generator_loss(
        cfg, inputs=x, last_layer_input=h, last_layer=last_layer_params(p),
        regularization_loss=jnp.mean(posterior.kl()),
        discriminator_fn=lambda im: disc.apply({"params": dp}, im),
        step=step, lpips_params=lpips_params, logvar=logvar)
    # differentiate w.r.t. p (and logvar); then, in the discriminator step:
    d_loss, d_metrics = discriminator_loss(
        cfg, logits_real=disc.apply({"params": dp}, x),
        logits_fake=disc.apply({"params": dp}, jax.lax.stop_gradient(x_rec)), step=step)

The perceptual term needs LPIPS weights from a local file
(:func:`ldm_jax.interop.lpips_weights.load_lpips_params`). Without them (``lpips_params=None``)
the perceptual term is OFF: its weight is 0, a warning is logged when the loss is traced, and
``metrics["perceptual_weight"]`` reports 0.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ldm_jax.models.autoencoder import apply_last_layer
from ldm_jax.models.lpips import lpips_distance

log = logging.getLogger(__name__)

Dtype = Any


@dataclasses.dataclass(frozen=True)
class FirstStageLossConfig:
    """Weights of the first-stage loss. Defaults follow LDM's KL-f8 config
    (``kl_weight=1e-6``, ``disc_weight=0.5``, ``disc_start=50001``); for VQ models set
    ``regularizer="vq"`` (taming: ``codebook_weight=1.0``, ``disc_weight=0.8``)."""

    regularizer: str = "kl"  # "kl" | "vq": picks the nll reduction and which regularizer weight applies
    pixel_loss: str = "l1"  # "l1" | "l2"
    perceptual_weight: float = 1.0  # applied only when LPIPS params are given
    kl_weight: float = 1e-6
    codebook_weight: float = 1.0
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_start: int = 50001
    disc_loss: str = "hinge"  # "hinge" | "vanilla"
    adaptive_disc_weight: bool = True  # False: lambda = disc_weight

    def __post_init__(self):
        if self.regularizer not in ("kl", "vq"):
            raise ValueError(f"unknown regularizer {self.regularizer!r} (use 'kl' or 'vq')")
        if self.pixel_loss not in ("l1", "l2"):
            raise ValueError(f"unknown pixel_loss {self.pixel_loss!r} (use 'l1' or 'l2')")
        if self.disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"unknown disc_loss {self.disc_loss!r} (use 'hinge' or 'vanilla')")
        for name in ("perceptual_weight", "kl_weight", "codebook_weight", "disc_weight", "disc_factor"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


# ----------------------------------------------------------------------------- pieces


def pixel_loss(x, y, kind: str = "l1"):
    """Elementwise |x - y| or (x - y)^2 in float32, same shape as x."""
    d = x.astype(jnp.float32) - y.astype(jnp.float32)
    if kind == "l1":
        return jnp.abs(d)
    if kind == "l2":
        return jnp.square(d)
    raise ValueError(f"unknown pixel_loss {kind!r} (use 'l1' or 'l2')")


def hinge_d_loss(logits_real, logits_fake):
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x^)))."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real, logits_fake):
    """0.5 * (mean softplus(-D(x)) + mean softplus(D(x^))): the non-saturating GAN loss."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def generator_adversarial_loss(logits_fake):
    """-mean D(x^) (taming / LDM use this for both hinge and vanilla discriminators)."""
    return -jnp.mean(logits_fake.astype(jnp.float32))


def adopt_weight(weight, step, threshold: int, value: float = 0.0):
    """``weight`` once ``step >= threshold``, else ``value`` (jit-safe in ``step``)."""
    return jnp.where(jnp.asarray(step) < threshold, value, weight)


def _global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree_util.tree_leaves(tree)))


def adaptive_disc_weight(rec_grad, gan_grad, disc_weight: float = 1.0, eps: float = 1e-4, max_weight: float = 1e4):
    """taming / LDM: clip(|rec_grad| / (|gan_grad| + eps), 0, max_weight) * disc_weight.

    ``rec_grad`` / ``gan_grad`` are the gradients (arrays or pytrees, L2 norm over all leaves)
    of the reconstruction (nll) loss and of the generator GAN loss w.r.t. the decoder's last
    layer. The result carries no gradient.
    """
    weight = _global_norm(rec_grad) / (_global_norm(gan_grad) + eps)
    weight = jnp.clip(weight, 0.0, max_weight)
    return jax.lax.stop_gradient(weight) * disc_weight


def adaptive_disc_weight_from_fn(
    losses_fn: Callable[[Any], Any], last_layer, disc_weight: float = 1.0, has_aux: bool = False
):
    """Adaptive weight from ``losses_fn(last_layer) -> (rec_loss, gan_loss)`` (or
    ``((rec_loss, gan_loss), aux)`` with ``has_aux=True``).

    One forward and two backward passes through ``losses_fn`` (``jax.vjp``). Returns
    ``(weight, (rec_loss, gan_loss))`` (plus ``aux``); the losses are the forward values and
    stay differentiable for an outer ``jax.grad``; only ``weight`` is a constant.
    """
    if has_aux:
        (rec, gan), pullback, aux = jax.vjp(losses_fn, last_layer, has_aux=True)
    else:
        (rec, gan), pullback = jax.vjp(losses_fn, last_layer)
    (rec_grad,) = pullback((jnp.ones_like(rec), jnp.zeros_like(gan)))
    (gan_grad,) = pullback((jnp.zeros_like(rec), jnp.ones_like(gan)))
    weight = adaptive_disc_weight(rec_grad, gan_grad, disc_weight)
    return (weight, (rec, gan), aux) if has_aux else (weight, (rec, gan))


def effective_perceptual_weight(config: FirstStageLossConfig, lpips_params) -> float:
    """``config.perceptual_weight`` if LPIPS params are available, else 0 (and says so)."""
    if lpips_params is None:
        if config.perceptual_weight > 0:
            log.warning(
                "perceptual_weight=%s but no LPIPS weights were loaded: the perceptual loss is OFF (weight 0)",
                config.perceptual_weight,
            )
        return 0.0
    return config.perceptual_weight


def reconstruction_loss(config: FirstStageLossConfig, inputs, reconstructions, lpips_params=None):
    """Per-pixel pixel loss plus the per-image LPIPS distance times perceptual weight.

    Shapes: [B, H, W, C] x2 -> ([B, H, W, C] rec, [B] LPIPS distance (zeros when off)).
    """
    rec = pixel_loss(inputs, reconstructions, config.pixel_loss)
    weight = effective_perceptual_weight(config, lpips_params)
    if weight > 0:
        perceptual = lpips_distance(lpips_params, inputs, reconstructions)
        rec = rec + weight * perceptual[:, None, None, None]
    else:
        perceptual = jnp.zeros((inputs.shape[0],), jnp.float32)
    return rec, perceptual


def nll_loss(config: FirstStageLossConfig, rec, logvar=0.0):
    """KL models (LDM): sum(rec / exp(logvar) + logvar) / B. VQ models (taming): mean(rec)."""
    if config.regularizer == "kl":
        logvar = jnp.asarray(logvar, jnp.float32)
        return jnp.sum(rec / jnp.exp(logvar) + logvar) / rec.shape[0]
    return jnp.mean(rec)


def disc_loss(kind: str, logits_real, logits_fake):
    if kind == "hinge":
        return hinge_d_loss(logits_real, logits_fake)
    if kind == "vanilla":
        return vanilla_d_loss(logits_real, logits_fake)
    raise ValueError(f"unknown disc_loss {kind!r} (use 'hinge' or 'vanilla')")


# ----------------------------------------------------------------------------- composed steps


def generator_loss(
    config: FirstStageLossConfig,
    *,
    inputs,
    last_layer_input,
    last_layer,
    regularization_loss,
    discriminator_fn: Callable[[jax.Array], jax.Array],
    step,
    lpips_params=None,
    logvar=0.0,
    dtype: Dtype = jnp.float32,
):
    """The autoencoder's loss for one batch (see the module docstring).

    Args:
      inputs: target images [B, H, W, C].
      last_layer_input: decoder ``conv_out`` input [B, H, W, C_h]
        (``return_last_layer_input=True``).
      last_layer: decoder ``conv_out`` params ``{"kernel", "bias"}`` (``last_layer_params``);
        the adaptive weight uses the gradient w.r.t. ``kernel``.
      regularization_loss: scalar; KL models: batch mean of ``posterior.kl()``; VQ models:
        ``QuantizerOutput.loss``.
      discriminator_fn: images -> logits, closed over the (frozen here) discriminator params.
      step: global step (int or traced int).
      lpips_params: LPIPS params or None (perceptual term off).
      logvar: LDM's learned scalar output log-variance (KL models only).

    Returns ``(loss, metrics, reconstructions)``.
    """
    perceptual_weight = effective_perceptual_weight(config, lpips_params)
    bias = last_layer.get("bias")

    def losses_of_kernel(kernel):
        params = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
        reconstructions = apply_last_layer(params, last_layer_input, dtype=dtype)
        rec, perceptual = reconstruction_loss(config, inputs, reconstructions, lpips_params)
        nll = nll_loss(config, rec, logvar)
        g_loss = generator_adversarial_loss(discriminator_fn(reconstructions))
        return (nll, g_loss), (rec, perceptual, reconstructions)

    if config.adaptive_disc_weight:
        d_weight, (nll, g_loss), (rec, perceptual, reconstructions) = adaptive_disc_weight_from_fn(
            losses_of_kernel, last_layer["kernel"], config.disc_weight, has_aux=True
        )
    else:
        (nll, g_loss), (rec, perceptual, reconstructions) = losses_of_kernel(last_layer["kernel"])
        d_weight = jnp.asarray(config.disc_weight, jnp.float32)

    factor = adopt_weight(config.disc_factor, step, config.disc_start)
    reg_weight = config.kl_weight if config.regularizer == "kl" else config.codebook_weight
    reg = jnp.asarray(regularization_loss, jnp.float32)
    loss = nll + reg_weight * reg + d_weight * factor * g_loss
    metrics = {
        "loss": loss,
        "nll_loss": nll,
        "rec_loss": jnp.mean(rec),
        "pixel_loss": jnp.mean(pixel_loss(inputs, reconstructions, config.pixel_loss)),
        "perceptual_loss": jnp.mean(perceptual),
        "perceptual_weight": jnp.asarray(perceptual_weight, jnp.float32),
        f"{config.regularizer}_loss": reg,
        "g_loss": g_loss,
        "d_weight": d_weight,
        "disc_factor": factor,
        "logvar": jnp.asarray(logvar, jnp.float32),
    }
    return loss, metrics, reconstructions


def discriminator_loss(config: FirstStageLossConfig, *, logits_real, logits_fake, step):
    """factor * disc_loss(D(x), D(sg[x^])) with factor = adopt_weight(disc_factor, step, disc_start).

    Compute ``logits_fake`` on ``jax.lax.stop_gradient(reconstructions)``. Returns
    ``(loss, metrics)``.
    """
    factor = adopt_weight(config.disc_factor, step, config.disc_start)
    loss = factor * disc_loss(config.disc_loss, logits_real.astype(jnp.float32), logits_fake.astype(jnp.float32))
    metrics = {
        "d_loss": loss,
        "logits_real": jnp.mean(logits_real.astype(jnp.float32)),
        "logits_fake": jnp.mean(logits_fake.astype(jnp.float32)),
        "disc_factor": factor,
    }
    return loss, metrics
