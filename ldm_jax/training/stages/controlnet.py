"""The ControlNet stage: a ControlNet trained on a frozen base model (Zhang et al. 2023).

``build_stage(config, data_stats, *, source=None, run=None) -> Stage`` is what ``train.py``
calls for ``config.stage == "controlnet"``. The base (``config.controlnet.base``: an ldm_jax
model folder, e.g. the export of a diffusion run, or a diffusers Stable Diffusion folder) gives
the U-Net, first stage, conditioner, schedule and prediction type; all of it is frozen.

* Params (the TrainState, the optimizer and the EMA): ``{"controlnet": ...}`` only, initialised
  as diffusers' ``ControlNetModel.from_unet`` (:func:`ldm_jax.models.controlnet.controlnet_from_unet`)
  or from a diffusers ControlNet folder (``controlnet.init``).
* Frozen (``Task.frozen_params``, placed once, arguments of every compiled program — the state
  init that copies the U-Net's encoder, ``prepare_batch`` and the train step — never constants):
  ``{"unet", "first_stage", "conditioner"}``. The U-Net carries its logical axis names, so it is
  sharded by the same rules as trained params (FSDP over ``config.sharding``); the first stage
  and the conditioner are replicated.
* Data: each example needs ``control`` (float [H, W, C] in [0, 1] at the image size, e.g.
  ``data.shapes_control="mask"``); ``prepare_batch`` encodes the images to latents and the
  conditions (captions / labels, a fraction ``controlnet.drop_prob`` dropped to the null
  condition for guidance) with the frozen first stage and conditioner.
* Loss: the base's objective (prediction type, schedule) on
  ``ControlledUNet(unet, (controlnet,))``: the U-Net with the ControlNet's residuals.
* Preview: the one generation program (``ldm_jax.ldm.generation``) with the ControlNet, on the
  control images and conditions of the first ``preview.num_images`` training examples.
* Export: a diffusers ``ControlNetModel`` folder (``ControlNetModel.from_pretrained`` loads it;
  ``sample.py --controlnet DIR`` runs it), written atomically by ``train.py``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.data import build_dataset
from ldm_jax.diffusion import diffusion_loss, make_schedule
from ldm_jax.interop.diffusers_controlnet import load_diffusers_controlnet, save_diffusers_controlnet
from ldm_jax.kernels.conv import CONV_IMPL_NAMES
from ldm_jax.ldm.conditioning import Unconditional
from ldm_jax.ldm.first_stage import PixelSpace, box_like
from ldm_jax.ldm.generation import Program, generate
from ldm_jax.ldm.sections import WEIGHTINGS, choice, merge_section
from ldm_jax.models.controlnet import ControlledUNet, ControlNet, controlnet_from_unet
from ldm_jax.pipeline.loading import read_model_folder
from ldm_jax.pipeline.pipeline import schedule_config_of
from ldm_jax.training.context import start_run
from ldm_jax.training.loop import Task
from ldm_jax.training.stages.base import Stage
from ldm_jax.training.stages.sections import controlnet_defaults, controlnet_preview_defaults

log = logging.getLogger(__name__)

# SD's conditioning embedding widths (diffusers' default); the first log2(f) + 1 are used.
SD_EMBEDDING_CHANNELS = (16, 32, 96, 256)


def embedding_channels(factor: int, requested=()) -> tuple[int, ...]:
    """Conditioning-embedding widths whose downsampling (2 ** (len - 1)) is ``factor``."""
    if requested:
        return tuple(int(c) for c in requested)
    steps = int(round(math.log2(factor)))
    if 2**steps != factor:
        raise ValueError(f"first-stage factor {factor} is not a power of two")
    widths = SD_EMBEDDING_CHANNELS + (SD_EMBEDDING_CHANNELS[-1],) * max(0, steps + 1 - len(SD_EMBEDDING_CHANNELS))
    return widths[: steps + 1]


@dataclasses.dataclass(frozen=True)
class ControlNetBase:
    """The frozen base model of a ControlNet run, read from a model folder."""

    unet: Any
    unet_params: Any
    first_stage: Any
    first_stage_variables: Any
    conditioner: Any
    conditioner_params: Any
    schedule_config: Mapping[str, Any]
    prediction: str

    @classmethod
    def from_folder(cls, folder: str, drop_prob: float = 0.0) -> "ControlNetBase":
        kwargs = read_model_folder(folder)
        if kwargs.get("concat"):
            raise ValueError(
                f"{folder}: ControlNet training on a U-Net with concatenated channels ({kwargs['concat']}) "
                "is not supported"
            )
        unet = kwargs["unet"]
        conditioner = kwargs.get("conditioner") or Unconditional()
        if conditioner.has_null and drop_prob > 0:
            conditioner = dataclasses.replace(conditioner, drop_prob=float(drop_prob))
        return cls(
            unet=unet,
            unet_params=kwargs["unet_params"],
            first_stage=kwargs.get("first_stage") or PixelSpace(unet.in_channels),
            first_stage_variables=kwargs.get("first_stage_variables") or {},
            conditioner=conditioner,
            conditioner_params=kwargs.get("conditioner_params") or {},
            schedule_config=schedule_config_of(kwargs["schedule"]),
            prediction=kwargs["prediction"],
        )

    def frozen_params(self) -> dict:
        """``{"unet" (boxed: sharded by the logical rules), "first_stage", "conditioner"}``."""
        boxed = jax.eval_shape(lambda: self.unet.init(jax.random.PRNGKey(0), **self.unet.dummy_inputs(1)))["params"]
        return {
            "unet": box_like(boxed, nn.meta.unbox(self.unet_params)),
            "first_stage": self.first_stage_variables,
            "conditioner": self.conditioner_params,
        }


def _control_channels(source) -> int:
    example = source[0]
    if "control" not in example:
        raise ValueError(
            "config.data gives no control image per example (for shapes set data.shapes_control='mask' or 'edges')"
        )
    control = np.asarray(example["control"])
    if control.ndim != 3:
        raise ValueError(f"data control images must be [H, W, C], got shape {control.shape}")
    return int(control.shape[-1])


def build_stage(config: Any, data_stats: Any, *, source: Any = None, run: Any = None) -> Stage:
    """The ControlNet stage for ``config`` (see the module docstring)."""
    run = start_run(config) if run is None else run
    section = merge_section(controlnet_defaults(), config.get("controlnet"), "controlnet")
    preview = merge_section(controlnet_preview_defaults(), config.get("preview"), "preview")
    if not section.base:
        raise ValueError("config.controlnet.base is empty: give the frozen base model folder")
    weighting = choice("config.controlnet.weighting", section.weighting, WEIGHTINGS)
    conv_impl = choice("config.controlnet.conv_impl", section.conv_impl, CONV_IMPL_NAMES)
    base = ControlNetBase.from_folder(str(section.base), float(section.drop_prob))
    unet, fs, c = base.unet.clone(conv_impl=conv_impl), base.first_stage, base.conditioner
    source = build_dataset(config.data) if source is None else source
    channels = _control_channels(source)
    resolution = int(data_stats.resolution)
    if resolution % (fs.factor * unet.downsample_factor):
        raise ValueError(
            f"data resolution {resolution} is not divisible by the first stage's factor {fs.factor} times the "
            f"U-Net's downsampling {unet.downsample_factor}"
        )
    options = dict(
        conditioning_channels=channels,
        conditioning_embedding_out_channels=embedding_channels(fs.factor, section.conditioning_embedding_out_channels),
    )
    init_folder = str(section.init or "")
    if init_folder:
        controlnet, init_values = load_diffusers_controlnet(init_folder)
        controlnet = controlnet.clone(conv_impl=conv_impl)
        if controlnet.control_downsample_factor != fs.factor or controlnet.in_channels != unet.in_channels:
            raise ValueError(f"{init_folder}: the ControlNet does not fit the base U-Net / first stage")
    else:
        controlnet, init_values = ControlNet.from_unet(unet, **options), None
    boxed_cn = jax.eval_shape(lambda: controlnet.init(jax.random.PRNGKey(0), **controlnet.dummy_inputs()))["params"]
    denoiser = ControlledUNet(unet, (controlnet,))
    schedule_config = dict(base.schedule_config)
    prediction = base.prediction
    min_snr_gamma = float(section.min_snr_gamma)

    def init_params(key, frozen):
        if init_values is not None:
            values = jax.tree.map(jnp.asarray, init_values)
        else:
            # The copy of the U-Net's encoder reads the (placed) frozen U-Net: an argument of
            # the init program, not a constant in it.
            values = controlnet_from_unet(unet, frozen["unet"], key, **options)[1]
        return {"controlnet": box_like(boxed_cn, values)}

    def host_batch(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        out = {"image": np.asarray(batch["image"], np.float32), "control": np.asarray(batch["control"], np.float32)}
        if c.kind == "class":
            out.update(c.host_inputs(batch["label"]))
        elif c.kind == "text":
            out.update(c.host_inputs(batch["caption"]))
        return out

    def prepare_batch(frozen, batch, key):
        noise_key, drop_key = jax.random.split(key)
        raw = fs.encode_raw(frozen["first_stage"], batch["image"])
        latents = fs.to_diffusion(fs.unscaled_latents(raw, noise_key, True)).astype(jnp.float32)
        cond = {k: batch[k] for k in c.input_keys if k in batch}
        cond = c.drop(cond, drop_key)
        return {"latents": latents, "control": batch["control"], **c.encode(frozen["conditioner"], cond)}

    def loss_fn(params, batch, key, frozen):
        loss_key, dropout_key = jax.random.split(key)
        cond_kwargs = {k: v for k, v in batch.items() if k not in ("latents", "control")}
        variables = {"params": {"unet": frozen["unet"], "controlnets": (params["controlnet"],)}}

        def model_fn(x, t):
            return denoiser.apply(
                variables, x, t, train=True, control=((batch["control"], 1.0),), rngs={"dropout": dropout_key},
                **cond_kwargs,
            )

        loss = diffusion_loss(
            make_schedule(**schedule_config), model_fn, batch["latents"], loss_key,
            prediction=prediction, weighting=weighting, min_snr_gamma=min_snr_gamma,
        )
        return loss, {"latent_std": jnp.std(batch["latents"])}

    task = Task(
        init_params=init_params,
        loss_fn=loss_fn,
        frozen_params=base.frozen_params(),
        prepare_batch=prepare_batch,
        loss_takes_frozen=True,
        init_takes_frozen=True,
    )

    preview_fn, rows = make_preview_fn(base, denoiser, preview, source, resolution, run)

    def export(params, directory):
        save_diffusers_controlnet(directory, controlnet, nn.meta.unbox(params["controlnet"]))

    metadata = {"stage": "controlnet", "base": str(section.base), "control_channels": channels}
    log.info(
        "controlnet stage: base %s, control %d channel(s) at %dx the latents, %d trainable params",
        section.base, channels, controlnet.control_downsample_factor,
        sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(boxed_cn))),
    )
    return Stage(
        task=task, host_batch=host_batch, preview=preview_fn, export=export, metadata=metadata,
        preview_columns=int(preview.columns) or 0, preview_rows=tuple(rows), model=denoiser,
    )


def make_preview_fn(base: ControlNetBase, denoiser: ControlledUNet, preview: Any, source: Any, resolution: int, run):
    """``preview(ema_params, key) -> uint8 [N, H, W, C]``: the generation program with the
    ControlNet (its EMA params, the frozen params and the inputs are jit arguments) on the
    control images and conditions of training examples ``0 .. num_images - 1``."""
    c, fs = base.conditioner, base.first_stage
    n = int(preview.num_images)
    examples = [source[i] for i in range(n)]
    control = np.stack([np.asarray(e["control"], np.float32) for e in examples])
    if c.kind == "class":
        cond = c.host_inputs([int(e["label"]) for e in examples])
    elif c.kind == "text":
        cond = c.host_inputs([str(e["caption"]) for e in examples])
    else:
        cond = {}
    guidance = float(preview.guidance_scale)
    use_cfg = c.has_null and guidance != 1.0
    uncond = c.null_host_inputs(n) if use_cfg else None
    size = resolution // fs.factor
    program = Program(
        mode="text2img", latent_shape=(size, size, fs.latent_channels), sampler=preview.sampler,
        num_steps=int(preview.num_steps), options=(("prediction", base.prediction),), use_cfg=use_cfg,
    )
    frozen_placed, _ = run.place_replicated({
        "unet": nn.meta.unbox(base.unet_params), "first_stage": base.first_stage_variables,
        "conditioner": base.conditioner_params,
    })
    schedule_config = dict(base.schedule_config)

    @functools.partial(jax.jit, out_shardings=run.replicated)
    def generate_fn(params, frozen, cond, uncond, control, scale, key):
        generation_params = {
            "unet": {"unet": frozen["unet"], "controlnets": (params["controlnet"],)},
            "first_stage": frozen["first_stage"],
            "conditioner": frozen["conditioner"],
        }
        inputs = {"index": jnp.arange(n), "cond": cond, "control": ((control, scale),)}
        if use_cfg:
            inputs["uncond"] = uncond
        images, _ = generate(
            program, denoiser, fs, c, generation_params, make_schedule(**schedule_config), inputs, key, guidance,
        )
        return images

    inputs = jax.tree.map(jnp.asarray, (cond, uncond, control, np.full((n,), float(preview.controlnet_scale), np.float32)))

    def preview_fn(params, key):
        images = generate_fn(params, frozen_placed, *inputs, key)
        return np.round(np.asarray(jax.device_get(images)) * 255.0).astype(np.uint8)

    return preview_fn, [str(e.get("caption", "")) for e in examples]
