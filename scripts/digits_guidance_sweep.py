#!/usr/bin/env python
"""Guidance scale x guidance interval sweep of the digits demo's exported model: 500 samples
(50 per digit, DDPM 100, seed 1) per setting, scored by the digits classifier (conditional
accuracy, Frechet distance / real-vs-real). One JSON line per setting on stdout.

    python scripts/digits_guidance_sweep.py runs/demo/ldm/model '[2.0, [300, 999]]' '[1.55, null]'

Each setting is ``[guidance_scale, [t_low, t_high] or null]`` (null: guidance at every step).
Produced ``docs/digits_guidance_interval_sweep.jsonl``.
"""
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from ldm_jax.evaluation import classifier as clf  # noqa: E402
from ldm_jax.pipeline import load_model_folder  # noqa: E402


def main(argv):
    pipe = load_model_folder(argv[0], batch_invariant=False)
    labels = np.repeat(np.arange(10), 50)
    for g, interval in (json.loads(a) for a in argv[1:]):
        start = time.time()
        images = []
        for i in range(0, len(labels), 100):
            kw = dict(class_labels=labels[i:i + 100].tolist(), sampler="ddpm", num_steps=100, guidance_scale=g,
                      seed=1, image_indices=list(range(i, i + 100)))
            if interval is not None:
                kw["guidance_interval"] = tuple(interval)
            images.append(pipe(**kw))
        m = clf.digits_quality(np.concatenate(images), labels, resolution=images[0].shape[1])
        print(json.dumps({"g": g, "interval": interval, "acc": m["accuracy"], "fd_ratio": round(m["fd_ratio"], 3),
                          "wall": round(time.time() - start), "load": os.getloadavg()[0]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
