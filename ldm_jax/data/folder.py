"""A directory tree of images, with optional captions and subfolder labels.

Layout::

    root/
      cats/0001.jpg      # label "cats" if labels_from_subfolders (classes sorted by name)
      cats/0001.txt      # optional caption for 0001.jpg (same stem, same folder, UTF-8)
      dogs/a/b/7.png     # labels use the first path component below root: "dogs"

Images (.png, .jpg, .jpeg, .webp, any case) are found recursively in sorted path order, so
index ``i`` always names the same file. Each is center-cropped to a square, resized to the
configured resolution with antialiased bicubic resampling (JPEGs are first DCT-downscaled by
libjpeg's draft mode when they are much larger than needed, which is much cheaper), EXIF
orientation applied, and transparency composited onto white.

Corrupt files never stop a run: files whose header cannot be read are dropped when the folder
is scanned, and files that fail to decode later are replaced by the next readable file in
index order (so ``source[i]`` stays a pure function of ``i`` and the files on disk). Both emit
a ``RuntimeWarning`` once per file and are counted in ``num_skipped`` / ``skipped_paths`` so the
trainer can log "skipped N corrupt images".
"""

from __future__ import annotations

import os
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps

from ldm_jax.data.images import check_channels, check_resolution, prepare_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_EXTENSION = ".txt"


class UnreadableDataError(ValueError):
    """Every image of a folder failed to decode (one line naming the folder)."""


def _scan(root: str) -> tuple[list[str], set[str]]:
    """Sorted image paths and the set of caption paths below ``root`` (relative, '/'-separated)."""
    images, captions = [], set()
    for directory, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()  # os.walk order is filesystem-dependent
        relative_dir = os.path.relpath(directory, root)
        for filename in sorted(filenames):
            relative = filename if relative_dir == "." else os.path.join(relative_dir, filename)
            extension = os.path.splitext(filename)[1].lower()
            if extension in IMAGE_EXTENSIONS:
                images.append(relative)
            elif extension == CAPTION_EXTENSION:
                captions.add(relative)
    return sorted(images), captions


class ImageFolderSource:
    """Random-access source over an image directory tree.

    Args:
      path: root directory.
      resolution: output side length.
      channels: 3 (RGB) or 1 (luma).
      labels_from_subfolders: give each image the index of its top-level subfolder among the
        sorted subfolder names; every image must then be inside a subfolder.
      verify: open every file's header at construction to drop unreadable files up front
        (cheap: headers only) and decode the first usable one, so a folder where nothing decodes
        fails at construction; later decode failures are handled lazily either way.
      resample: Pillow filter for the resize ("bicubic", "lanczos", "bilinear", ...).
    """

    def __init__(
        self,
        path: str,
        resolution: int,
        channels: int = 3,
        labels_from_subfolders: bool = False,
        verify: bool = True,
        resample: str = "bicubic",
    ):
        if not path or not os.path.isdir(path):
            raise ValueError(f"image folder {path!r} does not exist or is not a directory")
        self.root = os.path.abspath(path)
        self.name = f"folder:{path}"
        self.resolution = check_resolution(resolution)
        self.channels = check_channels(channels, allow_none=False)
        self.resample = resample
        self._lock = threading.Lock()
        self._bad: dict[str, str] = {}  # relative path -> reason

        paths, caption_files = _scan(self.root)
        if verify:
            readable = []
            for relative in paths:
                try:
                    with Image.open(os.path.join(self.root, relative)) as image:
                        image.size  # noqa: B018 -- opening parses the header; that is the check
                    readable.append(relative)
                except Exception as error:  # any failure means "not usable"; never crash a run
                    self._record_bad(relative, error)
            paths = readable
        if not paths:
            raise ValueError(f"no readable {'/'.join(IMAGE_EXTENSIONS)} images found under {path!r}")
        self.paths = paths
        self._caption_paths = [os.path.splitext(p)[0] + CAPTION_EXTENSION for p in paths]
        self._has_caption = np.array([c in caption_files for c in self._caption_paths])
        self.has_captions = bool(self._has_caption.any())

        if labels_from_subfolders:
            top_dirs = []
            for relative in paths:
                parts = relative.split(os.sep)
                if len(parts) < 2:
                    raise ValueError(
                        f"labels_from_subfolders needs every image in a subfolder, but {relative!r} is directly in {path!r}"
                    )
                top_dirs.append(parts[0])
            self.class_names = tuple(sorted(set(top_dirs)))
            index_of = {name: i for i, name in enumerate(self.class_names)}
            self._labels = np.array([index_of[d] for d in top_dirs], dtype=np.int32)
            self.num_classes = len(self.class_names)
        else:
            self.class_names = None
            self._labels = None
            self.num_classes = None
        if verify:
            self[0]  # decodes images until one works: a folder of undecodable files fails here

    @property
    def num_skipped(self) -> int:
        """How many files were found unreadable so far (grows as lazy decode failures appear)."""
        with self._lock:
            return len(self._bad)

    @property
    def skipped_paths(self) -> list[str]:
        with self._lock:
            return sorted(self._bad)

    def _record_bad(self, relative: str, error: Exception) -> None:
        with self._lock:
            if relative in self._bad:
                return
            self._bad[relative] = f"{type(error).__name__}: {error}"
            count = len(self._bad)
        warnings.warn(
            f"skipping unreadable image {os.path.join(self.root, relative)!r} ({type(error).__name__}: {error}); "
            f"{count} skipped so far",
            RuntimeWarning,
            stacklevel=3,
        )

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, index: int) -> np.ndarray:
        with Image.open(os.path.join(self.root, self.paths[index])) as image:
            if image.format == "JPEG":
                image.draft("L" if self.channels == 1 else "RGB", (self.resolution, self.resolution))
            image = ImageOps.exif_transpose(image)
            image.load()
            return prepare_image(image, self.resolution, self.channels, self.resample)

    def _caption(self, index: int) -> str:
        if not self._has_caption[index]:
            return ""
        with open(os.path.join(self.root, self._caption_paths[index]), encoding="utf-8", errors="replace") as f:
            return f.read().strip()

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self.paths):
            raise IndexError(f"image folder index {index} out of range [0, {len(self.paths)})")
        for attempt in range(len(self.paths)):
            candidate = (index + attempt) % len(self.paths)
            if self.paths[candidate] in self._bad:
                continue
            try:
                image = self._load(candidate)
            except Exception as error:  # corrupt/truncated data: replace, count, keep training
                self._record_bad(self.paths[candidate], error)
                continue
            example = {"image": image}
            if self._labels is not None:
                example["label"] = self._labels[candidate]
            if self.has_captions:
                example["caption"] = self._caption(candidate)
            return example
        raise UnreadableDataError(f"every image under {self.root!r} failed to decode; see the warnings above")
