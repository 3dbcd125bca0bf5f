#!/usr/bin/env python
"""Measure class-conditional digit samples of exported model folders with the digits classifier
of the evaluation work (issue 13): conditional accuracy (the classifier's argmax is the
requested digit) and the Frechet distance in its feature space against the real training
digits (with the real-vs-real floor).

    python scripts/eval_digits_quality.py --model runs/demo/ldm/model:ddpm:100 \
        --model runs/ditflow/dit/model:flow_euler:50 --per_class 50

``--model FOLDER:SAMPLER:STEPS`` (a model folder, or ``WORKDIR@STEP`` for a training run's
checkpoint, read without touching the run). The classifier is ``ldm_jax.evaluation.classifier``'s
(trained once on the digits and cached).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", action="append", required=True, help="FOLDER:SAMPLER:STEPS")
    p.add_argument("--per_class", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--guidance_interval", type=float, nargs=2, default=None, metavar=("T_LOW", "T_HIGH"),
                   help="guide only at timesteps in [T_LOW, T_HIGH] (default: every step)")
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--grid_dir", default=None, help="write a grid (one row per digit, 8 columns) per model here")
    args = p.parse_args()

    import numpy as np

    from ldm_jax.pipeline import from_workdir, load_model_folder

    from ldm_jax.evaluation import classifier as clf
    labels = np.repeat(np.arange(10), args.per_class)
    results = {}
    for entry in args.model:
        folder, sampler, steps = entry.rsplit(":", 2)
        if "@" in folder:
            workdir, step = folder.rsplit("@", 1)
            pipe = from_workdir(workdir, int(step), batch_invariant=False)
        else:
            pipe = load_model_folder(folder, batch_invariant=False)
        start = time.process_time()
        images = []
        for i in range(0, len(labels), args.batch_size):
            chunk = labels[i : i + args.batch_size].tolist()
            images.append(pipe(class_labels=chunk, sampler=sampler, num_steps=int(steps),
                               guidance_scale=args.guidance_scale, seed=args.seed,
                               guidance_interval=None if args.guidance_interval is None else tuple(args.guidance_interval),
                               image_indices=list(range(i, i + len(chunk)))))
        images = np.concatenate(images)
        cpu = time.process_time() - start
        if args.grid_dir:
            from PIL import Image

            cols = min(8, args.per_class)
            tiles = images.reshape(10, args.per_class, *images.shape[1:])[:, :cols, ..., 0]
            grid = np.pad(tiles, ((0, 0), (0, 0), (1, 1), (1, 1))).transpose(0, 2, 1, 3)
            grid = grid.reshape(10 * (images.shape[1] + 2), cols * (images.shape[2] + 2))
            os.makedirs(args.grid_dir, exist_ok=True)
            # runs/dit/model -> dit_model.png (two exported folders are both called "model")
            parts = os.path.normpath(folder.replace("@", "_step")).split(os.sep)
            name = "_".join(parts[-2:])
            Image.fromarray(np.kron(grid, np.ones((3, 3), np.uint8))).save(os.path.join(args.grid_dir, f"{name}.png"))
        metrics = clf.digits_quality(images, labels, resolution=images.shape[1])
        metrics.update(sampler=sampler, steps=int(steps), sampling_cpu_s=cpu,
                       denoiser=type(pipe.unet).__name__, objective=pipe.objective)
        results[folder] = metrics
        print(folder, json.dumps(metrics), flush=True)
    results["_meta"] = {"per_class": args.per_class, "guidance_scale": args.guidance_scale,
                        "guidance_interval": args.guidance_interval, "seed": args.seed,
                        "loadavg_1min": os.getloadavg()[0],
                        "cpu_s_total": resource.getrusage(resource.RUSAGE_SELF).ru_utime}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
