"""Pixel conversions shared by the data sources: channel handling, resize + center crop, [-1, 1],
and the crop geometry SDXL's micro-conditioning records.

All sources emit ``float32 [H, W, C]`` images in ``[-1, 1]`` (``uint8 0 -> -1``, ``255 -> 1``),
the range the autoencoder and the pixel-space diffusion models are trained on.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

RESAMPLE_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


def check_resolution(resolution) -> int:
    """Returns ``resolution`` as an int, or raises ValueError if it is not a positive integer."""
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution <= 0:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    return int(resolution)


def check_channels(channels, allow_none: bool = True):
    """Returns ``channels`` (1, 3, or None for "native"), or raises ValueError."""
    if channels is None and allow_none:
        return None
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3{' or None' if allow_none else ''}, got {channels!r}")
    return int(channels)


def resample_filter(name: str) -> Image.Resampling:
    if name not in RESAMPLE_FILTERS:
        raise ValueError(f"unknown interpolation {name!r}; expected one of {sorted(RESAMPLE_FILTERS)}")
    return RESAMPLE_FILTERS[name]


def to_model_range(pixels: np.ndarray) -> np.ndarray:
    """``uint8 [..]`` in ``[0, 255]`` -> ``float32 [..]`` in ``[-1, 1]``."""
    return pixels.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)


def array_to_pil(pixels: np.ndarray) -> Image.Image:
    """``[H, W]`` or ``[H, W, C]`` (C in 1, 3, 4) integer array -> 8-bit PIL image ("L", "RGB", "RGBA").

    16-bit inputs (some TFDS datasets) are scaled by 1/257 so that 65535 maps to 255.
    """
    pixels = np.asarray(pixels)
    if pixels.dtype == np.uint16:
        pixels = np.round(pixels.astype(np.float32) / 257.0).astype(np.uint8)
    elif pixels.dtype != np.uint8:
        raise ValueError(f"expected uint8 or uint16 image pixels, got dtype {pixels.dtype}")
    if pixels.ndim == 3 and pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim == 2:
        return Image.fromarray(pixels)
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        return Image.fromarray(pixels)
    raise ValueError(f"expected an image of shape [H, W] or [H, W, C] with C in (1, 3, 4), got {pixels.shape}")


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Converts any PIL image to 8-bit "L" (channels=1) or "RGB" (channels=3).

    Transparent pixels are composited onto white, not left at their (arbitrary, often black)
    stored colour, which is what a viewer shows for icons and cut-outs.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # Pillow's own "I" -> "L" conversion clips rather than rescales 16-bit data.
        wide = np.asarray(image, dtype=np.float32)
        image = Image.fromarray(np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.round(np.asarray(image)), 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode in ("RGB", "L") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def resize_center_crop(image: Image.Image, resolution: int, resample: str = "bicubic") -> Image.Image:
    """Center-crops the largest centred square and resizes it to ``resolution x resolution``.

    Equivalent to resizing the shorter side to ``resolution`` and then center-cropping, but done
    as one Pillow resample of the (sub-pixel) square box, so no rounding of the intermediate size.
    Pillow's resampling widens the filter when downsampling, so it is antialiased.
    """
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) / 2.0, (height - side) / 2.0
    if width == height == resolution:
        return image
    return image.resize(
        (resolution, resolution),
        resample=resample_filter(resample),
        box=(left, top, left + side, top + side),
        reducing_gap=None,
    )


# ----------------------------------------------------------------------------- crop geometry
# SDXL's micro-conditioning records where the training crop came from. The coordinates are the
# ones the SDXL paper (Algorithm 1) and diffusers' train_text_to_image_sdxl.py compute: the
# image is resized so that its shorter side is the resolution (torchvision ``Resize(resolution)``:
# the longer side truncated to an int), and ``(top, left)`` is the crop's corner in *that*
# resized image. Those are the values the released SDXL U-Nets were trained on; the pixels
# themselves come from one resample of the matching box of the original image.


def resized_size(height: int, width: int, resolution: int) -> tuple[int, int]:
    """``(h, w)`` of an image of ``(height, width)`` resized so its shorter side is
    ``resolution`` (the longer ``int(resolution * long / short)``, as torchvision's ``Resize``)."""
    if height <= width:
        return int(resolution), int(resolution * width / height)
    return int(resolution * height / width), int(resolution)


def center_crop_top_left(height: int, width: int, resolution: int) -> tuple[int, int]:
    """The center crop's ``(top, left)`` in the resized image, rounded as diffusers'
    ``train_text_to_image_sdxl.py`` (``round((h - resolution) / 2)``)."""
    h, w = resized_size(height, width, resolution)
    return max(0, int(round((h - resolution) / 2.0))), max(0, int(round((w - resolution) / 2.0)))


def random_crop_top_left(height: int, width: int, resolution: int, rng: np.random.Generator) -> tuple[int, int]:
    """A uniformly random ``(top, left)`` in the resized image (torchvision ``RandomCrop``'s
    range ``[0, h - resolution]`` x ``[0, w - resolution]``; one of them is always 0)."""
    h, w = resized_size(height, width, resolution)
    return int(rng.integers(0, h - resolution + 1)), int(rng.integers(0, w - resolution + 1))


def resize_crop(
    image: Image.Image, resolution: int, top_left: tuple[int, int], original_size: tuple[int, int],
    resample: str = "bicubic",
) -> Image.Image:
    """The ``resolution`` square at ``top_left`` of the resized image (see :func:`resized_size`)
    as one antialiased resample of the matching box of ``image``. ``original_size`` is the
    ``(height, width)`` the coordinates refer to; ``image`` may be a reduced decode of it
    (a JPEG draft), the box is scaled to its pixels."""
    height, width = original_size
    top, left = top_left
    side = min(height, width)
    scale = side / float(resolution)  # original pixels per output pixel
    fx, fy = image.size[0] / float(width), image.size[1] / float(height)
    box = (left * scale * fx, top * scale * fy, (left * scale + side) * fx, (top * scale + side) * fy)
    return image.resize((resolution, resolution), resample=resample_filter(resample), box=box, reducing_gap=None)


def pil_to_model_array(image: Image.Image, channels: int) -> np.ndarray:
    """8-bit "L"/"RGB" PIL image -> ``float32 [H, W, channels]`` in ``[-1, 1]``."""
    pixels = np.asarray(to_mode(image, channels), dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    return to_model_range(pixels)


def prepare_image(image: Image.Image, resolution: int, channels: int, resample: str = "bicubic") -> np.ndarray:
    """Any PIL image -> ``float32 [resolution, resolution, channels]`` in ``[-1, 1]``."""
    image = to_mode(image, channels)
    return pil_to_model_array(resize_center_crop(image, resolution, resample), channels)
