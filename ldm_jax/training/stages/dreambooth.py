"""DreamBooth data: instance images paired with class images the base model generated.

Ruiz et al. 2023 fine-tune on a few images of one subject captioned with a rare token
("a photo of sks dog") and keep the model's prior over the subject's class with
prior preservation: images the *base* model generates for the class prompt ("a photo of
dog") are trained on beside the instances, ``loss = instance loss + w * prior loss``.

:func:`class_images` generates those images once, before training, with the inference
pipeline (image ``i`` is the pipeline's image ``(class_seed, i)``, so the set is the same
whatever the batch size or device count) and keeps them as PNGs in ``class_dir`` with a
manifest; a later run (a resume) with the same settings reads them back instead.
:class:`DreamBoothSource` pairs example ``i`` of the instance images with class image
``i mod num_class_images``; the stage's ``prepare_batch`` stacks the two halves and weights
them so that the mean loss is instance mean + w * prior mean.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

MANIFEST = "class_images.json"
PRIOR_PREFIX = "prior_"


def _manifest(settings: Mapping[str, Any], n: int) -> dict:
    return {"num_images": int(n), **{k: settings[k] for k in sorted(settings)}}


def _read_cached(class_dir: str, manifest: dict) -> np.ndarray | None:
    path = os.path.join(class_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            stored = json.load(f)
        except json.JSONDecodeError:
            return None
    if stored != manifest:
        log.info("class images in %s were made with other settings; generating them again", class_dir)
        return None
    images = []
    for i in range(manifest["num_images"]):
        file = os.path.join(class_dir, f"{i:05d}.png")
        if not os.path.isfile(file):
            return None
        images.append(np.asarray(Image.open(file)))
    out = np.stack(images)
    return out[..., None] if out.ndim == 3 else out


def _write(class_dir: str, images: np.ndarray, manifest: dict) -> None:
    os.makedirs(class_dir, exist_ok=True)
    for i, image in enumerate(images):
        tmp = os.path.join(class_dir, f".{i:05d}.png.tmp")
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp, format="PNG")
        os.replace(tmp, os.path.join(class_dir, f"{i:05d}.png"))
    tmp = os.path.join(class_dir, f".{MANIFEST}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(class_dir, MANIFEST))  # last: the manifest vouches for the files


def class_images(
    pipe: Any, condition: Mapping[str, Any], num_images: int, resolution: int, dreambooth: Any,
    class_dir: str | None, write: bool = True,
) -> np.ndarray:
    """``num_images`` uint8 [N, H, W, C] images of the class from the base pipeline ``pipe``.

    ``condition``: ``{"prompts": str}`` (text models) or ``{"class_labels": int}``;
    ``dreambooth``: the ``config.dreambooth`` section (seed, sampler, steps, guidance, batch).
    Read back from ``class_dir`` when a previous run left them there with the same settings
    (the manifest records condition, count, sampler settings and the base's params hash);
    written there (``write``: on one process) otherwise."""
    n = int(num_images)
    if n < 1:
        raise ValueError(f"config.dreambooth.num_class_images must be >= 1 with prior preservation, got {n}")
    settings = {
        **{k: v for k, v in condition.items()},
        "seed": int(dreambooth.class_seed), "sampler": str(dreambooth.class_sampler),
        "num_steps": int(dreambooth.class_num_steps), "guidance_scale": float(dreambooth.class_guidance_scale),
        "resolution": int(resolution), "base_params_hash": pipe.params_hash,
    }
    manifest = _manifest(settings, n)
    if class_dir:
        cached = _read_cached(class_dir, manifest)
        if cached is not None:
            log.info("dreambooth: %d class images read from %s", n, class_dir)
            return cached
    batch = max(1, int(dreambooth.class_batch_size))
    out = []
    for start in range(0, n, batch):
        indices = list(range(start, min(n, start + batch)))
        if "class_labels" in condition:
            call = {"class_labels": [int(condition["class_labels"])] * len(indices)}
        else:
            call = {"prompts": [str(condition["prompts"])] * len(indices)}
        out.append(pipe(
            **call, num_images=len(indices), image_indices=indices, seed=int(dreambooth.class_seed),
            sampler=str(dreambooth.class_sampler), num_steps=int(dreambooth.class_num_steps),
            guidance_scale=float(dreambooth.class_guidance_scale), height=int(resolution), width=int(resolution),
            pad_batch_to=batch,
        ))
    images = np.concatenate(out)
    if class_dir and write:
        _write(class_dir, images, manifest)
    log.info("dreambooth: generated %d class images%s", n, f" into {class_dir}" if class_dir else "")
    return images


class DreamBoothSource:
    """Example ``i``: instance example ``i mod len(instances)`` (its ``image``) and class image
    ``i mod len(class_images)`` as ``prior_image`` (float32 [-1, 1]); length the larger of the
    two (as diffusers' DreamBooth dataset). Without class images: the instances alone."""

    num_classes = None
    has_captions = False
    name = "dreambooth"

    def __init__(self, instances: Any, class_images_uint8: np.ndarray | None):
        if len(instances) == 0:
            raise ValueError("the DreamBooth instance data (config.data) is empty")
        self.instances = instances
        self.resolution = int(instances.resolution)
        self.channels = int(instances.channels)
        self.prior = None
        if class_images_uint8 is not None:
            prior = np.asarray(class_images_uint8)
            if prior.shape[1:] != (self.resolution, self.resolution, self.channels):
                raise ValueError(
                    f"class images have shape {prior.shape[1:]}, the instance images "
                    f"{(self.resolution, self.resolution, self.channels)}"
                )
            self.prior = prior.astype(np.float32) / 127.5 - 1.0
        self.num_skipped = 0

    def __len__(self) -> int:
        n = len(self.instances)
        return n if self.prior is None else max(n, len(self.prior))

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"dreambooth index {index} out of range [0, {len(self)})")
        example = {"image": np.asarray(self.instances[index % len(self.instances)]["image"], np.float32)}
        if self.prior is not None:
            example[PRIOR_PREFIX + "image"] = self.prior[index % len(self.prior)]
        return example
