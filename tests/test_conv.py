"""Convolution formulations (ldm_jax.kernels.conv) against torch's float64 conv2d and lax.conv,
forward and gradients, and the Conv module against flax's nn.Conv (same parameters, same output)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm_jax.kernels.conv import CONV_IMPLS, conv2d, resolve_padding, select_conv_impl
from ldm_jax.models import partitioning as P
from ldm_jax.models.conv import Conv

# (x NHWC, w HWIO, strides, padding): the U-Net's 3x3 / stride-2 / 1x1 convs, the VAE encoder's
# asymmetric downsample, the discriminator's 4x4 stride 2, a non-square map.
CASES = [
    ((2, 8, 8, 5), (3, 3, 5, 7), (1, 1), ((1, 1), (1, 1))),
    ((2, 9, 7, 4), (3, 3, 4, 6), (2, 2), ((1, 1), (1, 1))),
    ((1, 8, 8, 3), (3, 3, 3, 4), (2, 2), ((0, 1), (0, 1))),
    ((3, 4, 4, 6), (1, 1, 6, 5), (1, 1), ((0, 0), (0, 0))),
    ((2, 10, 10, 3), (4, 4, 3, 4), (2, 2), ((1, 1), (1, 1))),
    ((2, 2, 2, 8), (3, 3, 8, 8), (1, 1), ((1, 1), (1, 1))),
]


def _inputs(xs, ws, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xs).astype(np.float32)
    w = (rng.standard_normal(ws) / np.sqrt(np.prod(ws[:3]))).astype(np.float32)
    return x, w


def _torch_conv64(x, w, strides, padding):
    """torch's conv2d in float64 on NCHW, asymmetric padding applied with F.pad first."""
    (pt, pb), (pl, pr) = padding
    xt = torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2)
    xt = F.pad(xt, (pl, pr, pt, pb))
    wt = torch.from_numpy(w.astype(np.float64)).permute(3, 2, 0, 1)
    return F.conv2d(xt, wt, stride=strides).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("impl", CONV_IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"x{c[0]}w{c[1]}s{c[2][0]}p{c[3]}")
def test_conv2d_matches_torch_float64(impl, case):
    xs, ws, strides, padding = case
    x, w = _inputs(xs, ws)
    want = _torch_conv64(x, w, strides, padding)
    got = np.asarray(jax.jit(lambda a, b: conv2d(a, b, strides=strides, padding=padding, impl=impl))(x, w))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("impl", [i for i in CONV_IMPLS if i != "xla"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"x{c[0]}w{c[1]}s{c[2][0]}p{c[3]}")
def test_conv2d_gradients_match_lax_conv(impl, case):
    """VJP w.r.t. input and kernel for a random cotangent, against lax.conv's (and torch float64)."""
    xs, ws, strides, padding = case
    x, w = _inputs(xs, ws, seed=1)

    def grads(impl):
        def f(a, b):
            return conv2d(a, b, strides=strides, padding=padding, impl=impl)

        out, vjp = jax.vjp(f, x, w)
        g = np.random.default_rng(2).standard_normal(out.shape).astype(np.float32)
        return vjp(g), g

    (dx, dw), g = jax.jit(lambda: grads(impl))()
    (rx, rw), _ = jax.jit(lambda: grads("xla"))()
    for got, ref in ((dx, rx), (dw, rw)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5 * np.abs(ref).max())

    # and against torch's float64 autograd
    (pt, pb), (pl, pr) = padding
    xt = torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2).requires_grad_()
    wt = torch.from_numpy(w.astype(np.float64)).permute(3, 2, 0, 1).requires_grad_()
    out = F.conv2d(F.pad(xt, (pl, pr, pt, pb)), wt, stride=strides)
    out.backward(torch.from_numpy(np.asarray(g, np.float64)).permute(0, 3, 1, 2))
    tdx = xt.grad.permute(0, 2, 3, 1).numpy()
    tdw = wt.grad.permute(2, 3, 1, 0).numpy()
    np.testing.assert_allclose(np.asarray(dx), tdx, rtol=1e-5, atol=1e-5 * np.abs(tdx).max())
    np.testing.assert_allclose(np.asarray(dw), tdw, rtol=1e-5, atol=1e-5 * np.abs(tdw).max())


@pytest.mark.parametrize("impl", ["im2col", "taps", "auto"])
@pytest.mark.parametrize(
    "kernel,strides,padding",
    [((3, 3), (1, 1), "SAME"), ((3, 3), (2, 2), "SAME"), ((1, 1), (1, 1), "VALID"), ((3, 3), (2, 2), ((0, 1), (0, 1)))],
)
def test_conv_module_matches_flax_conv(impl, kernel, strides, padding):
    """Same parameter tree and values as nn.Conv under the same key (checkpoints and weight
    converters cannot tell), same output to float32 rounding."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 7, 7, 4)), jnp.float32)
    ref = nn.Conv(6, kernel, strides=strides, padding=padding)
    ours = Conv(6, kernel, strides=strides, padding=padding, impl=impl)
    p_ref = ref.init(jax.random.key(0), x)
    p_ours = ours.init(jax.random.key(0), x)
    assert jax.tree.structure(p_ref) == jax.tree.structure(p_ours)
    for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_ours)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    p = jax.tree.map(lambda a: a + 0.1, p_ref)  # non-zero bias
    want = ref.apply(p, x)
    np.testing.assert_allclose(np.asarray(ours.apply(p, x)), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_factory_keeps_flax_conv_for_xla_and_logical_names():
    assert isinstance(P.conv(4, (3, 3)), nn.Conv)
    conv = P.conv(4, (3, 3), impl="im2col")
    assert isinstance(conv, Conv)
    x = jnp.zeros((1, 4, 4, 3))
    boxed = conv.init(jax.random.key(0), x)["params"]["kernel"]
    assert boxed.names == P.CONV_KERNEL


def test_select_conv_impl_and_bad_names():
    assert select_conv_impl("auto", (64, 8, 8, 32), (3, 3, 32, 32), platform="tpu") == "xla"
    assert select_conv_impl("auto", (64, 2, 2, 64), (3, 3, 64, 64), platform="cpu") == "im2col"
    assert select_conv_impl("auto", (64, 8, 8, 64), (1, 1, 64, 32), platform="cpu") == "im2col"
    assert select_conv_impl("taps", (1, 8, 8, 3), (3, 3, 3, 3)) == "taps"
    with pytest.raises(ValueError, match="winograd"):
        select_conv_impl("winograd", (1, 8, 8, 3), (3, 3, 3, 3))
    with pytest.raises(ValueError, match="winograd"):
        conv2d(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3, 2)), impl="winograd")
    with pytest.raises(ValueError, match="channels"):
        conv2d(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 5, 2)), impl="im2col")
    with pytest.raises(ValueError, match="SAMEISH"):
        resolve_padding("SAMEISH", (3, 3), (1, 1), (4, 4))
    assert resolve_padding("SAME", (3, 3), (2, 2), (8, 8)) == ((0, 1), (0, 1))  # XLA's SAME


@pytest.mark.slow  # run by `make test-all` (whole-U-Net compiles per formulation: 98 s here; the 45 per-layer formulation tests stay in make test)
def test_unet_conv_impls_match_xla_forward_and_gradients():
    """A tiny U-Net (down/up-sampling, 1x1 shortcuts, 4x4 and 2x2 levels) with conv_impl="auto":
    same parameter tree, output and parameter gradients as lax.conv to float32 rounding (the diffusers parity tests hold for ``xla``; this carries them to the others)."""
    from ldm_jax.models.unet import UNet

    cfg = dict(
        sample_size=4, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2,
        mid_block_type="UNetMidBlock2D", norm_num_groups=4, num_classes=3,
    )
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 4, 4, 4)), jnp.float32)
    t, labels = jnp.asarray([3, 700]), jnp.asarray([0, 2])
    ref_unet = UNet(**cfg)
    params = jax.jit(lambda k: ref_unet.init(k, x, t, class_labels=labels)["params"])(jax.random.key(0))

    def run(impl):
        unet = UNet(**cfg, conv_impl=impl)

        def loss(p):
            out = unet.apply({"params": p}, x, t, class_labels=labels)
            return jnp.sum(out * jnp.cos(out)), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return out, grads

    ref_out, ref_grads = run("xla")
    for impl in ("auto",):  # 4x4 and 2x2 maps: every conv runs as im2col under auto on CPU
        out, grads = run(impl)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-5, atol=1e-5 * float(jnp.abs(ref_out).max()))
        assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            scale = float(jnp.abs(r).max()) + 1e-30
            assert float(jnp.abs(g - r).max()) <= 1e-4 * scale, (impl, float(jnp.abs(g - r).max()), scale)
