"""SDXL's VAE settings: scaling factor 0.13025, ``force_upcast``, per-channel
``latents_mean``/``latents_std``. Truth: diffusers' ``AutoencoderKL`` config handling and
random-weight forward pass, and the latent normalisation diffusers' SDXL pipelines write
(``latents * std / scaling_factor + mean``), re-implemented in float64 NumPy here."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL

from ldm_jax.interop import diffusers_vae
from ldm_jax.models.autoencoder import AutoencoderKL

TINY_SDXL_VAE = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    scaling_factor=0.13025,
    force_upcast=True,
)
MEAN = [-1.6574, 1.886, -1.383, 2.5155]  # per-channel statistics in diffusers' config format
STD = [8.4927, 5.9022, 6.5498, 5.2299]


@pytest.fixture(scope="module")
def sdxl_vae(tmp_path_factory):
    torch.manual_seed(0)
    model = TorchAutoencoderKL(**TINY_SDXL_VAE, latents_mean=MEAN, latents_std=STD).eval()
    folder = tmp_path_factory.mktemp("sdxl_vae")
    model.save_pretrained(folder)
    ours, params = diffusers_vae.load_diffusers_autoencoder_kl(folder)
    return model, folder, ours, params


def test_sdxl_vae_config_fields_load_and_export(sdxl_vae, tmp_path):
    model, _, ours, params = sdxl_vae
    assert ours.scale_factor == pytest.approx(0.13025)
    assert ours.force_upcast is True
    assert ours.latents_mean == pytest.approx(MEAN) and ours.latents_std == pytest.approx(STD)
    diffusers_vae.save_diffusers_autoencoder_kl(ours, params, tmp_path)
    reloaded = TorchAutoencoderKL.from_pretrained(tmp_path)
    for key in ("scaling_factor", "force_upcast", "latents_mean", "latents_std"):
        assert reloaded.config[key] == pytest.approx(model.config[key]), key
    off = diffusers_vae.autoencoder_kl_from_config(dict(json.loads((tmp_path / "config.json").read_text()),
                                                        force_upcast=False))
    assert off.force_upcast is False


def test_latent_normalisation_matches_diffusers_sdxl_formula(sdxl_vae):
    _, _, ours, _ = sdxl_vae
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 3, 3, 4)) * 5
    mean, std = np.asarray(MEAN, np.float64), np.asarray(STD, np.float64)
    # diffusers SDXL img2img: (z - mean) * scaling_factor / std; decode: latents * std / scaling_factor + mean.
    want = (z - mean) * 0.13025 / std
    got = ours.latents_for_diffusion(jnp.asarray(z, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    back = ours.latents_from_diffusion(jnp.asarray(want, jnp.float32))
    np.testing.assert_allclose(np.asarray(back), want * std / 0.13025 + mean, rtol=1e-5, atol=1e-5)
    # Without statistics: the plain scaling of SD 1.x/2.x/SDXL base.
    plain = ours.clone(latents_mean=None, latents_std=None)
    np.testing.assert_allclose(np.asarray(plain.latents_for_diffusion(jnp.asarray(z, jnp.float32))), 0.13025 * z,
                               rtol=1e-6)


def test_force_upcast_decodes_float16_models_in_float32(sdxl_vae):
    model, _, ours, params = sdxl_vae
    rng = np.random.default_rng(1)
    z = rng.standard_normal((1, 4, 4, 4)).astype(np.float32)
    decode = lambda m: jax.jit(lambda p, x: m.apply({"params": p}, x, method=m.decode))  # noqa: E731
    half = ours.clone(dtype=jnp.float16)
    assert half.compute_dtype == jnp.float32
    out = decode(half)(params, jnp.asarray(z))
    assert out.dtype == jnp.float32
    with torch.no_grad():
        want = model.decode(torch.from_numpy(z.transpose(0, 3, 1, 2))).sample.numpy().transpose(0, 2, 3, 1)
    err = float(np.abs(np.asarray(out, np.float64) - want).max() / np.abs(want).max())
    print(f"float16 model with force_upcast: decode error vs diffusers float32 {err:.2e}")
    assert err <= 1e-5
    # Without force_upcast a float16 model really computes in float16; bfloat16 is never upcast.
    no_upcast = ours.clone(dtype=jnp.float16, force_upcast=False)
    assert no_upcast.compute_dtype == jnp.float16
    # (shapes only: XLA:CPU has no float16 x float16 -> float32 dot for the attention logits)
    abstract = jax.eval_shape(lambda p, x: no_upcast.apply({"params": p}, x, method=no_upcast.decode), params, z)
    assert abstract.dtype == jnp.float16
    assert ours.clone(dtype=jnp.bfloat16).compute_dtype == jnp.bfloat16


def test_bad_latent_statistics_raise():
    with pytest.raises(ValueError, match="together"):
        AutoencoderKL(latents_mean=(0.0,) * 4)
    with pytest.raises(ValueError, match="latents_std"):
        AutoencoderKL(latents_mean=(0.0,) * 4, latents_std=(1.0,) * 3)
    with pytest.raises(ValueError, match="not both"):
        AutoencoderKL(latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4, shift_factor=0.1)
