"""TensorFlow Datasets as a random-access source (no TensorFlow ops on the read path).

The dataset must already be prepared in ``data_dir`` (``tfds build <name> --data_dir=...`` or
``tfds.builder(name, data_dir=...).download_and_prepare()``); nothing is ever downloaded here.

* Datasets prepared as ``array_record`` (``--file_format=array_record``) are read through
  TFDS's own random-access ``builder.as_data_source(split)``.
* Datasets prepared as ``tfrecord`` (the TFDS default) have no random access in TFDS, so this
  module indexes the byte offset of every record once (a header walk that touches 12 bytes per
  record, ~0.1-1 s per 100k records on local disk) and then reads records with ``os.pread``,
  decoding them with the same ``features.deserialize_example_np`` that ``as_data_source`` uses.
  Split slicing such as ``"train[:90%]"`` works for both. This path needs local files; for
  ``gs://`` data dirs, prepare the dataset as array_record.

Images are center-cropped and resized to the configured resolution; grayscale data can be
kept at one channel or repeated to three (``channels``).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

from ldm_jax.data.images import array_to_pil, check_channels, check_resolution, prepare_image, to_model_range

_TFRECORD_HEADER_BYTES = 12  # uint64 length + uint32 masked CRC of the length
_TFRECORD_FOOTER_BYTES = 4  # uint32 masked CRC of the data

AUTO = "auto"


def tfrecord_record_offsets(filename: str) -> tuple[np.ndarray, np.ndarray]:
    """Byte offsets and lengths (each int64 [num_records]) of the payloads of a TFRecord file.

    Raises ValueError naming the file if a header points past its end (truncated or not a
    TFRecord file).
    """
    offsets, lengths = [], []
    file_size = os.path.getsize(filename)
    position = 0
    with open(filename, "rb") as f:
        while position < file_size:
            f.seek(position)
            header = f.read(_TFRECORD_HEADER_BYTES)
            length = int.from_bytes(header[:8], "little") if len(header) == _TFRECORD_HEADER_BYTES else -1
            end = position + _TFRECORD_HEADER_BYTES + length + _TFRECORD_FOOTER_BYTES
            if length < 0 or end > file_size:
                raise ValueError(f"TFRecord file {filename!r} is truncated or corrupt at byte {position}")
            offsets.append(position + _TFRECORD_HEADER_BYTES)
            lengths.append(length)
            position = end
    return np.asarray(offsets, dtype=np.int64), np.asarray(lengths, dtype=np.int64)


class TFRecordRecords:
    """Random access to the serialized records that a TFDS split's file instructions select."""

    def __init__(self, file_instructions):
        self.filenames, file_ids, offsets, lengths = [], [], [], []
        for instruction in file_instructions:
            filename = os.fspath(instruction.filename)
            if "://" in filename:
                raise ValueError(
                    f"random access to TFRecord files needs a local path, got {filename!r}; "
                    "prepare the dataset with file_format=array_record instead"
                )
            file_offsets, file_lengths = tfrecord_record_offsets(filename)
            if len(file_offsets) != instruction.examples_in_shard:
                raise ValueError(
                    f"{filename!r} holds {len(file_offsets)} records but the dataset info says "
                    f"{instruction.examples_in_shard}"
                )
            selected = slice(instruction.skip, instruction.skip + instruction.take)
            file_ids.append(np.full(instruction.take, len(self.filenames), dtype=np.int32))
            offsets.append(file_offsets[selected])
            lengths.append(file_lengths[selected])
            self.filenames.append(filename)
        self._file_ids = np.concatenate(file_ids) if file_ids else np.zeros(0, np.int32)
        self._offsets = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
        self._lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> bytes:
        fd = os.open(self.filenames[self._file_ids[index]], os.O_RDONLY)
        try:
            # pread has no shared file position, so reader threads need no lock.
            return os.pread(fd, int(self._lengths[index]), int(self._offsets[index]))
        finally:
            os.close(fd)


class _DeserializingTFRecordSource:
    def __init__(self, records: TFRecordRecords, features):
        self._records = records
        self._features = features

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return self._features.deserialize_example_np(self._records[index])


def _lookup(example: dict, key: str) -> Any:
    """``example["a"]["b"]`` for ``key == "a/b"``; KeyError if missing."""
    value = example
    for part in key.split("/"):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(key)
        value = value[part]
    return value


def _flat_keys(example: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in example.items():
        keys.extend(_flat_keys(v, f"{prefix}{k}/") if isinstance(v, dict) else [f"{prefix}{k}"])
    return keys


def _as_text(value: Any) -> str:
    """A TFDS Text value (bytes, str, or a sequence of them: the first is used) -> str."""
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            value = value.item()
        elif value.size == 0:
            return ""
        else:
            value = value.reshape(-1)[0]
    elif isinstance(value, (list, tuple)):
        if not value:
            return ""
        value = value[0]
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


class TfdsSource:
    """Random-access source over a prepared TFDS dataset split.

    Args:
      name: TFDS name, optionally with config/version ("celeb_a", "cifar10:3.0.2").
      data_dir: TFDS data dir holding the prepared dataset (None: TFDS's default location).
      split: split or slice ("train", "train[:90%]", "test").
      resolution: output side (center crop + antialiased bicubic resize).
      channels: 1, 3, or None to keep the dataset's own channel count.
      image_key: feature holding the image ("/" separates nested features).
      label_key: "auto" uses "label" when it is a ClassLabel feature; None disables labels; any
        other name must be an integer feature (num_classes comes from its ClassLabel if any).
      caption_key: None, or a Text feature; for a sequence of captions (e.g. "captions/text"),
        the first caption is used.
    """

    def __init__(
        self,
        name: str,
        *,
        data_dir: Optional[str],
        split: str = "train",
        resolution: int,
        channels: Optional[int] = None,
        image_key: str = "image",
        label_key: Optional[str] = AUTO,
        caption_key: Optional[str] = None,
    ):
        import tensorflow_datasets as tfds  # lazy: only this source needs TFDS

        self.resolution = check_resolution(resolution)
        self.name = f"tfds:{name}"
        try:
            builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise ValueError(f"unknown TFDS dataset {name!r}") from None
        try:
            source = builder.as_data_source(split=split)
        except NotImplementedError:
            # Prepared as TFRecord (or not prepared at all): TFDS offers no random access.
            if not builder.is_prepared():
                raise ValueError(
                    f"TFDS dataset {name!r} is not prepared under data_dir={data_dir!r}; run "
                    f"`tfds build {name} --data_dir=...` first (nothing is downloaded here)"
                ) from None
            try:
                instructions = builder.info.splits[split].file_instructions
            except KeyError:
                raise ValueError(f"unknown split {split!r} for TFDS dataset {name!r}") from None
            source = _DeserializingTFRecordSource(TFRecordRecords(instructions), builder.info.features)
        except KeyError:
            raise ValueError(f"unknown split {split!r} for TFDS dataset {name!r}") from None
        self._source = source
        self._length = len(source)
        if self._length == 0:
            raise ValueError(f"split {split!r} of TFDS dataset {name!r} is empty")

        first = source[0]
        available = _flat_keys(first)
        if image_key not in available:
            raise ValueError(f"image_key {image_key!r} is not a feature of {name!r}; features: {available}")
        self.image_key = image_key
        native_shape = np.shape(_lookup(first, image_key))
        native_channels = native_shape[-1] if len(native_shape) == 3 else 1
        self.channels = check_channels(channels) or (1 if native_channels == 1 else 3)

        features = builder.info.features
        if label_key == AUTO:
            label_key = "label" if "label" in available and hasattr(_feature(features, "label"), "num_classes") else None
        if label_key is not None and label_key not in available:
            raise ValueError(f"label_key {label_key!r} is not a feature of {name!r}; features: {available}")
        self.label_key = label_key
        self.num_classes = None
        self.class_names = None
        if label_key is not None:
            label_feature = _feature(features, label_key)
            if label_feature is None or not hasattr(label_feature, "num_classes"):
                raise ValueError(f"label_key {label_key!r} of {name!r} is not a ClassLabel feature")
            self.num_classes = int(label_feature.num_classes)
            names = getattr(label_feature, "names", None)
            self.class_names = tuple(names) if names else None

        if caption_key is not None and caption_key not in available:
            raise ValueError(f"caption_key {caption_key!r} is not a feature of {name!r}; features: {available}")
        self.caption_key = caption_key
        self.has_captions = caption_key is not None

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self._length:
            raise IndexError(f"{self.name} index {index} out of range [0, {self._length})")
        raw = self._source[index]
        pixels = np.asarray(_lookup(raw, self.image_key))
        if pixels.shape[:2] == (self.resolution, self.resolution) and pixels.dtype == np.uint8 and (
            (pixels.ndim == 2 and self.channels == 1) or (pixels.ndim == 3 and pixels.shape[-1] == self.channels)
        ):
            image = to_model_range(pixels.reshape(self.resolution, self.resolution, self.channels))
        else:
            image = prepare_image(array_to_pil(pixels), self.resolution, self.channels)
        example = {"image": image}
        if self.label_key is not None:
            example["label"] = np.int32(_lookup(raw, self.label_key))
        if self.caption_key is not None:
            example["caption"] = _as_text(_lookup(raw, self.caption_key))
        return example


def _feature(features, key: str):
    """The TFDS feature object at a "/"-separated key, or None if it cannot be resolved."""
    feature = features
    for part in key.split("/"):
        if hasattr(feature, "feature") and not hasattr(feature, "keys"):
            feature = feature.feature  # tfds.features.Sequence wraps the per-element feature
        try:
            feature = feature[part]
        except (KeyError, TypeError, AttributeError):
            return None
    return feature
