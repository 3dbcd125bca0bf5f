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
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ldm_jax.diffusion.flow import FLOW_PREDICTIONS, FlowSchedule, flow_schedule_config, make_flow_schedule
from ldm_jax.diffusion.schedules import Schedule, make_schedule
from ldm_jax.ldm.conditioning import CONCAT_KINDS, ClassConditioner, TextConditioner, Unconditional
from ldm_jax.ldm.first_stage import PixelSpace
from ldm_jax.ldm.generation import Program, generate
from ldm_jax.ldm.model import params_fingerprint
from ldm_jax.models.dit import DiT
from ldm_jax.models.pixart import PixArtDiT
from ldm_jax.models.unet import UNet
from ldm_jax.pipeline import loading
from ldm_jax.pipeline.requests import Request, prepare_request

BATCH_AXIS = "batch"
SCHEDULE_KEYS = ("kind", "num_timesteps", "beta_start", "beta_end", "betas", "rescale_to_zero_terminal_snr")
FLOW_SCHEDULE_KEYS = (
    "shift", "num_train_timesteps", "dynamic_shifting", "base_shift", "max_shift", "base_seq_len", "max_seq_len",
    "time_shift_type", "shift_terminal",
)
OBJECTIVES = ("ddpm", "flow")
DENOISERS = (UNet, DiT, PixArtDiT)  # the U-Net, the class-label DiT, the text-conditioned PixArt DiT


def schedule_config_of(schedule: dict | Schedule | FlowSchedule, objective: str = "ddpm") -> dict:
    """A checked ``make_schedule`` (``objective="flow"``: ``make_flow_schedule``) keyword dict.
    A :class:`Schedule` is stored by its (float32) betas; prefer the dict form, which rebuilds
    the float64 schedule exactly."""
    if isinstance(schedule, FlowSchedule):
        return flow_schedule_config(schedule)
    if isinstance(schedule, Schedule):
        return {"betas": [float(b) for b in np.asarray(schedule.betas, np.float64)]}
    keys, build = (FLOW_SCHEDULE_KEYS, make_flow_schedule) if objective == "flow" else (SCHEDULE_KEYS, make_schedule)
    unknown = set(schedule) - set(keys)
    if unknown:
        raise ValueError(f"unknown {objective} schedule config keys {sorted(unknown)}; expected a subset of {keys}")
    config = dict(schedule)
    build(**config)  # raises ValueError naming a bad value
    return config


def denoiser_out_channels(unet) -> int:
    """The network's output channels (a DiT's ``out_channels=None`` means ``in_channels``)."""
    return int(getattr(unet, "output_channels", unet.out_channels))


def denoiser_class_rows(unet) -> int | None:
    """Rows of the network's own class-label table (classes + the null label), or None."""
    if isinstance(unet, DiT):
        return unet.num_classes + 1
    if isinstance(unet, PixArtDiT):
        return None
    return unet.resolved()["class_rows"]


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


class LatentDiffusionPipeline:
    """A U-Net, a first stage, a conditioner and a noise schedule, ready to generate.

    Build with :meth:`from_pretrained` (a local diffusers Stable Diffusion folder or an
    ldm_jax model folder, see :mod:`ldm_jax.pipeline.loading`) or :meth:`from_components`;
    generate by calling the pipeline (see :meth:`__call__`).

    Attributes:
      unet, first_stage, conditioner: the modules and adapters (see
        :mod:`ldm_jax.ldm.first_stage` and :mod:`ldm_jax.ldm.conditioning`).
      params: ``{"unet": ..., "first_stage": ..., "conditioner": ...}`` (unboxed arrays;
        ``first_stage`` holds the autoencoder's full variables ``{"params": ...}``).
      unet: the denoiser: a ``UNet``, a class-label ``DiT`` or a text-conditioned ``PixArtDiT``.
      objective: "ddpm" (noise schedule, the DDPM-family samplers) or "flow" (rectified flow,
        the ``flow_*`` samplers; the network sees the timestep ``num_train_timesteps * t``).
      schedule_config: ``make_schedule`` (flow: ``make_flow_schedule``) keyword arguments;
        ``schedule`` the built Schedule / FlowSchedule.
      prediction: "eps", "v" or "x0"; flow: "velocity", "eps" or "x0".
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
        unet: UNet | DiT | PixArtDiT,
        unet_params,
        first_stage=None,
        first_stage_variables=None,
        conditioner=None,
        conditioner_params=None,
        schedule: dict | Schedule,
        prediction: str | None = None,
        concat: str | None = None,
        sampler_defaults: dict | None = None,
        info: dict | None = None,
        devices: Sequence[Any] | None = None,
        batch_invariant: bool = True,
        objective: str = "ddpm",
    ):
        if not isinstance(unet, DENOISERS):
            raise ValueError(f"unet must be an ldm_jax UNet, DiT or PixArtDiT, got {type(unet).__name__}")
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
        first_stage = PixelSpace(unet.in_channels) if first_stage is None and concat is None else first_stage
        if first_stage is None:
            raise ValueError("a U-Net with concatenated conditioning channels needs an explicit first_stage")
        conditioner = Unconditional() if conditioner is None else conditioner
        predictions = FLOW_PREDICTIONS if objective == "flow" else ("eps", "v", "x0")
        if prediction is None:
            prediction = predictions[0]
        if prediction not in predictions:
            raise ValueError(f"unknown prediction type {prediction!r} for a {objective} model; expected one of {predictions}")
        if concat not in CONCAT_KINDS:
            raise ValueError(f"unknown concat kind {concat!r}; expected one of {CONCAT_KINDS}")
        self.unet = unet
        self.first_stage = first_stage
        self.conditioner = conditioner
        self.objective = objective
        self.schedule_config = schedule_config_of(schedule, objective)
        build_schedule = make_flow_schedule if objective == "flow" else make_schedule
        self.schedule = build_schedule(**self.schedule_config)
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
        (:func:`load_model_folder`)."""
        return load_model_folder(folder, **kwargs)

    def with_devices(self, devices: Sequence[Any] | None = None, batch_invariant: bool | None = None):
        """A pipeline sharing this one's parameters, on other devices (and/or batching mode)."""
        other = copy.copy(self)
        if batch_invariant is not None:
            other.batch_invariant = bool(batch_invariant)
        other._set_devices(devices)
        return other

    def with_controlnets(self, controlnets: Sequence[tuple[Any, Any]]) -> "LatentDiffusionPipeline":
        """A pipeline sharing this one's parameters whose U-Net runs under ``controlnets``
        (``[(ControlNet, params), ...]``, e.g. from ``load_diffusers_controlnet``); call it with
        ``control_image=`` (one per ControlNet) and ``controlnet_scale=``. The ControlNets
        read control images at the image size: their downsampling must equal the first stage's."""
        from ldm_jax.models.controlnet import ControlledUNet

        base_unet = getattr(self.unet, "unet", self.unet)
        base_params = self.params["unet"].get("unet") if isinstance(self.unet, ControlledUNet) else self.params["unet"]
        nets = tuple(cn for cn, _ in controlnets)
        for i, cn in enumerate(nets):
            if cn.control_downsample_factor != self.first_stage.factor:
                raise ValueError(
                    f"ControlNet {i} downsamples its control image {cn.control_downsample_factor}x, "
                    f"the first stage {self.first_stage.factor}x"
                )
        other = copy.copy(self)
        other.unet = ControlledUNet(base_unet, nets)
        other.params = {
            **self.params,
            "unet": {"unet": base_params, "controlnets": tuple(nn.meta.unbox(p) for _, p in controlnets)},
        }
        other._set_devices(list(self.mesh.devices.flat))
        other._fingerprint = None
        return other

    def with_loras(self, loras) -> "LatentDiffusionPipeline":
        """A pipeline with LoRA files merged into copies of this one's weights (this one is
        unchanged): ``loras`` is a sequence of paths or ``(path, scale)`` pairs, each a
        diffusers/peft ``pytorch_lora_weights.safetensors`` (or its folder) or a kohya file
        (:func:`ldm_jax.interop.lora_formats.load_lora`). Every layer gets
        ``W + sum_i scale_i * scaling_i * A_i B_i``; the U-Net factors and, for text models,
        the text encoder's are merged before the jitted program, which stays the same."""
        from ldm_jax.interop.lora_formats import load_lora
        from ldm_jax.models.lora import merge

        components = {"unet": self.params["unet"]}
        if isinstance(self.conditioner, TextConditioner):
            components["text_encoder"] = self.params["conditioner"]
        weighted: dict[str, list] = {name: [] for name in components}
        applied = []
        for item in loras:
            path, scale = (item, 1.0) if isinstance(item, (str, os.PathLike)) else item
            for name, lora in load_lora(path, components).items():
                weighted[name].append((lora, float(scale)))
            applied.append({"path": os.path.abspath(os.fspath(path)), "scale": float(scale)})
        params = dict(self.params)
        for name, key in (("unet", "unet"), ("text_encoder", "conditioner")):
            if weighted.get(name):
                params[key] = jax.device_get(merge(self.params[key], weighted[name]))
        other = copy.copy(self)
        other.params = params
        other.info = {**self.info, "loras": list(self.info.get("loras", [])) + applied}
        other._fingerprint = None
        other._set_devices(list(self.mesh.devices.flat))
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
        out = denoiser_out_channels(unet)
        if out not in (c, 2 * c) or (self.objective == "flow" and out != c):
            fits = f"{c} latent channels" + ("" if self.objective == "flow" else f" nor 2 x {c}")
            raise ValueError(f"{type(unet).__name__} out_channels={out} does not fit {fits} ({self.objective} model)")
        if self.concat is None and unet.in_channels != c:
            raise ValueError(
                f"U-Net in_channels={unet.in_channels} != {c} latent channels (set concat='inpainting' or 'low_res')"
            )
        if self.concat == "inpainting" and unet.in_channels != 2 * c + 1:
            raise ValueError(f"an inpainting U-Net needs in_channels = 2 x {c} + 1, got {unet.in_channels}")
        if self.concat == "low_res" and unet.in_channels <= c:
            raise ValueError(f"a low-res-conditioned U-Net needs in_channels > {c}, got {unet.in_channels}")

    def _check_conditioning(self):
        rows = denoiser_class_rows(self.unet)
        cond = self.conditioner
        if isinstance(cond, ClassConditioner) and cond.embedder is None:
            if rows is None or rows < cond.num_classes + 1:
                raise ValueError(
                    f"ClassConditioner({cond.num_classes}) without an embedder needs a U-Net class embedding with "
                    f">= {cond.num_classes + 1} rows (the classes and the null label); the U-Net has {rows}"
                )
        elif rows is not None:
            raise ValueError(f"the U-Net has a class embedding ({rows} rows): use a ClassConditioner")
        unet = self.unet
        # DiT / PixArt have no addition embedding: only U-Nets carry SDXL's text_time field.
        addition = getattr(unet, "addition_embed_type", None)
        if (addition == "text_time") != (cond.kind == "sdxl"):
            raise ValueError(
                f"a denoiser with addition_embed_type={addition!r} cannot take the {cond.kind!r} conditioner "
                "(SDXL's text_time micro-conditioning and the sdxl conditioner go together)"
            )
        if cond.kind == "sdxl":
            width = cond.pooled_dim + cond.num_time_ids * unet.addition_time_embed_dim
            if width != unet.projection_class_embeddings_input_dim:
                raise ValueError(
                    f"the SDXL conditioner gives {cond.pooled_dim} pooled + {cond.num_time_ids} time ids x "
                    f"{unet.addition_time_embed_dim} = {width} features; the U-Net's add_embedding takes "
                    f"{unet.projection_class_embeddings_input_dim} (base/refiner mismatch: aesthetic={cond.aesthetic})"
                )
        gives_context = cond.context_dim is not None
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
            :func:`~ldm_jax.ldm.conditioning.low_res_condition`).
          latents: optional initial noise [N, h, w, c] (standard normal) instead of the
            per-image noise (text2img and known-region inpainting).
          encode_mode: "sample" (diffusers) or "mean" of the autoencoder posterior for
            init images.
          output_type: "uint8" ([0, 255]), "float" ([0, 1] float32) or "latent" (return only the
            final latents [N, h, w, c], nothing decoded; e.g. for a refiner).
          denoising_end: in (0, 1): stop where diffusers' ``denoising_end`` stops (the steps whose
            timestep >= round(T (1 - denoising_end))) and return the partly denoised latents (VP
            scale) - the SDXL base half of a base -> refiner hand-off.
          denoising_start: in (0, 1): continue ``init_latents`` (what a ``denoising_end`` run
            returned) from diffusers' ``denoising_start`` split (the steps whose timestep <
            round(T (1 - denoising_start))) - the refiner half.
          SDXL (``conditioner.kind == "sdxl"``): ``prompt_2`` / ``negative_prompt_2`` (second
            encoder's prompts), ``original_size``, ``crops_coords_top_left``, ``target_size``,
            their ``negative_*`` versions, ``aesthetic_score`` / ``negative_aesthetic_score``
            (refiner), defaults as diffusers (:mod:`ldm_jax.pipeline.sdxl`).
          return_latents: also return the final latents [N, h, w, c].
          pad_batch_to: pad the batch to at least this size (reuse one compiled program
            for a short last batch).

        Returns: images [N, H, W, C] (and latents if ``return_latents``).
        """
        request = prepare_request(self, prompts, **kwargs)
        images, final = self._run(request)
        if request.output_type == "latent":
            return final
        if request.output_type == "uint8":
            images = np.round(images * 255.0).astype(np.uint8)
        return (images, final) if request.return_latents else images

    def validate(self, prompts: str | Sequence[str] | None = None, **kwargs) -> None:
        """Check the arguments of a :meth:`__call__` without generating: raises the ValueError
        the call would raise (e.g. before starting a progress bar)."""
        prepare_request(self, prompts, **kwargs)

    @property
    def learned_variance(self) -> bool:
        return denoiser_out_channels(self.unet) == 2 * self.first_stage.latent_channels

    @property
    def default_sampler(self) -> str:
        """The sampler used when none is named: "ddim" (DDPM models) or "flow_euler" (flow)."""
        return "flow_euler" if self.objective == "flow" else "ddim"

    def _run(self, request: Request):
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
        return (None if images is None else np.asarray(images)[:n]), np.asarray(latents)[:n]

    @staticmethod
    def _place(tree, sharding):
        if jax.process_count() == 1:
            return jax.device_put(tree, sharding)
        # Every process holds the whole (global) arrays; each contributes its devices' slices.
        return jax.tree.map(
            lambda a: jax.make_array_from_callback(np.shape(a), sharding, lambda index: np.asarray(a)[index]), tree
        )

    def _program(self, program: Program, params, schedule, inputs, seed, guidance_scale, guidance_rescale):
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
                return (None if images is None else images[0]), latents[0]

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

    def _generate(self, program: Program, params, schedule, inputs, seed, guidance_scale, guidance_rescale):
        """One device's images: [b, H, W, C] in [0, 1] and final latents [b, h, w, c]."""
        return generate(
            program, self.unet, self.first_stage, self.conditioner, params, schedule, inputs,
            jax.random.PRNGKey(seed), guidance_scale, guidance_rescale,
        )


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


def load_model_folder(
    folder: str | os.PathLike, *, dtype: Any = jnp.float32, devices=None, batch_invariant: bool = True,
    variant: str | None = None,
) -> LatentDiffusionPipeline:
    """Load an ldm_jax model folder (``ldm_jax.json``) or a local diffusers Stable Diffusion
    folder (``model_index.json``) into a :class:`LatentDiffusionPipeline`.

    ``dtype`` is the compute dtype of every module (parameters stay float32); ``variant``
    (e.g. "fp16") picks diffusers' variant weight files of a diffusers folder. Raises
    FileNotFoundError for a missing folder or file and ValueError for unsupported content,
    each naming it (:func:`ldm_jax.pipeline.loading.read_model_folder`).
    """
    kwargs = loading.read_model_folder(folder, dtype=dtype, variant=variant)
    return LatentDiffusionPipeline(**kwargs, devices=devices, batch_invariant=batch_invariant)
