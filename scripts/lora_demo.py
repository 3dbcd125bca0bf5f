#!/usr/bin/env python
"""LoRA demo: adapt the digits LDM to thick strokes, then measure and draw before/after.

    python scripts/lora_demo.py                                  # base: runs/demo/ldm/model (make demo)
    python scripts/lora_demo.py --base runs/digits_ldm/model --steps 300 --out docs

1. the style data: every sklearn digit at the base's resolution, strokes thickened by a 3x3
   grey dilation, written as an image folder with one subfolder per digit;
2. ``train.py --config configs/lora_digits.py`` on it (rank-4 LoRA on the U-Net's convolutions,
   the base frozen), in ``--workdir``;
3. the same seeds and labels sampled from the base and from the base with the LoRA
   (``pipeline.with_loras``), and measured: the ink fraction (pixels > 0.5, the thickness
   proxy) of the samples against that of the original and the dilated digits, and the accuracy
   of a digits classifier (logistic regression on 8x8 downsampled data of both styles) on the
   labels asked for, so the LoRA is seen to change the style and keep the digit;
4. ``<out>/lora_demo.png`` (rows: data in both styles, base samples, LoRA samples) and
   ``<out>/lora_demo.json`` (the figures, steps, CPU seconds, load average).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def dilate(images: np.ndarray) -> np.ndarray:
    """3x3 grey dilation of [N, H, W] images in [0, 1] (maximum over the 8-neighbourhood)."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1)))
    h, w = images.shape[1:]
    return np.max([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=0)


def digits_at(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """All digits as [N, H, W] in [0, 1] and their labels."""
    from ldm_jax.data.digits import DigitsSource

    source = DigitsSource(resolution=resolution, channels=1)
    images = np.stack([source[i]["image"][..., 0] for i in range(len(source))])
    labels = np.asarray([int(source[i]["label"]) for i in range(len(source))])
    return (images + 1.0) / 2.0, labels


def write_style_folder(folder: str, images: np.ndarray, labels: np.ndarray) -> None:
    from PIL import Image

    if os.path.isfile(os.path.join(folder, "COMPLETE")):
        return
    for i, (image, label) in enumerate(zip(images, labels)):
        sub = os.path.join(folder, str(int(label)))
        os.makedirs(sub, exist_ok=True)
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(os.path.join(sub, f"{i:04d}.png"))
    open(os.path.join(folder, "COMPLETE"), "w").close()


def ink(images: np.ndarray) -> float:
    """Mean fraction of pixels > 0.5 (images in [0, 1])."""
    return float((np.asarray(images) > 0.5).mean())


def classifier(original: np.ndarray, thick: np.ndarray, labels: np.ndarray):
    """Logistic regression on 8x8 block means of both styles (style-blind digit reader)."""
    from sklearn.linear_model import LogisticRegression

    def features(x):
        n, h, w = x.shape
        f = h // 8
        return x.reshape(n, 8, f, 8, f).mean(axis=(2, 4)).reshape(n, -1)

    model = LogisticRegression(max_iter=2000).fit(np.concatenate([features(original), features(thick)]),
                                                   np.concatenate([labels, labels]))
    return lambda x: model.predict(features(x))


def grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Rows of [k, H, W] images in [0, 1] -> one uint8 image."""
    h, w = rows[0].shape[1:]
    k = max(len(r) for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, k * (w + pad) + pad), 128, np.uint8)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            out[y:y + h, x:x + w] = np.round(np.clip(image, 0, 1) * 255)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=os.path.join(ROOT, "runs/demo/ldm/model"), help="exported digits LDM folder")
    p.add_argument("--base_workdir", default=None,
                   help="instead of --base: a digits_ldm training workdir; its latest checkpoint's EMA model is "
                        "exported to <workdir>/base and used (read-only on that workdir, safe while it trains)")
    p.add_argument("--workdir", default=os.path.join(ROOT, "runs/lora_demo"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--samples_per_class", type=int, default=8)
    p.add_argument("--sample_steps", type=int, default=50)
    p.add_argument("--out", default=os.path.join(ROOT, "docs"))
    args = p.parse_args(argv)
    if args.base_workdir:
        from ldm_jax.pipeline import from_workdir, save_model_folder

        args.base = os.path.join(args.workdir, "base")
        if not os.path.isfile(os.path.join(args.base, "ldm_jax.json")):
            save_model_folder(from_workdir(args.base_workdir), args.base, overwrite=True)
    if not os.path.isfile(os.path.join(args.base, "ldm_jax.json")):
        print(f"lora_demo.py: error: no exported model in {args.base} (run `make demo`, or pass --base)", file=sys.stderr)
        return 2
    start_cpu, start = time.process_time(), time.time()
    import jax

    from configs import lora_digits
    from ldm_jax.pipeline import load_model_folder

    spec = __import__("importlib.util").util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
    train_cli = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(train_cli)

    base = load_model_folder(args.base)
    resolution = base.default_size[0]
    original, labels = digits_at(resolution)
    thick = dilate(original)
    data_dir = os.path.join(args.workdir, "data")
    write_style_folder(data_dir, thick, labels)

    config = lora_digits.get_config()
    config.finetune.base = os.path.abspath(args.base)
    config.data.path = data_dir
    config.data.resolution = resolution
    config.train.num_steps = int(args.steps)
    config.checkpoint.every_steps = max(1, int(args.steps) // 2)
    config.logging.progress_bar = False
    config.preview.every_steps = -1  # the before/after samples below are the preview
    train_start = time.process_time()
    result = train_cli.run(config, os.path.join(args.workdir, "run"))
    train_cpu = time.process_time() - train_start
    if result.preempted or result.step != int(args.steps):
        print(f"lora_demo.py: training stopped at step {result.step}; re-run the same command to resume", file=sys.stderr)
        return 1
    lora_dir = os.path.join(args.workdir, "run", "model")

    adapted = base.with_loras([lora_dir])
    asked = np.repeat(np.arange(10), args.samples_per_class)
    call = dict(class_labels=[int(c) for c in asked], num_steps=args.sample_steps, sampler="ddpm",
                guidance_scale=3.0, seed=0, output_type="float")
    before = base(**call)[..., 0]
    after = adapted(**call)[..., 0]
    read = classifier(original, thick, labels)
    figures = {
        "ink_fraction": {"data_original": ink(original), "data_thick": ink(thick),
                         "samples_base": ink(before), "samples_lora": ink(after)},
        "digit_accuracy": {"data_original": float((read(original) == labels).mean()),
                           "data_thick": float((read(thick) == labels).mean()),
                           "samples_base": float((read(before) == asked).mean()),
                           "samples_lora": float((read(after) == asked).mean())},
        "steps": int(result.step),
        "final_loss": float(result.last_metrics.get("loss", float("nan"))),
        "samples": int(len(asked)), "sample_steps": int(args.sample_steps), "sampler": "ddpm", "guidance_scale": 3.0,
        "train_cpu_seconds": round(train_cpu, 1),
        "total_cpu_seconds": round(time.process_time() - start_cpu, 1),
        "children_cpu_seconds": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime, 1),
        "wall_seconds": round(time.time() - start, 1),
        "load_average_1min_at_end": os.getloadavg()[0],
        "devices": jax.device_count(),
        "base": os.path.abspath(args.base),
    }
    os.makedirs(args.out, exist_ok=True)
    from PIL import Image

    k = args.samples_per_class
    pick = [np.flatnonzero(labels == c)[0] for c in range(10)]
    rows = [original[pick], thick[pick]]
    for j in range(min(k, 3)):  # three samples per digit from each model, same seeds
        rows.append(before[j::k])
    for j in range(min(k, 3)):
        rows.append(after[j::k])
    image = grid(rows)
    Image.fromarray(image).resize((image.shape[1] * 2, image.shape[0] * 2), Image.NEAREST).save(
        os.path.join(args.out, "lora_demo.png"))
    with open(os.path.join(args.out, "lora_demo.json"), "w") as f:
        json.dump(figures, f, indent=2, sort_keys=True)
    print(json.dumps(figures, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax").setLevel(logging.WARNING)
    sys.exit(main())
