"""First-stage losses against independent PyTorch re-implementations and closed forms."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util

from ldm_jax.interop.lpips_weights import load_lpips_params, lpips_params_from_state_dict, lpips_state_dict_from_params
from ldm_jax.interop.torch_weights import WeightsError, conv_to_flax, save_state_dict
from ldm_jax.models import first_stage_losses as L
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.models.lpips import LPIPS, lpips_distance

# ----------------------------------------------------------------------------- LPIPS

# (torch index in vgg16().features, in, out) for the 13 convs; pools follow 2, 7, 14, 21.
VGG_CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
             (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512),
             (26, 512, 512), (28, 512, 512)]  # fmt: skip
SLICE_OF = {0: 1, 2: 1, 5: 2, 7: 2, 10: 3, 12: 3, 14: 3, 17: 4, 19: 4, 21: 4, 24: 5, 26: 5, 28: 5}
LIN_CHANNELS = [64, 128, 256, 512, 512]


def random_lpips_state_dict(seed=0):
    """Random weights in the lpips package layout, He-scaled so 13 layers keep a sane scale."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for index, cin, cout in VGG_CONVS:
        sd[f"net.slice{SLICE_OF[index]}.{index}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * (2.0 / (9 * cin)) ** 0.5
        sd[f"net.slice{SLICE_OF[index]}.{index}.bias"] = 0.05 * torch.randn(cout, generator=gen)
    for k, c in enumerate(LIN_CHANNELS):
        sd[f"lin{k}.model.1.weight"] = torch.rand(1, c, 1, 1, generator=gen)
    sd["scaling_layer.shift"] = torch.tensor([-0.030, -0.088, -0.188]).reshape(1, 3, 1, 1)
    sd["scaling_layer.scale"] = torch.tensor([0.458, 0.448, 0.450]).reshape(1, 3, 1, 1)
    return {k: v.numpy() for k, v in sd.items()}


class TorchLPIPS(torch.nn.Module):
    """Independent reference: VGG16 convs as torch.nn.Conv2d, LPIPS normalisation and lin layers."""

    def __init__(self, sd):
        super().__init__()
        self.convs = torch.nn.ModuleDict()
        for index, cin, cout in VGG_CONVS:
            conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
            conv.weight.data = torch.from_numpy(sd[f"net.slice{SLICE_OF[index]}.{index}.weight"]).double()
            conv.bias.data = torch.from_numpy(sd[f"net.slice{SLICE_OF[index]}.{index}.bias"]).double()
            self.convs[str(index)] = conv
        self.lins = [torch.from_numpy(sd[f"lin{k}.model.1.weight"]).double() for k in range(5)]
        self.shift = torch.from_numpy(sd["scaling_layer.shift"]).double()
        self.scale = torch.from_numpy(sd["scaling_layer.scale"]).double()

    def features(self, x):
        taps = []
        for index, _, _ in VGG_CONVS:
            if index in (5, 10, 17, 24):
                x = F.max_pool2d(x, 2, 2)
            x = F.relu(self.convs[str(index)](x))
            if index in (2, 7, 14, 21, 28):
                taps.append(x)
        return taps

    def forward(self, x, y):
        fx = self.features((x - self.shift) / self.scale)
        fy = self.features((y - self.shift) / self.scale)
        total = 0
        for a, b, w in zip(fx, fy, self.lins):
            a = a / (torch.sqrt(torch.sum(a * a, dim=1, keepdim=True)) + 1e-10)
            b = b / (torch.sqrt(torch.sum(b * b, dim=1, keepdim=True)) + 1e-10)
            total = total + F.conv2d((a - b) ** 2, w).mean(dim=(2, 3))
        return total[:, 0]


@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
    sd = random_lpips_state_dict()
    folder = tmp_path_factory.mktemp("lpips")
    save_state_dict(sd, folder / "lpips_vgg.safetensors")
    return sd, folder


def test_lpips_matches_torch_reimplementation(lpips_files):
    sd, folder = lpips_files
    params = load_lpips_params(folder / "lpips_vgg.safetensors")
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    y = np.clip(x + 0.3 * rng.normal(size=x.shape), -1, 1).astype(np.float32)

    value_and_grad = jax.jit(jax.value_and_grad(lambda x, y: jnp.sum(lpips_distance(params, x, y)), argnums=1))
    dist = jax.jit(lpips_distance)(params, jnp.asarray(x), jnp.asarray(y))
    _, grad_y = value_and_grad(jnp.asarray(x), jnp.asarray(y))

    ref = TorchLPIPS(sd)
    tx = torch.from_numpy(x.transpose(0, 3, 1, 2)).double()
    ty = torch.from_numpy(y.transpose(0, 3, 1, 2)).double().requires_grad_(True)
    ref_dist = ref(tx, ty)
    (ref_grad,) = torch.autograd.grad(ref_dist.sum(), ty)
    ref_dist = ref_dist.detach().numpy()
    err = float(np.max(np.abs(np.asarray(dist) - ref_dist) / np.abs(ref_dist)))
    grad_err = float(np.max(np.abs(np.asarray(grad_y).transpose(0, 3, 1, 2) - ref_grad.numpy())) / np.max(np.abs(ref_grad.numpy())))
    print(f"LPIPS vs torch: distances {np.asarray(dist)} vs {ref_dist}, rel err {err:.2e}; input-grad rel err {grad_err:.2e}")
    assert err <= 1e-4
    assert grad_err <= 1e-3
    assert np.all(ref_dist > 0)
    np.testing.assert_allclose(jax.jit(lpips_distance)(params, jnp.asarray(x), jnp.asarray(x)), 0.0, atol=1e-7)


def test_lpips_loads_torchvision_names_from_split_files(lpips_files, tmp_path):
    """lpips ships lin weights only; the VGG trunk comes from a torchvision vgg16 state dict."""
    sd, folder = lpips_files
    lin = {k: v for k, v in sd.items() if k.startswith("lin")}
    vgg = {}
    for key, value in sd.items():
        if key.startswith("net."):
            _, _, index, leaf = key.split(".")
            vgg[f"features.{index}.{leaf}"] = value
    vgg["classifier.0.weight"] = np.zeros((4, 4), np.float32)  # torchvision head: ignored
    save_state_dict(lin, tmp_path / "vgg_lin.safetensors")
    save_state_dict(vgg, tmp_path / "vgg16.safetensors")
    split = load_lpips_params(tmp_path / "vgg_lin.safetensors", vgg_path=tmp_path / "vgg16.safetensors")
    whole = load_lpips_params(folder / "lpips_vgg.safetensors")
    flat_a = traverse_util.flatten_dict(nn.meta.unbox(split))
    flat_b = traverse_util.flatten_dict(nn.meta.unbox(whole))
    assert flat_a.keys() == flat_b.keys() and len(flat_a) == 2 * 13 + 5
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key])
    np.testing.assert_array_equal(flat_a[("lin3", "kernel")], conv_to_flax(sd["lin3.model.1.weight"]))
    exported = lpips_state_dict_from_params(whole)  # back to the lpips package layout
    assert exported.keys() == sd.keys()
    for key, value in sd.items():
        np.testing.assert_array_equal(exported[key], value)


def test_lpips_loader_names_bad_keys(lpips_files):
    sd, _ = lpips_files
    missing = {k: v for k, v in sd.items() if k != "lin2.model.1.weight"}
    with pytest.raises(WeightsError, match="lin2.model.1.weight"):
        lpips_params_from_state_dict(missing)
    bad_shape = dict(sd, **{"net.slice3.12.weight": np.zeros((256, 128, 3, 3), np.float32)})
    with pytest.raises(WeightsError, match="net.slice3.12.weight"):
        lpips_params_from_state_dict(bad_shape)
    bad_scale = dict(sd, **{"scaling_layer.scale": np.ones((1, 3, 1, 1), np.float32)})
    with pytest.raises(WeightsError, match="scaling_layer.scale"):
        lpips_params_from_state_dict(bad_scale)


def test_perceptual_loss_is_off_without_lpips_file(caplog):
    with caplog.at_level(logging.WARNING):
        assert load_lpips_params(None) is None
    assert "OFF" in caplog.text
    config = L.FirstStageLossConfig(perceptual_weight=1.0)
    rng = np.random.RandomState(0)
    x, y = rng.normal(size=(2, 4, 4, 3)).astype(np.float32), rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        rec, perceptual = L.reconstruction_loss(config, jnp.asarray(x), jnp.asarray(y), lpips_params=None)
    assert "OFF" in caplog.text
    np.testing.assert_allclose(rec, np.abs(x - y), rtol=1e-6)
    np.testing.assert_array_equal(perceptual, 0.0)


# ----------------------------------------------------------------------------- discriminator


def torch_patchgan(ndf, n_layers, groups, in_channels=3):
    """pix2pix NLayerDiscriminator with GroupNorm in place of BatchNorm, as plain torch layers."""
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(in_channels, ndf, 4, 2, 1), torch.nn.LeakyReLU(0.2)]
    mult = 1
    for n in range(1, n_layers):
        prev, mult = mult, min(2**n, 8)
        layers += [torch.nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=False), torch.nn.GroupNorm(groups, ndf * mult),
                   torch.nn.LeakyReLU(0.2)]
    prev, mult = mult, min(2**n_layers, 8)
    layers += [torch.nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=False), torch.nn.GroupNorm(groups, ndf * mult),
               torch.nn.LeakyReLU(0.2), torch.nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
    main = torch.nn.Sequential(*layers).double()
    with torch.no_grad():
        for m in main:
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return main


def patchgan_params(main):
    params = {}
    for i, m in enumerate(main):
        if isinstance(m, torch.nn.Conv2d):
            params[f"main_{i}"] = {"kernel": jnp.asarray(conv_to_flax(m.weight.detach().numpy()), jnp.float32)}
            if m.bias is not None:
                params[f"main_{i}"]["bias"] = jnp.asarray(m.bias.detach().numpy(), jnp.float32)
        elif isinstance(m, torch.nn.GroupNorm):
            params[f"main_{i}"] = {"scale": jnp.asarray(m.weight.detach().numpy(), jnp.float32),
                                   "bias": jnp.asarray(m.bias.detach().numpy(), jnp.float32)}
    return params


def test_patchgan_matches_torch_reference():
    main = torch_patchgan(ndf=8, n_layers=2, groups=4)
    disc = NLayerDiscriminator(ndf=8, n_layers=2, norm_num_groups=4)
    x = np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    abstract = jax.eval_shape(disc.init, jax.random.key(0), jnp.asarray(x))
    params = patchgan_params(main)
    shapes = jax.tree_util.tree_map(lambda s: s.shape, nn.meta.unbox(abstract["params"]))
    assert jax.tree_util.tree_map(lambda a: a.shape, params) == shapes
    logits = jax.jit(disc.apply)({"params": params}, jnp.asarray(x))
    with torch.no_grad():
        ref = main(torch.from_numpy(x.transpose(0, 3, 1, 2)).double()).numpy()
    assert logits.shape == (2, 2, 2, 1)
    err = float(np.max(np.abs(np.asarray(logits).transpose(0, 3, 1, 2) - ref)) / np.max(np.abs(ref)))
    print(f"PatchGAN vs torch: max rel err {err:.2e}")
    assert err <= 1e-4
    with pytest.raises(ValueError, match="8"):
        disc.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


# ----------------------------------------------------------------------------- GAN pieces


def test_hinge_and_vanilla_losses_match_formula():
    rng = np.random.RandomState(0)
    real, fake = rng.normal(size=(3, 5, 5, 1)) * 2, rng.normal(size=(3, 5, 5, 1)) * 2
    hinge = 0.5 * (np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)))
    vanilla = 0.5 * (np.mean(np.log1p(np.exp(-real))) + np.mean(np.log1p(np.exp(fake))))
    np.testing.assert_allclose(L.hinge_d_loss(jnp.asarray(real), jnp.asarray(fake)), hinge, rtol=1e-6)
    np.testing.assert_allclose(L.vanilla_d_loss(jnp.asarray(real), jnp.asarray(fake)), vanilla, rtol=1e-6)
    np.testing.assert_allclose(L.generator_adversarial_loss(jnp.asarray(fake)), -np.mean(fake), rtol=1e-6)
    config = L.FirstStageLossConfig(disc_start=10, disc_factor=0.7)
    for step, factor in ((9, 0.0), (10, 0.7), (11, 0.7)):
        d_loss, metrics = L.discriminator_loss(config, logits_real=jnp.asarray(real), logits_fake=jnp.asarray(fake), step=step)
        np.testing.assert_allclose(d_loss, factor * hinge, rtol=1e-6)
        assert float(metrics["disc_factor"]) == pytest.approx(factor)
    with pytest.raises(ValueError, match="'wgan'"):
        L.FirstStageLossConfig(disc_loss="wgan")


def test_adaptive_weight_matches_direct_formula_and_clips():
    rng = np.random.RandomState(0)
    rec_grad, gan_grad = rng.normal(size=(3, 3, 4, 2)), rng.normal(size=(3, 3, 4, 2)) * 0.01
    expected = np.linalg.norm(rec_grad) / (np.linalg.norm(gan_grad) + 1e-4) * 0.5
    np.testing.assert_allclose(L.adaptive_disc_weight(jnp.asarray(rec_grad), jnp.asarray(gan_grad), 0.5), expected, rtol=1e-5)
    # |gan_grad| = 0: ratio |rec|/1e-4 > 1e4 is clipped to 1e4 before the disc_weight factor
    np.testing.assert_allclose(L.adaptive_disc_weight(jnp.asarray(rec_grad), jnp.zeros_like(gan_grad), 0.5), 0.5e4)
    # no gradient flows through the weight
    g = jax.grad(lambda r: L.adaptive_disc_weight(r, jnp.asarray(gan_grad)))(jnp.asarray(rec_grad))
    np.testing.assert_array_equal(g, 0.0)


def torch_generator_loss(config, x, h, kernel, bias, disc, kl, logvar, step, lpips=None):
    """taming/LDM generator loss with torch autograd for the adaptive weight (last layer = W)."""
    W = torch.from_numpy(kernel).double().requires_grad_(True)
    h = torch.from_numpy(h.transpose(0, 3, 1, 2)).double().requires_grad_(True)
    x = torch.from_numpy(x.transpose(0, 3, 1, 2)).double()
    xrec = F.conv2d(h, W, torch.from_numpy(bias).double(), padding=1)
    rec = torch.abs(x - xrec) if config.pixel_loss == "l1" else (x - xrec) ** 2
    if lpips is not None:
        rec = rec + config.perceptual_weight * lpips(x, xrec)[:, None, None, None]
    if config.regularizer == "kl":
        nll = torch.sum(rec / np.exp(logvar) + logvar) / rec.shape[0]
        reg = config.kl_weight * kl
    else:
        nll = torch.mean(rec)
        reg = config.codebook_weight * kl
    g_loss = -torch.mean(disc(xrec))
    nll_grads = torch.autograd.grad(nll, W, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, W, retain_graph=True)[0]
    d_weight = torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4).detach() * config.disc_weight
    factor = config.disc_factor if step >= config.disc_start else 0.0
    loss = nll + reg + d_weight * factor * g_loss
    (grad_h,) = torch.autograd.grad(loss, h)
    scalars = [float(v.detach()) for v in (loss, d_weight, nll, g_loss)]
    return (*scalars, grad_h.numpy().transpose(0, 2, 3, 1))


@pytest.mark.parametrize(
    "config,use_lpips",
    [
        (L.FirstStageLossConfig(regularizer="kl", kl_weight=1e-3, disc_weight=0.5, disc_start=5, perceptual_weight=0.6), True),
        (L.FirstStageLossConfig(regularizer="vq", pixel_loss="l2", codebook_weight=0.7, disc_weight=0.8, disc_start=5), False),
    ],
    ids=["kl_l1_lpips", "vq_l2_no_lpips"],
)
def test_generator_loss_matches_torch_autograd(config, use_lpips, lpips_files):
    """Composed generator loss (LPIPS, adaptive weight from the last layer's gradients, disc
    start, regularizer) and its gradient w.r.t. the decoder activations vs torch autograd."""
    rng = np.random.RandomState(0)
    x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    h = rng.normal(size=(2, 16, 16, 4)).astype(np.float32)
    kernel = (0.2 * rng.normal(size=(3, 4, 3, 3))).astype(np.float32)  # torch layout [out, in, kh, kw]
    bias = (0.1 * rng.normal(size=3)).astype(np.float32)
    kl, logvar = 123.0, 0.3 if config.regularizer == "kl" else 0.0
    main = torch_patchgan(ndf=8, n_layers=1, groups=4)
    disc = NLayerDiscriminator(ndf=8, n_layers=1, norm_num_groups=4)
    disc_params = patchgan_params(main)
    last_layer = {"kernel": jnp.asarray(conv_to_flax(kernel)), "bias": jnp.asarray(bias)}
    sd, folder = lpips_files
    lpips_params = load_lpips_params(folder / "lpips_vgg.safetensors") if use_lpips else None

    @jax.jit
    def run(h, step):
        def total(h):
            loss, metrics, _ = L.generator_loss(
                config, inputs=jnp.asarray(x), last_layer_input=h, last_layer=last_layer,
                regularization_loss=jnp.float32(kl), discriminator_fn=lambda im: disc.apply({"params": disc_params}, im),
                step=step, lpips_params=lpips_params, logvar=logvar,
            )
            return loss, metrics

        return jax.value_and_grad(total, has_aux=True)(h)

    torch_lpips = TorchLPIPS(sd) if use_lpips else None
    for step in (4, 5):
        (loss, metrics), grad_h = run(jnp.asarray(h), step)
        ref_loss, ref_w, ref_nll, ref_g, ref_grad_h = torch_generator_loss(
            config, x, h, kernel, bias, main, kl, logvar, step, lpips=torch_lpips
        )
        print(f"{config.regularizer} step {step}: loss {float(loss):.6f} vs {ref_loss:.6f}, d_weight {float(metrics['d_weight']):.6f} vs {ref_w:.6f}")
        np.testing.assert_allclose(metrics["d_weight"], ref_w, rtol=1e-4)
        np.testing.assert_allclose(metrics["nll_loss"], ref_nll, rtol=1e-5)
        np.testing.assert_allclose(metrics["g_loss"], ref_g, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        np.testing.assert_allclose(grad_h, ref_grad_h, rtol=1e-4, atol=1e-5 * np.abs(ref_grad_h).max())
        expected_pw = config.perceptual_weight if use_lpips else 0.0
        assert float(metrics["perceptual_weight"]) == pytest.approx(expected_pw)
        assert (float(metrics["perceptual_loss"]) > 0) == use_lpips


# ----------------------------------------------------------------------------- dtypes and names


def test_loss_models_run_under_jit_in_bf16_with_f32_named_params(lpips_files):
    x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    disc = NLayerDiscriminator(ndf=8, n_layers=2, norm_num_groups=4, dtype=jnp.bfloat16)
    lpips = LPIPS(dtype=jnp.bfloat16)
    for abstract in (jax.eval_shape(disc.init, jax.random.key(0), x), jax.eval_shape(lpips.init, jax.random.key(0), x, x)):
        flat = traverse_util.flatten_dict(abstract["params"])
        for path, leaf in flat.items():
            assert isinstance(leaf, nn.LogicallyPartitioned) and len(leaf.names) == len(leaf.value.shape), path
            assert leaf.value.dtype == jnp.float32, path
    disc_vars = jax.jit(disc.init)(jax.random.key(0), x)
    logits = jax.jit(disc.apply)(disc_vars, x)
    assert logits.dtype == jnp.bfloat16 and logits.shape == (2, 6, 6, 1)
    params = load_lpips_params(lpips_files[1] / "lpips_vgg.safetensors")
    dist_bf16 = jax.jit(lambda p, a, b: lpips_distance(p, a, b, dtype=jnp.bfloat16))(params, x, -x)
    dist_f32 = jax.jit(lpips_distance)(params, x, -x)
    assert dist_bf16.dtype == jnp.float32
    np.testing.assert_allclose(dist_bf16, dist_f32, rtol=5e-2)
