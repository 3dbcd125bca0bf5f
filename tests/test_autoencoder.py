"""First-stage autoencoders against diffusers (random weights), NumPy references and closed forms."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from ldm_jax.interop import diffusers_vae
from ldm_jax.interop.torch_weights import WeightsError, load_state_dict
from ldm_jax.models.autoencoder import AutoencoderKL, DiagonalGaussian, VQModel, apply_last_layer, last_layer_params
from ldm_jax.models.quantizer import VectorQuantizer

TINY = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=8,
)
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
)


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def nchw(x):
    return np.asarray(x).transpose(0, 3, 1, 2)


def perturb_norms(model):
    """diffusers initialises GroupNorm to (1, 0); perturb so a scale/bias mix-up would show."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def images():
    return np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def diffusers_kl(tmp_path_factory):
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    torch.manual_seed(0)
    model = perturb_norms(TorchAutoencoderKL(latent_channels=4, scaling_factor=0.3, shift_factor=0.1, **TINY)).eval()
    folder = tmp_path_factory.mktemp("diffusers_kl")
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def loaded_kl(diffusers_kl):
    return diffusers_vae.load_diffusers_autoencoder_kl(diffusers_kl[1])


@pytest.fixture(scope="module")
def kl_outputs(loaded_kl, images):
    model, params = loaded_kl

    @jax.jit
    def run(params, x):
        posterior = model.apply({"params": params}, x, method=model.encode)
        return posterior.mean, posterior.logvar, model.apply({"params": params}, posterior.mean, method=model.decode)

    return run, run(params, jnp.asarray(images))


def torch_kl_outputs(model, images):
    with torch.no_grad():
        posterior = model.encode(torch.from_numpy(nchw(images))).latent_dist
        return posterior.mean.numpy(), posterior.logvar.numpy(), model.decode(posterior.mean).sample.numpy()


def test_vae_matches_diffusers_random_weights(diffusers_kl, loaded_kl, kl_outputs, images):
    ref_mean, ref_logvar, ref_dec = torch_kl_outputs(diffusers_kl[0], images)
    mean, logvar, dec = kl_outputs[1]
    errors = {
        "mean": rel_err(nchw(mean), ref_mean),
        "logvar": rel_err(nchw(logvar), ref_logvar),
        "decode": rel_err(nchw(dec), ref_dec),
    }
    print("AutoencoderKL vs diffusers, max relative error:", errors)
    assert max(errors.values()) <= 1e-4, errors
    model, _ = loaded_kl
    assert model.scale_factor == pytest.approx(0.3) and model.shift_factor == pytest.approx(0.1)


def test_vae_call_decodes_posterior_mean_or_sample(loaded_kl, kl_outputs, images):
    model, params = loaded_kl
    x = jnp.asarray(images)
    key = jax.random.key(3)

    @jax.jit
    def run(params, x):
        rec, _ = model.apply({"params": params}, x)
        rec_s, posterior = model.apply({"params": params}, x, key)
        z = posterior.mean + posterior.std * jax.random.normal(key, posterior.mean.shape)
        dec_z = model.apply({"params": params}, z, method=model.decode)
        h, _ = model.apply({"params": params}, x, return_last_layer_input=True)
        return rec, rec_s, dec_z, apply_last_layer(last_layer_params(params), h)

    rec, rec_s, dec_z, rec_from_h = run(params, x)
    np.testing.assert_allclose(rec, kl_outputs[1][2], rtol=0, atol=1e-5)
    np.testing.assert_allclose(rec_s, dec_z, atol=1e-5)
    assert float(jnp.max(jnp.abs(rec_s - rec))) > 1e-3  # the sample is not the mean
    # return_last_layer_input + apply_last_layer reproduce the decoder output.
    np.testing.assert_allclose(rec_from_h, rec, atol=1e-5)


def test_vae_export_roundtrip_loads_in_diffusers(diffusers_kl, loaded_kl, images, tmp_path):
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    model, params = loaded_kl
    diffusers_vae.save_diffusers_autoencoder_kl(model, params, tmp_path)
    reloaded = TorchAutoencoderKL.from_pretrained(tmp_path).eval()
    original_keys = set(diffusers_kl[0].state_dict())
    assert set(load_state_dict(tmp_path / "diffusion_pytorch_model.safetensors")) == original_keys
    assert reloaded.config.scaling_factor == pytest.approx(0.3)
    assert reloaded.config.shift_factor == pytest.approx(0.1)
    for ours, ref in zip(torch_kl_outputs(reloaded, images), torch_kl_outputs(diffusers_kl[0], images)):
        assert rel_err(ours, ref) <= 1e-6
    # and back into JAX: identical parameters.
    _, params2 = diffusers_vae.load_diffusers_autoencoder_kl(tmp_path)
    for a, b in zip(jax.tree_util.tree_leaves(nn.meta.unbox(params)), jax.tree_util.tree_leaves(nn.meta.unbox(params2))):
        np.testing.assert_array_equal(a, b)


def test_vae_loader_names_missing_extra_and_misshaped_keys(diffusers_kl, tmp_path):
    folder = diffusers_kl[1]
    tensors = load_state_dict(folder / "diffusion_pytorch_model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    model = diffusers_vae.autoencoder_kl_from_config(config)

    missing = dict(tensors)
    del missing["decoder.up_blocks.1.resnets.0.conv2.weight"]
    with pytest.raises(WeightsError, match="decoder.up_blocks.1.resnets.0.conv2.weight"):
        diffusers_vae.variables_from_state_dict(model, missing)

    extra = dict(tensors, **{"encoder.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(WeightsError, match="encoder.extra.weight"):
        diffusers_vae.variables_from_state_dict(model, extra)

    bad = dict(tensors)
    bad["quant_conv.weight"] = np.zeros((8, 8, 3, 3), np.float32)
    with pytest.raises(WeightsError, match="quant_conv.weight"):
        diffusers_vae.variables_from_state_dict(model, bad)


def test_vae_loader_accepts_deprecated_attention_names(diffusers_kl, loaded_kl):
    """Pre-0.14 diffusers files (the original SD VAE upload) name the mid-block attention
    query/key/value/proj_attn, sometimes as 1x1 convs; they must load to the same params."""
    tensors = load_state_dict(diffusers_kl[1] / "diffusion_pytorch_model.safetensors")
    renamed = {}
    for key, value in tensors.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                if key.endswith("weight"):
                    value = value[:, :, None, None]
        renamed[key] = value
    assert any(".proj_attn." in k for k in renamed)
    model, params = loaded_kl
    params2 = diffusers_vae.variables_from_state_dict(model, renamed)["params"]
    for a, b in zip(jax.tree_util.tree_leaves(nn.meta.unbox(params)), jax.tree_util.tree_leaves(nn.meta.unbox(params2))):
        np.testing.assert_array_equal(a, b)


def test_sd_vae_param_count_matches_diffusers():
    from diffusers import AutoencoderKL as TorchAutoencoderKL

    with torch.device("meta"):
        torch_model = TorchAutoencoderKL(**SD_VAE)
    torch_count = sum(p.numel() for p in torch_model.parameters())
    config = dict(SD_VAE, _class_name="AutoencoderKL")
    model = diffusers_vae.autoencoder_kl_from_config(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.meta.unbox(shapes["params"])))
    print("SD VAE parameters: ours", ours, "diffusers", torch_count)
    assert ours == torch_count == 83_653_863


def test_diagonal_gaussian_matches_diffusers_distribution():
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    rng = np.random.RandomState(0)
    moments = rng.normal(size=(2, 3, 3, 8)).astype(np.float32) * 3
    moments[0, 0, 0, 4] = -50.0  # clipped to -30
    moments[1, 2, 1, 7] = 40.0  # clipped to 20
    other = rng.normal(size=(2, 3, 3, 8)).astype(np.float32)
    ours, ours_other = DiagonalGaussian.from_moments(jnp.asarray(moments)), DiagonalGaussian.from_moments(jnp.asarray(other))
    ref = DiagonalGaussianDistribution(torch.from_numpy(nchw(moments)).double())
    ref_other = DiagonalGaussianDistribution(torch.from_numpy(nchw(other)).double())
    np.testing.assert_allclose(nchw(ours.logvar), ref.logvar.numpy(), rtol=1e-6)
    np.testing.assert_allclose(nchw(ours.std), ref.std.numpy(), rtol=1e-5)
    np.testing.assert_allclose(ours.kl(), ref.kl().numpy(), rtol=1e-5)
    np.testing.assert_allclose(ours.kl(ours_other), ref.kl(ref_other).numpy(), rtol=1e-5)
    sample = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(ours.nll(jnp.asarray(sample)), ref.nll(torch.from_numpy(nchw(sample)).double()).numpy(), rtol=1e-5)
    key = jax.random.key(0)
    expected = ours.mean + ours.std * jax.random.normal(key, ours.mean.shape)
    np.testing.assert_allclose(ours.sample(key), expected, rtol=1e-6)


def test_latent_scaling_follows_diffusers_convention():
    """diffusers pipelines feed the denoiser (z - shift_factor) * scaling_factor."""
    model = AutoencoderKL(scale_factor=0.5, shift_factor=0.25)
    z = jnp.array([1.0, -2.0, 0.25])
    np.testing.assert_allclose(model.latents_for_diffusion(z), (np.array([1.0, -2.0, 0.25]) - 0.25) * 0.5)
    np.testing.assert_allclose(model.latents_from_diffusion(model.latents_for_diffusion(z)), z, rtol=1e-7)
    assert AutoencoderKL().latents_for_diffusion(2.0) == pytest.approx(2.0 * 0.18215)


# ----------------------------------------------------------------------------- VQ


@pytest.fixture(scope="module")
def diffusers_vq(tmp_path_factory):
    from diffusers import VQModel as TorchVQModel

    torch.manual_seed(0)
    model = perturb_norms(TorchVQModel(latent_channels=4, num_vq_embeddings=16, vq_embed_dim=3, **TINY)).eval()
    with torch.no_grad():  # a codebook on the scale of the latents, so many codes are used
        model.quantize.embedding.weight.normal_()
    folder = tmp_path_factory.mktemp("diffusers_vq")
    model.save_pretrained(folder)
    return model, folder


def test_vq_model_matches_diffusers_random_weights(diffusers_vq, images, tmp_path):
    torch_model, folder = diffusers_vq
    model, variables = diffusers_vae.load_diffusers_vq_model(folder)

    @jax.jit
    def run(variables, x):
        h = model.apply(variables, x, method=model.encode)
        z_q, aux = model.apply(variables, h, method=model.quantize_latents)
        dec = model.apply(variables, h, method=model.decode)  # quantises first, like diffusers
        return h, z_q, aux, dec, model.apply(variables, aux.indices, method=model.decode_indices)

    h, z_q, aux, dec, dec_from_indices = run(variables, jnp.asarray(images))
    # z + sg(e - z) rounds differently from e itself, hence not bitwise equal
    np.testing.assert_allclose(dec_from_indices, dec, atol=1e-5)
    with torch.no_grad():
        ref_h = torch_model.encode(torch.from_numpy(nchw(images))).latents
        ref_zq, ref_loss, (_, _, ref_idx) = torch_model.quantize(ref_h)
        ref_dec = torch_model.decode(ref_h).sample
    errors = {"encode": rel_err(nchw(h), ref_h.numpy()), "decode": rel_err(nchw(dec), ref_dec.numpy())}
    print("VQModel vs diffusers, max relative error:", errors)
    assert max(errors.values()) <= 1e-4, errors
    np.testing.assert_array_equal(np.asarray(aux.indices).reshape(-1), ref_idx.numpy().reshape(-1))
    np.testing.assert_allclose(nchw(z_q), ref_zq.numpy(), atol=1e-6)
    np.testing.assert_allclose(aux.loss, ref_loss.item(), rtol=1e-4)  # legacy beta placement
    # export -> diffusers reload -> same weights
    from diffusers import VQModel as TorchVQModel

    diffusers_vae.save_diffusers_vq_model(model, variables, tmp_path)
    reloaded = TorchVQModel.from_pretrained(tmp_path)
    for (k, a), (k2, b) in zip(sorted(reloaded.state_dict().items()), sorted(torch_model.state_dict().items())):
        assert k == k2
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def numpy_quantize(z, codebook):
    d = ((z[:, None, :].astype(np.float64) - codebook[None].astype(np.float64)) ** 2).sum(-1)
    return d.argmin(1)


def numpy_perplexity(indices, k):
    counts = np.bincount(indices, minlength=k).astype(np.float64)
    p = counts / counts.sum()
    nz = p[p > 0]
    return np.exp(-(nz * np.log(nz)).sum()), (counts > 0).mean()


def test_vq_losses_perplexity_and_usage_match_numpy():
    rng = np.random.RandomState(0)
    k, d, beta = 8, 3, 0.3
    z = rng.normal(size=(2, 4, 5, d)).astype(np.float32)
    for legacy in (False, True):
        q = VectorQuantizer(num_embeddings=k, embedding_dim=d, beta=beta, legacy_beta=legacy)
        codebook = rng.normal(size=(k, d)).astype(np.float32)
        variables = {"params": {"embedding": jnp.asarray(codebook)}}
        z_q, out = q.apply(variables, jnp.asarray(z))
        flat = z.reshape(-1, d)
        idx = numpy_quantize(flat, codebook)
        np.testing.assert_array_equal(np.asarray(out.indices).reshape(-1), idx)
        np.testing.assert_allclose(np.asarray(z_q).reshape(-1, d), codebook[idx], rtol=1e-6)
        mse = np.mean((flat.astype(np.float64) - codebook[idx]) ** 2)
        expected = (beta * mse + mse) if legacy else (mse + beta * mse)
        np.testing.assert_allclose(out.loss, expected, rtol=1e-5)
        perplexity, usage = numpy_perplexity(idx, k)
        np.testing.assert_allclose(out.perplexity, perplexity, rtol=1e-5)
        np.testing.assert_allclose(out.codebook_usage, usage)


def test_vq_loss_gradients_match_formula():
    """d loss/d e_i = 2 (e_i - z)/(N D) summed over assigned z; d loss/d z = 2 beta (z - e)/(N D)."""
    rng = np.random.RandomState(1)
    k, d, beta = 6, 2, 0.25
    z = rng.normal(size=(1, 3, 4, d)).astype(np.float32)
    codebook = rng.normal(size=(k, d)).astype(np.float32)
    q = VectorQuantizer(num_embeddings=k, embedding_dim=d, beta=beta)

    def loss(codebook, z):
        return q.apply({"params": {"embedding": codebook}}, z)[1].loss

    g_codebook, g_z = jax.grad(loss, argnums=(0, 1))(jnp.asarray(codebook), jnp.asarray(z))
    flat = z.reshape(-1, d).astype(np.float64)
    idx = numpy_quantize(flat, codebook)
    e = codebook[idx].astype(np.float64)
    n = flat.size
    expected_z = 2 * beta * (flat - e) / n
    expected_codebook = np.zeros((k, d))
    np.add.at(expected_codebook, idx, 2 * (e - flat) / n)
    np.testing.assert_allclose(np.asarray(g_z).reshape(-1, d), expected_z, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_codebook, expected_codebook, rtol=1e-5, atol=1e-7)


@pytest.fixture(scope="module")
def tiny_vq(diffusers_vq):
    model, variables = diffusers_vae.load_diffusers_vq_model(diffusers_vq[1])
    return model, nn.meta.unbox(variables["params"])


def test_vq_straight_through_gradient_reaches_encoder(tiny_vq, images):
    """Encoder gradients of a loss on the reconstruction equal the encoder VJP of the
    gradient w.r.t. the quantised latents (the straight-through estimator), and are nonzero."""
    model, params = tiny_vq
    x = jnp.asarray(images)
    w = jax.random.normal(jax.random.key(2), x.shape)
    w_latent = jax.random.normal(jax.random.key(3), (2, 8, 8, 3))

    @jax.jit
    def run(params):
        def recon_loss(params):
            rec, _ = model.apply({"params": params}, x)
            return jnp.sum(w * rec)

        grads = jax.grad(recon_loss)(params)
        h, encode_vjp = jax.vjp(lambda p: model.apply({"params": p}, x, method=model.encode), params)
        z_q, _ = model.apply({"params": params}, h, method=model.quantize_latents)
        g_zq = jax.grad(lambda zq: jnp.sum(w * model.apply({"params": params}, zq, method=model.decode_quantized)))(z_q)
        (expected,) = encode_vjp(g_zq)
        q = VectorQuantizer(num_embeddings=model.num_vq_embeddings, embedding_dim=model.embed_dim)
        g_h = jax.grad(lambda z: jnp.sum(w_latent * q.apply({"params": params["quantize"]}, z)[0]))(h)
        return grads, expected, g_h

    grads, expected, g_h = run(params)
    for name in ("encoder", "quant_conv"):
        for a, b in zip(jax.tree_util.tree_leaves(grads[name]), jax.tree_util.tree_leaves(expected[name])):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(grads["quant_conv"]["kernel"]).max()) > 0
    assert float(jnp.abs(grads["encoder"]["conv_in"]["kernel"]).max()) > 0
    # the codebook gets no gradient from the reconstruction (only from the codebook loss)
    np.testing.assert_array_equal(grads["quantize"]["embedding"], 0.0)
    # d(sum w * z_q)/dz = w exactly
    np.testing.assert_array_equal(g_h, w_latent)


def test_vq_ema_update_matches_numpy_reference():
    rng = np.random.RandomState(0)
    k, d, decay, eps = 5, 3, 0.9, 1e-3
    q = VectorQuantizer(num_embeddings=k, embedding_dim=d, use_ema=True, ema_decay=decay, ema_epsilon=eps)
    batches = [rng.normal(size=(2, 3, 3, d)).astype(np.float32) for _ in range(3)]
    variables = q.init(jax.random.key(0), jnp.asarray(batches[0]))
    assert "params" not in variables
    ema = nn.meta.unbox(variables["vq_ema"])

    codebook = np.asarray(ema["embedding"], np.float64)
    cluster = np.ones(k)
    embed_sum = codebook.copy()
    np.testing.assert_allclose(ema["embed_sum"], codebook)
    np.testing.assert_allclose(ema["cluster_size"], cluster)

    apply = jax.jit(lambda v, z: q.apply(v, z, update_ema=True, mutable=["vq_ema"]))
    for z in batches:
        flat = z.reshape(-1, d).astype(np.float64)
        idx = numpy_quantize(flat, codebook)
        onehot = np.eye(k)[idx]
        cluster = decay * cluster + (1 - decay) * onehot.sum(0)
        embed_sum = decay * embed_sum + (1 - decay) * onehot.T @ flat
        n = cluster.sum()
        smoothed = (cluster + eps) / (n + k * eps) * n
        new_codebook = embed_sum / smoothed[:, None]

        (z_q, out), updates = apply(variables, jnp.asarray(z))
        # quantisation uses the codebook from before the update
        np.testing.assert_array_equal(np.asarray(out.indices).reshape(-1), idx)
        np.testing.assert_allclose(np.asarray(z_q).reshape(-1, d), codebook[idx], rtol=1e-5)
        np.testing.assert_allclose(out.loss, 0.25 * np.mean((flat - codebook[idx]) ** 2), rtol=1e-5)
        new = nn.meta.unbox(updates["vq_ema"])
        np.testing.assert_allclose(new["cluster_size"], cluster, rtol=1e-5)
        np.testing.assert_allclose(new["embed_sum"], embed_sum, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new["embedding"], new_codebook, rtol=1e-4, atol=1e-6)
        variables = updates
        codebook = new_codebook

    with pytest.raises(ValueError, match="mutable"):
        q.apply(variables, jnp.asarray(batches[0]), update_ema=True)


def test_vq_ema_model_loads_diffusers_codebook(diffusers_vq):
    model, variables = diffusers_vae.load_diffusers_vq_model(diffusers_vq[1], use_ema=True)
    ema = nn.meta.unbox(variables["vq_ema"]["quantize"])
    ref = diffusers_vq[0].quantize.embedding.weight.detach().numpy()
    np.testing.assert_array_equal(ema["embedding"], ref)
    np.testing.assert_array_equal(ema["embed_sum"], ref)
    np.testing.assert_array_equal(ema["cluster_size"], np.ones(16))


# ----------------------------------------------------------------------------- dtypes, names, errors


def _assert_all_params_named(variables):
    flat = traverse_util.flatten_dict(variables, is_leaf=lambda _, x: isinstance(x, nn.LogicallyPartitioned))
    assert flat
    for path, leaf in flat.items():
        assert isinstance(leaf, nn.LogicallyPartitioned), path
        assert len(leaf.names) == leaf.value.ndim, (path, leaf.names)
        assert leaf.value.dtype == jnp.float32, path


def _random_params(abstract, seed=0):
    """Concrete params for an eval_shape'd tree (NumPy RNG: no per-shape compilation)."""
    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype), nn.meta.unbox(abstract)
    )


def test_models_run_under_jit_in_bf16_with_f32_named_params():
    x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    small = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, dtype=jnp.bfloat16)
    kl = AutoencoderKL(**small)
    vq = VQModel(num_vq_embeddings=16, use_ema=True, **small)
    kl_abstract = jax.eval_shape(kl.init, jax.random.key(0), x)
    vq_abstract = jax.eval_shape(vq.init, jax.random.key(0), x)
    _assert_all_params_named(kl_abstract)
    _assert_all_params_named(vq_abstract)

    rec, posterior = jax.jit(lambda v, x, k: kl.apply(v, x, k))(_random_params(kl_abstract), x, jax.random.key(1))
    assert rec.dtype == jnp.bfloat16 and rec.shape == x.shape
    assert posterior.mean.dtype == jnp.float32 and posterior.mean.shape == (2, 4, 4, 4)
    assert bool(jnp.all(jnp.isfinite(rec.astype(jnp.float32))))

    vq_vars = _random_params(vq_abstract)
    (rec, aux), _ = jax.jit(lambda v, x: vq.apply(v, x, update_ema=True, mutable=["vq_ema"]))(vq_vars, x)
    assert rec.dtype == jnp.bfloat16 and rec.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(rec.astype(jnp.float32)))) and float(aux.perplexity) >= 1.0


def test_bad_arguments_raise_value_error(images):
    with pytest.raises(ValueError, match="48"):
        AutoencoderKL(block_out_channels=(32, 48), norm_num_groups=32).init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    model = AutoencoderKL(block_out_channels=(32,), norm_num_groups=8)
    with pytest.raises(ValueError, match=r"\(1, 8, 8, 4\)"):
        model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 4)))
    with pytest.raises(ValueError, match="'DownBlock2D'"):
        diffusers_vae.autoencoder_kl_from_config(dict(TINY, down_block_types=("DownBlock2D", "DownEncoderBlock2D")))
    with pytest.raises(ValueError, match="'spatial'"):
        diffusers_vae.vq_model_from_config(dict(TINY, norm_type="spatial"))
    with pytest.raises(ValueError, match="1.5"):
        VectorQuantizer(num_embeddings=4, embedding_dim=2, ema_decay=1.5).init(jax.random.key(0), jnp.zeros((1, 2)))
