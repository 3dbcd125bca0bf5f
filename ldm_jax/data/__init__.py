"""Input pipeline: random-access sources and deterministic, resumable, per-process batching.

Sources (each ``len`` + ``source[i] -> {"image": float32 [H, W, C] in [-1, 1], "label"?, "caption"?}``):
:class:`DigitsSource` (sklearn 8x8 digits), :class:`ShapesSource` (generated captioned shapes),
:class:`ImageFolderSource` (a directory of images, optional captions/labels) and
:class:`TfdsSource` (a prepared TensorFlow Datasets split, imported lazily).
:func:`build_dataset` / :func:`build_loader` construct them from ``config.data``.
"""

from ldm_jax.data.build import build_dataset, build_loader
from ldm_jax.data.digits import DigitsSource
from ldm_jax.data.folder import ImageFolderSource
from ldm_jax.data.loader import BatchIterator, DataLoader, IndexSampler, collate, make_global_batch
from ldm_jax.data.shapes import ShapesSource, ShapeSpec
from ldm_jax.data.source import DatasetStats, DataSource, dataset_stats


def __getattr__(name):
    # TfdsSource is resolved lazily so that importing ldm_jax.data never imports TFDS.
    if name == "TfdsSource":
        from ldm_jax.data.tfds_source import TfdsSource

        return TfdsSource
    raise AttributeError(name)


__all__ = [
    "BatchIterator",
    "DataLoader",
    "DataSource",
    "DatasetStats",
    "DigitsSource",
    "ImageFolderSource",
    "IndexSampler",
    "ShapeSpec",
    "ShapesSource",
    "TfdsSource",
    "build_dataset",
    "build_loader",
    "collate",
    "dataset_stats",
    "make_global_batch",
]
