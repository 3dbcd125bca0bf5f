"""Procedurally generated coloured shapes with labels and captions ("shapes" dataset).

Every example is a single shape (circle, square, triangle, diamond or star) of one of three
sizes and eight colours, placed in one cell of a 3x3 grid on a plain background, e.g.
``"a small red circle at the top left on a black background"``. The image is a pure function
of ``(seed, index)``, rendered with Pillow at 4x supersampling (of the shape's bounding box only)
and reduced with a box filter, i.e. area-averaged anti-aliasing; pixel values are not
quantised to 8 bits. Text-to-image, class-conditional
and unconditional pipelines can all be exercised on it at any resolution with no download.

Geometry (in units of the image side): the *size* is the larger side of the shape's bounding
box, 0.16 (small), 0.26 (medium) or 0.36 (large); the shape's centre (circle/square/diamond
centre, triangle and star centroid) lies inside its named grid cell, at least 0.06 from the
cell border; the whole shape lies inside the image. Triangles point up; nothing is rotated.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw

from ldm_jax.data.images import check_channels, check_resolution

SHAPE_NAMES = ("circle", "square", "triangle", "diamond", "star")
SHAPE_COLORS = {
    "red": (220, 20, 20),
    "green": (20, 170, 40),
    "blue": (30, 70, 230),
    "yellow": (240, 220, 20),
    "purple": (140, 40, 190),
    "orange": (250, 140, 0),
    "cyan": (0, 200, 220),
    "white": (250, 250, 250),
}
BACKGROUND_COLORS = {
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "white": (255, 255, 255),
    "navy": (15, 25, 80),
}
SIZE_EXTENTS = {"small": 0.16, "medium": 0.26, "large": 0.36}
# (row, column) of the 3x3 grid -> phrase, row 0 = top, column 0 = left.
POSITION_PHRASES = {
    (0, 0): "at the top left",
    (0, 1): "at the top",
    (0, 2): "at the top right",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "at the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "at the bottom right",
}
LABEL_MODES = ("shape", "color", "shape_color")
# ``control``: what ``source[i]["control"]`` holds (float32 [res, res, 1] in [0, 1]), the
# control image of a ControlNet: the shape's pixel coverage ("mask", exact area-averaged) or its
# outline ("edges": coverage minus its 3x3 erosion, a band about a pixel wide on the inside).
CONTROL_KINDS = ("mask", "edges")
_CELL_MARGIN = 0.06
_IMAGE_MARGIN = 0.01
# A background must differ from the shape colour by this much (RGB Euclidean) to be used.
_MIN_CONTRAST = 150.0
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601, as Pillow's "L"
_STAR_INNER_RATIO = math.sin(math.radians(18)) / math.sin(math.radians(54))  # regular pentagram


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """Everything that determines one shapes example. Coordinates are fractions of the side."""

    shape: str
    color: str
    size: str
    row: int
    column: int
    background: str
    center_x: float
    center_y: float

    @property
    def caption(self) -> str:
        position = POSITION_PHRASES[(self.row, self.column)]
        return f"a {self.size} {self.color} {self.shape} {position} on a {self.background} background"


def _unit_outline(shape: str) -> np.ndarray | None:
    """Vertices [K, 2] (x right, y down) of a polygon whose bounding box's larger side is 1,
    centred on its centroid; None for the circle (drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        return np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])
    if shape == "diamond":
        return np.array([[0.0, -0.5], [0.5, 0.0], [0.0, 0.5], [-0.5, 0.0]])
    if shape == "triangle":
        angles = np.radians([-90.0, 30.0, 150.0])
        radii = np.ones(3)
    elif shape == "star":
        angles = np.radians(-90.0 + 36.0 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, 1.0, _STAR_INNER_RATIO)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    # Regular polygons about their centre, which is also the area centroid.
    points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=-1)
    extent = (points.max(axis=0) - points.min(axis=0)).max()
    return points / extent


def _allowed_backgrounds(color: str) -> tuple[str, ...]:
    rgb = np.array(SHAPE_COLORS[color], dtype=np.float64)
    return tuple(
        name
        for name, bg in BACKGROUND_COLORS.items()
        if np.linalg.norm(rgb - np.array(bg, dtype=np.float64)) >= _MIN_CONTRAST
    )


class ShapesSource:
    """Random-access generated shapes; ``source[i]`` depends only on ``(seed, i)``.

    Args:
      resolution: image side in pixels (any positive size; below ~24 px stars blur).
      channels: 3 (RGB) or 1 (luma of the RGB rendering).
      num_examples: the dataset length; generation is cheap, so make it large.
      seed: content seed (independent of the loader's shuffle seed).
      label_mode: "shape" (5 classes), "color" (8) or "shape_color" (40, shape-major).
      control: None, or "mask" / "edges" (see ``CONTROL_KINDS``): add ``control`` to each example.
    """

    name = "shapes"
    has_captions = True

    def __init__(
        self,
        resolution: int = 32,
        channels: int = 3,
        num_examples: int = 100_000,
        seed: int = 0,
        label_mode: str = "shape",
        control: str | None = None,
    ):
        self.resolution = check_resolution(resolution)
        self.channels = check_channels(channels, allow_none=False)
        if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples <= 0:
            raise ValueError(f"shapes num_examples must be a positive integer, got {num_examples!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"shapes seed must be a non-negative integer, got {seed!r}")
        if label_mode not in LABEL_MODES:
            raise ValueError(f"unknown shapes label_mode {label_mode!r}; expected one of {LABEL_MODES}")
        if control is not None and control not in CONTROL_KINDS:
            raise ValueError(f"unknown shapes control {control!r}; expected None or one of {CONTROL_KINDS}")
        self.control = control
        self.num_examples = int(num_examples)
        self.seed = int(seed)
        self.label_mode = label_mode
        self.supersample = 4
        colors = tuple(SHAPE_COLORS)
        if label_mode == "shape":
            self.class_names = SHAPE_NAMES
        elif label_mode == "color":
            self.class_names = colors
        else:
            self.class_names = tuple(f"{c} {s}" for s in SHAPE_NAMES for c in colors)
        self.num_classes = len(self.class_names)
        self._backgrounds = {c: _allowed_backgrounds(c) for c in colors}

    def __len__(self) -> int:
        return self.num_examples

    def spec(self, index: int) -> ShapeSpec:
        """The attributes of example ``index`` (what the caption and the label describe)."""
        index = int(index)
        if not 0 <= index < self.num_examples:
            raise IndexError(f"shapes index {index} out of range [0, {self.num_examples})")
        rng = np.random.default_rng([self.seed, index])
        shape = SHAPE_NAMES[rng.integers(len(SHAPE_NAMES))]
        colors = tuple(SHAPE_COLORS)
        color = colors[rng.integers(len(colors))]
        size = tuple(SIZE_EXTENTS)[rng.integers(len(SIZE_EXTENTS))]
        row, column = (int(v) for v in rng.integers(3, size=2))
        backgrounds = self._backgrounds[color]
        background = backgrounds[rng.integers(len(backgrounds))]
        extent = SIZE_EXTENTS[size]
        outline = _unit_outline(shape)
        if outline is None:
            low, high = np.full(2, -0.5 * extent), np.full(2, 0.5 * extent)
        else:
            low, high = outline.min(axis=0) * extent, outline.max(axis=0) * extent
        centre = []
        for axis, cell in ((0, column), (1, row)):
            lo = max(cell / 3.0 + _CELL_MARGIN, _IMAGE_MARGIN - low[axis])
            hi = min((cell + 1) / 3.0 - _CELL_MARGIN, 1.0 - _IMAGE_MARGIN - high[axis])
            centre.append(float(rng.uniform(lo, hi)))
        return ShapeSpec(shape, color, size, row, column, background, centre[0], centre[1])

    def _coverage_patch(self, spec: ShapeSpec) -> tuple[np.ndarray, slice, slice]:
        """Pixel coverage in [0, 1] of the shape over its bounding box (plus a pixel of margin):
        a float32 [h, w] patch and the (rows, columns) slices it occupies in the image.

        Only that patch is rasterised, at ``supersample``x resolution, and box-filtered down, so
        the cost scales with the shape rather than the image.
        """
        res, ss = self.resolution, self.supersample
        extent = SIZE_EXTENTS[spec.size]
        outline = _unit_outline(spec.shape)
        centre = np.array([spec.center_x, spec.center_y]) * res
        if outline is None:
            points = None
            low, high = centre - 0.5 * extent * res, centre + 0.5 * extent * res
        else:
            points = outline * extent * res + centre
            low, high = points.min(axis=0), points.max(axis=0)
        x0, y0 = np.maximum(np.floor(low).astype(int) - 1, 0)
        x1, y1 = np.minimum(np.ceil(high).astype(int) + 1, res)
        patch = Image.new("F", ((x1 - x0) * ss, (y1 - y0) * ss), 0.0)
        draw = ImageDraw.Draw(patch)
        # Continuous pixel coordinate u maps to (u - patch origin) * ss on the patch (pixel edges).
        origin = np.array([x0, y0])
        if points is None:
            cx, cy = (centre - origin) * ss
            radius = 0.5 * extent * res * ss
            draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1.0)
        else:
            draw.polygon([tuple(p) for p in (points - origin) * ss], fill=1.0)
        alpha = np.asarray(patch.resize((x1 - x0, y1 - y0), resample=Image.Resampling.BOX), dtype=np.float32)
        return alpha, slice(int(y0), int(y1)), slice(int(x0), int(x1))

    def _compose(self, spec: ShapeSpec, background: np.ndarray, foreground: np.ndarray) -> np.ndarray:
        """float32 [res, res, C]: ``background`` blended towards ``foreground`` (both [C]) by coverage."""
        alpha, rows, columns = self._coverage_patch(spec)
        image = np.empty((self.resolution, self.resolution, background.shape[-1]), np.float32)
        image[...] = background
        image[rows, columns] += alpha[..., None] * (foreground - background)
        return image

    def render(self, spec: ShapeSpec) -> np.ndarray:
        """float32 [res, res, 3] RGB in [0, 255] (not quantised): exact area-averaged
        anti-aliasing of the shape edge, up to the supersampling."""
        return self._compose(
            spec,
            np.asarray(BACKGROUND_COLORS[spec.background], np.float32),
            np.asarray(SHAPE_COLORS[spec.color], np.float32),
        )

    def control_image(self, spec: ShapeSpec, kind: str = "mask") -> np.ndarray:
        """float32 [res, res, 1] in [0, 1]: the shape's coverage ("mask") or outline ("edges")."""
        if kind not in CONTROL_KINDS:
            raise ValueError(f"unknown shapes control {kind!r}; expected one of {CONTROL_KINDS}")
        mask = self._compose(spec, np.zeros(1, np.float32), np.ones(1, np.float32))
        if kind == "edges":
            padded = np.pad(mask[..., 0], 1)
            res = self.resolution
            eroded = np.min([padded[i:i + res, j:j + res] for i in range(3) for j in range(3)], axis=0)
            mask = np.clip(mask - eroded[..., None], 0.0, 1.0)
        return mask

    def label_of(self, spec: ShapeSpec) -> int:
        if self.label_mode == "shape":
            return SHAPE_NAMES.index(spec.shape)
        color_index = tuple(SHAPE_COLORS).index(spec.color)
        if self.label_mode == "color":
            return color_index
        return SHAPE_NAMES.index(spec.shape) * len(SHAPE_COLORS) + color_index

    def __getitem__(self, index: int) -> dict:
        spec = self.spec(index)
        # Blending is linear, so mapping the two colours (to [-1, 1], and to luma for C = 1)
        # before blending equals mapping the blended RGB image, at a fraction of the cost.
        colors = []
        for rgb in (BACKGROUND_COLORS[spec.background], SHAPE_COLORS[spec.color]):
            color = np.asarray(rgb, np.float32)
            if self.channels == 1:
                color = color @ _LUMA_WEIGHTS[:, None]
            colors.append(color * np.float32(2.0 / 255.0) - np.float32(1.0))
        example = {
            "image": self._compose(spec, *colors),
            "label": np.int32(self.label_of(spec)),
            "caption": spec.caption,
        }
        if self.control is not None:
            example["control"] = self.control_image(spec, self.control)
        return example
