"""Image sets to evaluate: a folder of image files, or any ``ldm_jax.data`` source.

Both present ``len(images)`` and ``images[i] -> uint8 [H, W, 3]`` (8-bit RGB, as the files a
published FID is computed on), and :func:`process_batches` deals them out: process ``p`` of
``P`` takes the images ``i`` with ``i % P == p``, in batches of ``batch_size``, and every process
yields the same number of batches (the last ones may be short or empty), as the collective
feature function needs.

A folder is read as pytorch-fid reads it: every image at its own size, converted to RGB, no
crop and no resize on the host (the network resizes to 299), so all images must share one
size. A data source (``ldm_jax.data.build_dataset``: digits, shapes, a folder, a tfds dataset
in a local ``data_dir``) gives float images in [-1, 1] at its configured resolution; they are
quantized to uint8 and grey images repeated to RGB.
"""

from __future__ import annotations

import math
import os
from typing import Iterator

import numpy as np
from PIL import Image

from ldm_jax.data.folder import IMAGE_EXTENSIONS
from ldm_jax.evaluation.features import quantize


class ImageFiles:
    """The image files under ``folder`` (recursive, sorted paths), all of one size."""

    def __init__(self, folder: str | os.PathLike, limit: int | None = None):
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise ValueError(f"image folder not found: {folder}")
        paths = []
        for directory, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames.sort()
            paths += [os.path.join(directory, f) for f in filenames if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
        paths.sort()
        if not paths:
            raise ValueError(f"no {'/'.join(IMAGE_EXTENSIONS)} images in {folder}")
        if limit is not None:
            if len(paths) < limit:
                raise ValueError(f"{folder} holds {len(paths)} images, fewer than the {limit} requested")
            paths = paths[:limit]
        self.folder, self.paths = folder, paths
        self.size = self._common_size()

    def _common_size(self) -> tuple[int, int]:
        sizes: dict[tuple[int, int], str] = {}
        for path in self.paths:
            with Image.open(path) as image:
                sizes.setdefault(image.size, path)
            if len(sizes) > 1:
                (s1, p1), (s2, p2) = list(sizes.items())[:2]
                raise ValueError(
                    f"images differ in size: {p1} is {s1[0]}x{s1[1]}, {p2} is {s2[0]}x{s2[1]} "
                    "(resize them to one size first)"
                )
        (width, height), = sizes
        return height, width

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        with Image.open(self.paths[index]) as image:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)


class SourceImages:
    """An ``ldm_jax.data`` source's images as uint8 RGB (first ``limit`` examples)."""

    def __init__(self, source, limit: int | None = None):
        n = len(source)
        if n == 0:
            raise ValueError(f"data source {getattr(source, 'name', source)!r} is empty")
        if limit is not None and limit > n:
            raise ValueError(f"data source holds {n} examples, fewer than the {limit} requested")
        self.source, self.length = source, n if limit is None else limit
        self.size = (int(source.resolution), int(source.resolution))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> np.ndarray:
        image = quantize(self.source[index]["image"])
        if image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        return image


def process_batches(images, batch_size: int, process_index: int = 0, process_count: int = 1) -> Iterator[np.ndarray]:
    """This process's share of ``images`` in uint8 batches [b <= batch_size, H, W, 3] (module docstring)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    mine = range(process_index, len(images), process_count)
    num_batches = math.ceil(math.ceil(len(images) / process_count) / batch_size)
    height, width = images.size
    for b in range(num_batches):
        indices = mine[b * batch_size:(b + 1) * batch_size]
        if len(indices) == 0:
            yield np.zeros((0, height, width, 3), np.uint8)
        else:
            yield np.stack([images[i] for i in indices])
