"""The image folder's SDXL micro-conditioning: per-image ``original_size`` and ``crop_top_left``,
the optional random crop, and how the loader collates them.

Truths: hand-computed values for images of known sizes, following the SDXL paper's Algorithm 1
and diffusers' ``train_text_to_image_sdxl.py`` (resize the shorter side to the resolution with
torchvision's ``Resize``, longer side ``int(resolution * long / short)``; center crop corner
``round((h - res) / 2)``, Python's round-half-even; random crop corner uniform in
``[0, h - res] x [0, w - res]``); for an image whose shorter side already is the resolution, the
random crop's pixels are exactly the original's sub-array at the recorded corner.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ldm_jax.data import DataLoader, build_dataset
from ldm_jax.data.folder import CROP_STREAM, ImageFolderSource
from ldm_jax.data.images import prepare_image, to_model_range

RES = 32
# file name -> (stored height, stored width, EXIF orientation, hand-computed original (h, w),
# resized (h', w') with the shorter side at 32, center-crop corner (top, left))
IMAGES = {
    "a.png": (48, 64, 1, (48, 64), (32, 42), (0, 5)),  # 32 * 64 / 48 = 42.67 -> 42; (42 - 32) / 2 = 5
    "b.png": (98, 64, 1, (98, 64), (49, 32), (8, 0)),  # 17 / 2 = 8.5 rounds to even: 8
    "c.png": (33, 100, 1, (33, 100), (32, 96), (0, 32)),  # 32 * 100 / 33 = 96.97 -> 96
    "d.png": (32, 32, 1, (32, 32), (32, 32), (0, 0)),
    "e.png": (20, 30, 1, (20, 30), (32, 48), (0, 8)),  # upscaled
    "f.png": (32, 80, 1, (32, 80), (32, 80), (0, 24)),  # shorter side already 32
    # A JPEG stored 128 high x 256 wide, EXIF-rotated by 90 degrees (orientation 6) to 256 x 128,
    # big enough that libjpeg's draft decode shrinks it 4x: the original size is the file's.
    "g.jpg": (128, 256, 6, (256, 128), (64, 32), (16, 0)),
    "h.png": (60, 45, 1, (60, 45), (42, 32), (5, 0)),  # 32 * 60 / 45 = 42.67 -> 42
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro")
    rng = np.random.default_rng(0)
    for name, (height, width, orientation, *_rest) in IMAGES.items():
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        if orientation != 1:
            exif = Image.Exif()
            exif[0x0112] = orientation
            image.save(root / name, exif=exif.tobytes(), quality=95)
        else:
            image.save(root / name)
        (root / name).with_suffix(".txt").write_text(f"caption of {name}")
    return root


def _names(source):
    return [p.split("/")[-1] for p in source.paths]


def test_center_crop_records_hand_computed_original_size_and_corner(folder):
    source = ImageFolderSource(str(folder), RES)
    assert _names(source) == sorted(IMAGES)
    for i, name in enumerate(_names(source)):
        example = source[i]
        _, _, _, original, _, corner = IMAGES[name]
        assert example["original_size"].dtype == np.int32 and example["crop_top_left"].dtype == np.int32
        assert tuple(example["original_size"]) == original, name
        assert tuple(example["crop_top_left"]) == corner, name
        if name.endswith(".png"):  # the center-crop pixels are what they always were
            with Image.open(folder / name) as image:
                np.testing.assert_array_equal(example["image"], prepare_image(image, RES, 3))


def test_random_crop_corners_lie_in_the_resized_range_and_are_a_function_of_seed_and_index(folder):
    source = ImageFolderSource(str(folder), RES, random_crop=True, seed=5)
    again = ImageFolderSource(str(folder), RES, random_crop=True, seed=5)
    other = ImageFolderSource(str(folder), RES, random_crop=True, seed=6)
    corners, other_corners = [], []
    for i, name in enumerate(_names(source)):
        _, _, _, original, (h, w), _ = IMAGES[name]
        example = source[i]
        top, left = (int(v) for v in example["crop_top_left"])
        assert tuple(example["original_size"]) == original
        assert 0 <= top <= h - RES and 0 <= left <= w - RES, (name, top, left)
        rng = np.random.default_rng([CROP_STREAM, 5, i])  # the documented stream
        assert (top, left) == (int(rng.integers(0, h - RES + 1)), int(rng.integers(0, w - RES + 1)))
        # pure function of (seed, index): read twice, from two sources, in another order
        for twin in (source[i], again[i]):
            np.testing.assert_array_equal(twin["image"], example["image"])
            np.testing.assert_array_equal(twin["crop_top_left"], example["crop_top_left"])
        corners.append((top, left))
        other_corners.append(tuple(int(v) for v in other[i]["crop_top_left"]))
    assert corners != other_corners  # another seed, other crops
    assert any(c != IMAGES[n][5] for c, n in zip(corners, _names(source)))  # not the center crop


def test_random_crop_pixels_are_the_original_at_the_recorded_corner(folder):
    source = ImageFolderSource(str(folder), RES, random_crop=True, seed=1)
    i = _names(source).index("f.png")  # 32 x 80: no resize, the crop is a sub-array
    example = source[i]
    top, left = (int(v) for v in example["crop_top_left"])
    with Image.open(folder / "f.png") as image:
        original = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(example["image"], to_model_range(original[top : top + RES, left : left + RES]))


def test_loader_collates_micro_conditioning_as_int_arrays(folder):
    source = build_dataset({"name": "folder", "path": str(folder), "resolution": RES, "folder_random_crop": True,
                            "seed": 3})
    assert source.random_crop and source.seed == 3
    batch = DataLoader(source, len(IMAGES), shuffle=False).get_batch(0)
    for key in ("original_size", "crop_top_left"):
        assert batch[key].shape == (len(IMAGES), 2) and batch[key].dtype == np.int32
    np.testing.assert_array_equal(batch["original_size"], [IMAGES[n][3] for n in sorted(IMAGES)])
    np.testing.assert_array_equal(batch["crop_top_left"], [source[i]["crop_top_left"] for i in range(len(IMAGES))])


def test_bad_seed_is_one_line_naming_it(folder):
    with pytest.raises(ValueError, match="seed must be an integer >= 0, got -1"):
        ImageFolderSource(str(folder), RES, seed=-1)
