"""Streaming mean / covariance of feature vectors, and pytorch-fid compatible ``.npz`` files.

:class:`GaussianAccumulator` folds batches in as they come (Chan et al.'s pairwise update of
count, mean and the centred sum of outer products, in float64), so the statistics of 50k
samples cost one [D, D] matrix, never [50k, D]. ``covariance`` has ``ddof=1``, as
``np.cov(features, rowvar=False)`` which pytorch-fid uses. Accumulators from several hosts
merge exactly (:meth:`GaussianAccumulator.merge`, :func:`allgather_merge`).

Statistics files hold ``mu`` [D] and ``sigma`` [D, D] (pytorch-fid's ``--save-stats`` format),
plus ``num_samples`` and optional string metadata (ignored by pytorch-fid).
"""

from __future__ import annotations

import os
from typing import Mapping, NamedTuple

import numpy as np


class GaussianStats(NamedTuple):
    mu: np.ndarray  # [D] float64
    sigma: np.ndarray  # [D, D] float64
    num_samples: int


class GaussianAccumulator:
    """Running ``(count, mean, M2)``; ``update(batch [B, D])``, ``merge(other)``, ``stats()``."""

    def __init__(self, dim: int):
        if dim < 1:
            raise ValueError(f"dim must be positive, got {dim}")
        self.dim = dim
        self.count = 0
        self.mean = np.zeros(dim, np.float64)
        self.m2 = np.zeros((dim, dim), np.float64)

    def update(self, batch) -> "GaussianAccumulator":
        x = np.asarray(batch, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"batch must be [n, {self.dim}], got shape {x.shape}")
        if x.shape[0] == 0:
            return self
        mean = x.mean(axis=0)
        centred = x - mean
        self._combine(x.shape[0], mean, centred.T @ centred)
        return self

    def merge(self, other: "GaussianAccumulator") -> "GaussianAccumulator":
        if other.dim != self.dim:
            raise ValueError(f"cannot merge dims {self.dim} and {other.dim}")
        if other.count:
            self._combine(other.count, other.mean, other.m2)
        return self

    def _combine(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        total = self.count + count
        delta = mean - self.mean
        self.m2 += m2 + np.outer(delta, delta) * (self.count * count / total)
        self.mean += delta * (count / total)
        self.count = total

    def stats(self) -> GaussianStats:
        if self.count < 2:
            raise ValueError(f"covariance needs at least 2 samples, got {self.count}")
        return GaussianStats(self.mean.copy(), self.m2 / (self.count - 1), self.count)


def allgather_merge(acc: GaussianAccumulator) -> GaussianAccumulator:
    """Merge every process's accumulator (identity on one process). Collective: every process
    must call it."""
    import jax

    if jax.process_count() == 1:
        return acc
    from jax.experimental import multihost_utils

    counts = np.asarray(multihost_utils.process_allgather(np.asarray([acc.count], np.int64)))
    means = np.asarray(multihost_utils.process_allgather(acc.mean))
    m2s = np.asarray(multihost_utils.process_allgather(acc.m2))
    merged = GaussianAccumulator(acc.dim)
    for count, mean, m2 in zip(counts.reshape(-1), means.reshape(-1, acc.dim), m2s.reshape(-1, acc.dim, acc.dim)):
        if count:
            merged._combine(int(count), mean, m2)
    return merged


def save_stats(path: str | os.PathLike, stats: GaussianStats, metadata: Mapping[str, str] | None = None) -> None:
    """Write ``mu``, ``sigma`` (pytorch-fid's keys), ``num_samples`` and ``meta_*`` strings."""
    path = os.fspath(path)
    extra = {f"meta_{k}": np.asarray(str(v)) for k, v in (metadata or {}).items()}
    tmp = path + ".tmp.npz"
    np.savez(tmp, mu=stats.mu, sigma=stats.sigma, num_samples=np.asarray(stats.num_samples), **extra)
    os.replace(tmp, path)


def load_stats(path: str | os.PathLike) -> GaussianStats:
    """Read a statistics ``.npz`` (ours or pytorch-fid's ``--save-stats`` output)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"statistics file not found: {path}")
    with np.load(path, allow_pickle=False) as f:
        if "mu" not in f or "sigma" not in f:
            raise ValueError(f"{path} has no 'mu'/'sigma' arrays (keys: {sorted(f.keys())})")
        mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
        count = int(f["num_samples"]) if "num_samples" in f else -1
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not [D] and [D, D]")
    return GaussianStats(mu, sigma, count)
