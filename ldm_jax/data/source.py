"""The random-access data-source protocol and the dataset statistics the trainer needs.

A source is a finite sequence of examples: ``len(source)`` and ``source[i]`` for
``0 <= i < len(source)``, where ``source[i]`` depends only on ``i`` (and the source's
construction arguments), never on call order. That is what makes shuffling, per-process
sharding and resumption from a single integer exact (see :mod:`ldm_jax.data.loader`).

Each example is a dict:

* ``"image"``: ``float32 [H, W, C]`` in ``[-1, 1]`` with ``H == W == source.resolution`` and
  ``C == source.channels``;
* ``"label"``: ``int32`` scalar in ``[0, num_classes)``, present iff ``source.num_classes``;
* ``"caption"``: ``str``, present iff ``source.has_captions``;
* ``"original_size"`` / ``"crop_top_left"``: ``int32 [2]``, SDXL's micro-conditioning (the
  image's (height, width) before resizing, the crop's (top, left)), where a source records them
  (``ldm_jax.data.folder``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol, Sequence, runtime_checkable


@runtime_checkable
class DataSource(Protocol):
    """What :class:`ldm_jax.data.loader.DataLoader` needs from a dataset."""

    resolution: int
    channels: int
    num_classes: Optional[int]
    has_captions: bool

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class DatasetStats:
    """Static facts about a source that configure the model and the trainer.

    ``num_classes`` is None for unlabelled data (use it to size a class-embedding table, with
    one extra "null" class for classifier-free guidance if the trainer wants one).
    ``num_skipped`` counts examples that could not be read so far (image folders only; it can
    grow during training as corrupt files are discovered), for "skipped N corrupt images" logs.
    """

    name: str
    num_examples: int
    resolution: int
    channels: int
    num_classes: Optional[int]
    class_names: Optional[Sequence[str]]
    has_captions: bool
    num_skipped: int


def dataset_stats(source: DataSource, name: str = "") -> DatasetStats:
    """Collects :class:`DatasetStats` from a source without reading any example."""
    class_names = getattr(source, "class_names", None)
    return DatasetStats(
        name=name or getattr(source, "name", type(source).__name__),
        num_examples=len(source),
        resolution=int(source.resolution),
        channels=int(source.channels),
        num_classes=None if source.num_classes is None else int(source.num_classes),
        class_names=None if class_names is None else tuple(class_names),
        has_captions=bool(source.has_captions),
        num_skipped=int(getattr(source, "num_skipped", 0)),
    )
