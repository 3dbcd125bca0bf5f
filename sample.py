#!/usr/bin/env python
"""Generate images from an ldm_jax model folder, a local diffusers Stable Diffusion folder, or
a training workdir.

    python sample.py --model_dir MODEL --prompt "a red circle" --num_samples 4 --out samples/
    python sample.py --model_dir MODEL --prompts prompts.txt --num_samples 2 --batch_size 8 --out samples/
    python sample.py --model_dir MODEL --class 0 1 2 --guidance_scale 3 --out samples/
    python sample.py --model_dir MODEL --prompt "..." --init_image in.png --strength 0.6 --out samples/
    python sample.py --model_dir MODEL --prompt "..." --init_image in.png --mask mask.png --out samples/
    python sample.py --model_dir MODEL --prompt "..." --controlnet CN --control_image edges.png \
        --controlnet_scale 0.8 --out samples/     # repeat --controlnet/--control_image for several

``--num_samples`` images are made per prompt / class (or in total for an unconditional
model). Image k of condition c has the image index ``start_index + c * num_samples + k``; its
noise depends only on (seed, image index), so ``--start_index i --num_samples 1`` with the
same condition regenerates image i bit for bit (each JSON sidecar holds that command).

Writes ``<index>.png`` and ``<index>.json`` per image and ``grid.png`` into ``--out``; refuses
to overwrite existing files unless ``--overwrite``. Bad input gets one line on stderr and exit
status 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import sys

import numpy as np

EXIT_BAD_INPUT = 2


class BadInput(Exception):
    """A user error: reported as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + message; one line is the contract here
        raise BadInput(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sample.py", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model_dir", help="ldm_jax model folder (ldm_jax.json) or diffusers SD folder (model_index.json)")
    src.add_argument("--workdir", help="diffusion training workdir (its EMA params, via ldm_jax.pipeline.from_workdir)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step in --workdir (default: latest)")
    p.add_argument("--config", default=None, help="config file path.py[:arg] for --workdir (default: the run's own config.json)")
    cond = p.add_mutually_exclusive_group()
    cond.add_argument("--prompt", action="append", help="a text prompt (repeatable)")
    cond.add_argument("--prompts", help="a text file with one prompt per line (blank lines skipped)")
    cond.add_argument("--class", dest="classes", type=int, nargs="+", help="class ids")
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--num_samples", type=int, default=1, help="images per prompt / class (default 1)")
    p.add_argument("--batch_size", type=int, default=8, help="images per compiled call (default 8)")
    p.add_argument("--start_index", type=int, default=0, help="image index of the first image (default 0)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--sampler", default=None, help="a sampler name (default: ddim, or flow_euler for flow models)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--guidance_rescale", type=float, default=0.0)
    p.add_argument("--guidance_interval", type=float, nargs=2, default=None, metavar=("T_LOW", "T_HIGH"),
                   help="guide only at timesteps in [T_LOW, T_HIGH] (the model's timestep units; "
                   "guidance in a limited interval, Kynkaanniemi et al. 2024)")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--init_image", default=None, help="image for img2img (or inpainting with --mask)")
    p.add_argument("--strength", type=float, default=None, help="img2img strength in [0, 1] (default 0.8)")
    p.add_argument("--mask", default=None, help="inpainting mask image: white = repaint, black = keep")
    p.add_argument("--low_res", default=None, help="low-resolution conditioning image (super-resolution models)")
    sdxl = p.add_argument_group("SDXL (micro-conditioning defaults as diffusers; see README)")
    sdxl.add_argument("--prompt_2", default=None, help="prompt for the second text encoder (default: --prompt)")
    sdxl.add_argument("--negative_prompt_2", default=None)
    for name, meta in (("original_size", ("H", "W")), ("target_size", ("H", "W")), ("crops_coords_top_left", ("TOP", "LEFT"))):
        sdxl.add_argument(f"--{name}", type=int, nargs=2, metavar=meta, default=None)
        sdxl.add_argument(f"--negative_{name}", type=int, nargs=2, metavar=meta, default=None)
    sdxl.add_argument("--aesthetic_score", type=float, default=None, help="refiner (default 6.0)")
    sdxl.add_argument("--negative_aesthetic_score", type=float, default=None, help="refiner (default 2.5)")
    sdxl.add_argument("--refiner_dir", default=None, help="SDXL refiner folder: the base hands over at --denoising_end")
    sdxl.add_argument("--denoising_end", type=float, default=None, help="base/refiner split in (0, 1) (default 0.8)")
    sdxl.add_argument("--variant", default=None, help="diffusers weight variant, e.g. fp16")
    p.add_argument("--controlnet", action="append", default=None, metavar="DIR",
                   help="a diffusers ControlNet folder (repeatable: several ControlNets, one --control_image each)")
    p.add_argument("--control_image", action="append", default=None, metavar="PNG",
                   help="the control image of each --controlnet, in order (resized to the image size)")
    p.add_argument("--controlnet_scale", action="append", type=float, default=None, metavar="S",
                   help="conditioning scale of each --controlnet (one value for all; default 1.0)")
    p.add_argument("--guess_mode", action="store_true",
                   help="ControlNet guess mode (diffusers' guess_mode): residuals ramped per block, "
                   "only the conditional guidance branch controlled")
    p.add_argument(
        "--lora", action="append", default=[], metavar="PATH[:SCALE]",
        help="a LoRA file (diffusers/peft or kohya .safetensors, or a folder with pytorch_lora_weights.safetensors) "
        "merged into the weights with SCALE (default 1); repeatable",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--compilation_cache", default=None, metavar="DIR", help="persistent XLA compilation cache dir")
    p.add_argument(
        "--fast_batching",
        action="store_true",
        help="batch each device's images together (faster on accelerators; images then depend on the batch size)",
    )
    return p


def _file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_image(path: str, name: str):
    """The image at ``path``, decoded (a PIL image); BadInput if missing or unreadable."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise BadInput(f"{name} not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError) as e:
        raise BadInput(f"cannot read {name} {path}: {e}") from None


def _pixels(image, channels: int) -> np.ndarray:
    """A PIL image as uint8 [H, W, channels] (1: grayscale, 3: RGB)."""
    if channels not in (1, 3):
        raise BadInput(f"image files need a 1- or 3-channel model, this one has {channels} channels")
    array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    return array[..., None] if channels == 1 else array


def _conditions(args) -> tuple[str, list]:
    """(kind, values): kind "prompt", "class" or "none"."""
    if args.prompts is not None:
        if not os.path.isfile(args.prompts):
            raise BadInput(f"prompt file not found: {args.prompts}")
        with open(args.prompts, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise BadInput(f"prompt file {args.prompts} holds no prompts")
        return "prompt", prompts
    if args.prompt is not None:
        return "prompt", list(args.prompt)
    if args.classes is not None:
        return "class", list(args.classes)
    return "none", [None]


def _check_args(args) -> None:
    for name in ("num_samples", "batch_size", "steps"):
        if getattr(args, name) < 1:
            raise BadInput(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.start_index < 0:
        raise BadInput(f"--start_index must be >= 0, got {args.start_index}")
    if not 0 <= args.seed < 2**32:
        raise BadInput(f"--seed must be in [0, 2**32), got {args.seed}")
    from ldm_jax.diffusion.samplers import sampler_names

    if args.sampler is not None and args.sampler not in sampler_names():
        raise BadInput(f"unknown sampler {args.sampler!r}; expected one of {', '.join(sampler_names())}")
    if args.strength is not None and args.init_image is None:
        raise BadInput("--strength needs --init_image")
    if args.mask is not None and args.init_image is None:
        raise BadInput("--mask needs --init_image")
    nets, controls, scales = (len(args.controlnet or ()), len(args.control_image or ()), len(args.controlnet_scale or ()))
    if nets != controls:
        raise BadInput(f"{nets} --controlnet folder(s) but {controls} --control_image(s): give one per ControlNet")
    if scales not in (0, 1, nets):
        raise BadInput(f"{scales} --controlnet_scale values for {nets} --controlnet folder(s)")
    if args.guess_mode and not nets:
        raise BadInput("--guess_mode applies to ControlNets: give --controlnet")
    for folder in args.controlnet or ():
        if not os.path.isdir(folder):
            raise BadInput(f"ControlNet folder not found: {folder}")
    if args.config is not None and args.workdir is None:
        raise BadInput("--config applies to --workdir only")
    if args.step is not None and args.workdir is None:
        raise BadInput("--step applies to --workdir only")
    if args.model_dir is not None and not os.path.isdir(args.model_dir):
        raise BadInput(f"model directory not found: {args.model_dir}")
    if args.workdir is not None and not os.path.isdir(args.workdir):
        raise BadInput(f"workdir not found: {args.workdir}")
    if args.refiner_dir is not None:
        if args.model_dir is None:
            raise BadInput("--refiner_dir needs --model_dir (an SDXL base folder)")
        if not os.path.isdir(args.refiner_dir):
            raise BadInput(f"refiner directory not found: {args.refiner_dir}")
        if args.init_image is not None:
            raise BadInput("--refiner_dir applies to text-to-image (no --init_image)")
    if args.denoising_end is not None and not 0.0 < args.denoising_end < 1.0:
        raise BadInput(f"--denoising_end must be in (0, 1), got {args.denoising_end}")
    if args.variant is not None and args.model_dir is None:
        raise BadInput("--variant applies to --model_dir only")


SDXL_FLAGS = ("prompt_2", "negative_prompt_2", "original_size", "negative_original_size", "target_size",
              "negative_target_size", "crops_coords_top_left", "negative_crops_coords_top_left", "aesthetic_score",
              "negative_aesthetic_score")


def _sdxl_options(args) -> dict:
    """The SDXL flags that were given, as pipeline keyword arguments."""
    out = {}
    for name in SDXL_FLAGS:
        value = getattr(args, name)
        if value is not None:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def _lora_specs(args) -> list[tuple[str, float]]:
    """``--lora PATH[:SCALE]`` -> [(path, scale)]; a path may itself hold ':' (the scale is the
    part after the last one, when it is a number)."""
    specs = []
    for spec in args.lora:
        path, scale = spec, 1.0
        head, sep, tail = spec.rpartition(":")
        if sep and head:
            try:
                path, scale = head, float(tail)
            except ValueError:
                pass
        if not math.isfinite(scale):
            raise BadInput(f"--lora {spec!r}: the scale must be a finite number")
        if not os.path.exists(path):
            raise BadInput(f"--lora file not found: {path}")
        specs.append((path, scale))
    return specs


def _load_pipeline(args):
    if args.model_dir is not None:
        from ldm_jax.pipeline import load_model_folder

        return load_model_folder(args.model_dir, batch_invariant=not args.fast_batching, variant=args.variant)
    from ldm_jax.pipeline import from_workdir

    return from_workdir(args.workdir, step=args.step, config=args.config, batch_invariant=not args.fast_batching)


def _regenerate_command(args, kind: str, value, index: int) -> str:
    """The command that makes exactly this image again (one image, its own index)."""
    cmd = ["python", "sample.py"]
    if args.model_dir is not None:
        cmd += ["--model_dir", os.path.abspath(args.model_dir)]
    else:
        cmd += ["--workdir", os.path.abspath(args.workdir)]
        if args.step is not None:
            cmd += ["--step", str(args.step)]
        if args.config is not None:
            cmd += ["--config", os.path.abspath(args.config)]
    for path, scale in _lora_specs(args):
        cmd += ["--lora", f"{os.path.abspath(path)}:{scale!r}"]
    if kind == "prompt":
        cmd += ["--prompt", value]
    elif kind == "class":
        cmd += ["--class", str(value)]
    if args.negative_prompt is not None:
        cmd += ["--negative_prompt", args.negative_prompt]
    cmd += ["--num_samples", "1", "--start_index", str(index), "--seed", str(args.seed)]
    cmd += ["--sampler", args.sampler, "--steps", str(args.steps), "--eta", repr(args.eta)]
    cmd += ["--guidance_scale", repr(args.guidance_scale), "--guidance_rescale", repr(args.guidance_rescale)]
    if args.guidance_interval is not None:
        cmd += ["--guidance_interval", *map(repr, args.guidance_interval)]
    cmd += ["--height", str(args.height), "--width", str(args.width)]
    for flag in ("init_image", "mask", "low_res"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag}", os.path.abspath(getattr(args, flag))]
    for folder, image in zip(args.controlnet or (), args.control_image or ()):
        cmd += ["--controlnet", os.path.abspath(folder), "--control_image", os.path.abspath(image)]
    for scale in args.controlnet_scale or ():
        cmd += ["--controlnet_scale", repr(scale)]
    if args.guess_mode:
        cmd += ["--guess_mode"]
    if args.strength is not None:
        cmd += ["--strength", repr(args.strength)]
    for name, value in _sdxl_options(args).items():
        cmd += [f"--{name}", *map(str, value)] if isinstance(value, tuple) else [f"--{name}", str(value)]
    for flag in ("refiner_dir", "denoising_end", "variant"):
        if getattr(args, flag) is not None:
            value = getattr(args, flag)
            cmd += [f"--{flag}", os.path.abspath(value) if flag == "refiner_dir" else str(value)]
    if args.fast_batching:
        cmd += ["--fast_batching", "--batch_size", str(args.batch_size)]
    cmd += ["--out", "regenerated"]
    return shlex.join(cmd)


def run(args) -> int:
    _check_args(args)
    kind, values = _conditions(args)
    jobs = [(value, args.start_index + c * args.num_samples + k) for c, value in enumerate(values) for k in range(args.num_samples)]
    names = [f"{index:06d}" for _, index in jobs]
    targets = [f"{n}.png" for n in names] + [f"{n}.json" for n in names] + ["grid.png"]
    existing = [t for t in targets if os.path.exists(os.path.join(args.out, t))]
    if existing and not args.overwrite:
        raise BadInput(
            f"{args.out} already holds {existing[0]}" + (f" and {len(existing) - 1} more outputs" if len(existing) > 1 else "")
            + "; pass --overwrite or choose another --out"
        )
    files = {}  # read now, so that a bad file is reported before the model loads
    for name, label in (("init_image", "init image"), ("mask", "mask"), ("low_res", "low-res image")):
        if getattr(args, name) is not None:
            files[name] = _read_image(getattr(args, name), label)
    controls = [_read_image(path, "control image") for path in args.control_image or ()]
    if "mask" in files and files["mask"].size != files["init_image"].size:
        (mw, mh), (iw, ih) = files["mask"].size, files["init_image"].size
        raise BadInput(f"mask size {mh}x{mw} does not match init image size {ih}x{iw}")

    from ldm_jax.pipeline import enable_compilation_cache
    from ldm_jax.training.run_logger import image_grid

    enable_compilation_cache(args.compilation_cache)
    if os.environ.get("LDM_JAX_COORDINATOR_ADDRESS"):
        from ldm_jax.training.distributed import initialize_distributed

        initialize_distributed({})
    import jax
    from PIL import Image
    from tqdm import tqdm

    loras = _lora_specs(args)
    pipe = _load_pipeline(args)
    refiner = None
    if args.refiner_dir is not None:
        from ldm_jax.pipeline import load_model_folder

        refiner = load_model_folder(args.refiner_dir, batch_invariant=not args.fast_batching, variant=args.variant)
    if args.sampler is None:  # the model's objective decides (DDPM: ddim, flow: flow_euler)
        args.sampler = pipe.default_sampler
    if loras:
        from ldm_jax.interop.torch_weights import WeightsError

        try:
            pipe = pipe.with_loras(loras)
        except (WeightsError, ValueError) as error:
            raise BadInput(f"--lora: {error}") from None
    images_in = {}
    if args.controlnet:
        from ldm_jax.interop.diffusers_controlnet import load_diffusers_controlnet

        nets = [load_diffusers_controlnet(folder) for folder in args.controlnet]
        pipe = pipe.with_controlnets(nets)
        # Grayscale control images stay one channel for 1-channel ControlNets, else RGB (diffusers' convert_rgb).
        images_in["control_image"] = [
            _pixels(image, 1 if cn.conditioning_channels == 1 else 3) for image, (cn, _) in zip(controls, nets)
        ]
        scales = args.controlnet_scale or [1.0]
        images_in["controlnet_scale"] = scales * len(nets) if len(scales) == 1 else list(scales)
        images_in["guess_mode"] = bool(args.guess_mode)
    if "init_image" in files:
        images_in["init_image"] = _pixels(files["init_image"], pipe.first_stage.image_channels)
    if "mask" in files:
        images_in["mask"] = _pixels(files["mask"], 1)
    if "low_res" in files:
        if pipe.concat != "low_res":
            raise BadInput("--low_res given but the model has no low-res conditioning channels")
        images_in["low_res"] = _pixels(files["low_res"], pipe.low_res_channels)
    if "init_image" in images_in:
        size = images_in["init_image"].shape[:2]
        if (args.height or size[0], args.width or size[1]) != size:
            raise BadInput(f"--height/--width {args.height}x{args.width} do not match the init image {size[0]}x{size[1]}")
        args.height, args.width = size
    default = pipe.default_size
    if args.height is None or args.width is None:
        if default is None:
            raise BadInput("the model has no default size: pass --height and --width")
        args.height = args.height or default[0]
        args.width = args.width or default[1]
    pipe.check_size(args.height, args.width)

    writer = jax.process_index() == 0
    model_record = {
        "source": pipe.info.get("source"),
        "format": pipe.info.get("format"),
        "checkpoint_step": pipe.info.get("step"),
        "params_hash": pipe.params_hash,
    }
    if loras:
        model_record["loras"] = [
            {"path": os.path.abspath(path), "scale": scale, "sha256": _file_sha256(
                os.path.join(path, "pytorch_lora_weights.safetensors") if os.path.isdir(path) else path)}
            for path, scale in loras
        ]
    inputs_record = {
        name: {"path": os.path.abspath(getattr(args, name)), "sha256": _file_sha256(getattr(args, name))}
        for name in images_in if name in ("init_image", "mask", "low_res")
    }
    if args.controlnet:
        inputs_record["controlnets"] = [
            {"folder": os.path.abspath(folder), "control_image": os.path.abspath(image),
             "sha256": _file_sha256(image), "scale": scale}
            for folder, image, scale in zip(args.controlnet, args.control_image, images_in["controlnet_scale"])
        ]
        inputs_record["guess_mode"] = bool(args.guess_mode)
    def call_arguments(batch):
        conditions = [value for value, _ in batch]
        return dict(
            prompts=conditions if kind == "prompt" else None,
            class_labels=conditions if kind == "class" else None,
            num_images=len(batch),
            image_indices=[index for _, index in batch],
            negative_prompt=args.negative_prompt,
            sampler=args.sampler,
            num_steps=args.steps,
            guidance_scale=args.guidance_scale,
            guidance_rescale=args.guidance_rescale,
            guidance_interval=None if args.guidance_interval is None else tuple(args.guidance_interval),
            eta=args.eta,
            seed=args.seed,
            height=args.height,
            width=args.width,
            strength=args.strength,
            pad_batch_to=args.batch_size,
            **images_in,
            **_sdxl_options(args),
            **({"denoising_end": args.denoising_end} if args.denoising_end is not None and refiner is None else {}),
        )

    def generate(batch):
        if refiner is None:
            return pipe(**call_arguments(batch))
        from ldm_jax.pipeline.sdxl import base_then_refiner

        kwargs = call_arguments(batch)
        prompts = kwargs.pop("prompts")
        split = 0.8 if args.denoising_end is None else args.denoising_end
        return base_then_refiner(pipe, refiner, prompts, denoising_end=split, **kwargs)

    batches = [jobs[i : i + args.batch_size] for i in range(0, len(jobs), args.batch_size)]
    pipe.validate(**call_arguments(batches[0]))  # argument errors before any output or progress bar
    outputs = []
    for batch in tqdm(batches, desc="sampling", unit="batch", file=sys.stderr, disable=not writer):
        images = generate(batch)
        if writer:
            os.makedirs(args.out, exist_ok=True)
        for (value, index), image in zip(batch, images):
            outputs.append(image)
            if not writer:
                continue
            name = f"{index:06d}"
            Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(os.path.join(args.out, f"{name}.png"))
            sidecar = {
                "image": f"{name}.png",
                "image_index": index,
                "seed": args.seed,
                "prompt": value if kind == "prompt" else None,
                "negative_prompt": args.negative_prompt,
                "class_label": value if kind == "class" else None,
                "sampler": args.sampler,
                "num_steps": args.steps,
                "guidance_scale": args.guidance_scale,
                "guidance_rescale": args.guidance_rescale,
                "guidance_interval": args.guidance_interval,
                "eta": args.eta,
                "height": args.height,
                "width": args.width,
                "strength": args.strength,
                **{name: list(v) if isinstance(v, tuple) else v for name, v in _sdxl_options(args).items()},
                "refiner": None if refiner is None else {"source": refiner.info.get("source"),
                                                         "params_hash": refiner.params_hash},
                "denoising_end": args.denoising_end,
                "inputs": inputs_record,
                "batch_invariant": not args.fast_batching,
                "batch_size": args.batch_size,
                "num_devices": pipe.num_devices,
                "model": model_record,
                "command": _regenerate_command(args, kind, value, index),
            }
            with open(os.path.join(args.out, f"{name}.json"), "w", encoding="utf-8") as f:
                json.dump(sidecar, f, indent=2)
                f.write("\n")
    if writer:
        columns = args.num_samples if len(values) > 1 and args.num_samples <= 16 else math.ceil(math.sqrt(len(outputs)))
        # No padding: images touch, as diffusers' make_image_grid.
        grid = image_grid(np.stack(outputs), columns, padding=0, pad_value=0)
        Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(os.path.join(args.out, "grid.png"))
        print(f"wrote {len(outputs)} images and grid.png to {args.out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return run(args)
    except (BadInput, ValueError, OSError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"sample.py: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
