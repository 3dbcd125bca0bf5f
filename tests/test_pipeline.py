"""LatentDiffusionPipeline against independent references.

* diffusers' PyTorch StableDiffusionPipeline / Img2Img / Inpaint pipelines on a random-weight
  tiny Stable Diffusion folder written with ``save_pretrained`` (same initial latents / noise);
* diffusers' torch AutoencoderKL for img2img at strength 0 and for the kept region of
  known-region inpainting;
* a hand-written torch DDIM loop with classifier-free guidance around a diffusers U-Net for a
  class-conditional, low-res-concat pixel-space model;
* bitwise equality of images across batch sizes and simulated device counts;
* diffusers loading a folder written by ``save_model_folder``.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_img2img as diffusers_img2img
from diffusers.pipelines.stable_diffusion import pipeline_stable_diffusion_inpaint as diffusers_inpaint
from transformers import CLIPTextConfig, CLIPTextModel
from transformers import CLIPTokenizer as HFCLIPTokenizer

from ldm_jax.diffusion.samplers import initial_noise
from ldm_jax.interop.diffusers_unet import load_diffusers_unet
from ldm_jax.pipeline import (
    ClassConditioner,
    LatentDiffusionPipeline,
    PixelSpace,
    load_model_folder,
    save_model_folder,
)

SIZE = 16  # pixels; the tiny VAE halves them: 8 x 8 x 4 latents
LATENT = (SIZE // 2, SIZE // 2, 4)
STEPS = 3
PROMPTS = ["a red cat", "cat", "red red", "a cat", "the red", "c", "tac", "der"]
SD_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
    set_alpha_to_one=False, steps_offset=1,
)
UNET = dict(
    sample_size=SIZE // 2,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=4,
    mid_block_type=None,  # fewer ops to compile; the mid block is covered by the U-Net tests
)
VAE = dict(
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    mid_block_add_attention=False,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
)


def _clip_tokenizer(folder) -> HFCLIPTokenizer:
    """A transformers CLIPTokenizer over a small local vocabulary: every byte character, its
    end-of-word form, four merges and the two specials."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = [chr(b) for b in keep] + [chr(256 + i) for i in range(256 - len(keep))]
    merges = [("c", "a"), ("ca", "t</w>"), ("r", "e"), ("re", "d</w>")]
    tokens = chars + [c + "</w>" for c in chars] + ["ca", "cat</w>", "re", "red</w>", "<|startoftext|>", "<|endoftext|>"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return HFCLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), model_max_length=16)


def _torch_sd(tmp, in_channels: int, cls):
    """A random-weight tiny diffusers SD pipeline of class ``cls``, saved and reloaded."""
    torch.manual_seed(0)
    tokenizer = _clip_tokenizer(os.path.join(tmp, "vocab"))
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, max_position_embeddings=16, bos_token_id=len(tokenizer) - 2,
            eos_token_id=len(tokenizer) - 1, pad_token_id=len(tokenizer) - 1,
        )
    )
    pipe = cls(
        vae=AutoencoderKL(**VAE),
        text_encoder=text,
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(in_channels=in_channels, **UNET),
        scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = os.path.join(tmp, "sd")
    pipe.save_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return folder, pipe


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    folder, torch_pipe = _torch_sd(str(tmp_path_factory.mktemp("sd")), 4, StableDiffusionPipeline)
    return folder, torch_pipe, load_model_folder(folder, devices=jax.devices()[:1])


def _noise(n, shape=LATENT, seed=1):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _images(n, seed=2):
    return np.random.default_rng(seed).uniform(size=(n, SIZE, SIZE, 3)).astype(np.float32)


def test_text_to_image_matches_diffusers_pipeline_ddim_cfg(sd):
    folder, torch_pipe, pipe = sd
    seed = 7
    # diffusers starts from the initial noise our pipeline draws for images 0..3 of this seed.
    x_T = np.asarray(initial_noise(jax.random.PRNGKey(seed), (4, *LATENT)))
    negatives = ["", "red", "", "cat"]
    # Guidance rescale is a traced argument: both runs use one compiled program.
    for guidance_rescale in (0.0, 0.7):
        with torch.no_grad():
            ref = torch_pipe(
                PROMPTS[:4], negative_prompt=negatives, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                guidance_scale=7.5, guidance_rescale=guidance_rescale, latents=_nchw(x_T), output_type="np",
            ).images
        ours = pipe(
            PROMPTS[:4], negative_prompt=negatives, num_steps=STEPS, guidance_scale=7.5,
            guidance_rescale=guidance_rescale, seed=seed, output_type="float",
        )
        assert ours.shape == ref.shape == (4, SIZE, SIZE, 3)
        err = np.abs(ours - ref).max()
        print(f"max |ours - diffusers| (rescale {guidance_rescale}): {err:.2e}")
        assert err < 2e-5
        assert np.abs(ref[0] - ref[1]).max() > 1e-2  # the prompts matter, so the comparison is not vacuous


def test_guidance_interval_reaches_the_sampler(sd):
    """An interval no sampling timestep falls in leaves only the conditional model (the
    guidance_scale=1 program, which runs no unconditional branch)."""
    _, _, pipe = sd
    kw = dict(num_steps=STEPS, seed=7, output_type="float")
    # the program of test_text_to_image_matches_diffusers_pipeline_ddim_cfg (compiled once)
    guided = pipe(PROMPTS[:4], negative_prompt=["", "red", "", "cat"], guidance_scale=7.5, **kw)
    outside = pipe(PROMPTS[:4], negative_prompt=["", "red", "", "cat"], guidance_scale=7.5,
                   guidance_interval=(-2.0, -1.0), **kw)
    conditional = pipe(PROMPTS[:4], guidance_scale=1.0, **kw)
    np.testing.assert_allclose(outside, conditional, atol=2e-5)
    assert np.abs(guided - conditional).max() > 1e-2


def test_same_seed_bit_identical_across_batch_sizes_and_device_counts(sd):
    _, _, pipe = sd
    pipe8 = pipe.with_devices(jax.devices()[:8])
    assert pipe8.num_devices == 8
    # The batch-of-4 program is the one the diffusers comparison compiled.
    kw = dict(num_steps=STEPS, guidance_scale=5.0, seed=7, return_latents=True)
    one, one_lat = pipe(PROMPTS[2], image_indices=[2], **kw)
    four, four_lat = pipe(PROMPTS[:4], **kw)
    eight, eight_lat = pipe8(PROMPTS, **kw)
    # One image on eight devices: padded to the same compiled batch of eight.
    padded, padded_lat = pipe8(PROMPTS[2], image_indices=[2], **kw)
    np.testing.assert_array_equal(one, four[2:3])
    np.testing.assert_array_equal(one_lat, four_lat[2:3])
    np.testing.assert_array_equal(four, eight[:4])
    np.testing.assert_array_equal(four_lat, eight_lat[:4])
    np.testing.assert_array_equal(padded_lat, one_lat)
    other_seed = pipe(PROMPTS[2], image_indices=[2], **{**kw, "seed": 8})[1]
    assert np.abs(other_seed - one_lat).max() > 0.1


def test_img2img_strength_zero_returns_torch_autoencoder_reconstruction(sd):
    _, torch_pipe, pipe = sd
    init = _images(2)
    ours = pipe(PROMPTS[:2], init_image=init, strength=0.0, encode_mode="mean", num_steps=STEPS, output_type="float")
    with torch.no_grad():
        vae = torch_pipe.vae
        z = vae.encode(_nchw(2 * init - 1)).latent_dist.mode()
        ref = (vae.decode(z).sample / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_img2img_matches_diffusers_img2img_pipeline(sd, monkeypatch):
    folder, torch_pipe, pipe = sd
    init, strength, seed = _images(2), 0.75, 5  # 3 of 4 DDIM steps
    noise = np.asarray(initial_noise(jax.random.PRNGKey(seed), (2, *LATENT)))
    # diffusers draws the forward noise with torch and samples the posterior: feed it our
    # per-image noise and take the posterior mode on both sides.
    monkeypatch.setattr(diffusers_img2img, "randn_tensor", lambda shape, **kw: _nchw(noise))
    monkeypatch.setattr(diffusers_img2img, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode())
    img2img = StableDiffusionImg2ImgPipeline(**torch_pipe.components)
    img2img.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = img2img(PROMPTS[:2], image=init, strength=strength, num_inference_steps=4, guidance_scale=6.0,
                      output_type="np").images
    ours = pipe(PROMPTS[:2], init_image=init, strength=strength, num_steps=4, guidance_scale=6.0, seed=seed,
                encode_mode="mean", output_type="float")
    err = np.abs(ours - ref).max()
    print(f"img2img max |ours - diffusers|: {err:.2e}")
    assert err < 2e-5


def test_inpainting_unet_matches_diffusers_inpaint_pipeline(tmp_path, monkeypatch):
    folder, torch_pipe = _torch_sd(str(tmp_path), 9, StableDiffusionInpaintPipeline)
    pipe = load_model_folder(folder, devices=jax.devices()[:1])
    assert pipe.concat == "inpainting"
    init, x_T = _images(2), _noise(2)
    mask = np.zeros((2, SIZE, SIZE, 1), np.float32)
    mask[0, 4:12, 2:10] = 1.0
    mask[1, :, 8:] = 1.0
    monkeypatch.setattr(diffusers_inpaint, "retrieve_latents", lambda out, generator=None: out.latent_dist.mode())
    with torch.no_grad():
        ref = torch_pipe(PROMPTS[:2], image=init, mask_image=mask, latents=_nchw(x_T), height=SIZE, width=SIZE,
                         num_inference_steps=STEPS, guidance_scale=7.5, output_type="np").images
    ours = pipe(PROMPTS[:2], init_image=init, mask=mask, latents=x_T, num_steps=STEPS, guidance_scale=7.5,
                encode_mode="mean", output_type="float")
    err = np.abs(ours - ref).max()
    print(f"inpainting U-Net max |ours - diffusers|: {err:.2e}")
    assert err < 2e-5


def test_known_region_inpainting_keeps_torch_encoded_latents(sd):
    _, torch_pipe, pipe = sd
    init = _images(2)
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[3:9, 5:13] = 1.0  # latent cells rows 1..4, cols 2..6 (max-pooled over 2 x 2 blocks)
    _, latents = pipe(PROMPTS[:2], init_image=init, mask=mask, num_steps=STEPS, encode_mode="mean", return_latents=True)
    with torch.no_grad():
        vae = torch_pipe.vae
        ref = (vae.config.scaling_factor * vae.encode(_nchw(2 * init - 1)).latent_dist.mode()).permute(0, 2, 3, 1).numpy()
    keep = np.ones(LATENT[:2], bool)
    keep[1:5, 2:7] = False
    np.testing.assert_allclose(latents[:, keep], ref[:, keep], atol=1e-5)
    assert np.abs(latents[:, ~keep] - ref[:, ~keep]).min(axis=-1).mean() > 1e-2


# ----------------------------------------------------------------------------- pixel-space model


PIXEL_UNET = dict(
    sample_size=SIZE,
    in_channels=6,  # 3 image channels + 3 low-res conditioning channels
    out_channels=3,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2D",
    norm_num_groups=8,
    num_class_embeds=4,  # 3 classes + the null label
)


@pytest.fixture(scope="module")
def pixel(tmp_path_factory):
    torch.manual_seed(3)
    torch_unet = UNet2DConditionModel(**PIXEL_UNET)
    folder = str(tmp_path_factory.mktemp("pixel_unet"))
    torch_unet.save_pretrained(folder)
    unet, params = load_diffusers_unet(folder)
    pipe = LatentDiffusionPipeline.from_components(
        unet=unet, unet_params=params, first_stage=PixelSpace(3), conditioner=ClassConditioner(3),
        schedule={"kind": "linear", "num_timesteps": 1000}, concat="low_res", devices=jax.devices()[:1],
    )
    return torch_unet, pipe


def _torch_ddim_cfg(unet, x_T, labels, null, extra, scale, steps):
    """Reference: diffusers' DDIMScheduler loop with classifier-free guidance on class labels and
    the extra channels concatenated to the U-Net input."""
    scheduler = DDIMScheduler(beta_schedule="linear", clip_sample=False)
    scheduler.set_timesteps(steps)
    x = x_T
    both = torch.cat([labels, torch.full_like(labels, null)])
    for t in scheduler.timesteps:
        model_in = torch.cat([torch.cat([x, x]), torch.cat([extra, extra])], dim=1)
        cond, uncond = unet(model_in, t, encoder_hidden_states=None, class_labels=both).sample.chunk(2)
        x = scheduler.step(uncond + scale * (cond - uncond), t, x).prev_sample
    return x


def test_class_conditional_low_res_guidance_matches_torch_ddim_loop(pixel):
    torch_unet, pipe = pixel
    x_T, low_res = _noise(2, (SIZE, SIZE, 3)), _images(2, seed=4)
    images, final = pipe(class_labels=[0, 2], low_res=low_res, latents=x_T, num_steps=STEPS, guidance_scale=4.0,
                         output_type="float", return_latents=True)
    with torch.no_grad():
        ref = _torch_ddim_cfg(torch_unet, _nchw(x_T), torch.tensor([0, 2]), 3, _nchw(2 * low_res - 1), 4.0, STEPS)
    ref = ref.permute(0, 2, 3, 1).numpy()
    # Pixel-space samples of a random model are large (x0 = (x - b eps) / a amplifies eps): compare
    # relative to their scale.
    err = np.abs(final - ref).max() / np.abs(ref).max()
    print(f"class + low-res max |ours - torch loop| / max |torch|: {err:.2e} (max |torch| {np.abs(ref).max():.1f})")
    assert err < 2e-6
    np.testing.assert_allclose(images, np.clip((ref + 1) / 2, 0, 1), atol=1e-4)
    assert np.abs(ref[0] - ref[1]).max() > 0.1


def test_pixel_space_inpainting_keeps_unmasked_pixels_exactly(pixel):
    _, pipe = pixel
    init = _images(2)
    mask = np.zeros((2, SIZE, SIZE), bool)
    mask[:, 5:11, 2:14] = True
    out = pipe(class_labels=[1, 2], low_res=_images(2, seed=6), init_image=init, mask=mask, num_steps=STEPS,
               guidance_scale=2.0, output_type="float")
    np.testing.assert_allclose(out[~mask], init[~mask], atol=1e-6)
    assert np.abs(out[mask] - init[mask]).mean() > 0.05


# ----------------------------------------------------------------------------- model folders and errors


def test_saved_model_folder_round_trips_and_diffusers_loads_it(sd, tmp_path):
    folder, torch_pipe, pipe = sd
    out = save_model_folder(pipe, tmp_path / "export", step=123, provenance={"note": "test"})
    back = load_model_folder(out, devices=jax.devices()[:1])
    assert back.info["step"] == 123 and back.info["note"] == "test" and back.info["params_hash"] == pipe.params_hash
    assert back.params_hash == pipe.params_hash
    assert back.schedule_config == pipe.schedule_config and back.sampler_defaults == pipe.sampler_defaults
    assert back.conditioner.tokenizer(PROMPTS).ids.tolist() == pipe.conditioner.tokenizer(PROMPTS).ids.tolist()
    with pytest.raises(ValueError, match="already exists"):
        save_model_folder(pipe, out)
    # diffusers loads the export (vocab.json tokenizer, DDIM scheduler config) and generates the same image.
    exported = StableDiffusionPipeline.from_pretrained(out)
    exported.set_progress_bar_config(disable=True)
    x_T = _nchw(_noise(1))
    with torch.no_grad():
        kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=x_T, output_type="np")
        np.testing.assert_allclose(exported(PROMPTS[0], **kw).images, torch_pipe(PROMPTS[0], **kw).images, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompts="x", sampler="nope"), "unknown sampler 'nope'"),
        (dict(prompts="x", height=18), "height=18 is not a positive multiple of 4"),
        (dict(prompts="x", init_image=np.zeros((SIZE, SIZE, 3), np.uint8), mask=np.zeros((8, 8))), "mask size 8x8"),
        (dict(class_labels=[1]), "class_labels given to a text-conditioned model"),
        (dict(prompts="x", strength=0.5), "strength applies to img2img"),
        (dict(prompts="x", init_image=np.full((SIZE, SIZE, 3), 2.0)), r"float init_image must lie in \[0, 1\]"),
        (dict(prompts="x", seed=-1), "seed must be an integer"),
        (dict(prompts="x", guidance_scale=1.0, negative_prompt="y"), "negative_prompt needs classifier-free"),
        (dict(prompts="x", guidance_scale=1.0, guidance_interval=(0, 500)), "guidance_interval needs classifier-free"),
        (dict(prompts="x", guidance_interval=(500, 0)), r"t_low <= t_high, got \(500, 0\)"),
        (dict(prompts="x", guidance_interval=(0, 1, 2)), r"two numbers \(t_low, t_high\), got \(0, 1, 2\)"),
        (dict(prompts=["a", "b"], num_images=3), "prompts has 2 entries"),
        (dict(prompts="x", latents=np.zeros((1, 4, 4, 4))), r"latents shape \(1, 4, 4, 4\)"),
        (dict(prompts="x", inpaint_jumps=(2, 3)), "resampling applies to known-region inpainting"),
        (dict(prompts="x", num_steps=0), "num_steps must be a positive integer"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(sd, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sd[2](**kwargs)


def test_model_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_model_folder(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither ldm_jax.json nor model_index.json"):
        load_model_folder(tmp_path)
    (tmp_path / "ldm_jax.json").write_text(json.dumps({"format": "ldm_jax.model", "format_version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        load_model_folder(tmp_path)
