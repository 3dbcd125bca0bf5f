"""The second training stage: latent diffusion on a frozen first stage, or pixel-space diffusion.

``build_stage(config, data_stats, *, source=None, run=None) -> Stage`` is what ``train.py``
calls for ``config.stage == "diffusion"``. The model itself (first stage, conditioner, U-Net,
objective) is ``ldm_jax.ldm.model.build_model``, shared with inference; the latent cache and
the scale-factor estimate are in ``latents``; previews run the one generation program
(``ldm_jax.ldm.generation``) that the pipeline runs.

First stage (``config.first_stage``), frozen
--------------------------------------------
* ``source="workdir"``: the EMA autoencoder of a first-stage training run
  (``first_stage.workdir``, checkpoint ``first_stage.step`` or the latest);
* ``source="diffusers"``: a diffusers ``AutoencoderKL`` / ``VQModel`` folder (``first_stage.path``;
  a Stable Diffusion folder's ``vae/`` works);
* ``source="identity"``: pixel-space diffusion (the U-Net sees the images).

The frozen parameters never become constants of a compiled program: they are ``Task.frozen_params``
and ``Task.prepare_batch`` encodes each device batch in its own jitted, sharded function that
takes them as an argument (``ldm_jax.training.loop``), before the train step. The U-Net is
trained on ``scale_factor * (z - shift)`` with ``z`` a posterior sample (KL; the mean when
``sample_posterior=False``) or the pre-quantisation latents (VQ). ``scale_factor`` is
``first_stage.scale_factor`` when > 0, else estimated at the start as 1 / std of ``z`` over
``first_stage.scale_batches`` training batches (LDM's ``scale_by_std``), stored in every
checkpoint's metadata (a resumed run reuses it) and written into the exported model.

Cached latents (``first_stage.cache_latents``): the dataset is encoded once (posterior mean and
std for KL, so training still samples the posterior) into ``<cache_dir>/latents.npy`` with
labels and captions beside it, and the loader reads those instead of images.

Conditioning (``config.conditioning.kind``)
-------------------------------------------
* ``"class"``: labels through the U-Net's class embedding (``UNet.num_classes``, label
  ``num_classes`` is the null class), or with ``class_as_context`` a ``ClassEmbedder`` giving a
  one-token cross-attention context (for U-Nets with attention blocks);
* ``"text"``: captions -> ``ByteTokenizer`` -> a from-scratch ``TextTransformer`` trained jointly
  (its params are ``params["text_encoder"]``);
* ``"clip"``: captions -> a frozen CLIP text encoder (``clip_path``: a transformers
  ``CLIPTextModel`` folder or a Stable Diffusion folder with ``text_encoder/`` and ``tokenizer/``),
  encoded in ``prepare_batch`` like the first stage;
* ``"none"``.
A fraction ``drop_prob`` of the examples get the null condition (null label, or the tokens of
the empty caption) so the model can be sampled with classifier-free guidance.

Params: ``{"unet": ..., "text_encoder"?: ..., "class_embedder"?: ...}``; the EMA copy of that
tree is what previews use and what ``export`` writes as an ``ldm_jax.pipeline`` model folder.

Fine-tuning (``config.diffusion.init_from``): a fresh run starts ``params["unet"]`` (and the
EMA) from a local folder's U-Net weights (:func:`unet_loader`); a resumed run restores its
checkpoint and never reads the folder.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.data import DataLoader, build_dataset
from ldm_jax.diffusion.guidance import check_guidance_interval
from ldm_jax.diffusion.samplers import resolve_sampler
from ldm_jax.ldm.conditioning import NEEDS_CAPTIONS, check_guidance_setting
from ldm_jax.ldm.generation import Program, generate
from ldm_jax.ldm.model import DiffusionModel, build_model, model_sections, params_fingerprint
from ldm_jax.ldm.sections import merge_section
from ldm_jax.pipeline import pipeline_from_model, save_model_folder
from ldm_jax.training.context import start_run
from ldm_jax.training.loop import Task
from ldm_jax.training.stages.base import Stage
from ldm_jax.training.stages.latents import FirstStageEncoder, build_latent_cache, data_dict, estimate_scale_factor
from ldm_jax.training.stages.sections import diffusion_preview_defaults
from ldm_jax.training.resume_guard import check_first_stage
from ldm_jax.training.workdir import checkpoint_dir, latest_metadata

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- preview


def preview_conditions(model: DiffusionModel, preview: Any, source: Any = None) -> tuple[dict, dict | None, int, list]:
    """The preview's host inputs: ``(cond, uncond or None, num_images, row_names)``; rows are
    classes 0.. (class models) or prompts, each repeated ``preview.columns`` times."""
    c = model.conditioner
    columns = max(1, int(preview.columns))
    if c.kind == "class":
        rows = list(range(min(int(c.num_classes), int(preview.max_rows))))
        labels = np.repeat(np.asarray(rows, np.int32), columns)
        n = len(labels)
        return c.host_inputs(labels), c.null_host_inputs(n), n, [str(r) for r in rows]
    if c.kind in ("text", "sdxl"):
        prompts = [str(p) for p in (preview.prompts or [])]
        if not prompts and source is not None:
            seen = []
            for i in range(min(len(source), 500)):
                caption = source[i].get("caption", "")
                if caption and caption not in seen:
                    seen.append(caption)
                if len(seen) >= int(preview.max_rows):
                    break
            prompts = seen
        if not prompts:
            raise ValueError("config.preview.prompts is empty and no captions were found for the preview")
        prompts = prompts[: int(preview.max_rows)]
        captions = [p for p in prompts for _ in range(columns)]
        n = len(captions)
        if c.kind == "sdxl":  # micro-conditioning: the training size, no crop
            size = (model.latent_size * model.first_stage.adapter.factor,) * 2
            micro = dict(original_size=size, target_size=size)
            return c.host_inputs(captions, **micro), c.null_host_inputs(n, **micro), n, prompts
        return c.host_inputs(captions), c.null_host_inputs(n), n, prompts
    n = int(preview.num_images)
    return {}, None, n, []


def make_preview_fn(
    model: DiffusionModel, preview: Any, frozen_placed: Any, cond: dict, uncond: dict | None, n: int,
    out_sharding: Any = None, batch_sharding: Any = None, compose: Any = None,
):
    """``preview(ema_params, key) -> uint8 [N, H, W, C]``: the generation program
    (``ldm_jax.ldm.generation.generate``, as the pipeline runs it) jitted over one batch; its
    arguments are the EMA params, the frozen params and the conditions (nothing large is a
    compile-time constant). Image i's noise is stream ``i`` of ``key``, as in the pipeline with
    ``seed`` -> ``PRNGKey(seed)``. ``out_sharding``: replicated, so every process can read it.
    ``batch_sharding``: split the images over devices (conditions placed with it); the returned
    function then also takes ``cond`` (same structure as the one given) as a third argument.
    ``compose(params, frozen) -> params``: inside the program, turns the trained tree into the
    model's params (fine-tuning: a LoRA merged into the frozen base weights). ``offset`` (an
    argument of the returned function, traced): the images are streams ``offset .. offset+N-1``
    of ``key``, so a large set drawn in batches is the same set whatever the batch size."""
    guidance = float(preview.guidance_scale)
    use_cfg = model.conditioner.has_null and uncond is not None and guidance != 1.0
    interval = tuple(preview.get("guidance_interval", ()) or ())
    program = Program(
        mode="text2img",
        latent_shape=model.latent_shape,
        sampler=preview.sampler,
        num_steps=int(preview.num_steps),
        options=(("prediction", model.prediction),),
        use_cfg=use_cfg,
        guidance_interval=check_guidance_interval(interval) if interval and use_cfg else None,
    )

    @functools.partial(jax.jit, out_shardings=out_sharding)
    def run(params, frozen, cond, uncond, key, offset):
        if compose is not None:
            params = compose(params, frozen)
        generation_params = {
            "unet": params["unet"],
            "first_stage": frozen["first_stage"],
            "conditioner": model.conditioner_params(params, frozen),
        }
        index = offset + jnp.arange(n)
        if batch_sharding is not None:
            index = jax.lax.with_sharding_constraint(index, batch_sharding)
        inputs = {"index": index, "cond": cond}
        if use_cfg:
            inputs["uncond"] = uncond
        # The schedule is built inside the trace (constants), as previews always compiled it.
        images, _ = generate(
            program, model.unet, model.first_stage.adapter, model.conditioner, generation_params,
            model.schedule, inputs, key, guidance,
        )
        return images

    def place(x):
        if batch_sharding is None:
            return jnp.asarray(x)
        x = np.asarray(x)  # the same on every process: each places its own devices' rows
        return jax.make_array_from_callback(x.shape, batch_sharding, lambda index: x[index])

    cond_j = jax.tree.map(place, cond)
    uncond_j = None if uncond is None else jax.tree.map(place, uncond)

    def preview_fn(params, key, cond=None, offset=0):
        given = cond_j if cond is None else jax.tree.map(place, cond)
        images = run(params, frozen_placed, given, uncond_j, key, jnp.int32(offset))
        if jax.process_count() > 1 and batch_sharding is not None:
            from jax.experimental import multihost_utils

            images = multihost_utils.process_allgather(images, tiled=True)
        return np.round(np.asarray(jax.device_get(images)) * 255.0).astype(np.uint8)

    return preview_fn


def make_sample_fn(model: DiffusionModel, frozen_placed: Any, run: Any):
    """``sample(ema_params, labels or None, key, settings) -> uint8 [N, H, W, C]``: ``N`` images
    of the given classes (None: unconditional, ``N = settings.num_images``) through the same
    generation program as the previews (:func:`make_preview_fn`), the batch split over the
    mesh's data axes (``N`` a multiple of their size). ``settings``: ``sampler``, ``num_steps``,
    ``guidance_scale``, optionally ``guidance_interval`` (the preview's keys). Image ``i`` is
    noise stream ``offset + i`` of ``key``. Programs are compiled once per (settings, N). Used by
    the evaluation hook (``ldm_jax.training.eval_hook``)."""
    compiled: dict = {}
    c = model.conditioner

    def sample(params, labels, key, settings, offset=0):
        if labels is not None and c.kind != "class":
            raise ValueError(f"labels given but the model's conditioning is {c.kind!r}")
        if labels is None and c.kind != "none":
            raise ValueError(f"the model's conditioning is {c.kind!r}: evaluation samples need labels (class models only)")
        n = int(settings.num_images) if labels is None else len(labels)
        cache_key = (
            str(settings.sampler), int(settings.num_steps), float(settings.guidance_scale),
            tuple(settings.get("guidance_interval", ()) or ()), n,
        )
        if cache_key not in compiled:
            cond, uncond = {}, None
            if labels is not None:
                cond, uncond = c.host_inputs(np.zeros(n, np.int32)), c.null_host_inputs(n)
            fn = make_preview_fn(model, settings, frozen_placed, cond, uncond, n, run.batch_sharding,
                                 batch_sharding=run.batch_sharding)
            compiled[cache_key] = fn
        cond = {} if labels is None else c.host_inputs(np.asarray(labels, np.int32))
        return compiled[cache_key](params, key, cond, offset)

    return sample


# ----------------------------------------------------------------------------- stage


def unet_loader(model: DiffusionModel, path: str):
    """``Task.load_params`` for ``config.diffusion.init_from``: ``(abstract, shardings) ->
    {"unet": params}`` read from the U-Net folder at ``path`` (a diffusers pipeline folder's
    ``unet/``, a ``UNet2DConditionModel`` folder or an ldm_jax model folder) into
    ``model.unet``'s tree. Each tensor is converted on the host and goes straight into its
    shards (``jax.make_array_from_callback`` with the param's sharding: every device receives
    its own slice, nothing is gathered on one device; a multi-host process places only its
    devices' slices). A folder for another U-Net is a one-line ValueError naming the setting
    (``config.unet.<name>``) or the tensor (:class:`WeightsError`)."""
    from flax import traverse_util

    from ldm_jax.interop.diffusers_unet import load_diffusers_unet_weights

    if model.denoiser_family != "unet":
        raise ValueError(f"config.diffusion.init_from loads U-Net weights; the denoiser is {model.denoiser_family!r}")

    def load(abstract, shardings):
        placement = traverse_util.flatten_dict(shardings["unet"])

        def place(param_path, host):
            return jax.make_array_from_callback(host.shape, placement[param_path], lambda index: host[index])

        log.info("diffusion stage: initialising the U-Net from %s", path)
        try:
            return {"unet": load_diffusers_unet_weights(path, model.unet, place=place)}
        except FileNotFoundError as error:  # one line through train.py's start-up errors
            raise ValueError(f"config.diffusion.init_from: {error}") from None

    return load


def dataset_info(data_stats: Any) -> dict:
    """The JSON facts about the data that ``build_model`` needs (stored in checkpoint metadata)."""
    return {
        "num_classes": None if data_stats.num_classes is None else int(data_stats.num_classes),
        "has_captions": bool(data_stats.has_captions),
        "resolution": int(data_stats.resolution),
        "channels": int(data_stats.channels),
        "class_names": None if data_stats.class_names is None else [str(n) for n in data_stats.class_names],
    }


def _resumed_scale_factor(config: Any) -> float | None:
    workdir = config.get("workdir")
    if not workdir:
        return None
    meta = latest_metadata(workdir)
    if meta is None or meta.get("scale_factor") is None:
        return None
    return float(meta["scale_factor"])


def build_stage(config: Any, data_stats: Any, *, source: Any = None, run: Any = None) -> Stage:
    """The diffusion stage for ``config`` and the dataset (``data_stats``; ``source`` is the
    dataset itself, built from ``config.data`` when None, used for the scale-factor estimate,
    the latent cache and default preview prompts). ``config.workdir`` (set by ``train.py``)
    locates a previous run's checkpoints to resume the scale factor from. ``run``: the
    ``RunContext`` of ``train.py`` (made here when None)."""
    run = start_run(config) if run is None else run
    sections = model_sections(config)
    init_from = sections.diffusion.get("init_from")
    if init_from is not None and not str(init_from).strip():  # checked before anything is loaded
        raise ValueError("config.diffusion.init_from is empty: give the pretrained folder (e.g. the SDXL folder, "
                         "whose unet/ is read) or set it to None for a random init")
    fs_config = sections.first_stage
    preview_config = merge_section(diffusion_preview_defaults(), config.get("preview"), "preview")
    info = dataset_info(data_stats)
    model = build_model(sections, info)
    try:  # a DDPM sampler for a flow model (or the reverse) fails now, in one line, not at the first preview
        resolve_sampler(str(preview_config.sampler), model.schedule, num_steps=int(preview_config.num_steps),
                        prediction=model.prediction)
    except ValueError as error:
        raise ValueError(f"config.preview.sampler: {error}") from None
    check_guidance_setting(preview_config.get("guidance_interval", ()), model.conditioner, "config.preview")
    fs = model.first_stage
    if source is None and (fs.kind != "identity" or model.conditioner.kind in NEEDS_CAPTIONS):
        source = build_dataset(config.data)

    fingerprint = None
    if fs.kind != "identity":
        fingerprint = params_fingerprint(fs.variables)
        if config.get("workdir"):
            # A resumed run keeps its first stage whatever cache_latents says (a resumed LDM
            # on another autoencoder would mix two latent spaces); checked before the cache.
            check_first_stage(checkpoint_dir(config.workdir), fingerprint)

    encoder = None
    data_source = None
    if fs.kind != "identity":
        encoder = FirstStageEncoder(run, model)
        if fs_config.cache_latents:
            cache_dir = fs_config.cache_dir or os.path.join(str(config.get("workdir") or "."), "latent_cache")
            data_source = build_latent_cache(config, model, source, encoder, os.path.abspath(cache_dir))

    # scale factor: explicit > stored in this run's checkpoints > estimated from data
    if fs.kind == "identity":
        scale, how = 1.0, "identity"
    elif float(fs_config.scale_factor) > 0:
        scale, how = float(fs_config.scale_factor), "config"
    else:
        scale, how = _resumed_scale_factor(config), "checkpoint"
        if scale is None:
            data = data_dict(config)
            loader = DataLoader(
                source, run.global_batch, seed=int(data.get("seed", 0)), shuffle=bool(data.get("shuffle", True))
            )
            if data_source is not None:
                cached = DataLoader(data_source, run.global_batch, seed=loader.sampler.seed, shuffle=loader.sampler.shuffle)

                def batches(i):
                    return run.batch(cached.get_batch(i)["raw"])
            else:

                def batches(i):
                    return encoder(loader.get_batch(i)["image"])

            scale = estimate_scale_factor(model, batches, int(fs_config.scale_batches), int(config.seed))
            how = f"estimated over {int(fs_config.scale_batches)} batches"
    log.info("diffusion stage: first stage %s, scale_factor %.6g (%s)", fs.kind, scale, how)
    model = model.with_scale(scale)
    c = model.conditioner

    def host_batch(batch: Mapping[str, Any]) -> dict[str, np.ndarray]:
        out = {}
        if "raw" in batch:
            out["raw"] = np.asarray(batch["raw"], np.float32)
        else:
            out["image"] = np.asarray(batch["image"], np.float32)
        if c.kind == "class":
            out.update(c.host_inputs(batch["label"]))
        elif c.kind == "text":
            out.update(c.host_inputs(batch["caption"]))
        elif c.kind == "sdxl":
            # SDXL micro-conditioning per image (the SDXL paper): its size before resizing and the
            # crop's top-left, int [B, 2] when the data source records them (the image folder, and
            # a latent cache built from it); else the training size, no crop, for every image.
            size = (int(data_stats.resolution), int(data_stats.resolution))
            out.update(c.host_inputs(
                list(batch["caption"]), original_size=batch.get("original_size", size),
                crops_coords_top_left=batch.get("crop_top_left", (0, 0)), target_size=size,
            ))
        return out

    task = Task(
        init_params=model.init_params,
        loss_fn=model.loss_fn,
        frozen_params=model.frozen_params(),
        prepare_batch=model.prepare_batch,
        load_params=unet_loader(model, str(init_from)) if init_from else None,
    )

    # Compiled on first use; the frozen params are placed (replicated) once, as arguments.
    cond, uncond, n, rows = preview_conditions(model, preview_config, source)
    frozen_placed, _ = run.place_replicated(model.frozen_params())
    preview_fn = make_preview_fn(model, preview_config, frozen_placed, cond, uncond, n, run.replicated)
    sample_fn = make_sample_fn(model, frozen_placed, run)

    def export(params, directory):
        save_model_folder(
            pipeline_from_model(model, params), directory, overwrite=True,
            provenance={"workdir": str(config.get("workdir") or ""), "scale_factor": float(scale),
                        "first_stage": dict(fs.description)},
        )

    metadata = {
        "stage": "diffusion",
        "scale_factor": float(scale),
        "scale_factor_source": how,
        "data": info,
        "first_stage": dict(fs.description),
    }
    if fs.kind != "identity":
        metadata["first_stage_params_hash"] = fingerprint
    return Stage(
        task=task,
        host_batch=host_batch,
        preview=preview_fn,
        export=export,
        metadata=metadata,
        data_source=data_source,
        preview_columns=max(1, int(preview_config.columns)) if c.has_null else 0,
        preview_rows=tuple(rows),
        model=model,
        sample=sample_fn,
    )
