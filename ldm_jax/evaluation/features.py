"""Feature extraction sharded over every device of every host, and streaming collection.

:class:`ShardedFeatureFn` compiles ``apply_fn(variables, images) -> {name: [B, ...]}`` once with
``jax.jit`` over a 1-D ``("data",)`` mesh of all devices: variables replicated, the batch split
across devices (``NamedSharding(mesh, P("data"))``). Each process passes its own images (a
fixed ``local_batch_size``; short batches are zero-padded and the padding dropped again), and
gets back the features of exactly its own rows, so hosts never exchange images; statistics are
merged across hosts at the end (:func:`ldm_jax.evaluation.statistics.allgather_merge`).
Multi-host: every process must make the same number of calls (a process with fewer images
passes empty batches).

:func:`collect` runs the function over an iterable of batches, folding ``stats_key`` features
into a :class:`GaussianAccumulator` and keeping the ``keep`` features (for KID, IS,
precision/recall) up to ``max_kept`` rows.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ldm_jax.evaluation.statistics import GaussianAccumulator, allgather_merge


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``"data"`` over ``devices`` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), ("data",))


def to_unit_interval(images) -> np.ndarray:
    """uint8 [0, 255] -> float32 [0, 1]; float input is taken to be in [0, 1] already."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return images.astype(np.float32)


def quantize(images_minus1_1) -> np.ndarray:
    """float [-1, 1] -> uint8, rounding as a PNG writer does: the images a published FID is
    computed on are 8-bit files, so generated and dataset images are quantized alike."""
    x = (np.asarray(images_minus1_1, np.float32) + 1.0) * 127.5
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


_COMPILED: dict = {}


class ShardedFeatureFn:
    """``fn(local_images [b, H, W, C]) -> {name: np.ndarray [b, ...]}`` (module docstring).

    Args:
      apply_fn: ``(variables, images float32 [B, H, W, C] in [0, 1]) -> {name: [B, ...]}``.
      variables: the network's variables (put on every device once).
      local_batch_size: images per call on this process; must divide evenly over its devices.
      mesh: 1-D mesh with axis ``"data"`` (default: all devices).
    """

    def __init__(self, apply_fn: Callable[[Any, jax.Array], Mapping[str, jax.Array]], variables, *,
                 local_batch_size: int, mesh: Mesh | None = None):
        self.mesh = data_mesh() if mesh is None else mesh
        if self.mesh.axis_names != ("data",):
            raise ValueError(f"mesh must be 1-D with axis 'data', got axes {self.mesh.axis_names}")
        local_devices = sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)
        if local_batch_size < 1 or local_batch_size % local_devices:
            raise ValueError(
                f"local_batch_size {local_batch_size} must be a positive multiple of this process's "
                f"{local_devices} devices"
            )
        self.local_batch_size = local_batch_size
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec("data"))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.variables = jax.device_put(variables, replicated)
        key = (apply_fn, self.mesh)
        if key not in _COMPILED:  # one jit object per (function, mesh): repeated evaluations compile once
            _COMPILED[key] = jax.jit(apply_fn, in_shardings=(replicated, self.batch_sharding),
                                     out_shardings=self.batch_sharding)
        self._fn = _COMPILED[key]

    def __call__(self, local_images) -> dict[str, np.ndarray]:
        images = to_unit_interval(local_images)
        n = images.shape[0]
        if n > self.local_batch_size:
            raise ValueError(f"got {n} images for local_batch_size {self.local_batch_size}")
        if n < self.local_batch_size:
            pad = np.zeros((self.local_batch_size - n,) + images.shape[1:], images.dtype)
            images = np.concatenate([images, pad])
        global_images = jax.make_array_from_process_local_data(self.batch_sharding, images)
        out = self._fn(self.variables, global_images)
        return {name: _local_rows(value)[:n] for name, value in out.items()}


def _local_rows(array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order."""
    if jax.process_count() == 1:
        return np.asarray(array)
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen, rows = set(), []
    for shard in shards:
        start = shard.index[0].start or 0
        if start not in seen:  # replicas of a shard (none on a 1-D data mesh) appear once
            seen.add(start)
            rows.append(np.asarray(shard.data))
    return np.concatenate(rows)


class Collected(dict):
    """``collect``'s result: ``{"stats": GaussianStats or None, name: np.ndarray [N, ...]}``."""


def collect(
    feature_fn: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    batches: Iterable[np.ndarray],
    *,
    stats_key: str | None = "pool3",
    keep: Sequence[str] = (),
    max_kept: int | None = None,
    progress=None,
) -> Collected:
    """Run ``feature_fn`` over ``batches``; accumulate ``stats_key`` (merged over processes),
    keep the ``keep`` features of each process's first ``max_kept`` images (gathered from every
    process; they must hold the same feature shapes). ``progress``: an object with
    ``update(n)`` (e.g. tqdm)."""
    acc = None
    kept: dict[str, list[np.ndarray]] = {name: [] for name in keep}
    num_kept = 0
    for batch in batches:
        out = feature_fn(batch)
        if stats_key is not None:
            feats = out[stats_key]
            acc = GaussianAccumulator(feats.shape[-1]) if acc is None else acc
            acc.update(feats.reshape(feats.shape[0], -1))
        take = len(batch) if max_kept is None else max(0, min(len(batch), max_kept - num_kept))
        for name in keep:
            kept[name].append(np.asarray(out[name][:take]))
        num_kept += take
        if progress is not None:
            progress.update(len(batch))
    result = Collected()
    result["stats"] = None if acc is None else allgather_merge(acc).stats()
    for name in keep:
        local = np.concatenate(kept[name]) if kept[name] else np.zeros((0,), np.float32)
        result[name] = _allgather_rows(local)
    return result


def _allgather_rows(local: np.ndarray) -> np.ndarray:
    """Every process's rows, concatenated in process order (identity on one process)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    counts = np.asarray(multihost_utils.process_allgather(np.asarray([local.shape[0]], np.int64))).reshape(-1)
    padded = np.zeros((int(counts.max()),) + local.shape[1:], local.dtype)
    padded[: local.shape[0]] = local
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return np.concatenate([gathered[p, : counts[p]] for p in range(len(counts))])
