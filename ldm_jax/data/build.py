"""Builds a source and a loader from the ``config.data`` section of an ml_collections config.

Keys (all optional except as noted, None meaning the default; plain dicts work too)::

    name                "digits" | "shapes" | "folder" | "tfds:<tfds name>"   (required)
    resolution          output side in pixels (default 32)
    channels            1 or 3; None -> the source's natural count (digits 1, tfds native, else 3)
    split               "train" (tfds splits/slices such as "train[:90%]"; digits train/test/all)
    seed                shuffle seed of the loader, and of the folder's random crops (default 0)
    shuffle             default True
    num_threads         reader threads per batch (default 2 for folder/tfds, else 1)
    data_dir            tfds data dir holding the prepared dataset
    image_key / label_key / caption_key     tfds feature names (defaults "image" / "auto" / None)
    path                folder root (required for "folder")
    folder_labels       label = top-level subfolder index (default False)
    folder_verify       read every header at start to drop unreadable files (default True)
    folder_random_crop  a random square per image (fixed per (seed, index)) instead of the
                        centred one (default False); the crop's corner is recorded either way
    shapes_num_examples default 100_000
    shapes_seed         content seed of the generated shapes (default 0)
    shapes_label_mode   "shape" | "color" | "shape_color" (default "shape")
    shapes_control      None | "mask" | "edges": add a ``control`` image per example (ControlNet)
    interpolation       digits resize filter (default "bilinear")
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from ldm_jax.data.loader import DataLoader
from ldm_jax.data.source import DataSource

KNOWN_KEYS = frozenset(
    {
        "name", "resolution", "channels", "split", "seed", "shuffle", "num_threads",
        "data_dir", "image_key", "label_key", "caption_key",
        "path", "folder_labels", "folder_verify", "folder_random_crop",
        "shapes_num_examples", "shapes_seed", "shapes_label_mode", "shapes_control",
        "interpolation",
    }
)  # fmt: skip
DATASET_NAMES = ("digits", "shapes", "folder", "tfds:<name>")


def _as_dict(config: Any) -> dict:
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
        return dict(config.to_dict())
    if isinstance(config, Mapping):
        return dict(config)
    raise ValueError(f"data config must be a ConfigDict or a mapping, got {type(config).__name__}")


def build_dataset(config: Any) -> DataSource:
    """The random-access source described by a ``config.data`` section (see module docstring)."""
    cfg = _as_dict(config)
    unknown = sorted(set(cfg) - KNOWN_KEYS)
    if unknown:
        raise ValueError(f"unknown data config keys {unknown}; known keys: {sorted(KNOWN_KEYS)}")
    # None: the default; except label_key, where None means "no labels" (its default is "auto")
    cfg = {key: value for key, value in cfg.items() if value is not None or key == "label_key"}
    name = cfg.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"data.name must be one of {DATASET_NAMES}, got {name!r}")
    resolution = cfg.get("resolution", 32)
    channels = cfg.get("channels")
    split = cfg.get("split", "train")

    if name == "digits":
        from ldm_jax.data.digits import DigitsSource

        return DigitsSource(
            resolution=resolution,
            channels=1 if channels is None else channels,
            split=split,
            interpolation=cfg.get("interpolation", "bilinear"),
        )
    if name == "shapes":
        from ldm_jax.data.shapes import ShapesSource

        return ShapesSource(
            resolution=resolution,
            channels=3 if channels is None else channels,
            num_examples=cfg.get("shapes_num_examples", 100_000),
            seed=cfg.get("shapes_seed", 0),
            label_mode=cfg.get("shapes_label_mode", "shape"),
            control=cfg.get("shapes_control"),
        )
    if name == "folder":
        from ldm_jax.data.folder import ImageFolderSource

        return ImageFolderSource(
            cfg.get("path"),
            resolution=resolution,
            channels=3 if channels is None else channels,
            labels_from_subfolders=bool(cfg.get("folder_labels", False)),
            verify=bool(cfg.get("folder_verify", True)),
            random_crop=bool(cfg.get("folder_random_crop", False)),
            seed=cfg.get("seed", 0),
        )
    if name.startswith("tfds:") and len(name) > len("tfds:"):
        from ldm_jax.data.tfds_source import AUTO, TfdsSource

        return TfdsSource(
            name[len("tfds:") :],
            data_dir=cfg.get("data_dir"),
            split=split,
            resolution=resolution,
            channels=channels,
            image_key=cfg.get("image_key", "image"),
            label_key=cfg.get("label_key", AUTO),
            caption_key=cfg.get("caption_key"),
        )
    raise ValueError(f"unknown dataset name {name!r}; expected one of {DATASET_NAMES}")


def build_loader(
    config: Any,
    global_batch_size: int,
    source: Optional[DataSource] = None,
    *,
    process_index: Optional[int] = None,
    process_count: Optional[int] = None,
) -> DataLoader:
    """A :class:`DataLoader` over ``source`` (built from ``config`` if None) with the config's
    seed, shuffle and thread settings; process index/count default to JAX's."""
    cfg = {key: value for key, value in _as_dict(config).items() if value is not None}
    source = build_dataset(config) if source is None else source
    threaded = str(cfg.get("name", "")).startswith(("folder", "tfds:"))
    return DataLoader(
        source,
        global_batch_size,
        seed=cfg.get("seed", 0),
        shuffle=bool(cfg.get("shuffle", True)),
        process_index=process_index,
        process_count=process_count,
        num_threads=cfg.get("num_threads", 2 if threaded else 1),
    )
