"""The first (autoencoder) training stage: the joint generator/discriminator objective against
separately computed taming/LDM gradients, the discriminator schedule, training through the
shared loop, the reconstruction preview and the diffusers export."""

import json
import os
import sys

import diffusers
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from ldm_jax.data import DigitsSource, build_dataset, dataset_stats  # noqa: E402
from ldm_jax.interop.diffusers_vae import load_diffusers_autoencoder_kl  # noqa: E402
from ldm_jax.models import first_stage_losses as L  # noqa: E402
from ldm_jax.models.autoencoder import last_layer_params  # noqa: E402
from ldm_jax.training import train, training_defaults  # noqa: E402
from ldm_jax.training.stages import autoencoder as A  # noqa: E402

RES, CH = 8, 1  # the digits' native 8x8: no resampling


@pytest.fixture(scope="module", autouse=True)
def rbg_keys():
    """XLA's RngBitGenerator keys for this module: compiling a param init with threefry keys
    costs ~3x more CPU (12 s vs 3.6 s for the tiny stage below); the code under test does not
    depend on the key implementation."""
    previous = jax.config.jax_default_prng_impl
    jax.config.update("jax_default_prng_impl", "rbg")
    yield
    jax.config.update("jax_default_prng_impl", previous)


def tiny_config(kind="kl", gan=True, disc_start=0, channels=CH, resolution=RES):
    c = training_defaults()
    c.data = ml_collections.ConfigDict({"name": "digits", "resolution": resolution, "channels": channels})
    c.autoencoder = A.autoencoder_defaults()
    c.autoencoder.update(
        kind=kind, block_out_channels=(8,), norm_num_groups=4, layers_per_block=1, latent_channels=2,
        mid_block_add_attention=False, num_vq_embeddings=16,
    )
    c.loss = A.loss_defaults()
    c.loss.update(disc_start=disc_start, disc_channels=8, disc_layers=1, disc_norm_groups=4, kl_weight=1e-3)
    if not gan:
        c.loss.disc_weight = 0.0
    c.preview = ml_collections.ConfigDict({"num_images": 4})
    return c


def images(n=4, seed=0, channels=CH):
    source = DigitsSource(resolution=RES, channels=channels, split="train")
    idx = np.random.default_rng(seed).choice(len(source), n, replace=False)
    return jnp.asarray(np.stack([source[int(i)]["image"] for i in idx]))


def unboxed_params(parts, seed=0, logvar=0.3):
    # jitted: one compile instead of one per primitive (eager init costs many seconds on CPU)
    params = nn.unbox(jax.jit(parts.init_params)(jax.random.key(seed)))
    if "logvar" in params:
        params["logvar"] = jnp.asarray(logvar, jnp.float32)  # away from 0 so its gradient path shows
    return params


def tree_max_abs_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def tree_norm(a):
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(a))))


def assert_tree_close(actual, expected, rel=1e-4):
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(expected))
    assert scale > 0
    assert tree_max_abs_diff(actual, expected) <= rel * scale


# ----------------------------------------------------------------------------- separate taming/LDM losses


def separate_generator_loss(parts, ae_params, logvar, disc_params, x, key, step):
    """taming/LDM generator step: L_gen with the discriminator's params as plain inputs."""
    if parts.kind == "kl":
        h, posterior = parts.model.apply({"params": ae_params}, x, key, return_last_layer_input=True)
        reg = jnp.mean(posterior.kl())
    else:
        h, q = parts.model.apply({"params": ae_params}, x, return_last_layer_input=True)
        reg = q.loss
    loss, _, _ = L.generator_loss(
        parts.loss_config, inputs=x, last_layer_input=h, last_layer=last_layer_params(ae_params),
        regularization_loss=reg, discriminator_fn=lambda im: parts.discriminator.apply({"params": disc_params}, im),
        step=step, logvar=logvar,
    )
    return loss


def separate_discriminator_loss(parts, ae_params, disc_params, x, key, step):
    """taming/LDM discriminator step: L_disc on D(x) and D(x^), x^ decoded from the same sample."""
    if parts.kind == "kl":
        posterior = parts.model.apply({"params": ae_params}, x, method=parts.model.encode)
        rec = parts.model.apply({"params": ae_params}, posterior.sample(key), method=parts.model.decode)
    else:
        rec, _ = parts.model.apply({"params": ae_params}, x)
    d = lambda im: parts.discriminator.apply({"params": disc_params}, im)  # noqa: E731
    loss, _ = L.discriminator_loss(parts.loss_config, logits_real=d(x), logits_fake=d(rec), step=step)
    return loss


DISC_START = 5


class GanCase:
    """A tiny stage with the GAN starting at DISC_START, its joint-loss gradient and the two
    separately computed taming/LDM gradients, each compiled once (step is a traced argument)."""

    def __init__(self, kind):
        self.parts = A.build_parts(tiny_config(kind, gan=True, disc_start=DISC_START), CH, RES)
        self.params = unboxed_params(self.parts)
        self.x, self.key = images(), jax.random.key(5)
        parts, x, key = self.parts, self.x, self.key
        self.stage_grad = jax.jit(jax.value_and_grad(parts.stage_loss, has_aux=True))

        def separate(ae, lv, dp, step):
            gen_fn = lambda ae, lv, dp: separate_generator_loss(parts, ae, lv, dp, x, key, step)  # noqa: E731
            gen, gen_grads = jax.value_and_grad(gen_fn, argnums=(0, 1, 2))(ae, lv, dp)
            disc_fn = lambda dp: separate_discriminator_loss(parts, ae, dp, x, key, step)  # noqa: E731
            disc, disc_grads = jax.value_and_grad(disc_fn)(dp)
            return gen, gen_grads, disc, disc_grads

        self.separate = jax.jit(separate)

    def run(self, step):
        step = jnp.int32(step)
        (total, metrics), grads = self.stage_grad(self.params, {"image": self.x}, self.key, step)
        separate = self.separate(
            self.params["autoencoder"], self.params.get("logvar", 0.0), self.params["discriminator"], step
        )
        return total, metrics, grads, separate


@pytest.fixture(scope="module")
def kl_case():
    return GanCase("kl")


def test_stage_gradients_equal_separate_generator_and_discriminator_gradients(kl_case):
    case = kl_case
    total, metrics, grads, (gen, (g_ae, g_lv, g_cross), disc, g_disc) = case.run(DISC_START + 1)

    np.testing.assert_allclose(float(total), float(gen) + float(disc), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ae_loss"]), float(gen), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["d_loss"]), float(disc), rtol=1e-5)
    assert float(metrics["disc_factor"]) == 1.0 and float(disc) > 0.0

    assert_tree_close(grads["autoencoder"], g_ae)
    assert_tree_close(grads["discriminator"], g_disc)
    np.testing.assert_allclose(float(grads["logvar"]), float(g_lv), rtol=1e-4)
    # The generator loss does depend on the discriminator's params: without the stop-gradient
    # the joint gradient would differ from taming's discriminator gradient by this much.
    assert tree_norm(g_cross) > 1e-2 * tree_norm(g_disc)


def test_vq_stage_loss_and_gradients_equal_taming_formula_without_gan():
    parts = A.build_parts(tiny_config("vq", gan=False), CH, RES)
    params = unboxed_params(parts, seed=2)
    assert set(params) == {"autoencoder"}  # no discriminator, no logvar
    x, key = images(seed=3), jax.random.key(1)
    (loss, metrics), grads = jax.jit(jax.value_and_grad(parts.stage_loss, has_aux=True))(
        params, {"image": x}, key, jnp.int32(0)
    )

    def taming(ae):  # mean |x - x^| + codebook_weight * (||sg[z] - e||^2 + beta ||z - sg[e]||^2)
        z = parts.model.apply({"params": ae}, x, method=parts.model.encode)
        e = ae["quantize"]["embedding"]
        d = jnp.sum((z[..., None, :] - e) ** 2, axis=-1)
        e_z = e[jnp.argmin(d, axis=-1)]
        vq = jnp.mean((jax.lax.stop_gradient(z) - e_z) ** 2) + 0.25 * jnp.mean((z - jax.lax.stop_gradient(e_z)) ** 2)
        z_q = z + jax.lax.stop_gradient(e_z - z)
        rec = parts.model.apply({"params": ae}, z_q, method=parts.model.decode_quantized)
        return jnp.mean(jnp.abs(x - rec)) + 1.0 * vq

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(taming))(params["autoencoder"])
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    assert float(metrics["vq_loss"]) > 0
    assert_tree_close(grads["autoencoder"], ref_grads)


def test_before_disc_start_discriminator_gets_zero_gradient_and_no_gan_term(kl_case):
    case = kl_case
    parts, params, x, key = case.parts, case.params, case.x, case.key
    loss, metrics, grads, (_, (g_ae, g_lv, _), disc, _) = case.run(DISC_START - 1)
    assert all(bool(jnp.all(g == 0)) for g in jax.tree.leaves(grads["discriminator"]))
    assert float(metrics["d_loss"]) == 0.0 and float(metrics["disc_factor"]) == 0.0 and float(disc) == 0.0

    # LDM's loss without the GAN term, in float64 NumPy from the model's outputs.
    encode = jax.jit(lambda p, x: parts.model.apply({"params": p}, x, method=parts.model.encode))
    decode = jax.jit(lambda p, z: parts.model.apply({"params": p}, z, method=parts.model.decode))
    posterior = encode(params["autoencoder"], x)
    rec = np.asarray(decode(params["autoencoder"], posterior.sample(key)), np.float64)
    mean, logvar_z = np.asarray(posterior.mean, np.float64), np.asarray(posterior.logvar, np.float64)
    lv = float(params["logvar"])
    nll = np.sum(np.abs(np.asarray(x, np.float64) - rec) / np.exp(lv) + lv) / x.shape[0]
    kl = np.mean(0.5 * np.sum(mean**2 + np.exp(logvar_z) - 1.0 - logvar_z, axis=(1, 2, 3)))
    np.testing.assert_allclose(float(loss), nll + 1e-3 * kl, rtol=1e-5)

    # The discriminator-free branch has the gradients of the full formula with factor 0.
    assert_tree_close(grads["autoencoder"], g_ae)
    np.testing.assert_allclose(float(grads["logvar"]), float(g_lv), rtol=1e-4)

    # At step == disc_start the GAN is on.
    _, metrics_on, grads_on, _ = case.run(DISC_START)
    assert float(metrics_on["disc_factor"]) == 1.0 and tree_norm(grads_on["discriminator"]) > 0


def test_training_through_shared_loop_reduces_reconstruction_and_starts_discriminator(tmp_path):
    config = tiny_config("kl", gan=True, disc_start=6)
    config.seed = 3
    config.optimizer.update(learning_rate=3e-3, warmup_steps=2, weight_decay=0.0, grad_clip_norm=0.0)
    config.ema.decay = 0.9
    config.train.update(global_batch_size=8, num_steps=14, log_every=1)
    config.checkpoint.update(every_steps=100, async_save=False)
    source = build_dataset(config.data)
    stage = A.build_stage(config, dataset_stats(source))

    def batches(position, rows):
        while True:
            idx = np.random.default_rng([11, position]).choice(len(source), 8, replace=False)
            batch = {"image": np.stack([source[int(i)]["image"] for i in idx]), "label": np.zeros(8, np.int32)}
            yield {k: v[rows] for k, v in stage.host_batch(batch).items()}
            position += 1

    seen = {}
    result = train(config, stage.task, batches, tmp_path / "ckpt", on_metrics=lambda s, m: seen.__setitem__(s, m))

    # Metrics of update s come from the loss at step s - 1: the GAN is on from update 7.
    assert all(seen[s]["disc_factor"] == 0.0 and seen[s]["d_loss"] == 0.0 for s in range(1, 7))
    assert all(seen[s]["disc_factor"] == 1.0 and seen[s]["d_loss"] > 0.0 for s in range(7, 15))

    parts = A.build_parts(config, CH, RES)
    x = images(32, seed=1)
    # the loop's initial params: TrainState init uses split(key(seed))[0]
    init = nn.unbox(jax.jit(parts.init_params)(jax.random.split(jax.random.key(3))[0]))
    l1 = jax.jit(lambda p: jnp.mean(jnp.abs(parts.reconstruct(p, x) - x)))
    before, after = float(l1(init["autoencoder"])), float(l1(result.state.params["autoencoder"]))
    assert after < 0.8 * before, (before, after)


def test_preview_shows_held_out_originals_beside_reconstructions(kl_case):
    config = tiny_config("kl", gan=True, disc_start=DISC_START)
    stage = A.build_stage(config, dataset_stats(build_dataset(config.data)))
    parts, params = kl_case.parts, kl_case.params
    grid = stage.preview(params, jax.random.key(0))
    assert grid.dtype == np.uint8 and grid.shape == (4, RES, 2 * RES, CH)

    held_out = DigitsSource(resolution=RES, channels=CH, split="test")
    originals = np.stack([held_out[i]["image"] for i in range(4)]).astype(np.float64)
    np.testing.assert_array_equal(grid[:, :, :RES], np.clip(np.rint((originals + 1) * 127.5), 0, 255))
    rec, _ = jax.jit(parts.model.apply)({"params": params["autoencoder"]}, jnp.asarray(originals, jnp.float32))
    expected = np.clip(np.rint((np.asarray(rec, np.float64) + 1) * 127.5), 0, 255)
    assert np.max(np.abs(grid[:, :, RES:].astype(np.float64) - expected)) <= 1  # float rounding at .5


def test_export_kl_loads_in_diffusers_and_matches_our_decode(tmp_path, kl_case):
    config = tiny_config("kl", gan=True, disc_start=DISC_START)
    stage = A.build_stage(config, dataset_stats(build_dataset(config.data)))
    parts, params = kl_case.parts, kl_case.params
    stage.export(params, tmp_path / "model")

    info = json.loads((tmp_path / "model" / A.FIRST_STAGE_JSON).read_text())
    expected = {"kind": "kl", "latent_channels": 2, "downsample_factor": 1, "resolution": RES, "channels": CH}
    assert {k: info[k] for k in expected} == expected and info["scale_factor_estimated"] is False
    assert not (tmp_path / "model" / "discriminator").exists()

    ref = diffusers.AutoencoderKL.from_pretrained(tmp_path / "model").eval()
    z = np.random.default_rng(0).standard_normal((2, RES, RES, 2)).astype(np.float32)
    decode = jax.jit(lambda p, z: parts.model.apply({"params": p}, z, method=parts.model.decode))
    ours = decode(params["autoencoder"], jnp.asarray(z))
    with torch.no_grad():
        theirs = ref.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)
    assert ref.config.scaling_factor == A.SCALE_FACTOR_PLACEHOLDER

    model, loaded = load_diffusers_autoencoder_kl(tmp_path / "model")
    assert (model.block_out_channels, model.in_channels, model.latent_channels) == (
        parts.model.block_out_channels, parts.model.in_channels, parts.model.latent_channels)
    again = decode(nn.unbox(loaded), jnp.asarray(z))  # same architecture: the compiled decode applies
    np.testing.assert_allclose(np.asarray(again), np.asarray(ours), atol=1e-6)


def test_export_vq_loads_in_diffusers_and_matches_our_decode(tmp_path):
    config = tiny_config("vq", gan=False)
    parts = A.build_parts(config, CH, RES)
    params = unboxed_params(parts, seed=6)
    A.export_autoencoder(parts, params, tmp_path / "vq")
    ref = diffusers.VQModel.from_pretrained(tmp_path / "vq").eval()
    h = np.random.default_rng(1).standard_normal((2, RES, RES, 2)).astype(np.float32) * 0.05
    decode = jax.jit(lambda p, h: parts.model.apply({"params": p}, h, method=parts.model.decode))
    ours = decode(params["autoencoder"], h)
    with torch.no_grad():
        theirs = ref.decode(torch.from_numpy(h).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


@pytest.mark.parametrize(
    "section, key, value, match",
    [
        ("autoencoder", "kind", "vae", "kind 'vae'"),
        ("autoencoder", "block_out_channels", (8, 10), "entry 10"),
        ("autoencoder", "dtype", "float16", "dtype 'float16'"),
        ("loss", "lpips_path", "/nonexistent/lpips.pth", "3-channel"),
        ("loss", "disc_loss", "wgan", "disc_loss 'wgan'"),
    ],
)
def test_bad_stage_config_values_raise_one_line_errors(section, key, value, match):
    config = tiny_config()
    config[section][key] = value
    with pytest.raises(ValueError, match=match):
        A.build_parts(config, CH, RES)


def test_bad_resolution_and_unknown_keys_raise():
    config = tiny_config()
    config.autoencoder.block_out_channels = (8, 8)
    with pytest.raises(ValueError, match="resolution 9 is not divisible"):
        A.build_parts(config, CH, 9)
    config = tiny_config()
    config.loss.disc_strat = 3
    with pytest.raises(ValueError, match="disc_strat"):
        A.build_parts(config, CH, RES)


def test_demo_configs_build_the_agreed_latent_shapes():
    from configs import digits_autoencoder, shapes_autoencoder

    for module, res, channels in ((digits_autoencoder, 32, 1), (shapes_autoencoder, 32, 3)):
        config = module.get_config()
        assert config.stage == "autoencoder"
        parts = A.build_parts(config, channels, config.data.resolution)
        assert config.data.resolution == res and parts.model.downsample_factor == 4
        assert parts.model.latent_channels == 4
        local = module.get_config("runlocal")
        assert local.train.num_steps < config.train.num_steps
