"""The first training stage: a KL (``AutoencoderKL``) or VQ (``VQModel``) autoencoder with
the taming / LDM losses (pixel + optional LPIPS, KL or codebook regulariser, PatchGAN
discriminator with the adaptive weight, switched on after ``config.loss.disc_start`` steps).

``build_stage(config, data_stats, *, source=None, run=None) -> Stage`` is what ``train.py``
calls for ``config.stage == "autoencoder"``; the autoencoder module itself is built by
``ldm_jax.ldm.first_stage.build_autoencoder`` (shared with the diffusion stage, which loads it
back from this stage's run).

Parameters
----------
One tree, so the shared single-optimizer loop, its EMA and its checkpoints cover everything::

    {"autoencoder": AutoencoderKL / VQModel params,
     "discriminator": NLayerDiscriminator params,      (absent when the GAN is off)
     "logvar": float32 []}                             (LDM's learned output log-variance; KL only)

Generator and discriminator in one objective
--------------------------------------------
taming / LDM alternate two optimizers per batch: the autoencoder (and ``logvar``) descends
``L_gen``, then the discriminator descends ``L_disc``. Here one loss is minimised::

    total = L_gen(ae, logvar; sg[disc]) + L_disc(disc; sg[x^])

where ``sg`` is ``jax.lax.stop_gradient`` and ``x^`` the reconstruction. Because ``L_gen``
sees the discriminator only through ``sg`` and ``L_disc`` sees the autoencoder only
through ``sg[x^]``::

    d total / d (ae, logvar) = d L_gen / d (ae, logvar)
    d total / d disc         = d L_disc / d disc

exactly (``tests/test_autoencoder_stage.py`` checks this against separately computed
gradients). AdamW is elementwise, so one AdamW over the joint tree is two AdamWs with the same
learning-rate schedule and hyper-parameters, i.e. taming's two Adams (taming also gives both
the same learning rate). What differs from taming:

* simultaneity: taming's discriminator step sees the reconstruction of the *already updated*
  autoencoder; here both parts step from the same parameters, so the discriminator sees a
  reconstruction one autoencoder update older (an O(learning rate) difference);
* global-norm gradient clipping (``config.optimizer.grad_clip_norm > 0``) computes one norm
  over both parts, so a large discriminator gradient also shrinks the autoencoder's step.
  taming does not clip; the configs here set ``grad_clip_norm = 0``. Weight decay likewise
  applies to both parts (configs: 0, as taming's Adam);
* the logged ``loss`` is ``L_gen + L_disc``, a sum of opposing objectives; watch ``ae_loss``,
  ``d_loss``, ``rec_loss``, ``kl_loss`` / ``vq_loss`` instead.

Before ``disc_start`` both GAN factors are 0 (``adopt_weight``), so ``L_disc = 0`` and the
generator's GAN term is 0. The loss then takes a ``lax.cond`` branch that does not run the
discriminator at all (same value and gradients as the factor-0 formula, without its cost).

VQ with an EMA codebook
-----------------------
With ``autoencoder.vq_use_ema=True`` the codebook and its statistics are the mutable ``vq_ema``
collection, not params: the task gives the loop ``init_model_state`` and the loss updates
``TrainState.model_state = {"vq_ema": ...}`` at every (micro)batch (no gradient reaches the
codebook; the loss is ``beta * commitment``). Previews and the export read the live codebook
(``params["vq_ema"]``, merged in by ``train.py``); the EMA of the params does not cover it (it
already is an EMA). Otherwise VQ models train their codebook by gradient
(``codebook_loss + beta * commitment``).

Export (the first stage of the diffusion stage)
-----------------------------------------------
``stage.export(ema_params, directory)`` writes a diffusers folder into ``directory``
(``train.py``: ``<workdir>/<config.export.dirname>``, by default ``<workdir>/model``)::

    config.json                          diffusers AutoencoderKL / VQModel config
    diffusion_pytorch_model.safetensors  the EMA autoencoder weights (discriminator dropped)
    first_stage.json                     {"kind", "latent_channels", "downsample_factor",
                                          "resolution", "channels", "scale_factor_estimated": false}

``config.json``'s ``scaling_factor`` is a placeholder (1.0): the diffusion stage estimates it
as 1 / std of the latents and stores its own. Load the folder with
``ldm_jax.interop.diffusers_vae.load_diffusers_autoencoder_kl`` (or ``load_diffusers_vq_model``)
or ``diffusers.AutoencoderKL.from_pretrained``.

Preview
-------
``stage.preview(ema_params, key) -> uint8 [N, H, 2W, C]``: each image is a held-out original
(left) beside its reconstruction from the posterior mean (right), so any grid layout shows
pairs. Held-out images: the digits ``test`` split, shapes with another content seed, else the
first N training images. N is ``config.preview.num_images`` (default 8).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ldm_jax.data import build_dataset
from ldm_jax.interop.diffusers_vae import save_diffusers_autoencoder_kl, save_diffusers_vq_model
from ldm_jax.interop.lpips_weights import load_lpips_params
from ldm_jax.ldm.first_stage import SCALE_FACTOR_PLACEHOLDER, build_autoencoder  # noqa: F401  (exported)
from ldm_jax.ldm.sections import autoencoder_defaults, compute_dtype, merge_section
from ldm_jax.models import first_stage_losses as losses
from ldm_jax.models.autoencoder import AutoencoderKL, last_layer_params
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.training.loop import Task
from ldm_jax.training.stages.base import Stage
from ldm_jax.training.stages.sections import loss_defaults

log = logging.getLogger(__name__)

FIRST_STAGE_JSON = "first_stage.json"


def autoencoder_config(section: Any) -> ml_collections.ConfigDict:
    """``config.autoencoder`` completed with its defaults (unknown keys raise)."""
    return merge_section(autoencoder_defaults(), section, "autoencoder")


def loss_config(section: Any) -> ml_collections.ConfigDict:
    """``config.loss`` completed with :func:`loss_defaults` (unknown keys raise)."""
    return merge_section(loss_defaults(), section, "loss")


def gan_enabled(loss_config: Any) -> bool:
    """Whether the stage has a discriminator at all."""
    return float(loss_config.disc_weight) > 0 and float(loss_config.disc_factor) > 0


def _loss_config(loss: ml_collections.ConfigDict, kind: str, perceptual_on: bool) -> losses.FirstStageLossConfig:
    return losses.FirstStageLossConfig(
        regularizer=kind,
        pixel_loss=loss.pixel_loss,
        # 0 when LPIPS is off: already logged once here, not again at every trace
        perceptual_weight=float(loss.perceptual_weight) if perceptual_on else 0.0,
        kl_weight=float(loss.kl_weight),
        codebook_weight=float(loss.codebook_weight),
        disc_weight=float(loss.disc_weight),
        disc_factor=float(loss.disc_factor),
        disc_start=int(loss.disc_start),
        disc_loss=loss.disc_loss,
        adaptive_disc_weight=bool(loss.adaptive_disc_weight),
    )


def _load_lpips(loss: ml_collections.ConfigDict, channels: int):
    if not loss.lpips_path or float(loss.perceptual_weight) == 0:
        log.warning(
            "autoencoder stage: perceptual (LPIPS) loss is OFF (%s); training on the pixel loss%s only",
            "no config.loss.lpips_path" if not loss.lpips_path else "perceptual_weight=0",
            " and the GAN" if gan_enabled(loss) else "",
        )
        return None
    if channels != 3:
        raise ValueError(
            f"the LPIPS perceptual loss needs 3-channel images, the data has {channels}; "
            "set data.channels=3 or config.loss.lpips_path=''"
        )
    return load_lpips_params(loss.lpips_path, loss.lpips_vgg_path or None)


# ----------------------------------------------------------------------------- the stage's pieces


@dataclasses.dataclass(frozen=True)
class AutoencoderStageParts:
    """The modules and loss settings of a built stage (also used by tests and scripts)."""

    model: Any  # AutoencoderKL | VQModel
    discriminator: NLayerDiscriminator | None
    loss_config: losses.FirstStageLossConfig
    lpips_params: Any
    logvar_init: float
    resolution: int
    channels: int

    @property
    def kind(self) -> str:
        return "kl" if isinstance(self.model, AutoencoderKL) else "vq"

    @property
    def stateful(self) -> bool:
        """VQ with the EMA codebook: the loss carries ``model_state = {"vq_ema": ...}``."""
        return self.kind == "vq" and bool(getattr(self.model, "use_ema", False))

    def init_model_state(self, key):
        """``{"vq_ema": ...}`` of the same init as :meth:`init_params` (same key)."""
        ae_key, _ = jax.random.split(key)
        image = jnp.zeros((1, self.resolution, self.resolution, self.channels), jnp.float32)
        return {"vq_ema": self.model.init(ae_key, image)["vq_ema"]}

    def _variables(self, ae_params, vq_ema=None):
        return {"params": ae_params} if vq_ema is None else {"params": ae_params, "vq_ema": vq_ema}

    # -- params

    def init_params(self, key):
        """The stage's param tree (logically boxed leaves for the models)."""
        ae_key, disc_key = jax.random.split(key)
        image = jnp.zeros((1, self.resolution, self.resolution, self.channels), jnp.float32)
        params = {"autoencoder": self.model.init(ae_key, image)["params"]}
        if self.discriminator is not None:
            params["discriminator"] = self.discriminator.init(disc_key, image)["params"]
        if self.kind == "kl":
            params["logvar"] = jnp.full((), self.logvar_init, jnp.float32)
        return params

    # -- forward pieces

    def encode_decode_last(self, ae_params, images, key, vq_ema=None):
        """Images -> (decoder ``conv_out`` input, regulariser loss, extra metrics, new vq_ema).

        KL: decodes a posterior sample (``key``), regulariser = batch mean of KL(q || N(0, I)).
        VQ: decodes the straight-through quantised latents, regulariser = the quantiser loss;
        with the EMA codebook (``vq_ema`` given) the codebook update of this batch is returned.
        """
        variables = self._variables(ae_params, vq_ema)
        if self.kind == "kl":
            h, posterior = self.model.apply(variables, images, key, return_last_layer_input=True)
            kl = jnp.mean(posterior.kl())
            extra = {"posterior_std": jnp.mean(posterior.std), "latent_abs_mean": jnp.mean(jnp.abs(posterior.mean))}
            return h, kl, extra, None
        if vq_ema is not None:
            (h, q), mutated = self.model.apply(
                variables, images, update_ema=True, return_last_layer_input=True, mutable=["vq_ema"]
            )
            vq_ema = mutated["vq_ema"]
        else:
            h, q = self.model.apply(variables, images, return_last_layer_input=True)
        extra = {
            "codebook_loss": q.codebook_loss,
            "commitment_loss": q.commitment_loss,
            "perplexity": q.perplexity,
            "codebook_usage": q.codebook_usage,
        }
        return h, q.loss, extra, vq_ema

    def reconstruct(self, ae_params, images, vq_ema=None):
        """Deterministic reconstruction (KL: posterior mean; VQ: quantised). [B,H,W,C] -> same, float32."""
        rec, _ = self.model.apply(self._variables(ae_params, vq_ema), images)
        return rec.astype(jnp.float32)

    def discriminate(self, disc_params, images):
        return self.discriminator.apply({"params": disc_params}, images)

    # -- losses

    def generator_objective(self, params, images, key, step, disc_params, vq_ema=None):
        """``L_gen`` of taming / LDM: (loss, metrics, reconstructions, new vq_ema).
        ``disc_params`` None = no discriminator pass (valid only while the GAN factor is 0)."""
        h, reg, extra, vq_ema = self.encode_decode_last(params["autoencoder"], images, key, vq_ema)
        cfg = self.loss_config
        if disc_params is None:
            # With factor 0 the GAN term is 0 * d_weight * g_loss = 0 whatever D says: the
            # fixed weight path with D := 0 gives the same loss and gradients without D.
            cfg = dataclasses.replace(cfg, adaptive_disc_weight=False)
            discriminator_fn = lambda im: jnp.zeros((im.shape[0], 1, 1, 1), jnp.float32)  # noqa: E731
        else:
            discriminator_fn = lambda im: self.discriminate(disc_params, im)  # noqa: E731
        loss, metrics, reconstructions = losses.generator_loss(
            cfg,
            inputs=images,
            last_layer_input=h,
            last_layer=last_layer_params(params["autoencoder"]),
            regularization_loss=reg,
            discriminator_fn=discriminator_fn,
            step=step,
            lpips_params=self.lpips_params,
            logvar=params.get("logvar", 0.0),
            dtype=self.model.dtype,
        )
        metrics = dict(metrics)
        metrics["ae_loss"] = metrics.pop("loss")  # the loop's "loss" is the stage total
        if self.kind == "vq":
            metrics.pop("logvar")
        if disc_params is None:
            metrics["d_weight"] = jnp.zeros((), jnp.float32)
        metrics.update(extra)
        return loss, metrics, reconstructions, vq_ema

    def discriminator_objective(self, disc_params, images, reconstructions, step):
        """``L_disc`` on real images and (gradient-stopped) reconstructions: (loss, metrics)."""
        both = jnp.concatenate([images, jax.lax.stop_gradient(reconstructions).astype(images.dtype)], axis=0)
        logits = self.discriminate(disc_params, both)
        real, fake = jnp.split(logits, 2, axis=0)
        return losses.discriminator_loss(self.loss_config, logits_real=real, logits_fake=fake, step=step)

    def stage_loss(self, params, batch, key, step):
        """``L_gen(ae, logvar; sg[disc]) + L_disc(disc; sg[x^])`` and the metrics of both."""
        loss, (metrics, _) = self._stage_loss(params, None, batch, key, step)
        return loss, metrics

    def stateful_stage_loss(self, params, model_state, batch, key, step):
        """:meth:`stage_loss` with the EMA codebook: ``(loss, (metrics, new model_state))``."""
        loss, (metrics, vq_ema) = self._stage_loss(params, model_state["vq_ema"], batch, key, step)
        return loss, (metrics, {"vq_ema": vq_ema})

    def _stage_loss(self, params, vq_ema, batch, key, step):
        images = batch["image"]

        if self.discriminator is None:
            loss, metrics, _, vq_ema = self.generator_objective(params, images, key, step, None, vq_ema)
            return loss, (metrics, vq_ema)

        def with_gan(params):
            g_loss, g_metrics, rec, new_ema = self.generator_objective(
                params, images, key, step, jax.lax.stop_gradient(params["discriminator"]), vq_ema
            )
            d_loss, d_metrics = self.discriminator_objective(params["discriminator"], images, rec, step)
            return g_loss + d_loss, ({**g_metrics, **d_metrics}, new_ema)

        def without_gan(params):
            g_loss, g_metrics, _, new_ema = self.generator_objective(params, images, key, step, None, vq_ema)
            zero = jnp.zeros((), jnp.float32)
            # the discriminator is not used here, so its gradient is exactly 0
            return g_loss, ({**g_metrics, "d_loss": zero, "logits_real": zero, "logits_fake": zero}, new_ema)

        return jax.lax.cond(jnp.asarray(step) >= self.loss_config.disc_start, with_gan, without_gan, params)


def build_parts(config: Any, channels: int, resolution: int) -> AutoencoderStageParts:
    """The stage's modules and loss settings from ``config.autoencoder`` / ``config.loss``."""
    ae = autoencoder_config(config.get("autoencoder"))
    loss = loss_config(config.get("loss"))
    model = build_autoencoder(ae, channels, allow_vq_ema=True)
    if resolution % model.downsample_factor:
        raise ValueError(
            f"data resolution {resolution} is not divisible by the autoencoder's downsampling factor "
            f"{model.downsample_factor} (block_out_channels={tuple(ae.block_out_channels)})"
        )
    lpips_params = _load_lpips(loss, channels)
    first_stage_loss = _loss_config(loss, ae.kind, perceptual_on=lpips_params is not None)
    discriminator = None
    if gan_enabled(loss):
        discriminator = NLayerDiscriminator(
            ndf=int(loss.disc_channels),
            n_layers=int(loss.disc_layers),
            norm=loss.disc_norm,
            norm_num_groups=int(loss.disc_norm_groups),
            dtype=compute_dtype(ae.dtype, "config.autoencoder.dtype"),
        )
        # fail at start-up, not inside the first jitted step
        image = jax.ShapeDtypeStruct((1, resolution, resolution, channels), jnp.float32)
        jax.eval_shape(discriminator.init, jax.random.key(0), image)
        log.info(
            "autoencoder stage: PatchGAN discriminator (%d layers, %d channels, %s loss) from step %d",
            loss.disc_layers, loss.disc_channels, loss.disc_loss, loss.disc_start,
        )
    else:
        log.info("autoencoder stage: GAN OFF (disc_weight=%s, disc_factor=%s)", loss.disc_weight, loss.disc_factor)
    return AutoencoderStageParts(
        model=model,
        discriminator=discriminator,
        loss_config=first_stage_loss,
        lpips_params=lpips_params,
        logvar_init=float(loss.logvar_init),
        resolution=int(resolution),
        channels=int(channels),
    )


# ----------------------------------------------------------------------------- preview / export


def held_out_data_config(data_config: Any) -> dict:
    """``config.data`` for held-out images: digits -> split "test"; shapes -> content seed + 1
    (a different image stream); other datasets unchanged (their first images)."""
    data = dict(data_config.to_dict() if hasattr(data_config, "to_dict") else data_config)
    if data.get("name") == "digits":
        data["split"] = "test"
    elif data.get("name") == "shapes":
        data["shapes_seed"] = int(data.get("shapes_seed") or 0) + 1
        data["shapes_num_examples"] = 1024
    return data


def to_uint8(images) -> np.ndarray:
    """[-1, 1] float images -> uint8 [0, 255] (round half to even, clipped)."""
    return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_preview(parts: AutoencoderStageParts, images: np.ndarray):
    """``preview(params, key) -> uint8 [N, H, 2W, C]``: originals (left) beside reconstructions."""
    originals = to_uint8(images)
    reconstruct = jax.jit(parts.reconstruct)

    def preview(params, key=None):
        del key  # deterministic: posterior mean / quantised latents
        rec = to_uint8(jax.device_get(reconstruct(params["autoencoder"], jnp.asarray(images), params.get("vq_ema"))))
        return np.concatenate([originals, rec], axis=2)

    return preview


def export_autoencoder(parts: AutoencoderStageParts, params: Mapping[str, Any], directory: str | os.PathLike) -> None:
    """Write ``params["autoencoder"]`` as a diffusers folder plus ``first_stage.json``."""
    directory = os.fspath(directory)
    ae_params = jax.device_get(params["autoencoder"])
    if parts.kind == "kl":
        save_diffusers_autoencoder_kl(parts.model, ae_params, directory, sample_size=parts.resolution)
    else:
        variables = parts._variables(ae_params, None if params.get("vq_ema") is None else jax.device_get(params["vq_ema"]))
        save_diffusers_vq_model(parts.model, variables, directory, sample_size=parts.resolution)
    info = {
        "kind": parts.kind,
        "latent_channels": int(parts.model.embed_dim if parts.kind == "vq" else parts.model.latent_channels),
        "downsample_factor": int(parts.model.downsample_factor),
        "resolution": parts.resolution,
        "channels": parts.channels,
        "scale_factor_estimated": False,
        "note": "config.json scaling_factor is a placeholder; the diffusion stage estimates 1/std of the latents",
    }
    with open(os.path.join(directory, FIRST_STAGE_JSON), "w") as f:
        json.dump(info, f, indent=2)


# ----------------------------------------------------------------------------- entry point


def build_stage(config: Any, data_stats: Any, *, source: Any = None, run: Any = None) -> Stage:
    """The autoencoder stage for ``config`` (sections ``autoencoder``, ``loss``, ``data``,
    ``preview``) and the dataset's :class:`ldm_jax.data.DatasetStats` (the common signature of
    ``ldm_jax.training.stages.base``; this stage needs neither ``source`` nor ``run``: it trains
    on the configured images and its preview reads held-out images itself)."""
    del source, run
    parts = build_parts(config, channels=int(data_stats.channels), resolution=int(data_stats.resolution))

    def host_batch(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        return {"image": np.asarray(batch["image"], np.float32)}

    if parts.stateful:
        task = Task(init_params=parts.init_params, loss_fn=parts.stateful_stage_loss, loss_takes_step=True,
                    init_model_state=parts.init_model_state)
    else:
        task = Task(init_params=parts.init_params, loss_fn=parts.stage_loss, loss_takes_step=True)

    preview = None
    num_preview = int((config.get("preview") or {}).get("num_images", 8))
    if num_preview > 0 and config.get("data") is not None:
        source = build_dataset(held_out_data_config(config.data))
        count = min(num_preview, len(source))
        images = np.stack([source[i]["image"] for i in range(count)]).astype(np.float32)
        preview = make_preview(parts, images)

    metadata = {
        "stage": "autoencoder",
        "kind": parts.kind,
        "latent_channels": int(parts.model.embed_dim if parts.kind == "vq" else parts.model.latent_channels),
        "downsample_factor": int(parts.model.downsample_factor),
        "gan": parts.discriminator is not None,
        "disc_start": int(parts.loss_config.disc_start),
        "perceptual": parts.lpips_params is not None,
    }
    return Stage(
        task=task,
        host_batch=host_batch,
        preview=preview,
        export=lambda params, directory: export_autoencoder(parts, params, directory),
        metadata=metadata,
    )
