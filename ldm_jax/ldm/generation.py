"""The one generation program: conditions -> reverse process -> decoded images.

:func:`generate` is what training previews (``ldm_jax.training.stages.diffusion``) and
:class:`ldm_jax.pipeline.LatentDiffusionPipeline` both run inside their own ``jit`` (the
pipeline shards it over devices and maps it over images; a preview runs it on one batch).
It covers text / class / unconditional sampling with classifier-free guidance, img2img,
concat inpainting, known-region inpainting (RePaint jumps) and low-res conditioning.

What is static lives in :class:`Program` (a jit cache key); the caller decides which
arguments are traced. Randomness: image ``inputs["index"][i]`` draws everything from
``fold_in(key, index)`` streams, so an image does not depend on the batch it is in.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.editing import img2img, img2img_start_step, inpaint, sample_range
from ldm_jax.diffusion.guidance import cfg_model_fn
from ldm_jax.diffusion.samplers import per_example_normal, sample, stream_key
from ldm_jax.ldm.conditioning import latent_mask, low_res_condition, masked_image

# Noise streams of generation, beside the samplers' streams 0-3 (ldm_jax.diffusion.samplers.noise).
STREAM_ENCODE = 16  # posterior sample of the init image's latents
STREAM_ENCODE_MASKED = 17  # posterior sample of the masked image's latents (inpainting U-Nets)
STREAM_RESUME = 18  # key of a resumed run (denoising_start), so its step noise is not the first run's
_CONCAT = "concat"  # key of the extra input channels in the conditioning pytree
MODES = ("text2img", "img2img", "inpaint_concat", "inpaint_replace", "resume")


@dataclasses.dataclass(frozen=True)
class Program:
    """Everything static about one generation program (the jit cache key, with the shapes).

    options: sorted ``(name, value)`` sampler options (``prediction`` among them).
    use_cfg: classifier-free guidance (``inputs["uncond"]`` is given).
    encode_noise: sample the posterior when encoding images (KL first stages).
    jumps: RePaint ``(jump_length, jump_n_sample)`` for known-region inpainting.
    batch_invariant: the pipeline maps the program over single images (see its docstring).
    start_step / stop_step: run only sampling steps [start_step, stop_step) (diffusers'
      ``denoising_start`` / ``denoising_end``; mode "resume" continues ``inputs["init_latents"]``,
      a VP state at the level of ``start_step``; ``stop_step`` applies to text2img and img2img too).
    decode: decode the final latents (False: ``images`` is None, e.g. a base -> refiner hand-off).
    guidance_interval: guide only at timesteps in ``[t_low, t_high]`` (``cfg_model_fn``).
    guess_mode: ControlNet guess mode (diffusers' ``guess_mode=True``): residuals ramped per
      block, and with guidance only the conditional branch is controlled.
    """

    mode: str
    latent_shape: tuple[int, int, int]
    sampler: str
    num_steps: int
    options: tuple
    strength: float | None = None
    use_cfg: bool = False
    encode_noise: bool = False
    jumps: tuple[int, int] = (1, 1)
    batch_invariant: bool = False
    start_step: int | None = None
    stop_step: int | None = None
    decode: bool = True
    guess_mode: bool = False
    guidance_interval: tuple[float, float] | None = None


def generate(
    program: Program,
    unet,
    first_stage,
    conditioner,
    params: Any,
    schedule,
    inputs: dict,
    key: jax.Array,
    guidance_scale=1.0,
    guidance_rescale=0.0,
):
    """Images [b, H, W, C] in [0, 1] (float32) and final latents [b, h, w, c].

    params: ``{"unet", "first_stage", "conditioner"}`` (unboxed). inputs: ``index`` int [b]
    (image indices), ``cond`` (and with ``use_cfg`` ``uncond``) conditioner host inputs,
    optionally ``image`` / ``mask`` / ``low_res`` / ``x_T`` / ``init_latents`` (mode "resume"),
    and ``control``: ControlNet
    inputs ``((image [b, H, W, C] in [0, 1], scale [b]), ...)`` for a
    :class:`~ldm_jax.models.controlnet.ControlledUNet` ``unet`` (then ``params["unet"]`` is
    ``{"unet", "controlnets"}``).
    """
    indices = inputs["index"]
    batch = indices.shape[0]
    fs = first_stage
    fs_vars = params["first_stage"]
    latent_shape = program.latent_shape
    # (a DiT's out_channels None means in_channels)
    learned_variance = getattr(unet, "output_channels", unet.out_channels) == 2 * fs.latent_channels

    def encode(images, stream):
        noise = None
        if program.encode_noise:
            noise = per_example_normal(stream_key(key, stream), indices, latent_shape)
        return fs.encode(fs_vars, images, noise)

    cond = conditioner.encode(params["conditioner"], inputs["cond"])
    uncond = conditioner.encode(params["conditioner"], inputs["uncond"]) if program.use_cfg else None
    init = encode(inputs["image"], STREAM_ENCODE) if "image" in inputs else None
    extra = []
    if program.mode == "inpaint_concat":
        extra.append(latent_mask(inputs["mask"], fs.factor, "nearest"))
        extra.append(encode(masked_image(inputs["image"], inputs["mask"]), STREAM_ENCODE_MASKED))
    if "low_res" in inputs:
        extra.append(low_res_condition(inputs["low_res"], latent_shape[:2]))
    if extra:
        # The same extra channels go to both guidance branches (as diffusers does).
        channels = jnp.concatenate(extra, axis=-1)
        cond = {**cond, _CONCAT: channels}
        uncond = None if uncond is None else {**uncond, _CONCAT: channels}

    unet_kwargs = {}
    if "control" in inputs:
        # ControlNet inputs go to both guidance branches, as diffusers duplicates the control
        # image; ControlledUNet.apply takes them as ``control``. In guess mode diffusers runs the
        # ControlNets on the conditional branch only and gives the unconditional one zero
        # residuals: here both branches run them (one batched call) with the unconditional
        # scales set to 0, which gives the same zeros.
        control = inputs["control"]
        cond = {**cond, "control": control}
        if uncond is not None:
            if program.guess_mode:
                control = tuple((image, jnp.zeros_like(scale)) for image, scale in control)
            uncond = {**uncond, "control": control}
        if program.guess_mode:
            unet_kwargs["guess_mode"] = True

    unet_variables = {"params": params["unet"]}

    def model_fn(x, t, conditioning):
        conditioning = dict(conditioning)
        channels = conditioning.pop(_CONCAT, None)
        if channels is not None:
            x = jnp.concatenate([x, channels.astype(x.dtype)], axis=-1)
        return unet.apply(unet_variables, x, t, **conditioning, **unet_kwargs)

    if program.use_cfg:
        model = cfg_model_fn(
            model_fn,
            cond,
            uncond,
            guidance_scale,
            guidance_rescale,
            guided_channels=latent_shape[-1] if learned_variance else None,
            guidance_interval=program.guidance_interval,
        )
    else:
        model = lambda x, t: model_fn(x, t, cond)  # noqa: E731

    common = dict(sampler=program.sampler, num_steps=program.num_steps, example_indices=indices, **dict(program.options))
    if program.mode == "resume":
        latents = sample_range(
            model, schedule, inputs["init_latents"], jax.random.fold_in(key, STREAM_RESUME),
            start_step=program.start_step, stop_step=program.stop_step, init="state", **common,
        )
    elif program.stop_step is not None and program.mode == "text2img":
        latents = sample_range(
            model, schedule, inputs.get("x_T"), key, shape=(batch, *latent_shape), stop_step=program.stop_step, **common
        )
    elif program.stop_step is not None and program.mode == "img2img":
        start = img2img_start_step(program.num_steps, program.strength)
        latents = sample_range(model, schedule, init, key, start_step=start, stop_step=program.stop_step, init="data",
                               **common)
    elif program.mode == "img2img" or (program.mode == "inpaint_concat" and program.strength < 1.0):
        latents = img2img(model, schedule, init, key, strength=program.strength, **common)
    elif program.mode == "inpaint_replace":
        known = 1.0 - latent_mask(inputs["mask"], fs.factor, "max")
        jump_length, jump_n_sample = program.jumps
        latents = inpaint(
            model, schedule, init, known, key, x_T=inputs.get("x_T"),
            jump_length=jump_length, jump_n_sample=jump_n_sample, **common,
        )
    else:
        latents = sample(model, schedule, (batch, *latent_shape), key, x_T=inputs.get("x_T"), **common)
    if not program.decode:
        return None, latents
    images = fs.decode(fs_vars, latents).astype(jnp.float32)
    return jnp.clip((images + 1.0) / 2.0, 0.0, 1.0), latents
