"""ControlNet sampling through the one generation program, against diffusers'
``StableDiffusionControlNetPipeline`` (two ControlNets, per-ControlNet scales, DDIM with
classifier-free guidance) on a random-weight tiny Stable Diffusion folder and random-weight
ControlNets (zero convolutions made non-zero), from the same initial latents; and
sample.py's ``--controlnet`` path and its bad-input errors."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel
from transformers import CLIPTokenizer as HFCLIPTokenizer

from ldm_jax.diffusion.samplers import initial_noise
from ldm_jax.interop.diffusers_controlnet import load_diffusers_controlnet
from ldm_jax.pipeline import load_model_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 16  # pixels; the tiny VAE halves them (8 x 8 x 4 latents), so the ControlNets embed 2x
LATENT = (SIZE // 2, SIZE // 2, 4)
STEPS = 3
PROMPTS = ["a red cat", "cat"]
SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1,
)
UNET = dict(
    sample_size=SIZE // 2, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8, cross_attention_dim=32, attention_head_dim=4, mid_block_type="UNetMidBlock2D",
)
VAE = dict(
    block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
    mid_block_add_attention=False, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
)


def _clip_tokenizer(folder) -> HFCLIPTokenizer:
    """A CLIPTokenizer over every printable byte character (and its end-of-word form)."""
    chars = [chr(b) for b in range(33, 127)]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return HFCLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=16)


def _randomize_controlnet(model, seed):
    """Random zero convolutions and conditioning-embedding output (else the residuals are 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p[0].numel()))


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("sd_cn"))
    torch.manual_seed(0)
    tokenizer = _clip_tokenizer(os.path.join(tmp, "vocab"))
    n = len(tokenizer)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=n, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=16, bos_token_id=n - 2, eos_token_id=n - 1, pad_token_id=n - 1,
    ))
    unet = UNet2DConditionModel(**UNET)
    nets, folders = [], []
    for seed, channels in ((1, 3), (2, 1)):
        cn = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16),
                                       conditioning_channels=channels).eval()
        _randomize_controlnet(cn, seed)
        folder = os.path.join(tmp, f"controlnet_{seed}")
        cn.save_pretrained(folder)
        nets.append(cn)
        folders.append(folder)
    pipe = StableDiffusionControlNetPipeline(
        vae=AutoencoderKL(**VAE), text_encoder=text, tokenizer=tokenizer, unet=unet, controlnet=nets,
        scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    sd_folder = os.path.join(tmp, "sd")
    pipe.save_pretrained(sd_folder)  # unet/, vae/, text_encoder/, tokenizer/, scheduler/ (+ controlnet/)
    ours = load_model_folder(sd_folder, devices=jax.devices()[:1])
    controlled = ours.with_controlnets([load_diffusers_controlnet(f) for f in folders])
    rng = np.random.default_rng(3)
    controls = [rng.uniform(size=(2, SIZE, SIZE, 3)).astype(np.float32),
                rng.uniform(size=(2, SIZE, SIZE, 1)).astype(np.float32)]
    return dict(pipe=pipe, ours=ours, controlled=controlled, folders=folders, sd_folder=sd_folder, controls=controls)


def test_controlnet_generation_matches_diffusers_controlnet_pipeline(sd):
    seed, scales = 7, [0.7, 1.3]
    x_T = np.asarray(initial_noise(jax.random.PRNGKey(seed), (2, *LATENT)))
    with torch.no_grad():
        ref = sd["pipe"](
            PROMPTS, image=[torch.from_numpy(c.transpose(0, 3, 1, 2).copy()) for c in sd["controls"]],
            height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=7.5,
            controlnet_conditioning_scale=scales, latents=torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy()),
            output_type="latent",
        ).images.numpy().transpose(0, 2, 3, 1)
        plain = sd["pipe"](
            PROMPTS, image=[torch.from_numpy(c.transpose(0, 3, 1, 2).copy()) for c in sd["controls"]],
            height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=7.5,
            controlnet_conditioning_scale=[0.0, 0.0], latents=torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy()),
            output_type="latent",
        ).images.numpy().transpose(0, 2, 3, 1)
    _, latents = sd["controlled"](
        PROMPTS, control_image=sd["controls"], controlnet_scale=scales, num_steps=STEPS, guidance_scale=7.5,
        seed=seed, return_latents=True,
    )
    err = float(np.abs(latents - ref).max() / np.abs(ref).max())
    effect = float(np.abs(plain - ref).max() / np.abs(ref).max())
    print(f"final latents vs diffusers StableDiffusionControlNetPipeline: max rel err {err:.2e} "
          f"(the ControlNets change them by {effect:.2e})")
    assert effect > 1e-2
    assert err <= 1e-5


def test_guess_mode_matches_diffusers_controlnet_pipeline(sd):
    """diffusers' guess mode: residuals ramped by logspace(-1, 0) per block, the unconditional
    guidance branch without ControlNet residuals; per-ControlNet scales as above."""
    seed, scales = 5, [0.7, 1.3]
    x_T = np.asarray(initial_noise(jax.random.PRNGKey(seed), (2, *LATENT)))
    images = [torch.from_numpy(c.transpose(0, 3, 1, 2).copy()) for c in sd["controls"]]

    def reference(guess_mode):
        with torch.no_grad():
            return sd["pipe"](
                PROMPTS, image=images, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=7.5,
                controlnet_conditioning_scale=scales, guess_mode=guess_mode,
                latents=torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy()), output_type="latent",
            ).images.numpy().transpose(0, 2, 3, 1)

    ref, unguessed = reference(True), reference(False)
    _, latents = sd["controlled"](
        PROMPTS, control_image=sd["controls"], controlnet_scale=scales, num_steps=STEPS, guidance_scale=7.5,
        seed=seed, return_latents=True, guess_mode=True,
    )
    err = float(np.abs(latents - ref).max() / np.abs(ref).max())
    effect = float(np.abs(unguessed - ref).max() / np.abs(ref).max())
    print(f"guess mode final latents vs diffusers: max rel err {err:.2e} (guess mode changes them by {effect:.2e})")
    assert effect > 1e-2
    assert err <= 1e-5


def test_controlnet_pipeline_bad_inputs_raise_one_line_errors(sd):
    with pytest.raises(ValueError, match="guess_mode applies to ControlNets"):
        sd["ours"].validate(PROMPTS, num_steps=STEPS, guess_mode=True)
    with pytest.raises(ValueError, match="guess_mode must be True or False, got 'yes'"):
        sd["controlled"].validate(PROMPTS, control_image=sd["controls"], num_steps=STEPS, guess_mode="yes")
    with pytest.raises(ValueError, match="pass control_image"):
        sd["controlled"].validate(PROMPTS, num_steps=STEPS)
    with pytest.raises(ValueError, match="control_image holds 1 entries for 2 ControlNet"):
        sd["controlled"].validate(PROMPTS, control_image=sd["controls"][0], num_steps=STEPS)
    with pytest.raises(ValueError, match="no ControlNet"):
        sd["ours"].validate(PROMPTS, control_image=sd["controls"][0], num_steps=STEPS)
    with pytest.raises(ValueError, match=r"control_image\[1\] must be"):
        sd["controlled"].validate(PROMPTS, control_image=[sd["controls"][0], sd["controls"][0]], num_steps=STEPS)


def test_control_image_resized_like_diffusers_image_processor():
    from diffusers.image_processor import VaeImageProcessor

    from ldm_jax.pipeline.requests import control_image_array

    image = (np.random.default_rng(0).uniform(size=(24, 20, 3)) * 255).astype(np.uint8)
    processor = VaeImageProcessor(vae_scale_factor=2, do_convert_rgb=True, do_normalize=False)
    want = processor.preprocess(Image.fromarray(image), height=SIZE, width=SIZE).numpy().transpose(0, 2, 3, 1)
    got = control_image_array(image, "control_image", 1, 3, SIZE, SIZE)
    assert got.shape == want.shape == (1, SIZE, SIZE, 3)
    np.testing.assert_allclose(got, want, atol=1e-6)
    # One channel is repeated to the ControlNet's three (diffusers' convert_rgb).
    gray = control_image_array(image[..., :1], "control_image", 2, 3, 24, 20)
    assert gray.shape == (2, 24, 20, 3) and (gray == image[None, ..., :1] / np.float32(255)).all()


def test_sample_cli_controlnet_flags(sd, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("sample_cli", os.path.join(ROOT, "sample.py"))
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
    paths = []
    for i, control in enumerate(sd["controls"]):
        pixels = np.round(control[0] * 255).astype(np.uint8)
        path = tmp_path / f"control_{i}.png"
        Image.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels).save(path)
        paths.append(str(path))
    common = ["--model_dir", sd["sd_folder"], "--prompt", PROMPTS[0], "--steps", str(STEPS), "--batch_size", "1"]
    code = sample.main(common + ["--controlnet", sd["folders"][0], "--out", str(tmp_path / "x")])
    assert code == 2 and "1 --controlnet folder(s) but 0 --control_image(s)" in capsys.readouterr().err
    code = sample.main(common + ["--guess_mode", "--out", str(tmp_path / "x")])
    assert code == 2 and "--guess_mode applies to ControlNets" in capsys.readouterr().err
    args = common + ["--out", str(tmp_path / "out")]
    for folder, path in zip(sd["folders"], paths):
        args += ["--controlnet", folder, "--control_image", path]
    args += ["--controlnet_scale", "0.7", "--controlnet_scale", "1.3"]
    assert sample.main(args) == 0, capsys.readouterr().err
    with open(tmp_path / "out" / "000000.json") as f:
        sidecar = json.load(f)
    assert [c["scale"] for c in sidecar["inputs"]["controlnets"]] == [0.7, 1.3]
    assert "--controlnet" in sidecar["command"]
    # The CLI image equals the pipeline's on the same (8-bit) control images.
    controls = [np.asarray(Image.open(p)) for p in paths]
    want = sd["controlled"](PROMPTS[0], control_image=controls, controlnet_scale=[0.7, 1.3], num_steps=STEPS,
                            guidance_scale=7.5, seed=0)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "000000.png")), want[0])

