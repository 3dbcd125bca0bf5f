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
orientation applied, and transparency composited onto white. ``random_crop=True`` takes a
uniformly random square instead of the centred one, drawn from ``default_rng([CROP_STREAM,
seed, index])``: the same crop of item ``i`` every time it is read, so ``source[i]`` stays a
pure function of ``i`` and the seed (and a resumed run sees the same crops); a new crop per
epoch would need the epoch, which a source does not know.

Every example also records SDXL's micro-conditioning (``ldm_jax.data.images``, crop geometry):
``original_size`` int32 [2], the (height, width) of the image file (after EXIF orientation,
before any draft decode, resize or crop), and ``crop_top_left`` int32 [2], the crop's (top,
left) in the image resized to a shorter side of ``resolution``, as the SDXL paper and
diffusers' ``train_text_to_image_sdxl.py`` compute them. The loader stacks them to [B, 2].

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

from ldm_jax.data.images import (
    center_crop_top_left,
    check_channels,
    check_resolution,
    pil_to_model_array,
    prepare_image,
    random_crop_top_left,
    resize_crop,
    to_mode,
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_EXTENSION = ".txt"
# First word of the random-crop seed sequence, so crop draws never share a stream with the
# loader's epoch permutations (``default_rng([seed, epoch])``).
CROP_STREAM = 0xC409
# EXIF orientations that rotate by 90 degrees (ImageOps.exif_transpose swaps width and height).
_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)


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
      random_crop: a random square (fixed per ``(seed, index)``) instead of the centred one.
      seed: seed of the random crops.
    """

    def __init__(
        self,
        path: str,
        resolution: int,
        channels: int = 3,
        labels_from_subfolders: bool = False,
        verify: bool = True,
        resample: str = "bicubic",
        random_crop: bool = False,
        seed: int = 0,
    ):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"image folder seed must be an integer >= 0, got {seed!r}")
        if not path or not os.path.isdir(path):
            raise ValueError(f"image folder {path!r} does not exist or is not a directory")
        self.root = os.path.abspath(path)
        self.name = f"folder:{path}"
        self.resolution = check_resolution(resolution)
        self.channels = check_channels(channels, allow_none=False)
        self.resample = resample
        self.random_crop = bool(random_crop)
        self.seed = int(seed)
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

    def _load(self, candidate: int, index: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """File ``candidate`` read for item ``index`` -> (pixels, original_size, crop_top_left)."""
        with Image.open(os.path.join(self.root, self.paths[candidate])) as image:
            width, height = image.size  # the file's own size: before the draft decode shrinks it
            if image.getexif().get(0x0112, 1) in _SWAPPING_ORIENTATIONS:  # 0x0112: EXIF Orientation
                width, height = height, width
            if image.format == "JPEG":
                image.draft("L" if self.channels == 1 else "RGB", (self.resolution, self.resolution))
            image = ImageOps.exif_transpose(image)
            image.load()
            original = (int(height), int(width))
            if not self.random_crop:
                pixels = prepare_image(image, self.resolution, self.channels, self.resample)
                return pixels, original, center_crop_top_left(height, width, self.resolution)
            rng = np.random.default_rng([CROP_STREAM, self.seed, int(index)])
            top_left = random_crop_top_left(height, width, self.resolution, rng)
            cropped = resize_crop(to_mode(image, self.channels), self.resolution, top_left, original, self.resample)
            return pil_to_model_array(cropped, self.channels), original, top_left

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
                image, original_size, crop_top_left = self._load(candidate, index)
            except Exception as error:  # corrupt/truncated data: replace, count, keep training
                self._record_bad(self.paths[candidate], error)
                continue
            example = {
                "image": image,
                "original_size": np.asarray(original_size, np.int32),
                "crop_top_left": np.asarray(crop_top_left, np.int32),
            }
            if self._labels is not None:
                example["label"] = self._labels[candidate]
            if self.has_captions:
                example["caption"] = self._caption(candidate)
            return example
        raise UnreadableDataError(f"every image under {self.root!r} failed to decode; see the warnings above")
