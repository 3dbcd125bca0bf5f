"""Tests for ldm_jax.data: sources against independent references, and the pipeline's
determinism, resumption, per-process split and sharding contracts."""

from __future__ import annotations

import math
import re
import warnings

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image

from ldm_jax.data import (
    DataLoader,
    DigitsSource,
    ImageFolderSource,
    IndexSampler,
    ShapesSource,
    build_dataset,
    build_loader,
    dataset_stats,
    make_global_batch,
)
from ldm_jax.data.images import prepare_image

# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def digits16():
    return DigitsSource(resolution=16, split="all")


@pytest.fixture(scope="module")
def shapes8():
    return ShapesSource(resolution=8, num_examples=37, seed=3)


def _batches(loader: DataLoader, start: int, count: int, **kwargs) -> list[dict]:
    with loader.iterate(start, count, **kwargs) as iterator:
        return list(iterator)


def _assert_batches_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "caption":
            assert a[key] == b[key]
        else:
            np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


# --------------------------------------------------------------------------------------------
# Sampler and loader contracts


def test_each_epoch_visits_every_example_once_and_batches_straddle_epochs():
    sampler = IndexSampler(num_examples=10, global_batch_size=4, seed=7)
    stream = np.concatenate([sampler.global_batch_indices(step) for step in range(10)])  # 40 = 4 epochs
    for epoch in range(4):
        assert sorted(stream[10 * epoch : 10 * (epoch + 1)].tolist()) == list(range(10))
    # Successive epochs are differently ordered (a reshuffle, not a repeat).
    assert len({tuple(stream[10 * e : 10 * (e + 1)]) for e in range(4)}) == 4
    # Batch 2 = stream positions 8..11: the end of epoch 0 and the start of epoch 1.
    np.testing.assert_array_equal(sampler.global_batch_indices(2), np.concatenate([stream[8:10], stream[10:12]]))
    # A dataset smaller than the batch still yields full batches of distinct-per-epoch examples.
    tiny = IndexSampler(num_examples=3, global_batch_size=8, seed=0).global_batch_indices(0)
    assert len(tiny) == 8 and sorted(tiny[:3].tolist()) == [0, 1, 2] and sorted(tiny[3:6].tolist()) == [0, 1, 2]
    # shuffle=False is the plain cyclic order.
    np.testing.assert_array_equal(IndexSampler(5, 4, shuffle=False).global_batch_indices(1), [4, 0, 1, 2])


def test_same_seed_gives_same_batches_and_different_seed_differs(shapes8):
    first = _batches(DataLoader(shapes8, 8, seed=11), 0, 6)
    again = _batches(DataLoader(shapes8, 8, seed=11), 0, 6)
    other = _batches(DataLoader(shapes8, 8, seed=12), 0, 6)
    for a, b in zip(first, again):
        _assert_batches_equal(a, b)
    assert any(not np.array_equal(a["index"], b["index"]) for a, b in zip(first, other))
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(first, other))
    # Each batch's images/labels/captions are the source's examples at the batch's indices.
    batch = first[4]
    for row, index in enumerate(batch["index"]):
        example = shapes8[int(index)]
        np.testing.assert_array_equal(batch["image"][row], example["image"])
        assert batch["label"][row] == example["label"] and batch["caption"][row] == example["caption"]
    assert batch["image"].shape == (8, 8, 8, 3) and batch["image"].dtype == np.float32
    assert batch["label"].dtype == np.int32 and isinstance(batch["caption"], list)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_iterator_resumed_at_position_k_yields_batches_k_onwards_of_uninterrupted_run(digits16, prefetch):
    loader = DataLoader(digits16, 64, seed=5, num_threads=2)  # 1797 / 64: crosses an epoch boundary
    uninterrupted = _batches(loader, 0, 32, prefetch=prefetch)
    with loader.iterate(0, prefetch=prefetch) as interrupted:
        for _ in range(27):
            next(interrupted)
        saved_position = interrupted.position  # what a checkpoint stores
    assert saved_position == 27
    with loader.iterate(saved_position, prefetch=prefetch) as resumed:
        for k in range(saved_position, 32):
            _assert_batches_equal(next(resumed), uninterrupted[k])
            assert resumed.position == k + 1
    loader.close()


def test_two_process_local_batches_concatenate_to_the_single_process_global_batch(digits16):
    single = DataLoader(digits16, 12, seed=2, process_index=0, process_count=1)
    halves = [DataLoader(digits16, 12, seed=2, process_index=p, process_count=2) for p in range(2)]
    assert halves[0].local_batch_size == 6
    for step in (0, 1, 149, 150, 151):  # 1797 / 12 = 149.75: step 149 straddles epochs
        whole = single.get_batch(step)
        parts = [h.get_batch(step) for h in halves]
        assert not set(parts[0]["index"].tolist()) & set(parts[1]["index"].tolist())
        for key in ("index", "label", "image"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
    with pytest.raises(ValueError, match="12.*process_count 5"):
        DataLoader(digits16, 12, process_index=0, process_count=5)


def test_iterator_reraises_a_source_error_instead_of_hanging():
    class Exploding:
        resolution, channels, num_classes, has_captions = 2, 1, None, False

        def __len__(self):
            return 10

        def __getitem__(self, index):
            if index == 3:
                raise OSError("disk gone at index 3")
            return {"image": np.zeros((2, 2, 1), np.float32)}

    loader = DataLoader(Exploding(), 5, shuffle=False)
    with loader.iterate(0, prefetch=2) as iterator:
        with pytest.raises(OSError, match="index 3"):
            next(iterator)


def test_abandoned_iterator_stops_its_prefetch_thread(shapes8):
    import gc

    iterator = DataLoader(shapes8, 4).iterate(0, prefetch=1)
    next(iterator)
    thread = iterator._thread
    assert thread.is_alive()  # blocked on the full queue
    del iterator
    gc.collect()
    thread.join(timeout=5.0)
    assert not thread.is_alive()


def test_sharded_global_batch_on_8_devices_has_global_shape_and_per_device_rows(shapes8):
    devices = np.array(jax.devices()[:8])
    assert devices.size == 8, "tests/conftest.py should provide 8 simulated CPU devices"
    mesh = Mesh(devices, ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    loader = DataLoader(shapes8, 16, seed=0)
    host_batch = loader.get_batch(3)
    with loader.iterate(3, 1, sharding=sharding) as iterator:
        batch = next(iterator)
    assert batch["image"].shape == (16, 8, 8, 3) and batch["label"].shape == (16,)
    assert batch["caption"] == host_batch["caption"]
    for key in ("image", "label", "index"):
        array = batch[key]
        assert isinstance(array, jax.Array) and array.sharding.is_equivalent_to(
            NamedSharding(mesh, PartitionSpec("data")), array.ndim
        )
        shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start)
        assert len(shards) == 8 and {s.device for s in shards} == set(devices.tolist())
        for d, shard in enumerate(shards):
            assert shard.data.shape == (2,) + host_batch[key].shape[1:]
            np.testing.assert_array_equal(np.asarray(shard.data), host_batch[key][2 * d : 2 * d + 2])
    # A spec naming more dimensions is reduced to its batch entry, so labels [b] still work.
    full_spec = NamedSharding(mesh, PartitionSpec("data", None, None, None))
    labels = make_global_batch({"label": host_batch["label"]}, full_spec)["label"]
    np.testing.assert_array_equal(np.asarray(labels), host_batch["label"])


# --------------------------------------------------------------------------------------------
# Sources against independent references


def _bilinear_half_pixel_reference(images: np.ndarray, size: int) -> np.ndarray:
    """float64 bilinear upsampling with half-pixel centres and edge clamping: [N, h, w] -> [N, size, size]."""
    n, h, w = images.shape

    def taps(in_size):
        src = (np.arange(size) + 0.5) * in_size / size - 0.5
        src = np.clip(src, 0.0, in_size - 1.0)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, in_size - 1)
        return lo, hi, src - lo

    y0, y1, fy = taps(h)
    x0, x1, fx = taps(w)
    rows = images[:, y0, :] * (1 - fy)[None, :, None] + images[:, y1, :] * fy[None, :, None]
    return rows[:, :, x0] * (1 - fx)[None, None, :] + rows[:, :, x1] * fx[None, None, :]


@pytest.mark.parametrize("resolution", [16, 32])
def test_digits_match_sklearn_images_resized_by_float64_bilinear_reference(resolution):
    from sklearn.datasets import load_digits

    digits = load_digits()
    reference = _bilinear_half_pixel_reference(digits.images.astype(np.float64), resolution) / 8.0 - 1.0
    for split, rows in (("train", slice(0, 1617)), ("test", slice(1617, 1797))):
        source = DigitsSource(resolution=resolution, split=split)
        assert len(source) == len(digits.target[rows])
        images = np.stack([source[i]["image"] for i in range(len(source))])
        labels = np.array([source[i]["label"] for i in range(len(source))])
        assert images.shape == (len(source), resolution, resolution, 1) and images.dtype == np.float32
        np.testing.assert_allclose(images[..., 0], reference[rows], atol=2e-6, rtol=0)
        np.testing.assert_array_equal(labels, digits.target[rows])
    # The 0 and 16 intensity extremes map to -1 and +1 at the native resolution.
    native = DigitsSource(resolution=8, split="all", channels=3)
    np.testing.assert_allclose(native[0]["image"], np.repeat(digits.images[0][..., None] / 8.0 - 1.0, 3, -1), atol=1e-7)


# Prototype colours by everyday name, independent of the generator's palette: the rendered
# colour must be nearer to the captioned name's prototype than to any other name's.
_NAMED_SHAPE_RGB = {
    "red": (255, 0, 0), "green": (0, 128, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
    "purple": (128, 0, 128), "orange": (255, 165, 0), "cyan": (0, 255, 255), "white": (255, 255, 255),
}  # fmt: skip
_NAMED_BACKGROUND_RGB = {"black": (0, 0, 0), "gray": (128, 128, 128), "white": (255, 255, 255), "navy": (0, 0, 128)}
_CAPTION = re.compile(
    r"^a (small|medium|large) (\w+) (circle|square|triangle|diamond|star) "
    r"(at the top left|at the top|at the top right|on the left|in the center|on the right|"
    r"at the bottom left|at the bottom|at the bottom right) on a (\w+) background$"
)
_CELL_OF_PHRASE = {
    "at the top left": (0, 0), "at the top": (0, 1), "at the top right": (0, 2),
    "on the left": (1, 0), "in the center": (1, 1), "on the right": (1, 2),
    "at the bottom left": (2, 0), "at the bottom": (2, 1), "at the bottom right": (2, 2),
}  # fmt: skip
# Larger side of the shape's bounding box as a fraction of the image side.
_SIZE_BANDS = {"small": (0.10, 0.21), "medium": (0.21, 0.31), "large": (0.31, 0.40)}


def _nearest_name(rgb: np.ndarray, table: dict) -> str:
    return min(table, key=lambda name: np.linalg.norm(rgb - np.array(table[name], dtype=np.float64)))


def _convex_hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of integer points [K, 2] (Andrew's monotone chain + shoelace)."""
    pts = sorted(set(map(tuple, points.tolist())))

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    chains = []
    for sequence in (pts, pts[::-1]):
        chain = []
        for p in sequence:
            while len(chain) >= 2 and cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
        chains.append(chain[:-1])
    hull = np.array(chains[0] + chains[1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _shape_from_mask(mask: np.ndarray) -> str:
    """Classifies a filled, unrotated shape by solidity, bounding-box fill and vertical balance."""
    ys, xs = np.nonzero(mask)
    pixel_corners = np.concatenate([np.stack([xs + dx, ys + dy], -1) for dx in (0, 1) for dy in (0, 1)])
    if mask.sum() / _convex_hull_area(pixel_corners) < 0.75:
        return "star"  # the only concave shape: a regular pentagram fills 0.47 of its hull
    height, width = np.ptp(ys) + 1, np.ptp(xs) + 1
    fill = mask.sum() / (height * width)
    if fill > 0.9:
        return "square"
    if fill > 0.68:
        return "circle"  # pi / 4 = 0.785
    # Triangle and diamond both fill 1/2 of their box; an upward triangle is bottom-heavy (2/3).
    centroid_from_top = (ys.mean() - ys.min() + 0.5) / height
    return "triangle" if centroid_from_top > 0.59 else "diamond"


def test_shapes_captions_describe_the_rendered_pixels():
    resolution = 96
    source = ShapesSource(resolution=resolution, num_examples=1000, seed=1, label_mode="shape_color")
    seen = {"shape": set(), "color": set(), "size": set(), "cell": set(), "background": set()}
    for index in range(0, 1000, 8):  # 125 examples
        example = source[index]
        match = _CAPTION.match(example["caption"])
        assert match, example["caption"]
        size, color, shape, phrase, background = match.groups()
        rgb = (example["image"].astype(np.float64) + 1.0) * 127.5
        corner_bg = rgb[0, 0]
        assert _nearest_name(corner_bg, _NAMED_BACKGROUND_RGB) == background, example["caption"]
        # The shape = pixels nearer to the shape's colour than to the background (half coverage).
        ys, xs = np.mgrid[:resolution, :resolution]
        rough = np.linalg.norm(rgb - corner_bg, axis=-1) > 60
        centre_rgb = rgb[int(round(ys[rough].mean())), int(round(xs[rough].mean()))]
        assert _nearest_name(centre_rgb, _NAMED_SHAPE_RGB) == color, example["caption"]
        mask = np.linalg.norm(rgb - centre_rgb, axis=-1) < np.linalg.norm(rgb - corner_bg, axis=-1)
        cy, cx = (ys[mask].mean() + 0.5) / resolution, (xs[mask].mean() + 0.5) / resolution
        assert (int(cy * 3), int(cx * 3)) == _CELL_OF_PHRASE[phrase], (example["caption"], cx, cy)
        extent = max(np.ptp(ys[mask]), np.ptp(xs[mask])) + 1
        low, high = _SIZE_BANDS[size]
        assert low <= extent / resolution < high, (example["caption"], extent / resolution)
        assert _shape_from_mask(mask) == shape, example["caption"]
        assert source.class_names[example["label"]] == f"{color} {shape}"
        for key, value in zip(seen, (shape, color, size, phrase, background)):
            seen[key].add(value)
    assert [len(v) for v in seen.values()] == [5, 8, 3, 9, 4]  # every attribute value occurs
    # Determinism by (seed, index), and the seed matters.
    np.testing.assert_array_equal(source[17]["image"], ShapesSource(96, num_examples=1000, seed=1)[17]["image"])
    assert source[17]["caption"] != ShapesSource(96, num_examples=1000, seed=2)[17]["caption"] or not np.array_equal(
        source[17]["image"], ShapesSource(96, num_examples=1000, seed=2)[17]["image"]
    )


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(
        x < 1, ((a + 2) * x - (a + 3)) * x * x + 1, np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0)
    )


def _antialiased_bicubic_matrix(in_size: int, out_size: int, box: tuple[float, float]) -> np.ndarray:
    """[out, in] float64 weights: a cubic kernel widened by the downscale factor, normalised."""
    scale = (box[1] - box[0]) / out_size
    widen = max(scale, 1.0)
    centres = box[0] + (np.arange(out_size) + 0.5) * scale
    weights = _cubic((np.arange(in_size)[None, :] + 0.5 - centres[:, None]) / widen)
    return weights / weights.sum(axis=1, keepdims=True)


def test_resize_center_crop_matches_float64_antialiased_bicubic_reference():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(30, 47, 3), dtype=np.uint8)  # landscape: crop columns
    out = prepare_image(Image.fromarray(pixels), resolution=12, channels=3)
    left = (47 - 30) / 2
    rows = _antialiased_bicubic_matrix(30, 12, (0.0, 30.0))
    cols = _antialiased_bicubic_matrix(47, 12, (left, left + 30))
    reference = np.einsum("yi,ijc,xj->yxc", rows, pixels.astype(np.float64), cols)
    reference = np.clip(reference, 0, 255) / 127.5 - 1.0
    # Pillow works in 8-bit fixed point with a rounded intermediate pass: allow 1 level.
    np.testing.assert_allclose(out, reference, atol=2 / 255, rtol=0)
    assert np.mean(np.abs(out - reference)) < 0.5 * 2 / 255


# --------------------------------------------------------------------------------------------
# Image folder


def _two_to_one_image(inner_rgb, outer_rgb) -> Image.Image:
    """60x20: the central 40 columns inner_rgb, 10 columns at each side outer_rgb."""
    pixels = np.empty((20, 60, 3), np.uint8)
    pixels[:] = outer_rgb
    pixels[:, 10:50] = inner_rgb
    return Image.fromarray(pixels)


def test_image_folder_skips_and_counts_corrupt_files_reads_captions_and_labels(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs" / "nested").mkdir(parents=True)
    _two_to_one_image((0, 200, 0), (255, 0, 0)).save(tmp_path / "cats" / "a.png")
    (tmp_path / "cats" / "a.txt").write_text("a green square\n", encoding="utf-8")
    Image.new("L", (16, 24), 255).save(tmp_path / "dogs" / "nested" / "b.PNG")
    (tmp_path / "dogs" / "garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    buffer = (tmp_path / "cats" / "a.png").read_bytes()
    (tmp_path / "dogs" / "truncated.png").write_bytes(buffer[: len(buffer) // 2])  # header ok, data cut
    (tmp_path / "notes.md").write_text("ignored")

    with pytest.warns(RuntimeWarning, match="garbage.jpg"):
        source = ImageFolderSource(str(tmp_path), resolution=8, labels_from_subfolders=True)
    assert source.num_skipped == 1 and len(source) == 3
    assert source.class_names == ("cats", "dogs") and source.num_classes == 2 and source.has_captions
    paths = source.paths
    assert paths == sorted(paths) and not any("garbage" in p for p in paths)

    cat = source[paths.index("cats/a.png")]
    # Center crop of the 60x20 image keeps only the inner colour (squashing would mix in red).
    np.testing.assert_allclose(cat["image"], np.broadcast_to(np.array([0, 200, 0]) / 127.5 - 1, (8, 8, 3)), atol=1e-6)
    assert cat["caption"] == "a green square" and cat["label"] == 0

    dog = source[paths.index("dogs/nested/b.PNG")]
    assert dog["caption"] == "" and dog["label"] == 1
    np.testing.assert_array_equal(dog["image"], np.ones((8, 8, 3), np.float32))  # gray "L" -> RGB

    truncated = paths.index("dogs/truncated.png")
    with pytest.warns(RuntimeWarning, match="truncated.png"):
        replacement = source[truncated]
    # Replaced by the next readable file in index order, deterministically.
    np.testing.assert_array_equal(replacement["image"], source[(truncated + 1) % 3]["image"])
    assert source.num_skipped == 2 and dataset_stats(source).num_skipped == 2
    assert sorted(source.skipped_paths) == ["dogs/garbage.jpg", "dogs/truncated.png"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # counted once: no second warning, no double count
        source[truncated]
    assert source.num_skipped == 2

    with pytest.warns(RuntimeWarning, match="garbage.jpg"):  # a fresh source rescans and re-counts
        gray = build_dataset(dict(name="folder", path=str(tmp_path), resolution=4, channels=1))
    assert gray[0]["image"].shape == (4, 4, 1) and gray.num_classes is None


# --------------------------------------------------------------------------------------------
# TFDS


def test_tfds_source_under_mock_data_matches_raw_examples():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        raw = tfds.data_source("mnist", split="train", download=False)
        mnist = build_dataset(dict(name="tfds:mnist", data_dir="/nonexistent/tfds", resolution=28))
        assert len(mnist) == 12 and mnist.channels == 1 and mnist.num_classes == 10 and not mnist.has_captions
        for i in (0, 5, 11):
            example = mnist[i]
            np.testing.assert_allclose(example["image"], raw[i]["image"].astype(np.float64) / 127.5 - 1, atol=1e-6)
            assert example["label"] == raw[i]["label"]
        rgb = build_dataset(dict(name="tfds:mnist", resolution=28, channels=3))[5]["image"]
        np.testing.assert_array_equal(rgb, np.repeat(mnist[5]["image"], 3, axis=-1))

        flowers = build_dataset(dict(name="tfds:oxford_flowers102", resolution=16, label_key=None, split="test"))
        image = flowers[3]["image"]
        assert image.shape == (16, 16, 3) and image.min() >= -1 and image.max() <= 1 and "label" not in flowers[3]
        celeb = build_dataset(dict(name="tfds:celeb_a", resolution=16))  # 218x178, no ClassLabel
        assert celeb[0]["image"].shape == (16, 16, 3) and celeb.num_classes is None and "label" not in celeb[0]
        # Through the loader, with two reader threads.
        batch = build_loader(dict(name="tfds:mnist", resolution=28, seed=4), 8, source=mnist).get_batch(1)
        assert batch["image"].shape == (8, 28, 28, 1)

        with pytest.raises(ValueError, match="'caption_text'"):
            build_dataset(dict(name="tfds:mnist", resolution=28, caption_key="caption_text"))
    with pytest.raises(ValueError, match="not_a_dataset_xyz"):
        build_dataset(dict(name="tfds:not_a_dataset_xyz", data_dir="/nonexistent/tfds"))


@pytest.fixture(scope="module")
def prepared_tfds_dirs(tmp_path_factory):
    """A tiny captioned dataset prepared (offline) as both TFRecord and ArrayRecord."""
    import tensorflow_datasets as tfds

    class LdmJaxTinyCaptioned(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3)),
                        "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
                        "text": tfds.features.Text(),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(9), "test": self._generate_examples(3)}

        def _generate_examples(self, count):
            rng = np.random.default_rng(count)
            for i in range(count):
                pixels = rng.integers(0, 256, size=(6 + i, 10, 3), dtype=np.uint8)
                yield i, {"image": pixels, "label": i % 3, "text": f"example number {i}"}

    dirs = {}
    for file_format in ("tfrecord", "array_record"):
        data_dir = str(tmp_path_factory.mktemp(file_format))
        LdmJaxTinyCaptioned(data_dir=data_dir, file_format=file_format).download_and_prepare()
        dirs[file_format] = data_dir
    return dirs


def test_tfds_tfrecord_offset_index_matches_tf_data_reading(prepared_tfds_dirs):
    import tensorflow_datasets as tfds

    config = dict(name="tfds:ldm_jax_tiny_captioned", resolution=6, caption_key="text")
    by_format = {
        fmt: build_dataset({**config, "data_dir": d, "split": "train[2:8]"}) for fmt, d in prepared_tfds_dirs.items()
    }
    builder = tfds.builder("ldm_jax_tiny_captioned", data_dir=prepared_tfds_dirs["tfrecord"])
    reference = list(tfds.as_numpy(builder.as_dataset(split="train[2:8]", shuffle_files=False)))
    for source in by_format.values():
        assert len(source) == 6 and source.num_classes == 3 and source.class_names == ("a", "b", "c")
        for i, expected in enumerate(reference):
            example = source[i]
            expected_image = prepare_image(Image.fromarray(expected["image"]), 6, 3)
            np.testing.assert_array_equal(example["image"], expected_image)
            assert example["label"] == expected["label"]
            assert example["caption"] == expected["text"].decode()
    for data_dir in prepared_tfds_dirs.values():
        with pytest.raises(ValueError, match="'validation'"):
            build_dataset({**config, "data_dir": data_dir, "split": "validation"})


# --------------------------------------------------------------------------------------------
# Configuration errors


def test_bad_configs_raise_value_error_naming_the_value(tmp_path):
    with pytest.raises(ValueError, match="'imagenet64'"):
        build_dataset(dict(name="imagenet64"))
    with pytest.raises(ValueError, match="resolution.* 0$"):
        build_dataset(dict(name="digits", resolution=0))
    with pytest.raises(ValueError, match="-8"):
        build_dataset(dict(name="shapes", resolution=-8))
    missing = str(tmp_path / "no_such_folder")
    with pytest.raises(ValueError, match=re.escape(repr(missing))):
        build_dataset(dict(name="folder", path=missing, resolution=8))
    with pytest.raises(ValueError, match="'resolutoin'"):
        build_dataset(dict(name="digits", resolutoin=8))
    with pytest.raises(ValueError, match="'validation'"):
        build_dataset(dict(name="digits", split="validation"))
    with pytest.raises(ValueError, match="channels.*2"):
        build_dataset(dict(name="shapes", channels=2))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no readable"):
        build_dataset(dict(name="folder", path=str(empty), resolution=8))


def test_build_from_config_dict_and_stats():
    import ml_collections

    config = ml_collections.ConfigDict(
        dict(name="shapes", resolution=12, shapes_num_examples=50, seed=3, shapes_label_mode="color")
    )
    source = build_dataset(config)
    stats = dataset_stats(source)
    assert (stats.num_examples, stats.resolution, stats.channels, stats.num_classes, stats.has_captions) == (
        50, 12, 3, 8, True,
    )  # fmt: skip
    loader = build_loader(config, 10, source=source)
    np.testing.assert_array_equal(
        loader.get_batch(0)["index"], np.random.default_rng([3, 0]).permutation(50)[:10]
    )  # the config seed drives the shuffle
