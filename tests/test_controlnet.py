"""ControlNet tests. Truth: diffusers' ControlNetModel (random weights, zero convolutions made
non-zero), its MultiControlNetModel, ControlNetModel.from_unet, and UNet2DConditionModel's
residual injection, on the same inputs."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from flax import traverse_util

from ldm_jax.interop.diffusers_controlnet import (
    load_diffusers_controlnet,
    params_from_diffusers_state_dict,
    params_to_diffusers_state_dict,
    save_diffusers_controlnet,
)
from ldm_jax.interop.diffusers_unet import params_from_diffusers_state_dict as unet_params_from_state_dict
from ldm_jax.interop.torch_weights import WeightsError
from ldm_jax.models.controlnet import ControlNet, controlnet_from_unet, sum_residuals
from ldm_jax.models.unet import UNet

TINY = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=4,
)
EMBED = (8, 16, 16)  # control image at 4x the latent size


def _rel_err(got, want) -> float:
    want = np.asarray(want, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def _randomize(model, seed):
    """Every weight random, including the zero convolutions (else the residuals are trivially 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.add_(0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.05 * noise)
            elif "controlnet_" in name or "conv_out" in name:
                p.copy_(noise / np.sqrt(p[0].numel()))


def _nhwc(t):
    return t.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    torch.manual_seed(0)
    unet_t = UNet2DConditionModel(**TINY).eval()
    _randomize(unet_t, 1)
    nets = []
    for seed, order in ((2, "rgb"), (3, "bgr")):
        cn = ControlNetModel.from_unet(unet_t, conditioning_embedding_out_channels=EMBED).eval()
        cn.register_to_config(controlnet_conditioning_channel_order=order)
        _randomize(cn, seed)
        folder = tmp_path_factory.mktemp(f"controlnet_{order}")
        cn.save_pretrained(folder)
        nets.append((cn, folder, load_diffusers_controlnet(folder)))
    unet = UNet.from_diffusers_config(unet_t.config)
    unet_params = unet_params_from_state_dict(unet, {k: v.numpy() for k, v in unet_t.state_dict().items()})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([5.0, 600.0], np.float32)
    ctx = rng.standard_normal((2, 5, 32)).astype(np.float32)
    conds = [rng.uniform(0, 1, (2, 3, 32, 32)).astype(np.float32) for _ in nets]
    cn_fwd = jax.jit(
        lambda cn, p, x, t, c, img, s: cn.apply({"params": p}, x, t, c, img, conditioning_scale=s),
        static_argnums=0,
    )
    unet_fwd = jax.jit(
        lambda p, x, t, c, down, mid: unet.apply(
            {"params": p}, x, t, c, down_block_additional_residuals=down, mid_block_additional_residual=mid
        )
    )
    j = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1) if a.ndim == 4 else a)  # noqa: E731
    return dict(unet_t=unet_t, nets=nets, unet=unet, unet_params=unet_params, x=x, t=t, ctx=ctx, conds=conds,
                cn_fwd=cn_fwd, unet_fwd=unet_fwd, j=j)


def test_controlnet_residuals_match_diffusers_random_weights(ref):
    j = ref["j"]
    for (cn_t, _, (controlnet, params)), cond in zip(ref["nets"], ref["conds"]):
        with torch.no_grad():
            want = cn_t(torch.from_numpy(ref["x"]), torch.from_numpy(ref["t"]), torch.from_numpy(ref["ctx"]),
                        torch.from_numpy(cond), conditioning_scale=0.8, return_dict=False)
        down, mid = ref["cn_fwd"](controlnet, params, j(ref["x"]), j(ref["t"]), j(ref["ctx"]), j(cond), 0.8)
        assert len(down) == len(want[0]) == 4  # conv_in, level 0 layer, its downsampler, level 1 layer
        errs = [_rel_err(d, _nhwc(w)) for d, w in zip(down, want[0])] + [_rel_err(mid, _nhwc(want[1]))]
        print(controlnet.controlnet_conditioning_channel_order, "residual errors", [f"{e:.1e}" for e in errs])
        assert max(errs) <= 1e-5


@pytest.mark.parametrize("conv_impl", ["im2col", "auto"])
def test_controlnet_conv_formulations_match_diffusers_and_export_the_same_config(ref, conv_impl):
    # conv_impl changes how the convolutions run, never the parameters or the exported config.
    j = ref["j"]
    (cn_t, _, (controlnet, params)), cond = ref["nets"][0], ref["conds"][0]
    other = controlnet.clone(conv_impl=conv_impl)
    assert other.to_diffusers_config() == controlnet.to_diffusers_config()
    assert ControlNet.from_unet(ref["unet"].clone(conv_impl=conv_impl)).conv_impl == conv_impl
    with torch.no_grad():
        want = cn_t(torch.from_numpy(ref["x"]), torch.from_numpy(ref["t"]), torch.from_numpy(ref["ctx"]),
                    torch.from_numpy(cond), conditioning_scale=0.8, return_dict=False)
    down, mid = ref["cn_fwd"](other, params, j(ref["x"]), j(ref["t"]), j(ref["ctx"]), j(cond), 0.8)
    errs = [_rel_err(d, _nhwc(w)) for d, w in zip(down, want[0])] + [_rel_err(mid, _nhwc(want[1]))]
    assert max(errs) <= 1e-5, (conv_impl, errs)


def test_several_controlnets_injected_into_unet_match_diffusers(ref):
    j = ref["j"]
    scales = [0.6, 1.3]
    multi = MultiControlNetModel([cn for cn, _, _ in ref["nets"]])
    with torch.no_grad():
        down_t, mid_t = multi(torch.from_numpy(ref["x"]), torch.from_numpy(ref["t"]), torch.from_numpy(ref["ctx"]),
                              [torch.from_numpy(c) for c in ref["conds"]], scales, return_dict=False)
        want = ref["unet_t"](torch.from_numpy(ref["x"]), torch.from_numpy(ref["t"]), torch.from_numpy(ref["ctx"]),
                             down_block_additional_residuals=down_t, mid_block_additional_residual=mid_t).sample
        plain = ref["unet_t"](
            torch.from_numpy(ref["x"]), torch.from_numpy(ref["t"]), torch.from_numpy(ref["ctx"])
        ).sample
    outputs = []
    for (_, _, (controlnet, params)), cond, s in zip(ref["nets"], ref["conds"], scales):
        outputs.append(ref["cn_fwd"](controlnet, params, j(ref["x"]), j(ref["t"]), j(ref["ctx"]), j(cond), s))
    down, mid = sum_residuals(outputs)
    got = ref["unet_fwd"](ref["unet_params"], j(ref["x"]), j(ref["t"]), j(ref["ctx"]), down, mid)
    err = _rel_err(got, _nhwc(want))
    effect = _rel_err(_nhwc(plain), _nhwc(want))
    print(f"U-Net + 2 ControlNets: max relative error {err:.2e} (ControlNets change the output by {effect:.2e})")
    assert effect > 1e-2
    assert err <= 1e-5


def test_controlnet_from_unet_copies_like_diffusers_and_starts_at_zero(ref):
    unet, unet_params = ref["unet"], ref["unet_params"]
    controlnet, params = controlnet_from_unet(unet, unet_params, jax.random.PRNGKey(0),
                                              conditioning_embedding_out_channels=EMBED)
    theirs = ControlNetModel.from_unet(ref["unet_t"], conditioning_embedding_out_channels=EMBED)
    mine = params_to_diffusers_state_dict(controlnet, params)
    their_sd = {k: v.numpy() for k, v in theirs.state_dict().items()}
    assert mine.keys() == their_sd.keys()
    for k, v in their_sd.items():
        if k.startswith("controlnet_cond_embedding.") and not k.startswith("controlnet_cond_embedding.conv_out"):
            # torch's default Conv2d init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as diffusers leaves them
            fan_in = np.prod(v.shape[1:]) if v.ndim == 4 else np.prod(their_sd[k[:-5] + ".weight"].shape[1:])
            assert mine[k].shape == v.shape
            assert 0.5 / np.sqrt(fan_in) < np.abs(mine[k]).max() <= 1 / np.sqrt(fan_in), k
        else:  # copied from the U-Net, or zero convolutions
            np.testing.assert_array_equal(mine[k], v, err_msg=k)
    # zero convolutions equal diffusers' zeros above, so the fresh ControlNet adds nothing to the U-Net
    assert not any(mine[k].any() for k in mine if k.startswith(("controlnet_down_blocks", "controlnet_mid_block")))


def test_controlnet_export_loads_in_diffusers_and_back(ref, tmp_path):
    cn_t, _, (controlnet, params) = ref["nets"][1]
    save_diffusers_controlnet(tmp_path, controlnet, params)
    again = ControlNetModel.from_pretrained(tmp_path).eval()
    original = {k: v.numpy() for k, v in cn_t.state_dict().items()}
    exported = {k: v.numpy() for k, v in again.state_dict().items()}
    assert exported.keys() == original.keys()
    for k in original:
        np.testing.assert_array_equal(exported[k], original[k], err_msg=k)
    assert again.config.controlnet_conditioning_channel_order == "bgr"
    controlnet2, params2 = load_diffusers_controlnet(tmp_path)
    assert controlnet2 == controlnet
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_controlnet_bad_weights_raise_weights_error_naming_the_key(ref):
    cn_t, _, _ = ref["nets"][0]
    controlnet = ControlNet.from_diffusers_config(cn_t.config)
    sd = {k: v.numpy() for k, v in cn_t.state_dict().items()}
    missing = {k: v for k, v in sd.items() if k != "controlnet_down_blocks.2.weight"}
    with pytest.raises(WeightsError, match="missing key 'controlnet_down_blocks.2.weight'"):
        params_from_diffusers_state_dict(controlnet, missing)
    bad = dict(sd, **{"controlnet_mid_block.weight": np.zeros((64, 32, 1, 1), np.float32)})
    with pytest.raises(WeightsError, match="shape mismatch for key 'controlnet_mid_block.weight'"):
        params_from_diffusers_state_dict(controlnet, bad)
    with pytest.raises(ValueError, match="control_image must be"):
        controlnet.apply({"params": traverse_util.unflatten_dict({})}, jnp.zeros((1, 8, 8, 4)), 1.0,
                         jnp.zeros((1, 3, 32)), jnp.zeros((1, 8, 8, 3)))


def test_controlnet_on_class_conditional_unet_without_attention_starts_as_identity():
    """The toy-LDM case (class labels with ldm_jax's null label, no cross-attention, a 4x control
    image): a fresh ControlNet's residuals are exactly zero, so the U-Net output is unchanged;
    the config (with num_classes) survives the diffusers config round trip."""
    unet = UNet(block_out_channels=(8, 16), layers_per_block=1, down_block_types=("DownBlock2D",) * 2,
                up_block_types=("UpBlock2D",) * 2, mid_block_type="UNetMidBlock2D", norm_num_groups=4,
                num_classes=3, cross_attention_dim=None)
    abstract = jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), **unet.dummy_inputs()))["params"]
    rng = np.random.default_rng(0)
    unet_params = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(s.shape, np.float32)),
                               nn.meta.unbox(abstract))
    controlnet, params = controlnet_from_unet(unet, unet_params, jax.random.PRNGKey(1),
                                              conditioning_embedding_out_channels=(4, 8, 8), conditioning_channels=1)
    assert ControlNet.from_diffusers_config(controlnet.to_diffusers_config()) == controlnet
    x = jnp.asarray(rng.standard_normal((2, 8, 8, 4), np.float32))
    labels = jnp.array([0, 3])  # 3 = the null label

    @jax.jit
    def run(cn_params, image):
        down, mid = controlnet.apply({"params": cn_params}, x, 7.0, None, image, 1.0, class_labels=labels)
        with_cn = unet.apply({"params": unet_params}, x, 7.0, None, labels,
                             down_block_additional_residuals=down, mid_block_additional_residual=mid)
        return down, with_cn, unet.apply({"params": unet_params}, x, 7.0, None, labels)

    down, with_cn, plain = run(params, jnp.ones((2, 32, 32, 1)))
    assert [d.shape for d in down] == [(2, 8, 8, 8), (2, 8, 8, 8), (2, 4, 4, 8), (2, 4, 4, 16)]
    np.testing.assert_array_equal(np.asarray(with_cn), np.asarray(plain))


def test_shapes_control_mask_is_the_coverage_the_image_was_blended_with():
    """The control mask is the shape's coverage: image = background + mask * (shape - background)
    with the example's own colours (from its spec), so the mask is recovered from the image;
    edges lie inside the mask, on its boundary (zero in the 3x3-eroded interior)."""
    from ldm_jax.data import build_dataset
    from ldm_jax.data.shapes import BACKGROUND_COLORS, SHAPE_COLORS

    masks = build_dataset({"name": "shapes", "resolution": 24, "shapes_num_examples": 6, "shapes_control": "mask"})
    edges = build_dataset({"name": "shapes", "resolution": 24, "shapes_num_examples": 6, "shapes_control": "edges"})
    for i in range(6):
        example, spec = masks[i], masks.spec(i)
        bg = np.asarray(BACKGROUND_COLORS[spec.background], np.float32) * 2 / 255 - 1
        fg = np.asarray(SHAPE_COLORS[spec.color], np.float32) * 2 / 255 - 1
        channel = int(np.argmax(np.abs(fg - bg)))
        recovered = (example["image"][..., channel] - bg[channel]) / (fg[channel] - bg[channel])
        assert example["control"].shape == (24, 24, 1) and example["control"].dtype == np.float32
        np.testing.assert_allclose(example["control"][..., 0], recovered, atol=1e-5)
        assert 0 < example["control"].sum() < 24 * 24 and np.array_equal(example["image"], edges[i]["image"])
        edge = edges[i]["control"][..., 0]
        mask = example["control"][..., 0]
        assert (edge <= mask + 1e-6).all() and edge.sum() > 0
        interior = np.ones_like(mask, bool)
        padded = np.pad(mask, 2)
        for di in range(5):
            for dj in range(5):
                interior &= padded[di:di + 24, dj:dj + 24] >= 1.0  # full coverage in the 5x5 neighbourhood
        assert (edge[interior] == 0).all()
    with pytest.raises(ValueError, match="unknown shapes control 'depth'"):
        build_dataset({"name": "shapes", "shapes_control": "depth"})
