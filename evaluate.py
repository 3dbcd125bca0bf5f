#!/usr/bin/env python
"""Sample-quality metrics (FID, KID, Inception Score, precision/recall, CLIP score) of a folder
of images, or of a model's samples generated on the fly, against a reference.

    python evaluate.py --inception pt_inception-2015-12-05-6726825d.pth --images samples/ --ref_images real/
    python evaluate.py --inception W.pth --images samples/ --ref_stats fid_stats_cifar10_train.npz
    python evaluate.py --inception W.pth --images real/ --save_stats real_stats.npz
    python evaluate.py --inception W.pth --model_dir MODEL --num_samples 50000 --classes 0 1 2 3 4 5 6 7 8 9 \
        --ref_data tfds:cifar10 --ref_data_dir ~/tensorflow_datasets --ref_resolution 32 \
        --metrics fid kid is precision_recall --out results.json
    python evaluate.py --inception W.pth --model_dir MODEL --prompts prompts.txt --clip_model clip-vit-l14/ \
        --metrics fid clip_score --ref_stats coco_stats.npz

Fake images: ``--images DIR`` (every image file below DIR; one size) or ``--model_dir`` (an ldm_jax
or diffusers model folder, sampled with ldm_jax.pipeline.LatentDiffusionPipeline; ``--prompts`` /
``--classes`` are cycled over ``--num_samples``). Reference: ``--ref_images DIR``, ``--ref_stats
FILE.npz`` (pytorch-fid's ``mu``/``sigma``; FID only) or ``--ref_data NAME`` (an ldm_jax data
source: digits, shapes, tfds:<name> in a local ``--ref_data_dir``). The FID protocol is
pytorch-fid's (module docstring of ldm_jax.evaluation.inception): 8-bit images, bilinear resize
to 299 inside the network, pool3 features, float64 statistics.

``--features digits_classifier`` scores digits (a folder, or a model with ``--classes``) with
the classifier of ``ldm_jax.evaluation.classifier`` instead of Inception (no weights needed):
``accuracy`` (samples of class y classified as y) and ``fd`` (Frechet distance in its
features to the digits' train split), beside ``fd_real_vs_real`` (two halves of that split)::

    python evaluate.py --features digits_classifier --model_dir runs/demo/ldm/model --num_samples 500 \
        --classes 0 1 2 3 4 5 6 7 8 9 --sampler ddpm --steps 100 --guidance_scale 3

CLIP score needs ``--clip_model`` (a local transformers CLIPModel folder with its tokenizer
files) and prompts: the model-mode prompts, or for ``--images`` each image's ``<stem>.txt``
caption or ``<stem>.json`` sidecar ``"prompt"`` (as sample.py writes).

Results are JSON (``--out FILE`` or stdout). Bad input (missing weights, mismatched sizes, empty
folders, ...) gets one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import numpy as np

EXIT_BAD_INPUT = 2
METRIC_NAMES = ("fid", "kid", "is", "precision_recall", "clip_score")
FEATURE_NETWORKS = ("inception", "digits_classifier")
# --features digits_classifier: ldm_jax.evaluation.classifier (conditional accuracy, FD in its features)
CLASSIFIER_METRICS = ("accuracy", "fd")


class BadInput(Exception):
    """A user error: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise BadInput(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--features", choices=FEATURE_NETWORKS, default="inception",
                   help="feature network: the FID Inception (--inception) or the digits' own classifier "
                        "(ldm_jax.evaluation.classifier, trained once and cached; metrics accuracy, fd)")
    p.add_argument("--inception", default=None, help="FID Inception weights: pytorch-fid .pth or converted .safetensors")
    p.add_argument("--classifier_cache_dir", default=None, help="--features digits_classifier: cache dir "
                   "(default $LDM_JAX_CACHE or ~/.cache/ldm_jax)")
    fake = p.add_mutually_exclusive_group(required=True)
    fake.add_argument("--images", help="folder of images to evaluate")
    fake.add_argument("--model_dir", help="model folder to sample from (ldm_jax.json or diffusers model_index.json)")
    fake.add_argument("--workdir", help="diffusion training workdir to sample from (EMA params of --step, default the latest)")
    ref = p.add_mutually_exclusive_group()
    ref.add_argument("--ref_images", help="folder of reference images")
    ref.add_argument("--ref_stats", help="reference statistics .npz (mu, sigma)")
    ref.add_argument("--ref_data", help="ldm_jax data source name: digits | shapes | tfds:<name>")
    p.add_argument("--ref_data_dir", default=None, help="tfds data_dir for --ref_data tfds:<name>")
    p.add_argument("--ref_split", default="train")
    p.add_argument("--ref_resolution", type=int, default=None, help="resolution of --ref_data images (default: the fake images')")
    p.add_argument("--num_ref", type=int, default=None, help="use the first N reference images (default: all)")
    p.add_argument("--metrics", nargs="+", default=None,
                   help=f"some of {' '.join(METRIC_NAMES)} (default fid); with --features digits_classifier "
                        f"some of {' '.join(CLASSIFIER_METRICS)} (default both; fd for --images)")
    p.add_argument("--num_samples", type=int, default=None, help="images to generate (model) or first N images (folder)")
    p.add_argument("--batch_size", type=int, default=64, help="images per step on this process (rounded up to a multiple of its devices)")
    p.add_argument("--save_stats", default=None, help="write the evaluated images' statistics to this .npz")
    p.add_argument("--save_ref_stats", default=None, help="write the reference statistics to this .npz")
    p.add_argument("--out", default=None, help="results JSON path (default: stdout)")
    p.add_argument("--kid_subsets", type=int, default=100)
    p.add_argument("--kid_subset_size", type=int, default=1000)
    p.add_argument("--is_splits", type=int, default=10)
    p.add_argument("--fid_method", choices=("sqrtm", "eigh"), default="sqrtm",
                   help="sqrtm: pytorch-fid's scipy sqrtm (default); eigh: the same trace by eigendecomposition, ~10x faster")
    p.add_argument("--pr_k", type=int, default=3, help="k of the k-NN manifolds of precision/recall")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (model) and KID subset seed")
    p.add_argument("--clip_model", default=None, help="local transformers CLIPModel folder (with tokenizer files)")
    gen = p.add_mutually_exclusive_group()
    gen.add_argument("--prompts", default=None, help="text file, one prompt per line (model mode)")
    gen.add_argument("--classes", type=int, nargs="+", default=None, help="class ids to cycle over (model mode)")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=1.0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--save_samples", default=None, help="also write generated images as PNG files here")
    p.add_argument("--step", type=int, default=None, help="checkpoint step of --workdir (default: latest)")
    p.add_argument("--fast_batching", action="store_true",
                   help="sample each device's share as one batch (faster; images then depend on the batch)")
    p.add_argument("--no_progress", action="store_true")
    p.add_argument("--compilation_cache", default=None, metavar="DIR", help="persistent XLA compilation cache dir")
    return p


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_classifier_args(args) -> None:
    if args.metrics is None:
        args.metrics = ["fd"] if args.images is not None else list(CLASSIFIER_METRICS)
    unknown = [m for m in args.metrics if m not in CLASSIFIER_METRICS]
    if unknown:
        raise BadInput(f"metric {unknown[0]!r} is not one of --features digits_classifier's {', '.join(CLASSIFIER_METRICS)}")
    for name in ("images", "model_dir", "workdir"):
        path = getattr(args, name)
        if path is not None and not os.path.isdir(path):
            raise BadInput(f"--{name} folder not found: {path}")
    if (args.model_dir or args.workdir) is not None and args.num_samples is None:
        raise BadInput("--model_dir/--workdir needs --num_samples")
    if "accuracy" in args.metrics and args.classes is None:
        raise BadInput("accuracy needs class-conditional samples: --model_dir/--workdir with --classes")
    for flag in ("ref_images", "ref_stats", "ref_data", "prompts", "clip_model", "save_stats", "save_ref_stats"):
        if getattr(args, flag) is not None:
            raise BadInput(f"--{flag} does not apply to --features digits_classifier (the reference is the digits' train split)")


def run_classifier(args) -> dict:
    """``--features digits_classifier``: conditional accuracy (model samples of ``--classes``
    classified as their label) and the FD in the classifier's features against the digits'
    train split, with the real-vs-real FD of two halves of it for scale."""
    _check_classifier_args(args)
    from ldm_jax.evaluation import classifier as C
    from ldm_jax.evaluation.images import ImageFiles

    fake_images = ImageFiles(args.images, limit=args.num_samples) if args.images else _ModelImages(args)
    if fake_images.size[0] != fake_images.size[1]:
        raise BadInput(f"the digits classifier needs square images, got {fake_images.size[0]}x{fake_images.size[1]}")
    images, labels = [], []
    if isinstance(fake_images, ImageFiles):
        images = [fake_images[i][..., :1] for i in range(len(fake_images))]
    else:
        for indices, _, everything in fake_images.batches(args.batch_size):
            images += list(everything[..., :1])
            labels += [args.classes[i % len(args.classes)] for i in indices]
    images = np.stack(images)
    # The classifier's reference (and its cache key) is the digits' train split at this size.
    data = {"name": "digits", "resolution": int(fake_images.size[0]), "channels": 1}
    classifier = C.train_or_load_classifier(data, cache_dir=args.classifier_cache_dir)
    reference = C.reference_for_data(classifier, data)
    metrics = C.classifier_quality(classifier, images, np.asarray(labels or np.zeros(len(images)), np.int64), reference)
    if "accuracy" not in args.metrics:
        metrics.pop("accuracy")
    return {
        "metrics": metrics,
        "images": args.images,
        "model_dir": args.model_dir or args.workdir,
        "step": args.step,
        "reference": "digits train split",
        "num_images": int(len(images)),
        "features": {"network": "digits_classifier", "cache_key": classifier.key,
                     "classifier_test_accuracy": classifier.test_accuracy, "num_reference": reference.num_images},
        "settings": {k: getattr(args, k) for k in ("num_samples", "sampler", "steps", "guidance_scale", "seed")},
    }


def _check_args(args) -> None:
    if args.inception is None:
        raise BadInput("--inception is required (FID Inception weights), or --features digits_classifier")
    if args.metrics is None:
        args.metrics = ["fid"]
    unknown = [m for m in args.metrics if m not in METRIC_NAMES]
    if unknown:
        raise BadInput(f"unknown metric {unknown[0]!r}; expected some of {', '.join(METRIC_NAMES)}")
    if not os.path.isfile(args.inception):
        raise BadInput(f"Inception weights not found: {args.inception} (pytorch-fid's "
                       "pt_inception-2015-12-05-6726825d.pth or a converted .safetensors)")
    for name in ("batch_size", "steps", "kid_subsets", "kid_subset_size", "is_splits", "pr_k"):
        if getattr(args, name) < 1:
            raise BadInput(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("num_samples", "num_ref"):
        if getattr(args, name) is not None and getattr(args, name) < 2:
            raise BadInput(f"--{name} must be >= 2, got {getattr(args, name)}")
    for name in ("images", "ref_images", "model_dir", "workdir", "clip_model"):
        path = getattr(args, name)
        if path is not None and not os.path.isdir(path):
            raise BadInput(f"--{name} folder not found: {path}")
    if args.ref_stats is not None and not os.path.isfile(args.ref_stats):
        raise BadInput(f"--ref_stats file not found: {args.ref_stats}")
    has_ref = any(getattr(args, n) is not None for n in ("ref_images", "ref_stats", "ref_data"))
    needs_ref = [m for m in args.metrics if m not in ("is", "clip_score")]
    if needs_ref and not has_ref and args.save_stats is None:
        raise BadInput(f"{needs_ref[0]} needs a reference: --ref_images, --ref_stats or --ref_data")
    if args.ref_stats is not None and ({"kid", "precision_recall"} & set(args.metrics)):
        raise BadInput("kid and precision_recall need reference images (--ref_images/--ref_data), not --ref_stats")
    if "clip_score" in args.metrics and args.clip_model is None:
        raise BadInput("clip_score needs --clip_model")
    if (args.model_dir or args.workdir) is not None and args.num_samples is None:
        raise BadInput("--model_dir/--workdir needs --num_samples")
    if args.model_dir is None and args.workdir is None:
        for flag in ("prompts", "classes", "save_samples"):
            if getattr(args, flag) is not None:
                raise BadInput(f"--{flag} applies to --model_dir only")


def _captions(paths: list[str]) -> list[str]:
    """Each image's prompt: ``<stem>.txt`` or the ``"prompt"`` of ``<stem>.json``."""
    out = []
    for path in paths:
        stem = os.path.splitext(path)[0]
        if os.path.isfile(stem + ".txt"):
            with open(stem + ".txt", encoding="utf-8") as f:
                out.append(f.read().strip())
        elif os.path.isfile(stem + ".json"):
            with open(stem + ".json", encoding="utf-8") as f:
                prompt = json.load(f).get("prompt")
            if not isinstance(prompt, str):
                raise BadInput(f"{stem}.json has no \"prompt\" string for clip_score")
            out.append(prompt)
        else:
            raise BadInput(f"clip_score needs a caption for {path}: {stem}.txt or a {stem}.json sidecar")
    return out


class _ModelImages:
    """Samples of a pipeline, generated batch by batch (never all held at once)."""

    def __init__(self, args):
        if args.workdir is not None:
            from ldm_jax.pipeline import from_workdir

            self.pipe = from_workdir(args.workdir, step=args.step, batch_invariant=not args.fast_batching)
        else:
            from ldm_jax.pipeline import load_model_folder

            self.pipe = load_model_folder(args.model_dir)
            if args.fast_batching:
                self.pipe = self.pipe.with_devices(batch_invariant=False)
        self.args = args
        self.prompts = None
        if args.prompts is not None:
            if not os.path.isfile(args.prompts):
                raise BadInput(f"--prompts file not found: {args.prompts}")
            with open(args.prompts, encoding="utf-8") as f:
                self.prompts = [line.strip() for line in f if line.strip()]
            if not self.prompts:
                raise BadInput(f"--prompts file {args.prompts} holds no prompts")
        default = self.pipe.default_size
        if (args.height is None or args.width is None) and default is None:
            raise BadInput("the model has no default size: pass --height and --width")
        self.height, self.width = args.height or default[0], args.width or default[1]
        self.pipe.check_size(self.height, self.width)
        self.size = (self.height, self.width)

    def __len__(self):
        return self.args.num_samples

    def prompt(self, i):
        return None if self.prompts is None else self.prompts[i % len(self.prompts)]

    def batches(self, batch_size: int):
        import jax

        a = self.args
        for lo in range(0, a.num_samples, batch_size):
            indices = list(range(lo, min(lo + batch_size, a.num_samples)))
            images = self.pipe(
                prompts=None if self.prompts is None else [self.prompt(i) for i in indices],
                class_labels=None if a.classes is None else [a.classes[i % len(a.classes)] for i in indices],
                num_images=len(indices), image_indices=indices, sampler=a.sampler, num_steps=a.steps,
                guidance_scale=a.guidance_scale, seed=a.seed, height=self.height, width=self.width,
                pad_batch_to=batch_size,
            )
            images = np.asarray(images)
            if images.shape[-1] == 1:
                images = np.repeat(images, 3, axis=-1)
            if a.save_samples is not None and jax.process_index() == 0:
                from PIL import Image

                os.makedirs(a.save_samples, exist_ok=True)
                for i, image in zip(indices, images):
                    Image.fromarray(image).save(os.path.join(a.save_samples, f"{i:06d}.png"))
            # Every process gets the whole batch; each featurises its own rows.
            yield indices, images[jax.process_index()::jax.process_count()], images


def run(args) -> dict:
    if args.features == "digits_classifier":
        return run_classifier(args)
    _check_args(args)
    import jax

    from ldm_jax.pipeline import enable_compilation_cache

    enable_compilation_cache(args.compilation_cache)
    from tqdm import tqdm

    from ldm_jax.evaluation import inception_metrics as IM
    from ldm_jax.evaluation.features import collect
    from ldm_jax.evaluation.images import ImageFiles, SourceImages
    from ldm_jax.evaluation.inception_weights import load_inception
    from ldm_jax.evaluation.statistics import GaussianStats, load_stats, save_stats

    metrics = list(dict.fromkeys(args.metrics))
    inception_metrics = [m for m in metrics if m != "clip_score"]
    fake_images = ImageFiles(args.images, limit=args.num_samples) if args.images else _ModelImages(args)

    reference = None
    if args.ref_stats is not None:
        reference = load_stats(args.ref_stats)
    elif args.ref_images is not None:
        reference = ImageFiles(args.ref_images, limit=args.num_ref)
    elif args.ref_data is not None:
        from ldm_jax.data import build_dataset

        resolution = args.ref_resolution or fake_images.size[0]
        source = build_dataset(dict(name=args.ref_data, data_dir=args.ref_data_dir, split=args.ref_split,
                                    resolution=resolution, channels=3, shuffle=False))
        reference = SourceImages(source, limit=args.num_ref)

    module, variables = load_inception(args.inception)
    local_devices = jax.local_device_count()
    batch_size = -(-args.batch_size // local_devices) * local_devices
    feature_fn = IM.inception_feature_fn(module, variables, local_batch_size=batch_size)
    show = not args.no_progress and jax.process_index() == 0

    need_real_features = bool({"kid", "precision_recall"} & set(metrics))
    real = None
    if isinstance(reference, GaussianStats):
        real = reference
    elif reference is not None:
        with tqdm(total=len(reference), desc="reference", unit="img", file=sys.stderr, disable=not show) as bar:
            real = IM.inception_features(feature_fn, reference, keep=("pool3",) if need_real_features else (),
                                         progress=bar)

    keep = tuple(k for k, m in (("pool3", need_real_features), ("logits_unbiased", "is" in metrics)) if m)
    scorer = None
    if "clip_score" in metrics:
        from ldm_jax.evaluation.clip_score import CLIPScorer, load_clip_model
        from ldm_jax.models.tokenizers import CLIPTokenizer

        clip_module, clip_params = load_clip_model(args.clip_model)
        scorer = CLIPScorer(clip_module, clip_params, CLIPTokenizer.from_pretrained(args.clip_model))

    with tqdm(total=len(fake_images), desc="evaluated", unit="img", file=sys.stderr, disable=not show) as bar:
        if isinstance(fake_images, ImageFiles):
            if scorer is not None:
                captions = _captions(fake_images.paths)
            fake = IM.inception_features(feature_fn, fake_images, keep=keep, progress=bar)
            if scorer is not None:
                for lo in range(0, len(fake_images), batch_size):
                    idx = range(lo, min(lo + batch_size, len(fake_images)))
                    scorer.update(np.stack([fake_images[i] for i in idx]), [captions[i] for i in idx])
        else:
            def local_batches():
                for indices, mine, everything in fake_images.batches(batch_size):
                    if scorer is not None:
                        if fake_images.prompts is None:
                            raise BadInput("clip_score of a model needs --prompts")
                        scorer.update(everything, [fake_images.prompt(i) for i in indices])
                    bar.update(len(everything) - len(mine))
                    yield mine

            fake = collect(feature_fn, local_batches(), stats_key="pool3", keep=keep, progress=bar)

    if args.save_stats is not None and jax.process_index() == 0:
        save_stats(args.save_stats, fake["stats"], {"source": args.images or args.model_dir or args.workdir})
    if args.save_ref_stats is not None and real is not None and not isinstance(real, GaussianStats):
        if jax.process_index() == 0:
            save_stats(args.save_ref_stats, real["stats"], {"source": args.ref_images or args.ref_data})

    results = IM.compare(real, fake, [m for m in inception_metrics if not (m == "fid" and real is None)],
                         kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                         is_splits=args.is_splits, pr_k=args.pr_k, seed=args.seed,
                         fid_method=args.fid_method) if inception_metrics else {}
    if scorer is not None:
        results["clip_score"] = scorer.result().score
    return {
        "metrics": results,
        "images": args.images,
        "model_dir": args.model_dir or args.workdir,
        "reference": args.ref_images or args.ref_stats or args.ref_data,
        "num_images": int(fake["stats"].num_samples),
        "inception": {"weights": os.path.abspath(args.inception), "sha256": _sha256(args.inception)},
        "protocol": "pytorch-fid: 8-bit RGB, bilinear resize to 299 (align_corners=False, no antialias), "
                    "2x-1 scaling, pool3 2048-d, float64 mean/covariance",
        "settings": {k: getattr(args, k) for k in ("fid_method", "kid_subsets", "kid_subset_size", "is_splits", "pr_k", "seed",
                                                     "num_samples", "num_ref", "sampler", "steps", "guidance_scale")},
    }


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        results = run(args)
    except (BadInput, ValueError, OSError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"evaluate.py: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    text = json.dumps(results, indent=2, sort_keys=True)
    import jax

    if jax.process_index() == 0:
        if args.out is None:
            print(text)
        else:
            tmp = args.out + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text + "\n")
            os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
