"""FID / KID / IS / precision-recall of image sets with the FID Inception, end to end.

    module, variables = load_inception("pt_inception-2015-12-05-6726825d.pth")
    fn = inception_feature_fn(module, variables, local_batch_size=64)
    real = inception_features(fn, ImageFiles("real/"), keep=("pool3",))
    fake = inception_features(fn, ImageFiles("samples/"), keep=("pool3", "logits_unbiased"))
    results = compare(real, fake, metrics=("fid", "kid", "is", "precision_recall"))

``real`` may also be the statistics of a ``.npz`` file (FID only: KID and precision/recall need
the real features themselves).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np

from ldm_jax.evaluation import metrics as M
from ldm_jax.evaluation.features import Collected, ShardedFeatureFn, collect
from ldm_jax.evaluation.images import process_batches
from ldm_jax.evaluation.statistics import GaussianStats

METRICS = ("fid", "kid", "is", "precision_recall")


def inception_feature_fn(module, variables, *, local_batch_size: int, mesh=None, resize: bool = True) -> ShardedFeatureFn:
    """A sharded ``images -> {"pool3", "logits", "logits_unbiased"}`` function."""
    return ShardedFeatureFn(_apply_fn(module, resize), variables, local_batch_size=local_batch_size, mesh=mesh)


_APPLY_FNS: dict = {}


def _apply_fn(module, resize: bool):
    """One function object per (module, resize), so its compiled program is reused."""
    key = (module, resize)
    if key not in _APPLY_FNS:
        def apply_fn(v, images):
            # Full float32 convolutions: TPUs/GPUs otherwise default to bf16 passes (~1e-3 off).
            with jax.default_matmul_precision("float32"):
                return module.apply(v, images, resize=resize)._asdict()

        _APPLY_FNS[key] = apply_fn
    return _APPLY_FNS[key]


def inception_features(feature_fn: ShardedFeatureFn, images, *, keep: Sequence[str] = ("pool3",),
                       max_kept: int | None = None, progress=None) -> Collected:
    """Statistics of ``pool3`` and the ``keep`` features over every image of every process."""
    batches = process_batches(images, feature_fn.local_batch_size, jax.process_index(), jax.process_count())
    return collect(feature_fn, batches, stats_key="pool3", keep=keep, max_kept=max_kept, progress=progress)


def _check_metrics(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; expected some of {METRICS}")


def compare(real: Mapping | GaussianStats | None, fake: Mapping, metrics: Sequence[str] = ("fid",), *,
            kid_subsets: int = 100, kid_subset_size: int = 1000, is_splits: int = 10, pr_k: int = 3,
            seed: int = 0, fid_method: str = "sqrtm") -> dict[str, float]:
    """The requested metrics of ``fake`` (a :class:`Collected`) against ``real`` (a ``Collected``
    or ``GaussianStats``; None when only IS is asked for). Returns a flat JSON-able dict."""
    _check_metrics(metrics)
    out: dict[str, float] = {}
    real_stats = real if isinstance(real, GaussianStats) else (None if real is None else real["stats"])
    needs_real = [m for m in metrics if m != "is"]
    if needs_real and real is None:
        raise ValueError(f"{needs_real[0]} needs reference images or statistics")
    real_pool3 = None if isinstance(real, GaussianStats) or real is None else real.get("pool3")
    for name in metrics:
        if name in ("kid", "precision_recall") and (real_pool3 is None or not len(real_pool3)):
            raise ValueError(f"{name} needs reference features, not only mu/sigma statistics")
    fake_stats = fake["stats"]
    if "fid" in metrics:
        if real_stats.mu.shape != fake_stats.mu.shape:
            raise ValueError(f"reference statistics have dim {real_stats.mu.shape[0]}, samples {fake_stats.mu.shape[0]}")
        out["fid"] = M.frechet_distance(real_stats.mu, real_stats.sigma, fake_stats.mu, fake_stats.sigma,
                                       method=fid_method)
    if "kid" in metrics:
        kid = M.kernel_inception_distance(real_pool3, fake["pool3"], kid_subsets, kid_subset_size,
                                          rng=np.random.RandomState(seed))
        out["kid_mean"], out["kid_std"] = kid.mean, kid.std
    if "is" in metrics:
        score = M.inception_score(fake["logits_unbiased"], splits=min(is_splits, len(fake["logits_unbiased"])))
        out["is_mean"], out["is_std"] = score.mean, score.std
    if "precision_recall" in metrics:
        pr = M.precision_recall(real_pool3, fake["pool3"], k=pr_k)
        out["precision"], out["recall"] = pr.precision, pr.recall
    out["num_fake"] = int(fake_stats.num_samples)
    if real_stats is not None:
        out["num_real"] = int(real_stats.num_samples)
    return out
