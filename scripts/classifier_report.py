#!/usr/bin/env python
"""Measure the digits feature network of ``ldm_jax.evaluation.classifier``: held-out accuracy
and training time per seed, and the Frechet distances that say what an FD figure means
(issue 13): real-vs-real of two halves, uniform noise, the held-out split against the train
split, and random real subsets of K images against the train reference -- drawn from the
reference itself (as the issue asks) and from outside it (the subset against the other N - K,
which is what a perfect generator's K samples look like: new images, not copies).

    python scripts/classifier_report.py --seeds 0 1 2 --num_samples 500 --subsets 5

Each seed trains into a fresh temporary cache (nothing is read from ``~/.cache``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _fd(a, b):
    from ldm_jax.evaluation import classifier as C
    from ldm_jax.evaluation.metrics import frechet_distance

    sa, sb = C._stats(a), C._stats(b)
    return frechet_distance(sa.mu, sa.sigma, sb.mu, sb.sigma)


def measure(seed: int, num_samples: int, subsets: int, spec_overrides: dict) -> dict:
    import numpy as np

    from ldm_jax.data import build_dataset
    from ldm_jax.evaluation import classifier as C

    data = {"name": "digits", "resolution": 32, "channels": 1}
    spec = dataclasses.replace(C.ClassifierSpec(), seed=seed, **spec_overrides)
    with tempfile.TemporaryDirectory() as cache:
        start, cpu = time.time(), time.process_time()
        classifier = C.train_or_load_classifier(data, cache_dir=cache, spec=spec)
        wall, cpu = time.time() - start, time.process_time() - cpu
    train, _ = C._source_arrays(build_dataset({**data, "split": "train"}))
    test, test_labels = C._source_arrays(build_dataset({**data, "split": "test"}))
    reference = C.real_reference(classifier, train)
    feats = classifier.features(train).astype(np.float64)
    test_feats = classifier.features(test).astype(np.float64)
    noise = np.random.RandomState(1).uniform(-1, 1, (num_samples,) + train.shape[1:]).astype(np.float32)
    rvr = reference.fd_real_vs_real
    rng = np.random.RandomState(100 + seed)
    inside, outside, small = [], [], []
    for _ in range(subsets):
        order = rng.permutation(len(feats))
        inside.append(_fd(feats[order[:num_samples]], feats))  # the figure: a subset of the reference
        outside.append(_fd(feats[order[:num_samples]], feats[order[num_samples:]]))  # disjoint from its reference
        small.append(_fd(feats[order[: len(test)]], feats[order[len(test):]]))  # as many as the test split
    return {
        "seed": seed,
        "test_accuracy": classifier.test_accuracy,
        "train_wall_s": round(wall, 1),
        "train_cpu_s": round(cpu, 1),
        "fd_real_vs_real": rvr,
        "fd_noise": _fd(classifier.features(noise), feats),
        "fd_test_vs_train": _fd(test_feats, feats),
        f"fd_train{len(test)}_vs_rest": float(np.mean(small)),
        f"ratio_train{num_samples}_subset_vs_train": [v / rvr for v in inside],
        f"ratio_train{num_samples}_vs_other{len(feats) - num_samples}": [v / rvr for v in outside],
        "test_accuracy_check": float(np.mean(classifier.predict(test) == test_labels)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--num_samples", type=int, default=500, help="K, the evaluation's sample count")
    p.add_argument("--subsets", type=int, default=5)
    p.add_argument("--spec", default="{}", help="JSON overrides of ClassifierSpec fields, e.g. '{\"steps\": 800}'")
    args = p.parse_args(argv)
    overrides = json.loads(args.spec)
    if "widths" in overrides:
        overrides["widths"] = tuple(overrides["widths"])
    for seed in args.seeds:
        print(json.dumps(measure(seed, args.num_samples, args.subsets, overrides)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
