"""Latents for the diffusion stage: the frozen first stage on the training mesh, the
scale-factor estimate and the latent cache.

Scale factor: the U-Net is trained on ``scale_factor * (z - shift)``; when
``config.first_stage.scale_factor`` is not > 0 it is estimated at the start as 1 / std of ``z``
over ``first_stage.scale_batches`` training batches (LDM's ``scale_by_std``).

Cached latents (``first_stage.cache_latents``): the dataset is encoded once (posterior mean and
std for KL, so training still samples the posterior) into ``<cache_dir>/latents.npy`` with
labels and captions beside it, and the loader reads those instead of images. For SDXL
(``conditioning.kind="sdxl"``) the source's per-image micro-conditioning (``original_size``,
``crop_top_left``: the image folder records them) is stored too, so cached batches carry it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ldm_jax.data import DataLoader
from ldm_jax.ldm.model import DiffusionModel
from ldm_jax.training.context import RunContext

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
# Per-image SDXL micro-conditioning a source may record (int32 [2] each), cached beside the latents.
MICRO_KEYS = ("original_size", "crop_top_left")


def data_dict(config: Any) -> dict:
    data = config.get("data")
    return dict(data.to_dict() if hasattr(data, "to_dict") else (data or {}))


class FirstStageEncoder:
    """The frozen first stage on the training mesh with a jitted, sharded ``encode_raw``."""

    def __init__(self, run: RunContext, model: DiffusionModel):
        self.run = run
        fs = model.first_stage
        self.variables, shardings = run.place({"first_stage": fs.variables})
        self.encode = jax.jit(
            lambda frozen, images: fs.adapter.encode_raw(frozen["first_stage"], images),
            in_shardings=(shardings, run.batch_sharding),
            out_shardings=run.batch_sharding,
        )

    def __call__(self, local_images: np.ndarray) -> jax.Array:
        """This process's rows of a global image batch -> the global ``encode_raw`` batch."""
        return self.encode(self.variables, self.run.batch(np.asarray(local_images, np.float32)))


def estimate_scale_factor(
    model: DiffusionModel, batches: Callable[[int], jax.Array], num_batches: int, seed: int = 0
) -> float:
    """1 / std of the unscaled latents z over ``num_batches`` batches (LDM's ``scale_by_std``,
    with the mean and second moment pooled over the batches). ``batches(i)`` returns global
    batch i as ``encode_raw`` output (a global array). Posterior samples use ``seed``."""
    fs = model.first_stage.adapter

    @jax.jit
    def moments(raw, key):
        z = fs.unscaled_latents(raw, key, model.sample_posterior).astype(jnp.float32)
        return jnp.stack([jnp.sum(z), jnp.sum(z * z), jnp.asarray(z.size, jnp.float32)])

    total = np.zeros(3, np.float64)
    for i in range(max(1, int(num_batches))):
        raw = batches(i)
        key = jax.random.fold_in(jax.random.key(seed), i)
        total += np.asarray(jax.device_get(moments(raw, key)), np.float64)
    mean = total[0] / total[2]
    var = max(total[1] / total[2] - mean * mean, 0.0)
    std = float(np.sqrt(var))
    if not np.isfinite(std) or std <= 0:
        raise FloatingPointError(f"cannot estimate scale_factor: latent std is {std}")
    return 1.0 / std


class LatentCacheSource:
    """A data source over an encoded dataset: ``{"raw": float32 [h, w, k], "label"?, "caption"?}``
    with ``raw`` the first stage's ``encode_raw`` output (``ldm_jax.ldm.first_stage``)."""

    def __init__(self, directory: str):
        with open(os.path.join(directory, "info.json")) as f:
            self.info = json.load(f)
        self.raw = np.load(os.path.join(directory, "latents.npy"), mmap_mode="r")
        labels_path = os.path.join(directory, "labels.npy")
        self.labels = np.load(labels_path) if os.path.isfile(labels_path) else None
        captions_path = os.path.join(directory, "captions.json")
        self.captions = None
        if os.path.isfile(captions_path):
            with open(captions_path) as f:
                self.captions = json.load(f)
        self.name = f"latent_cache:{directory}"
        self.resolution = int(self.info["resolution"])
        self.channels = int(self.info["channels"])
        self.num_classes = self.info.get("num_classes")
        self.has_captions = self.captions is not None
        self.num_skipped = int(self.info.get("num_skipped", 0))
        self.micro = {}
        for name in MICRO_KEYS:
            micro_path = os.path.join(directory, f"{name}.npy")
            if os.path.isfile(micro_path):
                self.micro[name] = np.load(micro_path)

    def __len__(self) -> int:
        return int(self.raw.shape[0])

    def __getitem__(self, index: int) -> dict:
        example = {"raw": np.asarray(self.raw[int(index)], np.float32)}
        if self.labels is not None:
            example["label"] = self.labels[int(index)]
        if self.captions is not None:
            example["caption"] = self.captions[int(index)]
        for name, values in self.micro.items():
            example[name] = values[int(index)]
        return example


def _set_keys(data: dict) -> dict:
    return {k: v for k, v in data.items() if v is not None}


def _micro_keys(model: DiffusionModel, source: Any) -> tuple[str, ...]:
    """The micro-conditioning keys to cache: those the source records, for SDXL models only
    (other models never read them, and their caches stay as they were)."""
    if model.conditioner.kind != "sdxl" or len(source) == 0:
        return ()
    first = source[0]
    return tuple(name for name in MICRO_KEYS if name in first)


def _cache_key(config: Any, model: DiffusionModel, num_examples: int, micro: tuple[str, ...] = ()) -> dict:
    key = {
        "format": CACHE_FORMAT,
        "data": _set_keys(data_dict(config)),
        "first_stage": dict(model.first_stage.description),
        "num_examples": int(num_examples),
        "raw_shape": [model.latent_size, model.latent_size, model.first_stage.adapter.raw_channels],
    }
    if micro:  # only then: a cache of a model without micro-conditioning keeps its old key
        key["micro_conditioning"] = list(micro)
    return key


def build_latent_cache(
    config: Any, model: DiffusionModel, source: Any, encoder: FirstStageEncoder, directory: str
) -> LatentCacheSource:
    """Encode ``source`` once (in index order, global batches over all processes) into
    ``directory`` and return the cached source; an existing complete cache for the same data
    and first stage is reused."""
    micro_keys = _micro_keys(model, source)
    key = _cache_key(config, model, len(source), micro_keys)
    info_path = os.path.join(directory, "info.json")
    if os.path.isfile(info_path):
        with open(info_path) as f:
            found = json.load(f)
        found = {**found, "data": _set_keys(found.get("data") or {})}  # unset (None) keys are defaults
        if {k: found.get(k) for k in key} == json.loads(json.dumps(key)):
            log.info("using the latent cache in %s (%d examples)", directory, len(source))
            return LatentCacheSource(directory)
        raise ValueError(
            f"latent cache {directory} was built for other data or another first stage; "
            "delete it or set config.first_stage.cache_dir elsewhere"
        )
    n = len(source)
    batch = encoder.run.global_batch
    loader = DataLoader(source, batch, shuffle=False)  # stream 0..N-1, 0.. in index order
    num_batches = -(-n // batch)
    main = jax.process_index() == 0
    tmp = f"{directory}.tmp"
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        raw_out = np.lib.format.open_memmap(
            os.path.join(tmp, "latents.npy"), mode="w+", dtype=np.float32, shape=(n, *key["raw_shape"])
        )
    labels = np.zeros((n,), np.int32) if source.num_classes else None
    captions = [""] * n if source.has_captions else None
    micro = {name: np.zeros((n, 2), np.int32) for name in micro_keys}
    multi = jax.process_count() > 1

    def gather(values):
        """This process's rows of a global batch -> all of them (a no-op on one process)."""
        return np.asarray(multihost_utils.process_allgather(values, tiled=True)) if multi else np.asarray(values)

    log.info("encoding %d examples into the latent cache %s", n, directory)
    for b in range(num_batches):
        local = loader.get_batch(b)
        raw = gather(encoder(local["image"]))
        batch_labels = gather(np.asarray(local["label"])) if labels is not None else None
        batch_micro = {name: gather(np.asarray(local[name], np.int32)) for name in micro_keys}
        indices = loader.sampler.global_batch_indices(b)
        keep = np.arange(b * batch, (b + 1) * batch) < n  # the last batch wraps around
        if main:
            raw_out[indices[keep]] = raw[keep]
            for name, values in batch_micro.items():
                micro[name][indices[keep]] = values[keep]
            if batch_labels is not None:
                labels[indices[keep]] = batch_labels[keep]
            if captions is not None:
                # Other processes' captions are host strings: process 0 reads them again.
                batch_captions = local["caption"] if not multi else [source[int(i)]["caption"] for i in indices]
                for i, caption, kept in zip(indices, batch_captions, keep):
                    if kept:
                        captions[int(i)] = caption
    if main:
        raw_out.flush()
        del raw_out
        if labels is not None:
            np.save(os.path.join(tmp, "labels.npy"), labels)
        for name, values in micro.items():
            np.save(os.path.join(tmp, f"{name}.npy"), values)
        if captions is not None:
            with open(os.path.join(tmp, "captions.json"), "w") as f:
                json.dump(captions, f)
        with open(os.path.join(tmp, "info.json"), "w") as f:
            json.dump(
                {
                    **key,
                    "resolution": int(source.resolution),
                    "channels": int(source.channels),
                    "num_classes": source.num_classes,
                    "num_skipped": int(getattr(source, "num_skipped", 0)),
                },
                f,
                indent=2,
            )
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("ldm_jax latent cache written")
    loader.close()
    return LatentCacheSource(directory)
