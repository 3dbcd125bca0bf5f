"""Request validation of :class:`~ldm_jax.pipeline.pipeline.LatentDiffusionPipeline`: the
arguments of one ``pipe(...)`` call -> a static :class:`~ldm_jax.ldm.generation.Program` and
host-side inputs, or one ValueError line naming the offending value (before anything runs).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import numpy as np

from ldm_jax.diffusion.editing import img2img_start_step
from ldm_jax.diffusion.guidance import check_guidance_interval
from ldm_jax.diffusion.samplers import SAMPLERS, resolve_sampler
from ldm_jax.ldm.generation import Program
from ldm_jax.pipeline.sdxl import SDXL_OPTIONS, sdxl_host_inputs

OUTPUT_TYPES = ("uint8", "float", "latent")
ENCODE_MODES = ("sample", "mean")


class Request(NamedTuple):
    """A validated generation request: the static program and the host-side inputs."""

    program: Program
    inputs: dict
    num_images: int
    seed: int
    guidance_scale: float
    guidance_rescale: float
    pad_batch_to: int | None
    output_type: str
    return_latents: bool


def _as_list(value, name: str) -> list | None:
    if value is None:
        return None
    if isinstance(value, (str, int, np.integer)):
        return [value]
    value = list(value)
    if not value:
        raise ValueError(f"{name} is empty")
    return value


def _broadcast(values: list, n: int, name: str) -> list:
    if len(values) == n:
        return values
    if len(values) == 1:
        return values * n
    raise ValueError(f"{name} has {len(values)} entries, expected 1 or num_images={n}")


def image_array(image, name: str, n: int, channels: int) -> np.ndarray:
    """uint8 [0, 255] or float [0, 1] image(s) [H, W, C] / [N, H, W, C] (or PIL) -> float32
    [n, H, W, C] in [-1, 1]."""
    array = np.asarray(image)
    if array.ndim == 2 and channels == 1:
        array = array[..., None]
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != channels:
        raise ValueError(f"{name} must be [H, W, {channels}] or [N, H, W, {channels}], got shape {array.shape}")
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise ValueError(f"float {name} must lie in [0, 1], got range [{array.min()}, {array.max()}]")
    else:
        raise ValueError(f"{name} must be uint8 or float in [0, 1], got dtype {array.dtype}")
    if array.shape[0] not in (1, n):
        raise ValueError(f"{name} holds {array.shape[0]} images, expected 1 or num_images={n}")
    return np.broadcast_to(2.0 * array - 1.0, (n,) + array.shape[1:])


def control_image_array(image, name: str, n: int, channels: int, height: int, width: int) -> np.ndarray:
    """A ControlNet control image as diffusers' ControlNet pipelines prepare it: uint8 or
    float [0, 1] [H, W(, C)] / [N, H, W, C] (or PIL) -> float32 [n, height, width, channels] in
    [0, 1] (not normalised to [-1, 1]); one channel is repeated to RGB, another size is resized
    with Lanczos (VaeImageProcessor's default resample; on the 8-bit values for uint8 input, as
    diffusers does for PIL images)."""
    from PIL import Image

    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3) or (array.shape[-1] == 3 and channels == 1):
        raise ValueError(f"{name} must be [H, W], [H, W, 1|{channels}] or [N, H, W, C], got shape {np.shape(image)}")
    if array.shape[0] not in (1, n):
        raise ValueError(f"{name} holds {array.shape[0]} images, expected 1 or num_images={n}")
    if array.dtype == np.uint8:
        if array.shape[1:3] != (height, width):  # 8-bit Lanczos, as diffusers resizes PIL images
            array = np.stack([
                np.stack([
                    np.asarray(Image.fromarray(im[..., c]).resize((width, height), Image.Resampling.LANCZOS))
                    for c in range(im.shape[-1])
                ], axis=-1)
                for im in array
            ])
        array = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise ValueError(f"float {name} must lie in [0, 1], got range [{array.min()}, {array.max()}]")
        if array.shape[1:3] != (height, width):
            array = np.stack([
                np.stack([
                    np.asarray(Image.fromarray(im[..., c], mode="F").resize((width, height), Image.Resampling.LANCZOS))
                    for c in range(im.shape[-1])
                ], axis=-1)
                for im in array
            ]).clip(0.0, 1.0)
    else:
        raise ValueError(f"{name} must be uint8 or float in [0, 1], got dtype {array.dtype}")
    if array.shape[-1] != channels:
        array = np.repeat(array, channels, axis=-1)
    return np.broadcast_to(array, (n, height, width, channels))


def control_inputs(controlnets, control_image, controlnet_scale, n: int, height: int, width: int) -> tuple:
    """``((image [n, H, W, C], scale [n]), ...)``, one per ControlNet: ``control_image`` is one
    image (one ControlNet) or a list with one per ControlNet; ``controlnet_scale`` a number or
    one per ControlNet."""
    k = len(controlnets)
    if control_image is None:
        raise ValueError(f"this pipeline runs {k} ControlNet(s): pass control_image")
    images = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
    if len(images) != k:
        raise ValueError(f"control_image holds {len(images)} entries for {k} ControlNet(s)")
    scales = list(controlnet_scale) if isinstance(controlnet_scale, (list, tuple)) else [controlnet_scale] * k
    if len(scales) != k:
        raise ValueError(f"controlnet_scale holds {len(scales)} entries for {k} ControlNet(s)")
    out = []
    for i, (cn, image, scale) in enumerate(zip(controlnets, images, scales)):
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)) or not math.isfinite(scale):
            raise ValueError(f"controlnet_scale must be finite numbers, got {scale!r}")
        array = control_image_array(image, f"control_image[{i}]", n, cn.conditioning_channels, height, width)
        out.append((array, np.full((n,), scale, np.float32)))
    return tuple(out)


def mask_array(mask, n: int) -> np.ndarray:
    """Repaint mask(s) [H, W], [H, W, 1], [N, H, W] or [N, H, W, 1]: bool, uint8 (>= 128 is
    repaint) or float in [0, 1] (>= 0.5 is repaint) -> float32 {0, 1} [n, H, W, 1]."""
    array = np.asarray(mask)
    if array.ndim == 2:
        array = array[None, ..., None]
    elif array.ndim == 3:
        array = array[..., None] if array.shape[-1] != 1 else array[None]
    if array.ndim != 4 or array.shape[-1] != 1:
        raise ValueError(f"mask must be [H, W], [H, W, 1], [N, H, W] or [N, H, W, 1], got shape {np.shape(mask)}")
    if array.dtype == np.uint8:
        array = array >= 128
    elif np.issubdtype(array.dtype, np.floating):
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise ValueError(f"float mask must lie in [0, 1], got range [{array.min()}, {array.max()}]")
        array = array >= 0.5
    elif array.dtype != bool:
        raise ValueError(f"mask must be bool, uint8 or float in [0, 1], got dtype {array.dtype}")
    if array.shape[0] not in (1, n):
        raise ValueError(f"mask holds {array.shape[0]} masks, expected 1 or num_images={n}")
    return np.broadcast_to(array.astype(np.float32), (n,) + array.shape[1:])


def prepare_request(
    pipe,
    prompts: str | Sequence[str] | None = None,
    *,
    class_labels: int | Sequence[int] | None = None,
    num_images: int | None = None,
    negative_prompt: str | Sequence[str] | None = None,
    sampler: str | None = None,
    num_steps: int = 50,
    guidance_scale: float = 7.5,
    guidance_rescale: float = 0.0,
    eta: float = 0.0,
    seed: int = 0,
    image_indices: Sequence[int] | None = None,
    height: int | None = None,
    width: int | None = None,
    init_image=None,
    strength: float | None = None,
    mask=None,
    low_res=None,
    latents=None,
    encode_mode: str = "sample",
    inpaint_jumps: tuple[int, int] = (1, 1),
    output_type: str = "uint8",
    return_latents: bool = False,
    pad_batch_to: int | None = None,
    denoising_end: float | None = None,
    denoising_start: float | None = None,
    init_latents=None,
    control_image=None,
    controlnet_scale=1.0,
    guess_mode: bool = False,
    guidance_interval: tuple[float, float] | None = None,
    **sampler_options,
) -> Request:
    """Validate the arguments of ``pipe(...)`` (:meth:`LatentDiffusionPipeline.__call__`) and
    build the host-side request."""
    fs = pipe.first_stage
    sdxl_options = {k: sampler_options.pop(k) for k in list(sampler_options) if k in SDXL_OPTIONS}
    if sdxl_options and pipe.conditioner.kind != "sdxl":
        raise ValueError(f"{sorted(sdxl_options)[0]} applies to SDXL models, not to a {pipe.conditioner.kind!r}-conditioned one")
    sampler = pipe.default_sampler if sampler is None else sampler
    conditions, n = _conditions(pipe, prompts, class_labels, num_images)
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"unknown output_type {output_type!r}; expected one of {OUTPUT_TYPES}")
    if encode_mode not in ENCODE_MODES:
        raise ValueError(f"unknown encode_mode {encode_mode!r}; expected one of {ENCODE_MODES}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
    if image_indices is None:
        indices = np.arange(n, dtype=np.int64)
    else:
        indices = np.asarray(image_indices)
        if indices.shape != (n,) or not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"image_indices must be {n} integers, got {image_indices!r}")
        if indices.size and (indices.min() < 0 or indices.max() >= 2**31):
            raise ValueError(f"image_indices must lie in [0, 2**31), got range [{indices.min()}, {indices.max()}]")
    if pad_batch_to is not None and (
        isinstance(pad_batch_to, bool) or not isinstance(pad_batch_to, (int, np.integer)) or pad_batch_to < 1
    ):
        raise ValueError(f"pad_batch_to must be a positive integer or None, got {pad_batch_to!r}")
    for name, value in (("guidance_scale", guidance_scale), ("guidance_rescale", guidance_rescale)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")

    inputs: dict[str, Any] = {"index": indices.astype(np.int32)}
    image = None
    if init_image is not None:
        image = image_array(init_image, "init_image", n, fs.image_channels)
        size = image.shape[1:3]
        if (height is not None and height != size[0]) or (width is not None and width != size[1]):
            raise ValueError(f"init_image size {size[0]}x{size[1]} does not match height={height}, width={width}")
        height, width = size
    if init_latents is not None and image is None and np.ndim(init_latents) in (3, 4):
        # a refiner continues latents: the output size is theirs
        h, w = np.shape(init_latents)[-3:-1]
        height = h * fs.factor if height is None else height
        width = w * fs.factor if width is None else width
    if height is None or width is None:
        default = pipe.default_size
        if default is None:
            raise ValueError("height and width are required (the U-Net config has no sample_size)")
        height = default[0] if height is None else height
        width = default[1] if width is None else width
    pipe.check_size(height, width)
    latent_shape = (height // fs.factor, width // fs.factor, fs.latent_channels)

    mode, strength = _mode(pipe, image is not None, mask is not None, strength)
    if denoising_start is not None:
        if mode != "text2img" or strength is not None:
            raise ValueError("denoising_start continues init_latents; it does not take init_image, mask or strength")
        if init_latents is None:
            raise ValueError("denoising_start needs init_latents (the latents a denoising_end run returned)")
        mode = "resume"
        z = np.asarray(init_latents, np.float32)
        z = z[None] if z.ndim == 3 else z
        if z.shape[1:] != latent_shape or z.shape[0] not in (1, n):
            raise ValueError(f"init_latents shape {np.shape(init_latents)} does not match {(n,) + latent_shape}")
        if not np.all(np.isfinite(z)):
            raise ValueError("init_latents holds non-finite values")
        inputs["init_latents"] = np.broadcast_to(z, (n,) + latent_shape)
    elif init_latents is not None:
        raise ValueError("init_latents are continued with denoising_start; pass it too")
    if image is not None:
        inputs["image"] = image
    if mask is not None:
        masks = mask_array(mask, n)
        if masks.shape[1:3] != (height, width):
            raise ValueError(
                f"mask size {masks.shape[1]}x{masks.shape[2]} does not match the image size {height}x{width}"
            )
        inputs["mask"] = masks
    if pipe.concat == "low_res":
        if low_res is None:
            raise ValueError("this model is low-res conditioned: pass low_res")
        inputs["low_res"] = image_array(low_res, "low_res", n, pipe.low_res_channels)
    elif low_res is not None:
        raise ValueError("low_res given but the model is not low-res conditioned (concat != 'low_res')")
    if latents is not None:
        if mode not in ("text2img", "inpaint_replace") and not (mode == "inpaint_concat" and strength == 1.0):
            raise ValueError("latents (initial noise) apply to generation from pure noise, not to img2img")
        x_T = np.asarray(latents, np.float32)
        x_T = x_T[None] if x_T.ndim == 3 else x_T
        if x_T.shape != (n,) + latent_shape:
            raise ValueError(f"latents shape {x_T.shape} does not match {(n,) + latent_shape}")
        inputs["x_T"] = x_T

    controlnets = getattr(pipe.unet, "controlnets", None)
    if not isinstance(guess_mode, (bool, np.bool_)):
        raise ValueError(f"guess_mode must be True or False, got {guess_mode!r}")
    if controlnets:
        inputs["control"] = control_inputs(controlnets, control_image, controlnet_scale, n, height, width)
        # as diffusers: a global-pooling ControlNet (shuffle) always runs in guess mode
        guess_mode = bool(guess_mode) or any(cn.global_pool_conditions for cn in controlnets)
    elif control_image is not None:
        raise ValueError("control_image given but the pipeline has no ControlNet (pipe.with_controlnets)")
    elif guess_mode:
        raise ValueError("guess_mode applies to ControlNets; this pipeline has none (pipe.with_controlnets)")

    use_cfg = pipe.conditioner.has_null and float(guidance_scale) != 1.0
    if negative_prompt is not None and not use_cfg:
        raise ValueError("negative_prompt needs classifier-free guidance (guidance_scale != 1)")
    if guidance_interval is not None:
        guidance_interval = check_guidance_interval(guidance_interval)
        if not use_cfg:
            raise ValueError("guidance_interval needs classifier-free guidance (guidance_scale != 1)")
    negatives = _as_list(negative_prompt, "negative_prompt") if use_cfg else None
    negatives = None if negatives is None else _broadcast(negatives, n, "negative_prompt")
    if pipe.conditioner.kind == "sdxl":
        inputs["cond"], uncond = sdxl_host_inputs(
            pipe.conditioner, conditions, negatives, n, use_cfg, (height, width), mode, sdxl_options
        )
        if use_cfg:
            inputs["uncond"] = uncond
    else:
        inputs["cond"] = pipe.conditioner.host_inputs(conditions) if conditions is not None else {}
        if use_cfg:
            inputs["uncond"] = pipe.conditioner.null_host_inputs(n, negatives)

    options = _sampler_options(pipe, sampler, num_steps, eta, sampler_options)
    jump_length, jump_n_sample = _jumps(inpaint_jumps, mode, sampler)
    start_step, stop_step = denoising_range(
        pipe, sampler, int(num_steps), options, mode, strength, denoising_start, denoising_end
    )
    program = Program(
        mode=mode,
        latent_shape=latent_shape,
        sampler=sampler,
        num_steps=int(num_steps),
        options=options,
        strength=strength,
        use_cfg=use_cfg,
        encode_noise=encode_mode == "sample" and fs.kind == "kl",
        jumps=(jump_length, jump_n_sample),
        batch_invariant=pipe.batch_invariant,
        start_step=start_step,
        stop_step=stop_step,
        decode=output_type != "latent",
        guess_mode=bool(guess_mode),
        guidance_interval=guidance_interval,
    )
    return Request(
        program, inputs, n, seed, float(guidance_scale), float(guidance_rescale), pad_batch_to, output_type,
        bool(return_latents),
    )

def _conditions(pipe, prompts, class_labels, num_images):
    """(per-image conditions or None, number of images)."""
    if num_images is not None and (
        isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1
    ):
        raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
    kind = pipe.conditioner.kind
    prompts = _as_list(prompts, "prompts")
    labels = _as_list(class_labels, "class_labels")
    if kind in ("text", "sdxl"):
        if labels is not None:
            raise ValueError("class_labels given to a text-conditioned model")
        if prompts is None:
            raise ValueError("this model is text-conditioned: pass prompts")
        values, name = prompts, "prompts"
    elif kind == "class":
        if prompts is not None:
            raise ValueError("prompts given to a class-conditional model")
        if labels is None:
            raise ValueError("this model is class-conditional: pass class_labels")
        values, name = labels, "class_labels"
    else:
        if prompts is not None or labels is not None:
            raise ValueError("prompts/class_labels given to an unconditional model")
        return None, int(num_images or 1)
    n = int(num_images or len(values))
    return _broadcast(values, n, name), n

def _mode(pipe, has_image: bool, has_mask: bool, strength):
    """(mode, strength) for the given inputs; ValueError for inconsistent ones."""
    if strength is not None and (
        isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating)) or not 0 <= strength <= 1
    ):
        raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
    if has_mask and not has_image:
        raise ValueError("mask given without init_image")
    if pipe.concat == "inpainting" and not has_mask:
        raise ValueError("this is an inpainting model: pass init_image and mask")
    if has_mask:
        strength = 1.0 if strength is None else float(strength)
        if pipe.concat == "inpainting":
            return "inpaint_concat", strength
        if strength != 1.0:
            raise ValueError(
                f"strength={strength} is not supported by known-region inpainting (this U-Net has no mask channels)"
            )
        return "inpaint_replace", strength
    if has_image:
        return "img2img", 0.8 if strength is None else float(strength)
    if strength is not None:
        raise ValueError("strength applies to img2img / inpainting: pass init_image")
    return "text2img", None

def _jumps(inpaint_jumps, mode: str, sampler: str) -> tuple[int, int]:
    """(jump_length, jump_n_sample), checked: RePaint resampling applies to known-region
    inpainting with a one-step sampler."""
    values = tuple(inpaint_jumps) if isinstance(inpaint_jumps, (tuple, list)) else ()
    if len(values) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in values):
        raise ValueError(f"inpaint_jumps must be two positive integers (jump_length, jump_n_sample), got {inpaint_jumps!r}")
    jump_length, jump_n_sample = (int(v) for v in values)
    if jump_n_sample > 1:
        if mode != "inpaint_replace":
            raise ValueError("inpaint_jumps resampling applies to known-region inpainting (init_image and mask)")
        if not SAMPLERS[sampler].memoryless:
            raise ValueError(f"inpaint_jumps resampling needs a one-step sampler, not {sampler!r}")
    return jump_length, jump_n_sample


def _sampler_options(pipe, sampler: str, num_steps: int, eta: float, overrides: dict) -> tuple:
    """The sampler's keyword options: model defaults it supports, then the caller's
    (validated now, with the driver's own messages, rather than inside ``jit``)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
    spec = SAMPLERS[sampler]
    options: dict[str, Any] = {"prediction": pipe.prediction}
    for name, value in pipe.sampler_defaults.items():
        if name in ("spacing", "steps_offset", "threshold_max", "threshold_percentile"):
            options[name] = value
        elif name in spec.options:
            options[name] = value
    if pipe.learned_variance:
        options["variance"] = "learned"
    options["eta"] = float(eta)
    options.update(overrides)
    # The schedule itself (not its timestep count): a sampler of the other objective is refused
    # in one line naming it and the valid ones.
    resolve_sampler(sampler, pipe.schedule, num_steps=num_steps, **options)
    return tuple(sorted(options.items()))

# ------------------------------------------------------------------ execution


def _fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) or not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def denoising_range(
    pipe, sampler: str, num_steps: int, options: tuple, mode: str, strength, denoising_start, denoising_end
):
    """``(start_step, stop_step)`` of a run cut by diffusers' ``denoising_start`` /
    ``denoising_end`` (None, None when neither is given).

    As diffusers' SDXL pipelines, on the run's own timesteps t (one per step) and T training
    timesteps: ``denoising_end`` keeps the steps with ``t >= round(T - denoising_end T)`` (of
    the steps img2img's strength leaves); ``denoising_start`` runs the last
    ``#{t < round(T - denoising_start T)}`` steps.
    """
    if denoising_start is None and denoising_end is None:
        return None, None
    start = _fraction(denoising_start, "denoising_start") if denoising_start is not None else None
    end = _fraction(denoising_end, "denoising_end") if denoising_end is not None else None
    if start is not None and end is not None and start >= end:
        raise ValueError(f"denoising_start={start} must be below denoising_end={end}")
    if mode in ("inpaint_concat", "inpaint_replace"):
        raise ValueError("denoising_start / denoising_end apply to text2img, img2img and refinement, not inpainting")
    spec, cfg = resolve_sampler(sampler, pipe.schedule, num_steps=num_steps, **dict(options))
    timesteps = np.asarray(spec.plan(pipe.schedule, cfg, 0).t, np.float64)
    if timesteps.shape[0] != cfg.num_steps:
        raise ValueError(f"denoising_start / denoising_end need a sampler with one model evaluation per step, not {sampler!r}")
    total = int(pipe.schedule.num_timesteps)
    first = 0
    if start is not None:
        count = int(np.sum(timesteps < int(round(total - start * total))))
        if count == 0:
            raise ValueError(f"denoising_start={start} leaves no step of {cfg.num_steps} to run")
        first = cfg.num_steps - count
    elif mode == "img2img":
        first = img2img_start_step(cfg.num_steps, strength)
    stop = None
    if end is not None:
        stop = first + int(np.sum(timesteps[first:] >= int(round(total - end * total))))
        if stop == first:
            raise ValueError(f"denoising_end={end} leaves no step of {cfg.num_steps} to run")
    return (first if start is not None else None), stop
