"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes; no download).

Useful as a seconds-scale class-conditional smoke-test dataset. The 8x8 images (integer
intensities 0..16) are resized once, at construction, to the configured resolution and kept
in memory as ``float32``, so ``__getitem__`` is an array lookup.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from ldm_jax.data.images import check_channels, check_resolution, resample_filter

DIGITS_MAX_INTENSITY = 16.0
# A fixed 90/10 cut of the file order (sklearn ships no split); "all" gives every image.
DIGITS_SPLITS = ("train", "test", "all")
_TRAIN_FRACTION = 0.9


class DigitsSource:
    """Random-access source over the sklearn digits.

    Args:
      resolution: output side length (the 8x8 images are resampled to it).
      channels: 1 (native grayscale) or 3 (the gray channel repeated).
      split: "train" (first 90% of sklearn's order), "test" (last 10%) or "all".
      interpolation: Pillow filter, "bilinear" by default; values are clipped to [-1, 1]
        because bicubic/lanczos overshoot at the digits' hard edges.

    Intensities map linearly ``0 -> -1`` and ``16 -> 1`` before any clipping.
    """

    name = "digits"
    num_classes = 10
    class_names = tuple(str(d) for d in range(10))
    has_captions = False

    def __init__(self, resolution: int = 32, channels: int = 1, split: str = "train", interpolation: str = "bilinear"):
        from sklearn.datasets import load_digits  # imported lazily: sklearn takes ~1 s to import

        self.resolution = check_resolution(resolution)
        self.channels = check_channels(channels, allow_none=False)
        if split not in DIGITS_SPLITS:
            raise ValueError(f"unknown digits split {split!r}; expected one of {DIGITS_SPLITS}")
        self.split = split
        resample = resample_filter(interpolation)

        digits = load_digits()
        images = np.asarray(digits.images, dtype=np.float32)
        labels = np.asarray(digits.target, dtype=np.int32)
        num_train = int(round(_TRAIN_FRACTION * len(images)))
        if split == "train":
            images, labels = images[:num_train], labels[:num_train]
        elif split == "test":
            images, labels = images[num_train:], labels[num_train:]

        if self.resolution == images.shape[1]:
            resized = images
        else:
            size = (self.resolution, self.resolution)
            # Mode "F" keeps full float precision through Pillow's resampler.
            resized = np.stack([np.asarray(Image.fromarray(img).resize(size, resample=resample)) for img in images])
        scaled = np.clip(resized * np.float32(2.0 / DIGITS_MAX_INTENSITY) - np.float32(1.0), -1.0, 1.0)
        scaled = scaled[..., None].astype(np.float32)
        if self.channels == 3:
            scaled = np.repeat(scaled, 3, axis=-1)
        self._images = scaled
        self._labels = labels

    def __len__(self) -> int:
        return len(self._labels)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self._labels):
            raise IndexError(f"digits index {index} out of range [0, {len(self._labels)})")
        return {"image": self._images[index], "label": self._labels[index]}
