#!/usr/bin/env python
"""ControlNet demo on this CPU: does a ControlNet make the shapes LDM follow a mask?

    python scripts/controlnet_demo.py [--workdir runs/controlnet_demo] [--quick]

Three runs through ``train.py``'s in-process entry (each resumes or is skipped when finished):

1. the shapes autoencoder (``configs/shapes_autoencoder.py``), shrunk: 16 px, f=2 (8x8x4 latents);
2. a class-conditional shapes LDM on it (``configs/shapes_ldm.py`` with the label = the shape's
   kind and a convolutional U-Net), so the base model decides position and size itself;
3. a ControlNet on the frozen LDM (``configs/controlnet_shapes.py``) with the shape's mask as
   the control image.

Evaluation: ``--num_eval`` masks of unseen examples (shapes seed 1); for each the base pipeline
generates the example's shape class without and with the ControlNet (same seed and image
index), the generated shape is segmented (pixels farther than ``FOREGROUND_DISTANCE`` in RGB
from the image's border median, the background) and compared with the mask (coverage >= 0.5)
by IoU. Writes ``<workdir>/controlnet_demo.json`` (IoUs, timings, load average) and a figure
(rows: control masks | without ControlNet | with ControlNet) to ``docs/controlnet_shapes.png``.
``--quick``: tiny step counts, to check the script runs (numbers meaningless).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.chdir(ROOT)

FOREGROUND_DISTANCE = 0.3  # RGB distance in [0, 1] units; shape/background colours differ by >= 150/255


def _train_module():
    spec = importlib.util.spec_from_file_location("train_cli", os.path.join(ROOT, "train.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _quiet(c, steps, batch, progress):
    c.train.num_steps = steps
    c.train.global_batch_size = batch
    c.train.log_every = max(1, steps // 5)
    c.checkpoint.every_steps = max(1, steps // 2)
    c.checkpoint.async_save = False
    c.logging.progress_bar = progress
    c.logging.tensorboard = False
    c.preview.every_steps = -1
    return c


def configs(workdir: str, a):
    from configs import controlnet_shapes, shapes_autoencoder, shapes_ldm

    res = a.resolution
    ae = _quiet(shapes_autoencoder.get_config(), a.ae_steps, 32, a.progress)
    ae.data.resolution = res
    ae.data.shapes_num_examples = 20_000
    ae.autoencoder.block_out_channels = (32, 64)  # f = 2: 16x16x3 -> 8x8x4
    ae.autoencoder.norm_num_groups = 16
    ae.autoencoder.mid_block_add_attention = False
    ae.optimizer.warmup_steps = 20

    ldm = _quiet(shapes_ldm.get_config(), a.ldm_steps, 64, a.progress)
    ldm.data.resolution = res
    ldm.data.shapes_num_examples = 20_000
    ldm.first_stage.workdir = os.path.join(workdir, "autoencoder")
    ldm.first_stage.scale_batches = 4
    # 8x8 -> 4x4. Widths 64/128 (LDM 800, ControlNet 400 steps) followed the masks better (IoU
    # 0.345 vs 0.208) but took 12 min on the 2-core VM; 32/64 with ControlNet 900 steps: 7.7 min.
    ldm.unet.block_out_channels = (32, 64)
    ldm.unet.layers_per_block = 1
    ldm.unet.down_block_types = ("DownBlock2D",) * 2
    ldm.unet.up_block_types = ("UpBlock2D",) * 2
    ldm.unet.mid_block_type = "UNetMidBlock2D"
    ldm.unet.norm_num_groups = 32
    # The per-shape CPU convolution formulation (as configs/digits_ldm.py, whose train step it
    # made 1.49x faster; not compared idle on this U-Net): same parameters, and the exported
    # model (the ControlNet's base) is unchanged.
    ldm.unet.conv_impl = "auto"
    ldm.conditioning.kind = "class"  # label: the shape (circle, square, ...)
    ldm.conditioning.drop_prob = 0.1
    ldm.diffusion.prediction = "eps"
    ldm.optimizer.learning_rate = 1e-3
    ldm.optimizer.warmup_steps = 50
    ldm.ema.decay = 0.995

    cn = _quiet(controlnet_shapes.get_config(), a.cn_steps, 64, a.progress)
    cn.data.resolution = res
    cn.data.shapes_num_examples = 20_000
    cn.controlnet.base = os.path.join(workdir, "ldm", "model")
    # cn.controlnet.conv_impl stays "xla": "auto" was no faster for this stage (600 steps in
    # 187 s vs 178 s with "xla", measured idle in the same hour).
    cn.optimizer.learning_rate = 5e-4
    cn.optimizer.warmup_steps = 20
    cn.ema.decay = 0.99
    for c in (ae, ldm, cn):
        c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, max(1, c.train.num_steps // 4))
    return ae, ldm, cn


def segment(images, distance=FOREGROUND_DISTANCE):
    """float [N, H, W, 3] in [0, 1] -> bool [N, H, W]: pixels farther than ``distance`` from
    the median colour of the image border (the background)."""
    import numpy as np

    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)
    background = np.median(border, axis=1)[:, None, None, :]
    return np.linalg.norm(images - background, axis=-1) > distance


def iou(a, b):
    import numpy as np

    inter = np.logical_and(a, b).sum(axis=(1, 2))
    union = np.logical_or(a, b).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/controlnet_demo")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--ae_steps", type=int, default=300)
    p.add_argument("--ldm_steps", type=int, default=800)
    p.add_argument("--cn_steps", type=int, default=900)
    p.add_argument("--num_eval", type=int, default=64)
    p.add_argument("--sample_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=2.0)
    p.add_argument("--figure", default="docs/controlnet_shapes.png")
    p.add_argument("--quick", action="store_true", help="tiny runs: checks the script, not the model")
    p.add_argument("--progress", action="store_true", help="progress bars")
    a = p.parse_args(argv)
    if a.quick:
        a.ae_steps, a.ldm_steps, a.cn_steps, a.num_eval, a.sample_steps = 4, 4, 4, 8, 3
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import numpy as np
    from PIL import Image

    train_cli = _train_module()
    from ldm_jax.data.shapes import ShapesSource
    from ldm_jax.interop.diffusers_controlnet import load_diffusers_controlnet
    from ldm_jax.pipeline import load_model_folder
    from ldm_jax.training.run_logger import image_grid

    workdir = os.path.abspath(a.workdir)
    os.makedirs(workdir, exist_ok=True)
    ae, ldm, cn = configs(workdir, a)
    timings = {}
    for name, config in (("autoencoder", ae), ("ldm", ldm), ("controlnet", cn)):
        start, cpu = time.time(), time.process_time()
        result = train_cli.run(config, os.path.join(workdir, name))
        timings[name] = {"wall_s": round(time.time() - start, 1), "cpu_s": round(time.process_time() - cpu, 1),
                         "steps": result.step, "loss": result.last_metrics.get("loss"),
                         "load_avg_1min": os.getloadavg()[0]}
        print(f"== {name}: {timings[name]}", flush=True)

    start = time.time()
    source = ShapesSource(resolution=a.resolution, num_examples=a.num_eval, seed=1, control="mask")
    examples = [source[i] for i in range(a.num_eval)]
    masks = np.stack([e["control"] for e in examples])  # [N, H, W, 1] coverage
    labels = [int(e["label"]) for e in examples]
    base = load_model_folder(os.path.join(ldm_dir := os.path.join(workdir, "ldm"), "model"))
    controlled = base.with_controlnets([load_diffusers_controlnet(os.path.join(workdir, "controlnet", "model"))])
    common = dict(class_labels=labels, num_steps=a.sample_steps, sampler="ddim", guidance_scale=a.guidance_scale,
                  seed=0, output_type="float")
    without = np.asarray(base(**common))
    with_cn = np.asarray(controlled(**common, control_image=masks))
    target = masks[..., 0] >= 0.5
    iou_without, iou_with = iou(segment(without), target), iou(segment(with_cn), target)
    timings["evaluation"] = {"wall_s": round(time.time() - start, 1), "load_avg_1min": os.getloadavg()[0]}
    # The data's own images through the same segmentation: the ceiling of the measure.
    data_images = (np.stack([e["image"] for e in examples]) + 1.0) / 2.0
    iou_data = iou(segment(data_images), target)

    summary = {
        "num_eval": a.num_eval,
        "iou_without_controlnet": {"mean": float(iou_without.mean()), "median": float(np.median(iou_without))},
        "iou_with_controlnet": {"mean": float(iou_with.mean()), "median": float(np.median(iou_with))},
        "iou_of_the_data_images": {"mean": float(iou_data.mean())},
        "settings": {k: v for k, v in vars(a).items() if k not in ("progress",)},
        "timings": timings,
        "ldm_dir": ldm_dir,
    }
    with open(os.path.join(workdir, "controlnet_demo.json"), "w") as f:
        json.dump(summary, f, indent=2)
    k = min(16, a.num_eval)
    to_u8 = lambda x: np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)  # noqa: E731
    rows = np.concatenate([to_u8(np.repeat(masks[:k], 3, axis=-1)), to_u8(without[:k]), to_u8(with_cn[:k])])
    grid = image_grid(rows, columns=k, padding=1, pad_value=128)
    figure = Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.Resampling.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(a.figure)), exist_ok=True)
    figure.save(a.figure)
    print(json.dumps({k: summary[k] for k in ("iou_without_controlnet", "iou_with_controlnet", "iou_of_the_data_images")}))
    print(f"figure (rows: control masks | without ControlNet | with ControlNet): {a.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
