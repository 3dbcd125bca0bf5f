"""Sampling speed: ldm_jax's jitted pipeline against diffusers' PyTorch StableDiffusionPipeline on
the same CPU, with the same random-weight small U-Net + VAE + CLIP text encoder.

Measures, for a 50-step DDIM text-to-image generation with classifier-free guidance:
  * time per image, ours (compiled; batch-invariant and batched modes) and diffusers, and their ratio;
  * the loop overhead of our sampler: (time of the jitted 50-step loop) / (50 x time of one
    jitted guided U-Net call), both on the same batch; and the same ratio for diffusers'
    pipeline (whole call) against its U-Net;
  * compile time (first call minus a compiled call).

Usage:  python benchmarks/bench_sampling.py [--batch 4] [--steps 50] [--size 128] [--repeats 3]
Prints a markdown table. Runs on one JAX CPU device (do not set
--xla_force_host_platform_device_count: both frameworks then use all cores for one program).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel
from transformers import CLIPTokenizer as HFCLIPTokenizer

from ldm_jax.diffusion.guidance import cfg_model_fn
from ldm_jax.diffusion.samplers import sample
from ldm_jax.pipeline import load_model_folder

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


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict, repeats: int) -> dict:
    """Median wall time of each function over ``repeats`` rounds, the functions alternating
    within each round, so that a shared, busy machine loads them alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(seconds(fn))
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--size", type=int, default=64, help="image side (latents are size / 4)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
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
        rows = [(name, t / batch, first[name] - t if name in first else None) for name, t in steady.items()]

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

    ours_time = rows[0][1]
    print(f"\nSampling benchmark: {steps}-step DDIM, classifier-free guidance 7.5, batch {batch}, {size}x{size} images "
          f"(latents {size // 4}x{size // 4}x4)")
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch threads "
          f"{torch.get_num_threads()}; JAX devices {jax.device_count()} ({jax.devices()[0].platform}); "
          f"U-Net {sum(p.numel() for p in torch_pipe.unet.parameters()) / 1e6:.2f}M params\n")
    print("| pipeline | time per image (s) | diffusers / this | compile (s) |")
    print("|---|---|---|---|")
    for name, per_image, compile_time in rows:
        compile_text = f"{compile_time:.1f}" if compile_time is not None else "-"
        print(f"| {name} | {per_image:.3f} | {diffusers_time / batch / per_image:.2f}x | {compile_text} |")
    print("\n| loop overhead | value |")
    print("|---|---|")
    print(f"| ours: {steps}-step jitted loop / ({steps} x jitted guided U-Net call) | "
          f"{overhead['loop'] / overhead['unet calls']:.3f} ({overhead['loop']:.2f} s / {overhead['unet calls']:.2f} s) |")
    print(f"| diffusers: whole call / ({steps} x guided U-Net call) | "
          f"{overhead['diffusers'] / overhead['torch unet calls']:.3f} "
          f"({overhead['diffusers']:.2f} s / {overhead['torch unet calls']:.2f} s) |")
    print(f"\nours (batch-invariant) is {diffusers_time / batch / ours_time:.2f}x the speed of diffusers per image.")


if __name__ == "__main__":
    main()
