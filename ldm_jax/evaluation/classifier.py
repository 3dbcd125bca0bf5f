"""A feature network trained on the dataset's own labels, for datasets without Inception weights.

The offline demo (the sklearn digits) has no Inception weights at hand, and Inception features
of 8x8 scans upsampled to 32x32 would say little anyway. Instead a small CNN is trained once on
the labelled training images (deterministically: fixed seed, fixed batch order, fixed
augmentation stream) and cached; its penultimate layer is the feature space of a Frechet
distance and its argmax the judge of class-conditional samples:

* **conditional accuracy**: the fraction of samples generated for label ``y`` that the
  classifier assigns to ``y``;
* **FD** (``fd``): the Frechet distance (:func:`ldm_jax.evaluation.metrics.frechet_distance`)
  between the features of the samples and those of the real training images;
* **real-vs-real FD** (``fd_real_vs_real``): the same distance between two random halves of
  the real images -- the floor a perfect model reaches at a similar sample size (a half of
  the digits' train split is 808 images; the K samples of an evaluation are compared with all
  1617, so with K around 500 the estimator biases of the two numbers are alike).

That the classifier is a valid feature network is checked by its accuracy on the held-out
split (``DatasetClassifier.test_accuracy``; > 0.97 on the digits, tests/test_evaluation_classifier.py).

Cache: ``<cache_dir>/classifier_<hash>.msgpack`` (flax's msgpack serialization, no pickle)
plus a ``.json`` with the spec and accuracy; the hash covers the dataset's name, resolution,
channels, a fingerprint of the training images and labels, and the :class:`ClassifierSpec`.
The default ``cache_dir`` is ``$LDM_JAX_CACHE`` or ``~/.cache/ldm_jax``.

Entry points: :func:`train_or_load_classifier` (from a ``config.data`` section, e.g. the one
of ``configs/digits_ldm.py``), :func:`classifier_quality` (metrics of labelled samples) and
:func:`digits_quality` (both in one call, for the digits).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Mapping, Sequence

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax.evaluation.features import ShardedFeatureFn, collect
from ldm_jax.evaluation.metrics import frechet_distance
from ldm_jax.evaluation.statistics import GaussianStats

log = logging.getLogger(__name__)

FEATURES = "features"
LOGITS = "logits"
_CACHE_VERSION = 2  # 2: trained by a Python loop of jitted steps (was one lax.scan; same recipe, rounding differs)


@dataclasses.dataclass(frozen=True)
class ClassifierSpec:
    """Architecture and training recipe (all of it is in the cache key)."""

    widths: tuple[int, ...] = (16, 32, 64)  # a stride-1 convolution, then stride-2 ones
    feature_dim: int = 64  # the penultimate layer: the FD's feature space
    input_pool: int = 2  # average-pool the input first (the digits are 8x8 scans upsampled)
    steps: int = 400
    batch_size: int = 64
    learning_rate: float = 2e-3
    max_shift: int = 2  # random translation (pixels, with edge padding) as augmentation
    seed: int = 0


class ConvClassifier(nn.Module):
    """images float32 [B, H, W, C] in [-1, 1] -> {"features": [B, feature_dim], "logits": [B, K]}."""

    num_classes: int
    widths: Sequence[int] = (16, 32, 64)
    feature_dim: int = 64
    input_pool: int = 1

    @nn.compact
    def __call__(self, x):
        if self.input_pool > 1:
            x = nn.avg_pool(x, (self.input_pool,) * 2, strides=(self.input_pool,) * 2)
        x = nn.gelu(nn.Conv(self.widths[0], (3, 3))(x))
        for width in self.widths[1:]:
            x = nn.Conv(width, (3, 3), strides=(2, 2))(x)
            x = nn.gelu(nn.GroupNorm(num_groups=8)(x))
        x = jnp.mean(x, axis=(1, 2))
        features = nn.gelu(nn.Dense(self.feature_dim)(x))
        return {FEATURES: features, LOGITS: nn.Dense(self.num_classes)(features)}


def _as_minus1_1(images) -> np.ndarray:
    """uint8 [0, 255] or float [-1, 1] -> float32 [-1, 1]."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 127.5 - 1.0
    return images.astype(np.float32)


def _shift(images: jax.Array, key: jax.Array, max_shift: int) -> jax.Array:
    """Translate each image by a random integer offset in [-max_shift, max_shift] (edge padded)."""
    if max_shift <= 0:
        return images
    b, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge")
    offsets = jax.random.randint(key, (b, 2), 0, 2 * max_shift + 1)

    def one(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, image.shape[-1]))

    return jax.vmap(one)(padded, offsets)


def train_classifier(images, labels, num_classes: int, spec: ClassifierSpec = ClassifierSpec()) -> dict:
    """Train :class:`ConvClassifier` on ``images`` (uint8 or float [-1, 1], [N, H, W, C]) and
    integer ``labels``; returns its params. Deterministic for fixed inputs and ``spec``."""
    x = jnp.asarray(_as_minus1_1(images))
    y = jnp.asarray(np.asarray(labels, np.int32))
    if x.ndim != 4 or x.shape[0] != y.shape[0]:
        raise ValueError(f"images must be [N, H, W, C] with one label each, got {x.shape} and {y.shape}")
    if int(spec.steps) < 1:
        raise ValueError(f"classifier training steps must be >= 1, got {spec.steps}")
    module = ConvClassifier(num_classes, tuple(spec.widths), spec.feature_dim, spec.input_pool)
    key = jax.random.PRNGKey(spec.seed)
    params = module.init(key, x[:1])["params"]
    schedule = optax.cosine_decay_schedule(spec.learning_rate, spec.steps, alpha=0.05)
    tx = optax.adam(schedule)
    opt_state = tx.init(params)
    n = x.shape[0]
    batch = min(int(spec.batch_size), n)

    def loss_fn(p, xb, yb):
        logits = module.apply({"params": p}, xb)[LOGITS]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    # One jitted step driven from Python, the data an argument (not a constant of the program):
    # on XLA:CPU the same step as the body of a lax.scan ran ~15x slower (the backward convs
    # inside the while loop: 105 ms vs 7 ms per step on 2 cores), 46 s of 400 steps vs ~4 s.
    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(p, o, x, y, i):
        k = jax.random.fold_in(key, i)
        idx = jax.random.choice(jax.random.fold_in(k, 1), n, (batch,), replace=False)
        xb = _shift(x[idx], jax.random.fold_in(k, 2), int(spec.max_shift))
        loss, grads = jax.value_and_grad(loss_fn)(p, xb, y[idx])
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    loss = None
    for i in range(int(spec.steps)):
        params, opt_state, loss = step(params, opt_state, x, y, jnp.int32(i))
    log.info("classifier trained: %d steps, final loss %.4f", spec.steps, float(loss))
    return jax.device_get(params)


@dataclasses.dataclass
class DatasetClassifier:
    """A trained classifier; ``features(images)`` / ``predict(images)`` run it sharded over all
    devices (:class:`ldm_jax.evaluation.features.ShardedFeatureFn`)."""

    module: ConvClassifier
    params: Any
    num_classes: int
    test_accuracy: float
    key: str  # the cache key
    batch_size: int = 256
    _fns: dict = dataclasses.field(default_factory=dict, repr=False)

    def feature_fn(self, local_batch_size: int | None = None, mesh=None) -> ShardedFeatureFn:
        """The sharded ``fn(uint8 or [0, 1] images) -> {"features", "logits"}``."""
        devices = jax.local_device_count()
        size = local_batch_size or max(devices, (self.batch_size // devices) * devices)
        if (size, mesh) not in self._fns:
            m = self.module
            apply = _apply_fn(m.num_classes, tuple(m.widths), m.feature_dim, m.input_pool)
            self._fns[(size, mesh)] = ShardedFeatureFn(apply, {"params": self.params}, local_batch_size=size, mesh=mesh)
        return self._fns[(size, mesh)]

    def run(self, images) -> dict[str, np.ndarray]:
        """``{"features": [N, D], "logits": [N, K]}`` of uint8 or float [-1, 1] images [N, H, W, C].
        Multi-host: every process passes the same ``images`` and computes a contiguous share."""
        x01 = (_as_minus1_1(images) + 1.0) / 2.0
        fn = self.feature_fn()
        share = -(-len(x01) // jax.process_count())
        mine = x01[jax.process_index() * share : (jax.process_index() + 1) * share]
        size = fn.local_batch_size
        batches = (mine[i * size : (i + 1) * size] for i in range(-(-share // size)))  # same count everywhere
        return dict(collect(fn, batches, stats_key=None, keep=(FEATURES, LOGITS)))

    def features(self, images) -> np.ndarray:
        return self.run(images)[FEATURES]

    def predict(self, images) -> np.ndarray:
        return np.argmax(self.run(images)[LOGITS], axis=-1)


@functools.lru_cache(maxsize=None)
def _apply_fn(num_classes: int, widths: tuple[int, ...], feature_dim: int, input_pool: int):
    """One function object per architecture, so ShardedFeatureFn compiles it once per mesh."""
    module = ConvClassifier(num_classes, widths, feature_dim, input_pool)

    def apply(variables, images01):
        return module.apply(variables, images01 * 2.0 - 1.0)

    return apply


def default_cache_dir() -> str:
    return os.environ.get("LDM_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ldm_jax")


def _fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    digest = hashlib.sha256()
    digest.update(str(images.shape).encode())
    digest.update(np.ascontiguousarray(images, np.float32).tobytes())
    digest.update(np.ascontiguousarray(labels, np.int32).tobytes())
    return digest.hexdigest()


def _source_arrays(source) -> tuple[np.ndarray, np.ndarray]:
    if not source.num_classes:
        raise ValueError(f"the dataset {getattr(source, 'name', source)!r} has no labels: a classifier feature network needs them")
    examples = [source[i] for i in range(len(source))]
    return (np.stack([e["image"] for e in examples]).astype(np.float32),
            np.asarray([e["label"] for e in examples], np.int32))


def _data_config(data: Any, split: str) -> dict:
    cfg = dict(data.to_dict() if hasattr(data, "to_dict") else data)
    cfg = {k: v for k, v in cfg.items() if k not in ("seed", "shuffle")}
    cfg["split"] = split
    return cfg


def train_or_load_classifier(
    data: Any = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    spec: ClassifierSpec = ClassifierSpec(),
    train_split: str = "train",
    test_split: str = "test",
) -> DatasetClassifier:
    """The classifier of dataset ``data`` (a ``config.data`` section or dict, default the
    32x32 one-channel digits), trained on ``train_split`` and scored on ``test_split`` the first
    time, read from ``cache_dir`` afterwards (module docstring)."""
    from ldm_jax.data import build_dataset

    data = {"name": "digits", "resolution": 32, "channels": 1} if data is None else data
    train_source = build_dataset(_data_config(data, train_split))
    images, labels = _source_arrays(train_source)
    num_classes = int(train_source.num_classes)
    key_material = {
        "version": _CACHE_VERSION,
        "data": {k: str(v) for k, v in sorted(_data_config(data, train_split).items())},
        "fingerprint": _fingerprint(images, labels),
        "num_classes": num_classes,
        "spec": dataclasses.asdict(spec),
    }
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:16]
    module = ConvClassifier(num_classes, tuple(spec.widths), spec.feature_dim, spec.input_pool)
    directory = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    weights_path = os.path.join(directory, f"classifier_{key}.msgpack")
    info_path = os.path.join(directory, f"classifier_{key}.json")
    if os.path.isfile(weights_path) and os.path.isfile(info_path):
        template = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1,) + images.shape[1:]))["params"])
        template = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), template)
        with open(weights_path, "rb") as f:
            params = flax.serialization.from_bytes(template, f.read())
        with open(info_path) as f:
            info = json.load(f)
        log.info("classifier %s loaded from %s (test accuracy %.4f)", key, weights_path, info["test_accuracy"])
        return DatasetClassifier(module, params, num_classes, float(info["test_accuracy"]), key)

    params = train_classifier(images, labels, num_classes, spec)
    classifier = DatasetClassifier(module, params, num_classes, float("nan"), key)
    test_images, test_labels = _source_arrays(build_dataset(_data_config(data, test_split)))
    classifier.test_accuracy = float(np.mean(classifier.predict(test_images) == test_labels))
    log.info("classifier %s: held-out (%s split) accuracy %.4f; cached in %s", key, test_split,
             classifier.test_accuracy, weights_path)
    os.makedirs(directory, exist_ok=True)
    _write_atomic(weights_path, flax.serialization.to_bytes(params))
    info = {"key_material": key_material, "test_accuracy": classifier.test_accuracy, "test_split": test_split,
            "num_test": int(len(test_labels))}
    _write_atomic(info_path, json.dumps(info, indent=2, sort_keys=True).encode())
    return classifier


def _write_atomic(path: str, payload: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".classifier.")
    with os.fdopen(fd, "wb") as f:
        f.write(payload)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- metrics


def _stats(features: np.ndarray) -> GaussianStats:
    x = np.asarray(features, np.float64)
    return GaussianStats(x.mean(axis=0), np.cov(x, rowvar=False), x.shape[0])


@dataclasses.dataclass(frozen=True)
class RealReference:
    """Feature statistics of the real images and the real-vs-real FD of two random halves."""

    stats: GaussianStats
    fd_real_vs_real: float
    num_images: int


def real_reference(classifier: DatasetClassifier, images, seed: int = 0) -> RealReference:
    """Statistics of ``images`` (the training images) in the classifier's feature space and the
    FD between two random halves of them (``seed`` picks the halves)."""
    features = classifier.features(images)
    order = np.random.RandomState(seed).permutation(len(features))
    half = len(features) // 2
    a, b = _stats(features[order[:half]]), _stats(features[order[half : 2 * half]])
    return RealReference(_stats(features), frechet_distance(a.mu, a.sigma, b.mu, b.sigma), len(features))


def classifier_quality(classifier: DatasetClassifier, images, labels, reference: RealReference) -> dict[str, float]:
    """Metrics of labelled samples (uint8 or float [-1, 1] [N, H, W, C], ``labels`` [N]):
    ``accuracy`` (conditional accuracy), ``fd``, ``fd_real_vs_real``, ``fd_ratio`` (fd / the
    real-vs-real fd) and ``num_samples``."""
    labels = np.asarray(labels, np.int64)
    out = classifier.run(images)
    if len(labels) != len(out[FEATURES]):
        raise ValueError(f"{len(out[FEATURES])} images but {len(labels)} labels")
    fake = _stats(out[FEATURES])
    fd = frechet_distance(fake.mu, fake.sigma, reference.stats.mu, reference.stats.sigma)
    return {
        "accuracy": float(np.mean(np.argmax(out[LOGITS], axis=-1) == labels)),
        "fd": fd,
        "fd_real_vs_real": reference.fd_real_vs_real,
        "fd_ratio": fd / max(reference.fd_real_vs_real, 1e-12),
        "num_samples": float(len(labels)),
    }


_DIGITS_CACHE: dict = {}


def digits_quality(images, labels, *, resolution: int = 32, cache_dir: str | os.PathLike | None = None,
                   spec: ClassifierSpec = ClassifierSpec()) -> dict[str, float]:
    """:func:`classifier_quality` of class-conditional digit samples (uint8 or float [-1, 1],
    ``[N, resolution, resolution, 1]``) against the digits' train split, with the cached
    digits classifier; also reports the classifier's own held-out ``classifier_test_accuracy``."""
    key = (resolution, os.fspath(cache_dir) if cache_dir else None, spec)
    if key not in _DIGITS_CACHE:
        from ldm_jax.data import build_dataset

        data = {"name": "digits", "resolution": resolution, "channels": 1}
        classifier = train_or_load_classifier(data, cache_dir=cache_dir, spec=spec)
        real, _ = _source_arrays(build_dataset(_data_config(data, "train")))
        _DIGITS_CACHE[key] = (classifier, real_reference(classifier, real))
    classifier, reference = _DIGITS_CACHE[key]
    metrics = classifier_quality(classifier, images, labels, reference)
    metrics["classifier_test_accuracy"] = classifier.test_accuracy
    return metrics


def reference_for_data(classifier: DatasetClassifier, data: Any, split: str = "train") -> RealReference:
    """:func:`real_reference` of the ``split`` images of dataset ``data`` (a ``config.data``)."""
    from ldm_jax.data import build_dataset

    images, _ = _source_arrays(build_dataset(_data_config(data, split)))
    return real_reference(classifier, images)


def metrics_summary(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
