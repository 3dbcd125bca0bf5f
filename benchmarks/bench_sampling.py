"""Sampling speed: ldm_jax's jitted pipeline against diffusers' PyTorch StableDiffusionPipeline on
the same CPU, with the same random-weight small U-Net + VAE + CLIP text encoder.

Measures, for a 50-step DDIM text-to-image generation with classifier-free guidance:
  * time per image, ours (compiled; batch-invariant and batched modes) and diffusers, and their ratio;
  * the loop overhead of our sampler: (time of the jitted 50-step loop) / (50 x time of one
    jitted guided U-Net call), both on the same batch; and the same ratio for diffusers'
    pipeline (whole call) against its U-Net;
  * compile time (first call minus a compiled call).

Usage:  python benchmarks/bench_sampling.py [--batch 4] [--steps 50] [--size 64] [--repeats 3] [--threads N]
Prints markdown tables of wall and process CPU time. Runs on one JAX CPU device (do not set
--xla_force_host_platform_device_count); ``--threads N`` gives both frameworks N threads (on a
shared machine, ``--threads 1`` and the CPU-time columns are the least disturbed by other load).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np


def _parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=64, help="image side (latents are size / 4)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0,
                        help="pin the process to this many cores, torch threads to match (0: all cores, defaults)")
    return parser.parse_args()


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.threads:
    # Before JAX and torch start their thread pools: pin the process (every thread it will
    # create) to N cores, and give XLA single-threaded matrix kernels when N is 1.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: ARGS.threads])
    if ARGS.threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel  # noqa: E402
from transformers import CLIPTokenizer as HFCLIPTokenizer  # noqa: E402

from ldm_jax.diffusion.guidance import cfg_model_fn  # noqa: E402
from ldm_jax.diffusion.samplers import sample  # noqa: E402
from ldm_jax.pipeline import load_model_folder  # noqa: E402

UNET = dict(
    block_out_channels=(64, 128, 128),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=32,
    cross_attention_dim=64,
    attention_head_dim=4,
)
VAE = dict(
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
)
SD_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1,
)
PROMPTS = ["a photograph of an astronaut riding a horse", "a red cat", "a castle at sunset", "a blue dog"]


def _tokenizer(folder: str) -> HFCLIPTokenizer:
    """A CLIP tokenizer over every byte character (and its end-of-word form); no merges."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = [chr(b) for b in keep] + [chr(256 + i) for i in range(256 - len(keep))]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return HFCLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=77)


def build_diffusers(folder: str, size: int) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    tokenizer = _tokenizer(folder)
    n = len(tokenizer)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=n, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=77, bos_token_id=n - 2,
                                        eos_token_id=n - 1, pad_token_id=n - 1))
    vae = AutoencoderKL(**VAE)
    unet = UNet2DConditionModel(sample_size=size // 4, **UNET)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seconds(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call; CPU time counts every thread of this process,
    so it is less sensitive than wall time to other programs sharing the machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(fns: dict, repeats: int) -> dict:
    """Median (wall, CPU) seconds of each function over ``repeats`` rounds, the functions
    alternating within each round, so that a shared, busy machine loads them alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(seconds(fn))
    return {name: tuple(statistics.median(x) for x in zip(*t)) for name, t in times.items()}


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    batch, steps, size = args.batch, args.steps, args.size
    prompts = (PROMPTS * batch)[:batch]

    with tempfile.TemporaryDirectory() as tmp:
        torch_pipe = build_diffusers(tmp, size)
        torch_pipe.save_pretrained(os.path.join(tmp, "sd"))
        ours = load_model_folder(os.path.join(tmp, "sd"))
        latent_shape = (batch, size // 4, size // 4, 4)

        # Ours: the whole pipeline (text encoding, DDIM steps with CFG, decoding) is one jitted
        # program; compile time = first call - a compiled call. Diffusers: same weights, same CPU.
        pipes = {invariant: ours.with_devices(batch_invariant=invariant) for invariant in (True, False)}
        calls = {
            f"ours, batch_invariant={invariant}": (
                lambda p=p: p(prompts, num_steps=steps, guidance_scale=7.5, seed=0)
            )
            for invariant, p in pipes.items()
        }
        first = {name: seconds(call) for name, call in calls.items()}

        def diffusers_call():
            with torch.no_grad():
                torch_pipe(prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=7.5,
                           output_type="np")

        with torch.no_grad():  # warm-up
            torch_pipe(prompts, height=size, width=size, num_inference_steps=2, output_type="np")
        calls["diffusers (PyTorch)"] = diffusers_call
        steady = interleaved(calls, args.repeats)
        diffusers_time = steady["diffusers (PyTorch)"]
        rows = [(name, wall / batch, cpu / batch, first[name][0] - wall if name in first else None)
                for name, (wall, cpu) in steady.items()]

        # Loop overhead: our jitted loop vs the same number of jitted guided U-Net calls (same
        # batch, conditioning and latents); diffusers' whole call vs its guided U-Net batch.
        unet, params = ours.unet, ours.params["unet"]
        context = ours.conditioner.encode(ours.params["conditioner"], ours.conditioner.host_inputs(prompts))
        uncond = ours.conditioner.encode(ours.params["conditioner"], ours.conditioner.null_host_inputs(batch))

        def guided(params, context, uncond):
            model = lambda x, t, c: unet.apply({"params": params}, x, t, **c)  # noqa: E731
            return cfg_model_fn(model, context, uncond, 7.5)

        unet_call = jax.jit(lambda p, x, t, c, u: guided(p, c, u)(x, t))
        loop = jax.jit(lambda p, x, c, u, s: sample(guided(p, c, u), s, latent_shape, jax.random.PRNGKey(0),
                                                    num_steps=steps, x_T=x, **ours.sampler_defaults))
        x = jnp.asarray(np.random.default_rng(0).standard_normal(latent_shape), jnp.float32)
        t = jnp.full((batch,), 500, jnp.int32)
        jax.block_until_ready(unet_call(params, x, t, context, uncond))
        jax.block_until_ready(loop(params, x, context, uncond, ours.schedule))
        xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
        embeds = torch.randn(2 * batch, 77, 64)

        def torch_unet_calls():
            with torch.no_grad():
                for _ in range(steps):
                    torch_pipe.unet(torch.cat([xt, xt]), 500, encoder_hidden_states=embeds)

        def unet_calls():
            for _ in range(steps):
                jax.block_until_ready(unet_call(params, x, t, context, uncond))

        overhead = interleaved(
            {
                "loop": lambda: jax.block_until_ready(loop(params, x, context, uncond, ours.schedule)),
                "unet calls": unet_calls,
                "torch unet calls": torch_unet_calls,
                "diffusers": diffusers_call,
            },
            args.repeats,
        )

    (d_wall, d_cpu), (loop_wall, loop_cpu) = diffusers_time, overhead["loop"]
    (calls_wall, calls_cpu), (torch_wall, torch_cpu) = overhead["unet calls"], overhead["torch unet calls"]
    (dd_wall, dd_cpu) = overhead["diffusers"]
    print(f"\nSampling benchmark: {steps}-step DDIM, classifier-free guidance 7.5, batch {batch}, {size}x{size} images "
          f"(latents {size // 4}x{size // 4}x4); medians of {args.repeats} interleaved runs")
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f}; threads: {args.threads or 'default'} (torch {torch.get_num_threads()}); "
          f"JAX {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device; torch {torch.__version__}; "
          f"U-Net {sum(p.numel() for p in torch_pipe.unet.parameters()) / 1e6:.2f}M params\n")
    print("| pipeline | wall s / image | CPU s / image | diffusers / this (wall) | diffusers / this (CPU) | compile s |")
    print("|---|---|---|---|---|---|")
    for name, wall, cpu, compile_time in rows:
        compile_text = f"{compile_time:.1f}" if compile_time is not None else "-"
        print(f"| {name} | {wall:.3f} | {cpu:.3f} | {d_wall / batch / wall:.2f}x | {d_cpu / batch / cpu:.2f}x "
              f"| {compile_text} |")
    print("\n| loop overhead | wall | CPU |")
    print("|---|---|---|")
    print(f"| ours: {steps}-step jitted loop / ({steps} x jitted guided U-Net call) | {loop_wall / calls_wall:.3f} "
          f"({loop_wall:.2f} s / {calls_wall:.2f} s) | {loop_cpu / calls_cpu:.3f} ({loop_cpu:.2f} s / {calls_cpu:.2f} s) |")
    print(f"| diffusers: whole call / ({steps} x guided U-Net call) | {dd_wall / torch_wall:.3f} "
          f"({dd_wall:.2f} s / {torch_wall:.2f} s) | {dd_cpu / torch_cpu:.3f} ({dd_cpu:.2f} s / {torch_cpu:.2f} s) |")
    sys.stdout.flush()


if __name__ == "__main__":
    main(ARGS)
