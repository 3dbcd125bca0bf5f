"""U-Net tests. Truth comes from diffusers (random-weight UNet2DConditionModel and its
get_timestep_embedding, same inputs), float64 NumPy attention, and diffusers' own parameter
counts for the Stable Diffusion configs (built on torch's meta device, nothing allocated)."""

from __future__ import annotations

import json
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from diffusers import UNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding

from ldm_jax.interop.diffusers_unet import (
    abstract_params,
    load_diffusers_unet,
    params_from_diffusers_state_dict,
    params_to_diffusers_state_dict,
    save_diffusers_unet,
)
from ldm_jax.interop.torch_weights import WeightsError
from ldm_jax.models.attention import Attention
from ldm_jax.models.embeddings import timestep_embedding
from ldm_jax.models.unet import SD2_UNET_CONFIG, SD15_UNET_CONFIG, UNet

# Three levels, SD-like block layout, linear projections, per-block heads, 2-deep transformers.
TINY_LINEAR = dict(
    sample_size=16,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=(2, 4, 4),
    transformer_layers_per_block=(1, 2, 2),
    use_linear_projection=True,
)
# SD 1.x style: 1x1-conv projections, a single head count, two resnets per level.
TINY_CONV = dict(
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
    cross_attention_dim=32,
    attention_head_dim=4,
    use_linear_projection=False,
)
# Class-conditional, no text: class embedding, channel-concat input (6 = 4 latent + 2 extra),
# learned-variance output (8 = 2 x 4), scale-shift resnets, resnet-only mid block.
TINY_CLASS = dict(
    sample_size=16,
    in_channels=6,
    out_channels=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
    mid_block_type="UNetMidBlock2D",
    mid_block_scale_factor=1.5,
    norm_num_groups=8,
    num_class_embeds=10,
    resnet_time_scale_shift="scale_shift",
    time_embedding_dim=48,
)
CONFIGS = {"linear_projection": TINY_LINEAR, "conv_projection": TINY_CONV, "class_conditional": TINY_CLASS}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Move norms off (1, 0) and biases off 0, so a swapped scale/bias or a dropped bias shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name:
                p.add_(0.1 * noise)
            elif name.endswith("bias"):
                p.add_(0.05 * noise)


def _random_params(abstract, seed: int) -> dict:
    """Random values for an abstract (unboxed) param tree: fan-in scaled kernels, norms near
    (1, 0), small biases. Cheaper than running ``init`` (whose RNG code is slow to compile)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in traverse_util.flatten_dict(abstract).items():
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if path[-1] == "kernel":
            value = noise / np.sqrt(math.prod(leaf.shape[:-1]))
        elif path[-1] == "scale":
            value = 1.0 + 0.1 * noise
        elif path[-1] == "bias":
            value = 0.05 * noise
        else:
            value = noise
        out[path] = jnp.asarray(value)
    return traverse_util.unflatten_dict(out)


def _inputs(cfg: dict, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, cfg.get("in_channels", 4), 16, 16)).astype(np.float32)
    t = np.array([3.7, 999.0], np.float32)  # fractional timesteps on purpose
    has_text = any(b.startswith("CrossAttn") for b in cfg["down_block_types"])
    ctx = rng.standard_normal((2, 5, cfg["cross_attention_dim"])).astype(np.float32) if has_text else None
    labels = np.array([3, cfg["num_class_embeds"] - 1]) if cfg.get("num_class_embeds") else None
    return x, t, ctx, labels


def _torch_forward(model, x, t, ctx, labels) -> np.ndarray:
    with torch.no_grad():
        out = model(
            torch.from_numpy(x),
            torch.from_numpy(t),
            None if ctx is None else torch.from_numpy(ctx),
            class_labels=None if labels is None else torch.from_numpy(labels),
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)


def _jax_forward_impl(unet, params, x, t, ctx, labels):
    return unet.apply({"params": params}, x, t, ctx, labels)


_jax_forward_jit = jax.jit(_jax_forward_impl, static_argnums=0)


def _jax_forward(unet, params, x, t, ctx, labels) -> np.ndarray:
    x = jnp.asarray(x.transpose(0, 2, 3, 1))
    ctx = None if ctx is None else jnp.asarray(ctx)
    labels = None if labels is None else jnp.asarray(labels)
    return np.asarray(_jax_forward_jit(unet, params, x, jnp.asarray(t), ctx, labels))


def _rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """name -> (diffusers model, its save_pretrained folder, our (unet, params) loaded from it)."""
    out = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = UNet2DConditionModel(**cfg).eval()
        _randomize(model, seed=100 + i)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, folder, load_diffusers_unet(folder))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unet_matches_diffusers_random_weights(reference, name):
    model, _, (unet, params) = reference[name]
    x, t, ctx, labels = _inputs(CONFIGS[name])
    want = _torch_forward(model, x, t, ctx, labels)
    got = _jax_forward(unet, params, x, t, ctx, labels)
    err = _rel_err(got, want)
    print(f"{name}: max relative error vs diffusers {err:.2e}")
    assert got.shape == want.shape
    assert err <= 1e-4


def test_export_roundtrip_diffusers_from_pretrained_same_outputs(reference, tmp_path):
    model, _, (unet, params) = reference["linear_projection"]
    save_diffusers_unet(tmp_path, unet, params)
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    exported = {k: v.numpy() for k, v in reloaded.state_dict().items()}
    assert exported.keys() == original.keys()
    for k in original:
        np.testing.assert_array_equal(exported[k], original[k], err_msg=k)
    x, t, ctx, labels = _inputs(TINY_LINEAR, seed=1)
    err = _rel_err(_jax_forward(unet, params, x, t, ctx, labels), _torch_forward(reloaded, x, t, ctx, labels))
    print(f"round trip: max relative error vs re-loaded diffusers {err:.2e}")
    assert err <= 1e-4
    # ...and back into ldm_jax, bit for bit.
    unet2, params2 = load_diffusers_unet(tmp_path)
    assert unet2 == unet
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_null_class_label_extension_roundtrips_through_diffusers(tmp_path):
    # num_classes=10 -> an 11-row table whose last row is the classifier-free-guidance null label.
    cfg = {k: v for k, v in TINY_CLASS.items() if k != "num_class_embeds"}
    unet = UNet.from_diffusers_config(cfg, num_classes=10)
    assert unet.null_class_label == 10
    params = _random_params(abstract_params(unet), seed=5)
    assert params["class_embedding"]["embedding"].shape == (11, 48)
    save_diffusers_unet(tmp_path, unet, params)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_class_embeds"] == 11 and config["_ldm_jax_num_classes"] == 10
    # diffusers builds an 11-row table holding our rows (the forward pass itself is checked
    # against diffusers by test_unet_matches_diffusers_random_weights[class_conditional]).
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path)
    np.testing.assert_array_equal(
        reloaded.class_embedding.weight.detach().numpy(), params["class_embedding"]["embedding"]
    )
    unet2, _ = load_diffusers_unet(tmp_path)
    assert unet2.num_classes == 10 and unet2.num_class_embeds is None


def test_loader_reads_bin_like_safetensors(reference, tmp_path):
    model, _, (unet, params) = reference["conv_projection"]
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "diffusion_pytorch_model.bin").exists()
    _, params_bin = load_diffusers_unet(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, params_bin, params)


@pytest.fixture(scope="module")
def linear_state_dict(reference):
    model = reference["linear_projection"][0]
    return {k: v.numpy() for k, v in model.state_dict().items()}


def test_loader_missing_key_names_it(reference, linear_state_dict):
    unet = reference["linear_projection"][2][0]
    key = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    sd = {k: v for k, v in linear_state_dict.items() if k != key}
    with pytest.raises(WeightsError, match=f"missing key '{key}'"):
        params_from_diffusers_state_dict(unet, sd)


def test_loader_extra_key_names_it(reference, linear_state_dict):
    unet = reference["linear_projection"][2][0]
    sd = dict(linear_state_dict, **{"down_blocks.0.attentions.0.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(WeightsError, match="down_blocks.0.attentions.0.extra.weight"):
        params_from_diffusers_state_dict(unet, sd)


def test_loader_wrong_shape_names_it(reference, linear_state_dict):
    unet = reference["linear_projection"][2][0]
    key = "down_blocks.1.attentions.0.proj_in.weight"
    sd = dict(linear_state_dict, **{key: np.zeros((64, 63), np.float32)})
    with pytest.raises(WeightsError, match=f"shape mismatch for key '{key}'"):
        params_from_diffusers_state_dict(unet, sd)


@pytest.mark.parametrize(
    "option, value",
    [("addition_embed_type", "text_image"), ("class_embed_type", "timestep"), ("only_cross_attention", True)],
)
def test_unsupported_diffusers_option_raises_naming_it(option, value):
    with pytest.raises(ValueError, match=option):
        UNet.from_diffusers_config({**SD15_UNET_CONFIG, option: value})


def test_unknown_config_key_and_block_type_raise():
    with pytest.raises(ValueError, match="made_up_option"):
        UNet.from_diffusers_config({**SD15_UNET_CONFIG, "made_up_option": 1})
    down = ["AttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
    with pytest.raises(ValueError, match="AttnDownBlock2D"):
        UNet.from_diffusers_config({**SD15_UNET_CONFIG, "down_block_types": down})


def test_bad_call_arguments_raise_value_error():
    unet = UNet.from_diffusers_config(TINY_CONV)
    good = unet.dummy_inputs(batch_size=2, spatial=8)
    init = lambda **kw: jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), **{**good, **kw}))
    with pytest.raises(ValueError, match="cross_attention_dim"):
        init(context=jnp.zeros((2, 3, 16)))
    with pytest.raises(ValueError, match="context"):
        init(context=None)
    with pytest.raises(ValueError, match="divisible"):
        init(x=jnp.zeros((2, 9, 8, 4)))
    with pytest.raises(ValueError, match="class_labels"):
        init(class_labels=jnp.zeros((2,), jnp.int32))
    class_unet = UNet.from_diffusers_config(TINY_CLASS)
    with pytest.raises(ValueError, match="class_labels"):
        jax.eval_shape(lambda: class_unet.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 6)), jnp.zeros((1,))))


@pytest.fixture(scope="module")
def sd_abstract():
    """name -> (our boxed abstract variables, diffusers config)."""
    out = {}
    for name, cfg in (("sd15", SD15_UNET_CONFIG), ("sd2", SD2_UNET_CONFIG)):
        unet = UNet.from_diffusers_config(cfg)
        out[name] = (jax.eval_shape(lambda u=unet: u.init(jax.random.PRNGKey(0), **u.dummy_inputs())), cfg)
    return out


@pytest.mark.parametrize("name, known", [("sd15", 859_520_964), ("sd2", 865_910_724)])
def test_sd_unet_param_count_matches_diffusers(sd_abstract, name, known):
    boxed, cfg = sd_abstract[name]
    ours = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nn.meta.unbox(boxed)))
    with torch.device("meta"):
        reference_model = UNet2DConditionModel(**cfg)
    theirs = sum(p.numel() for p in reference_model.parameters())
    print(f"{name}: {ours:,} parameters (diffusers {theirs:,})")
    assert ours == theirs == known


def test_every_param_has_logical_axis_names(sd_abstract):
    allowed = {"conv_height", "conv_width", "embed", "mlp", "heads", "vocab", "norm"}
    boxed, _ = sd_abstract["sd15"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    assert len(leaves) > 600
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= allowed, leaf.names
    # A class-conditional model's embedding table too.
    class_unet = UNet.from_diffusers_config(TINY_CLASS)
    boxed = jax.eval_shape(lambda: class_unet.init(jax.random.PRNGKey(0), **class_unet.dummy_inputs()))
    assert boxed["params"]["class_embedding"]["embedding"].names == ("vocab", "embed")


def test_timestep_embedding_matches_diffusers():
    t = np.array([0.0, 1.0, 2.5, 17.25, 999.0], np.float32)
    for dim, flip, shift in [(32, True, 0), (32, False, 1), (33, True, 1), (320, True, 0)]:
        want = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        got = timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        assert got.shape == (5, dim) and got.dtype == jnp.float32
        # |phase| reaches ~1e3, where float32 sin/cos implementations may differ by ~1e-4.
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=2e-4, rtol=0)


def test_attention_matches_float64_softmax_attention():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 16)).astype(np.float32)
    ctx = rng.standard_normal((2, 5, 12)).astype(np.float32)
    attn = Attention(heads=4, head_dim=8)
    params = _random_params(nn.meta.unbox(jax.eval_shape(attn.init, jax.random.PRNGKey(1), x, ctx))["params"], 1)
    got = np.asarray(attn.apply({"params": params}, x, ctx))

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    split = lambda a: a.reshape(a.shape[0], a.shape[1], 4, 8)
    q = split(x @ p["to_q"]["kernel"])
    k = split(ctx @ p["to_k"]["kernel"])
    v = split(ctx @ p["to_v"]["kernel"])
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(8)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    o = np.einsum("bhts,bshd->bthd", probs, v).reshape(2, 6, 32)
    want = o @ p["to_out_0"]["kernel"] + p["to_out_0"]["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bf16_compute_close_to_float32(reference):
    _, _, (unet, params) = reference["conv_projection"]
    x, t, ctx, labels = _inputs(TINY_CONV)
    f32 = _jax_forward(unet, params, x, t, ctx, labels)
    unet_bf16 = unet.clone(dtype=jnp.bfloat16)
    x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
    out = _jax_forward_jit(unet_bf16, params, x_nhwc, jnp.asarray(t), jnp.asarray(ctx), None)
    assert out.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    err = _rel_err(out, f32)
    print(f"bf16 compute: max error / max|f32 output| = {err:.2e}")
    # bf16 keeps 8 significant bits (unit roundoff u = 2^-8 = 3.9e-3). The output passes through
    # a few tens of bf16 roundings (convs, projections, residual adds) that accumulate roughly as
    # a random walk, sqrt(30) * u = 2e-2; we measure ~1.3e-2. 5e-2 leaves margin for that and
    # still fails on a structural bug (a wrong cast or dropped branch gives O(1) errors).
    assert err <= 5e-2


def test_remat_same_output_and_grads():
    # One level (down, mid and up blocks all with cross-attention) keeps the two gradient compiles cheap.
    unet = UNet.from_diffusers_config(
        dict(
            block_out_channels=(16,),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",),
            norm_num_groups=4,
            cross_attention_dim=8,
            attention_head_dim=2,
        )
    )
    inputs = unet.dummy_inputs(batch_size=2, spatial=4)
    rng = np.random.default_rng(3)
    inputs = {k: jnp.asarray(rng.standard_normal(v.shape), v.dtype) for k, v in inputs.items()}
    params = _random_params(abstract_params(unet), seed=4)

    results = {}
    for remat in (False, True):
        module = unet.clone(remat=remat)

        def loss(params):
            out = module.apply({"params": params}, **inputs)
            return jnp.mean(out**2), out

        # remat must really be there: one checkpoint primitive (named remat2 or checkpoint,
        # depending on the JAX version) per down, mid and up block.
        forward = str(jax.make_jaxpr(loss)(params))
        assert len(re.findall(r"= (?:remat\w*|checkpoint)\[", forward)) == (3 if remat else 0)
        results[remat] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    (value, out), grads = results[True]
    (value_ref, out_ref), grads_ref = results[False]
    np.testing.assert_allclose(out, out_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, grads_ref)


def test_abstract_params_match_state_dict_keys(reference, linear_state_dict):
    # The exporter's key set equals diffusers' state dict key set for the same config.
    unet, params = reference["linear_projection"][2]
    sd = params_to_diffusers_state_dict(unet, params)
    assert sd.keys() == linear_state_dict.keys()
    assert len(jax.tree.leaves(abstract_params(unet))) == len(linear_state_dict)
