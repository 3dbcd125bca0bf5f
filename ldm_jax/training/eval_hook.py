"""Sample-quality evaluation inside the training loop (``config.eval``, ldm_jax.evaluation.settings).

Every ``eval.every_steps`` updates (and after the last one, with ``at_end``) the hook draws
``eval.num_samples`` images from the EMA params through the stage's ``sample`` function -- the
generation program the previews run, the batch split over the mesh's data axes -- with the
same key each time, and scores them with a feature network:

* ``features="classifier"``: the dataset's own classifier
  (:func:`ldm_jax.evaluation.classifier.train_or_load_classifier`, trained once on the labels of
  ``config.data`` and cached): ``accuracy`` (class models: samples of label y classified as y),
  ``fd`` (Frechet distance to the training images in its feature space), ``fd_real_vs_real``
  (two halves of the training images) and ``fd_ratio``;
* ``features="inception"``: the FID Inception from ``eval.inception_path``: ``fid`` against
  ``eval.reference_stats`` (a pytorch-fid ``.npz``) or the statistics of ``config.data``, and
  ``is_mean``.

Metrics go to TensorBoard (``eval/<name>``), to the run log (one line) and to
``<workdir>/eval_metrics.jsonl`` (one JSON object per evaluation, for curves). With
``eval.best_metric`` the state of the best evaluation so far is kept in
``<workdir>/best_checkpoint/<step>`` (the orbax ``Checkpointer`` of the run, one checkpoint, with
``eval_metric``/``eval_value`` in its metadata), besides the latest ones in ``checkpoints/``; a
resumed run reads the best value back from there.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from ldm_jax.diffusion.guidance import check_guidance_interval
from ldm_jax.evaluation.settings import FEATURE_NETWORKS, METRIC_MODES, eval_defaults
from ldm_jax.ldm.conditioning import check_guidance_setting
from ldm_jax.ldm.sections import merge_section
from ldm_jax.training import mesh as mesh_lib
from ldm_jax.training.loop import Hook

log = logging.getLogger(__name__)

BEST_DIR = "best_checkpoint"
METRICS_FILE = "eval_metrics.jsonl"
GRID_TAG = "eval"  # samples/eval_<step>.png


def eval_settings(config: Any) -> ml_collections.ConfigDict:
    """``config.eval`` over the defaults, checked (one-line ValueError naming the bad value)."""
    settings = merge_section(eval_defaults(), config.get("eval"), "eval")
    if settings.features not in FEATURE_NETWORKS:
        raise ValueError(f"config.eval.features must be one of {FEATURE_NETWORKS}, got {settings.features!r}")
    if int(settings.num_samples) < 2:
        raise ValueError(f"config.eval.num_samples must be >= 2, got {settings.num_samples}")
    if settings.best_metric and settings.best_metric not in METRIC_MODES:
        raise ValueError(f"config.eval.best_metric must be one of {sorted(METRIC_MODES)} or '', got {settings.best_metric!r}")
    if settings.best_mode not in ("", "min", "max"):
        raise ValueError(f"config.eval.best_mode must be 'min', 'max' or '', got {settings.best_mode!r}")
    if settings.guidance_interval:
        try:
            check_guidance_interval(settings.guidance_interval)
        except ValueError as error:
            raise ValueError(f"config.eval.{error}") from None
    if int(settings.grid_columns) < 0 or (int(settings.grid_columns) > 0 and int(settings.grid_rows) <= 0):
        raise ValueError(f"config.eval.grid_columns must be >= 0 and grid_rows > 0 with a grid, "
                         f"got grid_columns={settings.grid_columns} grid_rows={settings.grid_rows}")
    if settings.features == "inception" and not settings.inception_path:
        raise ValueError("config.eval.features='inception' needs config.eval.inception_path (FID Inception weights)")
    return settings


def _generation_settings(settings, preview) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "sampler": settings.sampler or preview.get("sampler", "ddim"),
        "num_steps": int(settings.num_steps) or int(preview.get("num_steps", 50)),
        "guidance_scale": float(settings.guidance_scale) if float(settings.guidance_scale) >= 0
        else float(preview.get("guidance_scale", 1.0)),
        "guidance_interval": tuple(settings.guidance_interval) or tuple(preview.get("guidance_interval", ())),
        "num_images": 0,
    })


class _ClassifierScorer:
    def __init__(self, config, settings):
        from ldm_jax.evaluation import classifier as C

        self._c = C
        import dataclasses

        cache = settings.classifier_cache_dir or None
        spec = C.ClassifierSpec()
        if int(settings.classifier_steps) > 0:
            spec = dataclasses.replace(spec, steps=int(settings.classifier_steps))
        self.classifier = C.train_or_load_classifier(config.data, cache_dir=cache, spec=spec,
                                                     test_split=settings.classifier_test_split)
        self.reference = C.reference_for_data(self.classifier, config.data, str(config.data.get("split", "train")))
        log.info("eval: classifier %s (held-out accuracy %.4f), real-vs-real FD %.4g over %d images",
                 self.classifier.key, self.classifier.test_accuracy, self.reference.fd_real_vs_real,
                 self.reference.num_images)

    def __call__(self, images, labels):
        metrics = self._c.classifier_quality(self.classifier, images, np.zeros(len(images)) if labels is None else labels,
                                             self.reference)
        if labels is None:
            metrics.pop("accuracy")
        return metrics


class _InceptionScorer:
    def __init__(self, config, settings):
        from ldm_jax.evaluation import inception_metrics as IM
        from ldm_jax.evaluation.inception_weights import load_inception
        from ldm_jax.evaluation.statistics import load_stats

        self._im = IM
        module, variables = load_inception(settings.inception_path)
        devices = jax.local_device_count()
        self.fn = IM.inception_feature_fn(module, variables, local_batch_size=max(devices, (64 // devices) * devices))
        if settings.reference_stats:
            self.reference = load_stats(settings.reference_stats)
        else:
            from ldm_jax.data import build_dataset
            from ldm_jax.evaluation.features import quantize

            source = build_dataset(config.data)
            limit = int(settings.num_reference) or len(source)
            real = _ArrayImages(np.stack([quantize(source[i]["image"]) for i in range(min(limit, len(source)))]))
            self.reference = IM.inception_features(self.fn, real)["stats"]

    def __call__(self, images, labels):
        fake = self._im.inception_features(self.fn, _ArrayImages(images), keep=("logits_unbiased",))
        return self._im.compare(self.reference, fake, ("fid", "is"), is_splits=min(10, len(images)))


class _ArrayImages:
    """uint8 [N, H, W, C] as the ``len`` / ``[i]`` / ``size`` image set of ``process_batches`` (RGB)."""

    def __init__(self, images):
        self.images = np.asarray(images)
        self.size = self.images.shape[1:3]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def build_eval_hook(config: Any, stage: Any, workdir: str, run: Any,
                    write_scalars: Callable[[int, dict], None] | None = None,
                    write_grid: Callable[..., Any] | None = None) -> Hook | None:
    """The loop :class:`~ldm_jax.training.loop.Hook` of ``config.eval``, or None when it is off
    (``every_steps <= 0``). ``write_scalars(step, {name: value})``: TensorBoard
    (``RunLogger.write_scalars``). ``write_grid(step, images, tag, columns)``
    (``RunLogger.write_grid``): with ``eval.grid_columns > 0`` the scored samples are also saved
    as ``samples/eval_<step>.png`` (:func:`eval_grid`). The feature network and the reference
    statistics are made here, before training starts."""
    settings = eval_settings(config)
    every = int(settings.every_steps)
    if every <= 0:
        return None
    if stage.sample is None:
        raise ValueError(f"config.eval is on but the {config.stage!r} stage does not generate samples")
    model = stage.model
    conditioner = getattr(model, "conditioner", None)
    kind = getattr(conditioner, "kind", "none")
    if kind not in ("class", "none"):
        raise ValueError(f"config.eval supports class-conditional and unconditional models, not conditioning {kind!r}")
    check_guidance_setting(settings.guidance_interval, conditioner, "config.eval")
    num = int(settings.num_samples)
    data_size = mesh_lib.data_parallel_size(run.mesh)
    batch = int(settings.batch_size) or num
    batch = max(data_size, int(math.ceil(batch / data_size)) * data_size)
    labels = None if kind == "none" else np.arange(num, dtype=np.int32) % int(conditioner.num_classes)
    gen = _generation_settings(settings, config.get("preview") or {})
    gen.num_images = batch
    scorer = (_ClassifierScorer if settings.features == "classifier" else _InceptionScorer)(config, settings)
    metric = str(settings.best_metric)
    mode = settings.best_mode or METRIC_MODES.get(metric, "min")
    best_dir = os.path.join(os.path.abspath(workdir), BEST_DIR)
    best = {"value": _stored_best(best_dir, metric)}
    key = jax.random.PRNGKey(int(settings.seed))

    # Sample i is noise stream i of one key whatever the batch: eval.batch_size (memory) changes
    # neither the samples nor the metrics; one batch of all K is what earlier versions drew.
    sample_key = jax.random.fold_in(key, 0)

    def sample_all(params):
        chunks = []
        for start in range(0, num, batch):
            chunk_labels = None
            if labels is not None:
                chunk_labels = np.resize(labels[start : start + batch], batch)  # the last chunk padded
            images = stage.sample(params, chunk_labels, sample_key, gen, offset=start)
            chunks.append(images[: min(batch, num - start)])
        return np.concatenate(chunks)

    def evaluate(step: int, state) -> None:
        images = sample_all(state.ema_params)
        metrics = {k: float(v) for k, v in scorer(images, labels).items()}
        if jax.process_index() == 0:
            log.info("eval step %d: %s", step, " ".join(f"eval/{k}={v:.5g}" for k, v in sorted(metrics.items())))
            if write_scalars is not None:
                write_scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
            _append_jsonl(os.path.join(workdir, METRICS_FILE), {"step": int(step), **metrics})
            if write_grid is not None and int(settings.grid_columns) > 0:
                grid, width = eval_grid(images, labels, int(settings.grid_rows), int(settings.grid_columns))
                path = write_grid(step, grid, GRID_TAG, width)
                if path:
                    log.info("eval step %d: samples grid %s", step, path)
        if metric:
            if metric not in metrics:
                raise ValueError(f"config.eval.best_metric {metric!r} is not among the metrics {sorted(metrics)}")
            value = metrics[metric]
            previous = best["value"]
            better = previous is None or (value < previous if mode == "min" else value > previous)
            if better and np.isfinite(value):
                _save_best(best_dir, step, state, metric, value, dict(stage.metadata))
                best["value"] = value
                log.info("eval step %d: new best %s=%.5g kept in %s", step, metric, value, best_dir)

    return Hook(every, evaluate, at_end=bool(settings.at_end))


def eval_grid(images: np.ndarray, labels: np.ndarray | None, rows: int, columns: int) -> tuple[np.ndarray, int]:
    """``(grid images, width)``: the images of a grid ``width`` wide, row-major, taken from the
    evaluation's samples: row ``y`` holds the first samples of class ``y`` (class models;
    classes 0..rows-1 that have samples), or the first ``rows * columns`` samples (``labels``
    None). ``width`` is ``columns``, or the smallest count of a row's class when that is less
    (so the grid stays full)."""
    images = np.asarray(images)
    if labels is None:
        return images[: rows * columns], columns
    labels = np.asarray(labels)
    per_class = [idx for idx in (np.flatnonzero(labels == y) for y in range(rows)) if len(idx)]
    width = min(columns, min(len(idx) for idx in per_class))
    return images[np.concatenate([idx[:width] for idx in per_class])], width


def _append_jsonl(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")


def _stored_best(best_dir: str, metric: str) -> float | None:
    if not metric or not os.path.isdir(best_dir):
        return None
    from ldm_jax.training.checkpointing import Checkpointer

    with Checkpointer(best_dir, max_to_keep=1, async_save=False) as checkpointer:
        found = checkpointer.latest_intact_metadata()
    if found is None or found[1].get("eval_metric") != metric:
        return None
    return float(found[1]["eval_value"])


def _save_best(best_dir: str, step: int, state, metric: str, value: float, metadata: dict) -> None:
    from ldm_jax.training.checkpointing import Checkpointer

    meta = {**metadata, "data_position": int(step), "eval_metric": metric, "eval_value": float(value)}
    with Checkpointer(best_dir, max_to_keep=1, async_save=False) as checkpointer:
        if checkpointer.latest_step() == step:
            return
        checkpointer.save(step, state, meta)
