"""``LatentDiffusionPipeline``: text-, class- or un-conditioned generation, img2img,
inpainting and low-res-conditioned super-resolution as ONE jitted program per shape.

What one call compiles (and caches, keyed by the static options and shapes): conditioning
encoding (e.g. the CLIP text tower), optional first-stage encoding of an init image, the whole
reverse process as one ``lax.scan`` (:mod:`ldm_jax.diffusion.samplers`), and decoding. The
guidance scale, guidance rescale and seed are traced arguments: changing them does not
recompile. Sampler, number of steps, strength, sizes and batch size are static.

Devices: the batch is split over a 1-D mesh of all devices (``jax.devices()``: every host's
devices when ``jax.distributed`` is initialised) with ``shard_map``; parameters are
replicated. A batch that does not fill the devices is padded and the padding trimmed.

Reproducibility: image ``i`` (its *image index*, ``image_indices[i]``, default ``i``) draws all
of its randomness (initial noise, per-step noise, posterior samples) from
``fold_in(key(seed), image index)`` streams. With ``batch_invariant=True`` (the default) each
device also computes its images one at a time (a ``lax.map`` over its share of the batch), so
every array an image passes through has the same shape whatever the batch size or device
count, and the image is bit-identical across both. (XLA's matrix kernels pick their blocking,
hence their summation order, from the shapes: a batched run differs in the last bits, ~1e-6.)
``batch_invariant=False`` runs each device's share as one batch: faster on accelerators,
reproducible to the seed only for a fixed batch size and device count. Bit-identity holds for
one platform and JAX/XLA version (tested on CPU with 1, 2 and 8 devices); a different backend
or compiler may round differently.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
import os
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ldm_jax.diffusion.editing import img2img, inpaint
from ldm_jax.diffusion.guidance import cfg_model_fn
from ldm_jax.diffusion.samplers import SAMPLERS, per_example_normal, resolve_sampler, sample, stream_key
from ldm_jax.diffusion.schedules import Schedule, make_schedule
from ldm_jax.models.unet import UNet
from ldm_jax.pipeline.components import (
    CONCAT_KINDS,
    ClassConditioner,
    PixelSpace,
    TextConditioner,
    Unconditional,
    latent_mask,
    low_res_condition,
    masked_image,
)

BATCH_AXIS = "batch"
# Noise streams of the pipeline, beside the samplers' streams 0-3 (ldm_jax.diffusion.samplers.noise).
STREAM_ENCODE = 16  # posterior sample of the init image's latents
STREAM_ENCODE_MASKED = 17  # posterior sample of the masked image's latents (inpainting U-Nets)
_CONCAT = "concat"  # key of the extra input channels in the conditioning pytree
OUTPUT_TYPES = ("uint8", "float")
ENCODE_MODES = ("sample", "mean")
SCHEDULE_KEYS = ("kind", "num_timesteps", "beta_start", "beta_end", "betas", "rescale_to_zero_terminal_snr")


@dataclasses.dataclass(frozen=True)
class _Program:
    """Everything static about one generation program (the jit cache key, with the shapes)."""

    mode: str  # "text2img" | "img2img" | "inpaint_concat" | "inpaint_replace"
    latent_shape: tuple[int, int, int]
    sampler: str
    num_steps: int
    options: tuple  # sorted (name, value) sampler options
    strength: float | None
    use_cfg: bool
    encode_noise: bool
    jumps: tuple[int, int]
    batch_invariant: bool


class _Request(NamedTuple):
    """A validated generation request: the static program and the host-side inputs."""

    program: _Program
    inputs: dict
    num_images: int
    seed: int
    guidance_scale: float
    guidance_rescale: float
    pad_batch_to: int | None
    output_type: str
    return_latents: bool


def schedule_config_of(schedule: dict | Schedule) -> dict:
    """A checked ``make_schedule`` keyword dict. A :class:`Schedule` is stored by its
    (float32) betas; prefer the dict form, which rebuilds the float64 schedule exactly."""
    if isinstance(schedule, Schedule):
        return {"betas": [float(b) for b in np.asarray(schedule.betas, np.float64)]}
    unknown = set(schedule) - set(SCHEDULE_KEYS)
    if unknown:
        raise ValueError(f"unknown schedule config keys {sorted(unknown)}; expected a subset of {SCHEDULE_KEYS}")
    config = dict(schedule)
    make_schedule(**config)  # raises ValueError naming a bad value
    return config


def params_fingerprint(tree) -> str:
    """sha256 (first 16 hex digits) of a parameter pytree: paths, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        value = np.asarray(jax.device_get(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape};".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()[:16]


def map_opaque_count(fn, xs):
    """``lax.map(fn, xs)`` compiled so that ``fn``'s body sees the same program whatever the
    number of rows.

    XLA simplifies a loop that runs once (inlining it) and a dynamic slice of an axis of size
    1 (to a loop-invariant reshape, which it then hoists and fuses with its surroundings);
    either changes the last bits of the result, so a device holding one image would not
    reproduce that image's bits from a device holding two. Here the trip count is hidden
    behind an optimisation barrier and the sliced and updated arrays carry one spare row.
    """
    count = jax.tree.leaves(xs)[0].shape[0]
    spare = jax.tree.map(lambda a: jnp.concatenate([a, a[:1]]), xs)
    out_shapes = jax.eval_shape(fn, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), xs))
    outs = jax.tree.map(lambda s: jnp.zeros((count + 1, *s.shape), s.dtype), out_shapes)

    def body(i, outs):
        example = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), spare)
        return jax.tree.map(lambda buf, y: jax.lax.dynamic_update_index_in_dim(buf, y, i, 0), outs, fn(example))

    opaque_count = jax.lax.optimization_barrier(jnp.int32(count))
    return jax.tree.map(lambda a: a[:count], jax.lax.fori_loop(0, opaque_count, body, outs))


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


def _image_array(image, name: str, n: int, channels: int) -> np.ndarray:
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


def _mask_array(mask, n: int) -> np.ndarray:
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


class LatentDiffusionPipeline:
    """A U-Net, a first stage, a conditioner and a noise schedule, ready to generate.

    Build with :meth:`from_pretrained` (a local diffusers Stable Diffusion folder or an
    ldm_jax model folder, see :mod:`ldm_jax.pipeline.loading`) or :meth:`from_components`;
    generate by calling the pipeline (see :meth:`__call__`).

    Attributes:
      unet, first_stage, conditioner: the modules and adapters (see
        :mod:`ldm_jax.pipeline.components`).
      params: ``{"unet": ..., "first_stage": ..., "conditioner": ...}`` (unboxed arrays;
        ``first_stage`` holds the autoencoder's full variables ``{"params": ...}``).
      schedule_config: ``make_schedule`` keyword arguments; ``schedule`` the built Schedule.
      prediction: "eps", "v" or "x0".
      concat: None, "inpainting" or "low_res": what the U-Net's extra input channels hold.
      sampler_defaults: sampler options the model was trained/configured with (``spacing``,
        ``steps_offset``, ``set_alpha_to_one``, ``variance``, ...); applied when the chosen
        sampler supports them.
      info: provenance (``source``, ``format``, ``step``, ...), written to image sidecars.
      mesh: the 1-D device mesh (axis "batch").
    """

    def __init__(
        self,
        *,
        unet: UNet,
        unet_params,
        first_stage=None,
        first_stage_variables=None,
        conditioner=None,
        conditioner_params=None,
        schedule: dict | Schedule,
        prediction: str = "eps",
        concat: str | None = None,
        sampler_defaults: dict | None = None,
        info: dict | None = None,
        devices: Sequence[Any] | None = None,
        batch_invariant: bool = True,
    ):
        if not isinstance(unet, UNet):
            raise ValueError(f"unet must be an ldm_jax UNet, got {type(unet).__name__}")
        first_stage = PixelSpace(unet.in_channels) if first_stage is None and concat is None else first_stage
        if first_stage is None:
            raise ValueError("a U-Net with concatenated conditioning channels needs an explicit first_stage")
        conditioner = Unconditional() if conditioner is None else conditioner
        if prediction not in ("eps", "v", "x0"):
            raise ValueError(f"unknown prediction type {prediction!r}; expected 'eps', 'v' or 'x0'")
        if concat not in CONCAT_KINDS:
            raise ValueError(f"unknown concat kind {concat!r}; expected one of {CONCAT_KINDS}")
        self.unet = unet
        self.first_stage = first_stage
        self.conditioner = conditioner
        self.schedule_config = schedule_config_of(schedule)
        self.schedule = make_schedule(**self.schedule_config)
        self.prediction = prediction
        self.concat = concat
        self.sampler_defaults = dict(sampler_defaults or {})
        self.info = dict(info or {})
        self.batch_invariant = bool(batch_invariant)
        self.params = {
            "unet": nn.meta.unbox(unet_params),
            "first_stage": nn.meta.unbox(first_stage_variables) if first_stage_variables is not None else {},
            "conditioner": nn.meta.unbox(conditioner_params) if conditioner_params is not None else {},
        }
        self._check_channels()
        self._check_conditioning()
        self._set_devices(devices)
        self._fingerprint = None

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_components(cls, **kwargs) -> "LatentDiffusionPipeline":
        """Build from modules and parameters (see the class docstring and ``__init__``).

        Example (a class-conditional latent model)::

            pipe = LatentDiffusionPipeline.from_components(
                unet=unet, unet_params=params,
                first_stage=KLFirstStage(vae), first_stage_variables={"params": vae_params},
                conditioner=ClassConditioner(num_classes=10),
                schedule={"kind": "linear", "num_timesteps": 1000}, prediction="eps")
        """
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, folder, **kwargs) -> "LatentDiffusionPipeline":
        """Load a local diffusers Stable Diffusion folder or an ldm_jax model folder
        (:func:`ldm_jax.pipeline.loading.load_model_folder`)."""
        from ldm_jax.pipeline.loading import load_model_folder

        return load_model_folder(folder, **kwargs)

    def with_devices(self, devices: Sequence[Any] | None = None, batch_invariant: bool | None = None):
        """A pipeline sharing this one's parameters, on other devices (and/or batching mode)."""
        other = copy.copy(self)
        if batch_invariant is not None:
            other.batch_invariant = bool(batch_invariant)
        other._set_devices(devices)
        return other

    def _set_devices(self, devices):
        devices = list(jax.devices() if devices is None else devices)
        if not devices:
            raise ValueError("devices is empty")
        self.mesh = Mesh(np.array(devices), (BATCH_AXIS,))
        self._replicated = NamedSharding(self.mesh, PartitionSpec())
        self._batched = NamedSharding(self.mesh, PartitionSpec(BATCH_AXIS))
        self._placed_params = self._placed_schedule = None
        self._jitted = jax.jit(self._program, static_argnums=0, out_shardings=self._replicated)

    def _check_channels(self):
        fs, unet = self.first_stage, self.unet
        c = fs.latent_channels
        out_ok = unet.out_channels in (c, 2 * c)
        if not out_ok:
            raise ValueError(f"U-Net out_channels={unet.out_channels} fits neither {c} latent channels nor 2 x {c}")
        if self.concat is None and unet.in_channels != c:
            raise ValueError(
                f"U-Net in_channels={unet.in_channels} != {c} latent channels (set concat='inpainting' or 'low_res')"
            )
        if self.concat == "inpainting" and unet.in_channels != 2 * c + 1:
            raise ValueError(f"an inpainting U-Net needs in_channels = 2 x {c} + 1, got {unet.in_channels}")
        if self.concat == "low_res" and unet.in_channels <= c:
            raise ValueError(f"a low-res-conditioned U-Net needs in_channels > {c}, got {unet.in_channels}")

    def _check_conditioning(self):
        rows = self.unet.resolved()["class_rows"]
        cond = self.conditioner
        if isinstance(cond, ClassConditioner) and cond.embedder is None:
            if rows is None or rows < cond.num_classes + 1:
                raise ValueError(
                    f"ClassConditioner({cond.num_classes}) without an embedder needs a U-Net class embedding with "
                    f">= {cond.num_classes + 1} rows (the classes and the null label); the U-Net has {rows}"
                )
        elif rows is not None:
            raise ValueError(f"the U-Net has a class embedding ({rows} rows): use a ClassConditioner")
        gives_context = isinstance(cond, TextConditioner) or getattr(cond, "embedder", None) is not None
        if gives_context != self.unet.uses_cross_attention:
            raise ValueError(
                f"the {cond.kind!r} conditioner {'gives' if gives_context else 'gives no'} cross-attention context "
                f"but the U-Net {'has' if self.unet.uses_cross_attention else 'has no'} cross-attention blocks"
            )

    # ------------------------------------------------------------------ properties

    @property
    def num_devices(self) -> int:
        return self.mesh.devices.size

    @property
    def size_factor(self) -> int:
        """Height and width must be multiples of this (autoencoder x U-Net downsampling)."""
        return self.first_stage.factor * self.unet.downsample_factor

    @property
    def low_res_channels(self) -> int:
        return self.unet.in_channels - self.first_stage.latent_channels if self.concat == "low_res" else 0

    @property
    def default_size(self) -> tuple[int, int] | None:
        """(height, width) the U-Net was configured for (``sample_size`` x autoencoder factor)."""
        s = self.unet.sample_size
        if s is None:
            return None
        s = (s, s) if isinstance(s, int) else tuple(s)
        return s[0] * self.first_stage.factor, s[1] * self.first_stage.factor

    @property
    def params_hash(self) -> str:
        """:func:`params_fingerprint` of all parameters (computed once)."""
        if self._fingerprint is None:
            self._fingerprint = params_fingerprint(self.params)
        return self._fingerprint

    def check_size(self, height: int, width: int) -> None:
        """ValueError naming the value unless both are positive multiples of :attr:`size_factor`."""
        f = self.size_factor
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1 or value % f:
                raise ValueError(
                    f"{name}={value!r} is not a positive multiple of {f} "
                    f"(autoencoder factor {self.first_stage.factor} x U-Net factor {self.unet.downsample_factor})"
                )

    # ------------------------------------------------------------------ generation

    def __call__(self, prompts: str | Sequence[str] | None = None, **kwargs):
        """Generate ``num_images`` images.

        Args:
          prompts: text prompt(s) for a text-conditioned model (one, or one per image).
          class_labels: class id(s) for a class-conditional model (one, or one per image).
          num_images: default: the number of prompts / labels, else 1.
          negative_prompt: the unconditional branch's prompt(s) (default "").
          sampler, num_steps, eta: see :func:`ldm_jax.diffusion.samplers.sample`;
            ``sampler_options`` (``spacing``, ``karras_sigmas``, ``thresholding``, ...) override
            the model's ``sampler_defaults``.
          guidance_scale: classifier-free guidance w (diffusers' convention; 1 = conditional
            model only, no unconditional branch). Ignored for unconditional models. Traced.
          guidance_rescale: Lin et al. 2023's phi (0 = off). Traced.
          seed: in [0, 2^32). Traced.
          image_indices: [N] ints naming each image's noise streams (default 0..N-1): image
            ``(seed, index)`` is the same in any batch; pass ``[i]`` to regenerate image i.
          height, width: output size (default: the init image's, else the model's).
          init_image: [H, W, C] or [N, H, W, C], uint8 or float in [0, 1]: img2img start
            (without ``mask``) or the image to inpaint (with ``mask``).
          strength: img2img strength in [0, 1] (diffusers semantics; default 0.8; 0 returns
            the init image through the autoencoder). Inpainting: 1.0 (concat-channel U-Nets
            also accept < 1).
          mask: repaint mask [H, W] / [N, H, W] (1 / white = generate, 0 = keep). With an
            inpainting U-Net (``concat="inpainting"``) it is fed to the U-Net (SD layout);
            otherwise the kept region is replaced by the forward-noised original after every
            step (RePaint; ``inpaint_jumps=(jump_length, jump_n_sample)`` resamples).
          low_res: low-resolution conditioning image(s) for ``concat="low_res"`` models
            (uint8 or float in [0, 1]; resized to the latent grid by
            :func:`~ldm_jax.pipeline.components.low_res_condition`).
          latents: optional initial noise [N, h, w, c] (standard normal) instead of the
            per-image noise (text2img and known-region inpainting).
          encode_mode: "sample" (diffusers) or "mean" of the autoencoder posterior for
            init images.
          output_type: "uint8" ([0, 255]) or "float" ([0, 1] float32).
          return_latents: also return the final latents [N, h, w, c].
          pad_batch_to: pad the batch to at least this size (reuse one compiled program
            for a short last batch).

        Returns: images [N, H, W, C] (and latents if ``return_latents``).
        """
        request = self._prepare(prompts, **kwargs)
        images, final = self._run(request)
        if request.output_type == "uint8":
            images = np.round(images * 255.0).astype(np.uint8)
        return (images, final) if request.return_latents else images

    def validate(self, prompts: str | Sequence[str] | None = None, **kwargs) -> None:
        """Check the arguments of a :meth:`__call__` without generating: raises the ValueError
        the call would raise (e.g. before starting a progress bar)."""
        self._prepare(prompts, **kwargs)

    def _prepare(
        self,
        prompts: str | Sequence[str] | None = None,
        *,
        class_labels: int | Sequence[int] | None = None,
        num_images: int | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        sampler: str = "ddim",
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
        **sampler_options,
    ) -> _Request:
        """Validate the arguments of :meth:`__call__` and build the host-side request."""
        fs = self.first_stage
        conditions, n = self._conditions(prompts, class_labels, num_images)
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
            image = _image_array(init_image, "init_image", n, fs.image_channels)
            size = image.shape[1:3]
            if (height is not None and height != size[0]) or (width is not None and width != size[1]):
                raise ValueError(f"init_image size {size[0]}x{size[1]} does not match height={height}, width={width}")
            height, width = size
        if height is None or width is None:
            default = self.default_size
            if default is None:
                raise ValueError("height and width are required (the U-Net config has no sample_size)")
            height = default[0] if height is None else height
            width = default[1] if width is None else width
        self.check_size(height, width)
        latent_shape = (height // fs.factor, width // fs.factor, fs.latent_channels)

        mode, strength = self._mode(image is not None, mask is not None, strength)
        if image is not None:
            inputs["image"] = image
        if mask is not None:
            mask_array = _mask_array(mask, n)
            if mask_array.shape[1:3] != (height, width):
                raise ValueError(
                    f"mask size {mask_array.shape[1]}x{mask_array.shape[2]} does not match the image size {height}x{width}"
                )
            inputs["mask"] = mask_array
        if self.concat == "low_res":
            if low_res is None:
                raise ValueError("this model is low-res conditioned: pass low_res")
            inputs["low_res"] = _image_array(low_res, "low_res", n, self.low_res_channels)
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

        use_cfg = self.conditioner.has_null and float(guidance_scale) != 1.0
        if negative_prompt is not None and not use_cfg:
            raise ValueError("negative_prompt needs classifier-free guidance (guidance_scale != 1)")
        inputs["cond"] = self.conditioner.host_inputs(conditions) if conditions is not None else {}
        if use_cfg:
            negatives = _as_list(negative_prompt, "negative_prompt")
            negatives = None if negatives is None else _broadcast(negatives, n, "negative_prompt")
            inputs["uncond"] = self.conditioner.null_host_inputs(n, negatives)

        options = self._sampler_options(sampler, num_steps, eta, sampler_options)
        jump_length, jump_n_sample = self._jumps(inpaint_jumps, mode, sampler)
        program = _Program(
            mode=mode,
            latent_shape=latent_shape,
            sampler=sampler,
            num_steps=int(num_steps),
            options=options,
            strength=strength,
            use_cfg=use_cfg,
            encode_noise=encode_mode == "sample" and fs.kind == "kl",
            jumps=(jump_length, jump_n_sample),
            batch_invariant=self.batch_invariant,
        )
        return _Request(
            program, inputs, n, seed, float(guidance_scale), float(guidance_rescale), pad_batch_to, output_type,
            bool(return_latents),
        )

    def _conditions(self, prompts, class_labels, num_images):
        """(per-image conditions or None, number of images)."""
        if num_images is not None and (
            isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1
        ):
            raise ValueError(f"num_images must be a positive integer, got {num_images!r}")
        kind = self.conditioner.kind
        prompts = _as_list(prompts, "prompts")
        labels = _as_list(class_labels, "class_labels")
        if kind == "text":
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

    def _mode(self, has_image: bool, has_mask: bool, strength):
        """(mode, strength) for the given inputs; ValueError for inconsistent ones."""
        if strength is not None and (
            isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating)) or not 0 <= strength <= 1
        ):
            raise ValueError(f"strength must be a number in [0, 1], got {strength!r}")
        if has_mask and not has_image:
            raise ValueError("mask given without init_image")
        if self.concat == "inpainting" and not has_mask:
            raise ValueError("this is an inpainting model: pass init_image and mask")
        if has_mask:
            strength = 1.0 if strength is None else float(strength)
            if self.concat == "inpainting":
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

    @staticmethod
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

    @property
    def learned_variance(self) -> bool:
        return self.unet.out_channels == 2 * self.first_stage.latent_channels

    def _sampler_options(self, sampler: str, num_steps: int, eta: float, overrides: dict) -> tuple:
        """The sampler's keyword options: model defaults it supports, then the caller's
        (validated now, with the driver's own messages, rather than inside ``jit``)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; expected one of {sorted(SAMPLERS)}")
        spec = SAMPLERS[sampler]
        options: dict[str, Any] = {"prediction": self.prediction}
        for name, value in self.sampler_defaults.items():
            if name in ("spacing", "steps_offset", "threshold_max", "threshold_percentile"):
                options[name] = value
            elif name in spec.options:
                options[name] = value
        if self.learned_variance:
            options["variance"] = "learned"
        options["eta"] = float(eta)
        options.update(overrides)
        resolve_sampler(sampler, self.schedule.num_timesteps, num_steps=num_steps, **options)
        return tuple(sorted(options.items()))

    # ------------------------------------------------------------------ execution

    def _run(self, request: _Request):
        """Pad to the device count, place, run the jitted program, trim."""
        inputs, n = request.inputs, request.num_images
        size = max(n, int(request.pad_batch_to or 0))
        size = -(-size // self.num_devices) * self.num_devices
        if size > n:
            # Padding rows repeat the last image (their outputs are dropped).
            inputs = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[-1:], size - n, axis=0)]), inputs)
        inputs = self._place(inputs, self._batched)
        if self._placed_params is None:
            self._placed_params = self._place(self.params, self._replicated)
            self._placed_schedule = self._place(self.schedule, self._replicated)
        images, latents = self._jitted(
            request.program,
            self._placed_params,
            self._placed_schedule,
            inputs,
            np.uint32(request.seed),
            np.float32(request.guidance_scale),
            np.float32(request.guidance_rescale),
        )
        return np.asarray(images)[:n], np.asarray(latents)[:n]

    @staticmethod
    def _place(tree, sharding):
        if jax.process_count() == 1:
            return jax.device_put(tree, sharding)
        # Every process holds the whole (global) arrays; each contributes its devices' slices.
        return jax.tree.map(
            lambda a: jax.make_array_from_callback(np.shape(a), sharding, lambda index: np.asarray(a)[index]), tree
        )

    def _program(self, program: _Program, params, schedule, inputs, seed, guidance_scale, guidance_rescale):
        """The jitted program: shard the batch over the mesh; per device, generate its images
        one at a time (``batch_invariant``) or as one batch.

        The schedule is an argument rather than a constant: with constant sampler coefficients
        XLA's single-device and multi-device (SPMD) pipelines simplify the update arithmetic
        differently, and LLVM then contracts different multiply-adds into FMAs, so one device
        would not reproduce the bits of two.
        """

        def local(params, schedule, inputs, seed, guidance_scale, guidance_rescale):
            args = (program, params, schedule)
            if not program.batch_invariant:
                return self._generate(*args, inputs, seed, guidance_scale, guidance_rescale)

            def one(example):
                example = jax.tree.map(lambda a: a[None], example)
                images, latents = self._generate(*args, example, seed, guidance_scale, guidance_rescale)
                return images[0], latents[0]

            return map_opaque_count(one, inputs)

        replicated, batched = PartitionSpec(), PartitionSpec(BATCH_AXIS)
        return jax.shard_map(
            local,
            mesh=self.mesh,
            in_specs=(replicated, replicated, batched, replicated, replicated, replicated),
            out_specs=(batched, batched),
            # The per-example loop's buffers start as unvarying zeros; every output is per-device anyway.
            check_vma=False,
        )(params, schedule, inputs, seed, guidance_scale, guidance_rescale)

    def _generate(self, program: _Program, params, schedule, inputs, seed, guidance_scale, guidance_rescale):
        """One device's images: [b, H, W, C] in [0, 1] and final latents [b, h, w, c]."""
        key = jax.random.PRNGKey(seed)
        indices = inputs["index"]
        batch = indices.shape[0]
        fs = self.first_stage
        fs_vars = params["first_stage"]
        latent_shape = program.latent_shape

        def encode(images, stream):
            noise = None
            if program.encode_noise:
                noise = per_example_normal(stream_key(key, stream), indices, latent_shape)
            return fs.encode(fs_vars, images, noise)

        cond = self.conditioner.encode(params["conditioner"], inputs["cond"])
        uncond = self.conditioner.encode(params["conditioner"], inputs["uncond"]) if program.use_cfg else None
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

        unet_variables = {"params": params["unet"]}

        def model_fn(x, t, conditioning):
            conditioning = dict(conditioning)
            channels = conditioning.pop(_CONCAT, None)
            if channels is not None:
                x = jnp.concatenate([x, channels.astype(x.dtype)], axis=-1)
            return self.unet.apply(unet_variables, x, t, **conditioning)

        if program.use_cfg:
            model = cfg_model_fn(
                model_fn,
                cond,
                uncond,
                guidance_scale,
                guidance_rescale,
                guided_channels=latent_shape[-1] if self.learned_variance else None,
            )
        else:
            model = lambda x, t: model_fn(x, t, cond)  # noqa: E731

        common = dict(sampler=program.sampler, num_steps=program.num_steps, example_indices=indices, **dict(program.options))
        if program.mode == "img2img" or (program.mode == "inpaint_concat" and program.strength < 1.0):
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
        images = fs.decode(fs_vars, latents).astype(jnp.float32)
        return jnp.clip((images + 1.0) / 2.0, 0.0, 1.0), latents


def enable_compilation_cache(directory: str | None) -> None:
    """Turn on JAX's persistent compilation cache in ``directory`` (None: leave it off), so a
    later process with the same program and devices skips XLA compilation."""
    if directory is None:
        return
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", os.path.abspath(directory))
    # Cache every program, however quick to compile (the defaults skip small ones).
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
