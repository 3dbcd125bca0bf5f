"""What a person watching a run sees: a progress bar, TensorBoard event files, sample grids.

``RunLogger`` plugs into ``ldm_jax.training.loop.train`` through its ``on_start`` /
``on_step`` / ``on_metrics`` callbacks and writes, on process 0 only:

* a tqdm progress bar (loss, images/s) on stderr;
* TensorBoard scalars in ``<workdir>/tensorboard``: every metric of the step (``train/loss``,
  ``train/grad_norm``, ``train/lr``, aux losses, ...), ``perf/images_per_sec`` and
  ``perf/steps_per_sec`` (wall clock between log points, compilation excluded) and
  ``data/skipped_images`` (unreadable images replaced so far);
* sample grids: ``<workdir>/samples/<tag>_<step>.png`` plus a TensorBoard image;
* other scalars (``write_scalars``: the evaluation hook's ``eval/*``).

``image_grid`` / ``save_png`` are plain NumPy/Pillow helpers usable on their own.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

SAMPLES_DIR = "samples"
TENSORBOARD_DIR = "tensorboard"


def image_grid(images: np.ndarray, columns: int = 0, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 images [N, H, W, C] -> one uint8 image [rows * (H + p) + p, columns * (W + p) + p, C],
    filled row-major (image i at row ``i // columns``). ``columns`` 0 picks ceil(sqrt(N))."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be [N, H, W, C] with N >= 1, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    n, h, w, c = images.shape
    columns = int(columns) if columns and columns > 0 else math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + padding) + padding, columns * (w + padding) + padding, c), pad_value, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = image
    return grid


def save_png(image: np.ndarray, path: str, scale: int = 1) -> str:
    """Write uint8 [H, W, C] (C = 1 or 3) as a PNG atomically; ``scale`` > 1 enlarges it with
    nearest-neighbour pixels (tiny samples stay crisp in viewers)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] not in (1, 3) or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 1 or 3], got {image.dtype} {image.shape}")
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".grid.", suffix=".png")
    os.close(fd)
    pil.save(tmp, format="PNG")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


class RunLogger:
    """Progress bar + TensorBoard + sample grids for one run (see the module docstring).

    Args:
      workdir: run directory.
      total_steps: ``config.train.num_steps``.
      global_batch_size: images per step (for images/s).
      tensorboard, progress_bar: switches (``config.logging``).
      skipped_images: returns how many unreadable images the data source replaced so far.
      enabled: default: process 0 only.
    """

    def __init__(
        self,
        workdir: str,
        *,
        total_steps: int,
        global_batch_size: int,
        tensorboard: bool = True,
        progress_bar: bool = True,
        skipped_images: Callable[[], int] | None = None,
        enabled: bool | None = None,
    ):
        self.workdir = os.path.abspath(workdir)
        self.total_steps = int(total_steps)
        self.global_batch_size = int(global_batch_size)
        self.enabled = jax.process_index() == 0 if enabled is None else bool(enabled)
        self._skipped_images = skipped_images
        self._skipped_reported = 0
        self._writer = None
        self._bar = None
        self._want_bar = progress_bar
        self._mark: tuple[int, float] | None = None  # (step, time) of the last throughput point
        self.last_grid_path: str | None = None
        if self.enabled and tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(os.path.join(self.workdir, TENSORBOARD_DIR))

    # ------------------------------------------------------------------ loop callbacks

    def on_start(self, step: int) -> None:
        if not self.enabled:
            return
        if self._want_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total_steps, initial=step, desc="train", unit="step", file=sys.stderr,
                dynamic_ncols=True, mininterval=1.0,
            )
        log.info("training from step %d to %d in %s", step, self.total_steps, self.workdir)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if self._mark is None:
            # The first step includes compilation: throughput is measured from its end.
            self._mark = (step, now)
            self._rate_mark = (step, now)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            start_step, start_time = self._rate_mark
            rate = (step - start_step) * self.global_batch_size / max(now - start_time, 1e-9)
            postfix = {"loss": f"{metrics.get('loss', float('nan')):.4g}"}
            if step > start_step:
                postfix["img/s"] = f"{rate:.1f}"
            self._bar.set_postfix(postfix, refresh=False)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        scalars = {f"train/{name}": value for name, value in metrics.items() if name != "finite"}
        if self._mark is not None and step > self._mark[0]:
            steps = step - self._mark[0]
            seconds = max(now - self._mark[1], 1e-9)
            scalars["perf/steps_per_sec"] = steps / seconds
            scalars["perf/images_per_sec"] = steps * self.global_batch_size / seconds
        self._mark = (step, now)
        if self._skipped_images is not None:
            skipped = int(self._skipped_images())
            scalars["data/skipped_images"] = skipped
            if skipped > self._skipped_reported:
                log.warning("skipped %d unreadable images so far (replaced by readable ones)", skipped)
                self._skipped_reported = skipped
        message = " ".join(f"{name}={value:.5g}" for name, value in sorted(scalars.items()))
        if self._bar is not None:
            self._bar.write(f"step {step}: {message}", file=sys.stderr)
        else:
            log.info("step %d: %s", step, message)
        if self._writer is not None:
            for name, value in scalars.items():
                self._writer.add_scalar(name, value, step)
            self._writer.flush()

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        """TensorBoard scalars under their given names (e.g. ``eval/fd``), outside ``on_metrics``."""
        if self._writer is None or not self.enabled:
            return
        for name, value in scalars.items():
            self._writer.add_scalar(name, float(value), step)
        self._writer.flush()

    # ------------------------------------------------------------------ images

    def write_grid(self, step: int, images: np.ndarray, tag: str = "samples", columns: int = 0) -> str | None:
        """Save uint8 [N, H, W, C] images as ``<workdir>/samples/<tag>_<step>.png`` (and to
        TensorBoard). Returns the PNG path (None on processes other than 0)."""
        if not self.enabled:
            return None
        grid = image_grid(np.asarray(images), columns)
        scale = max(1, 256 // max(grid.shape[0], grid.shape[1]))
        path = save_png(grid, os.path.join(self.workdir, SAMPLES_DIR, f"{tag}_{step:07d}.png"), scale=scale)
        if self._writer is not None:
            self._writer.add_image(tag, grid, step, dataformats="HWC")
            self._writer.flush()
        self.last_grid_path = path
        return path

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
