"""SDXL U-Net features: "text_time" micro-conditioning, per-level and per-layer transformer
depths (with diffusers' reversed lists for the up blocks), levels without attention.

Truth: diffusers' ``UNet2DConditionModel`` (random weights, same inputs) and its parameter
counts for the published SDXL base / refiner configs, built on torch's meta device."""

from __future__ import annotations

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from ldm_jax.interop.diffusers_unet import load_diffusers_unet, save_diffusers_unet
from ldm_jax.models.embeddings import sdxl_time_ids
from ldm_jax.models.unet import UNet

# stabilityai/stable-diffusion-xl-base-1.0 unet/config.json (model-defining keys).
SDXL_BASE_UNET_CONFIG = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}
# stabilityai/stable-diffusion-xl-refiner-1.0 unet/config.json: 4 levels, 1280-d context
# (OpenCLIP bigG only), 5 time ids (original size, crop, aesthetic score): 1280 + 5 x 256 = 2560.
SDXL_REFINER_UNET_CONFIG = {
    **SDXL_BASE_UNET_CONFIG,
    "attention_head_dim": [6, 12, 24, 24],
    "block_out_channels": [384, 768, 1536, 1536],
    "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "projection_class_embeddings_input_dim": 2560,
    "transformer_layers_per_block": 4,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}

_TINY_COMMON = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8,
    cross_attention_dim=24,
    attention_head_dim=(2, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8,  # pooled 16 + 6 time ids x 8
)
# SDXL-shaped: a first level without attention, per-level depths [1, 2] (reversed for the up blocks).
TINY_SDXL = dict(_TINY_COMMON, transformer_layers_per_block=(1, 2))
# Per-layer depths with an explicit (asymmetric) up-block list, as SSD-1B-style configs write them.
TINY_PER_LAYER = dict(
    _TINY_COMMON,
    transformer_layers_per_block=((1,), (2,)),
    reverse_transformer_layers_per_block=((3, 1), (1, 1)),
)
CONFIGS = {"sdxl_shaped": TINY_SDXL, "per_layer_depths": TINY_PER_LAYER}


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


def _inputs(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return dict(
        x=rng.standard_normal((2, 4, 8, 8)).astype(np.float32),
        t=np.array([3.7, 999.0], np.float32),
        context=rng.standard_normal((2, 5, cfg["cross_attention_dim"])).astype(np.float32),
        text_embeds=rng.standard_normal((2, 16)).astype(np.float32),
        # (original h, w, crop top, left, target h, w) as SDXL's pipeline builds them.
        time_ids=np.array([[1024, 1024, 0, 0, 1024, 1024], [512, 768, 16, 32, 1024, 768]], np.float32),
    )


def _torch_forward(model, inputs) -> np.ndarray:
    with torch.no_grad():
        out = model(
            torch.from_numpy(inputs["x"]),
            torch.from_numpy(inputs["t"]),
            torch.from_numpy(inputs["context"]),
            added_cond_kwargs={k: torch.from_numpy(inputs[k]) for k in ("text_embeds", "time_ids")},
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)


def _jax_forward_impl(unet, params, inputs):
    return unet.apply({"params": params}, **inputs)


_jax_forward_jit = jax.jit(_jax_forward_impl, static_argnums=0)


def _jax_forward(unet, params, inputs) -> np.ndarray:
    return np.asarray(_jax_forward_jit(unet, params, dict(inputs, x=inputs["x"].transpose(0, 2, 3, 1))))


def _rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """name -> (diffusers model, our (unet, params) loaded from its save_pretrained folder)."""
    out = {}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        torch.manual_seed(10 + i)
        model = UNet2DConditionModel(**cfg).eval()
        _randomize(model, seed=200 + i)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, load_diffusers_unet(folder))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sdxl_unet_matches_diffusers_random_weights(reference, name):
    model, (unet, params) = reference[name]
    inputs = _inputs(CONFIGS[name])
    want = _torch_forward(model, inputs)
    got = _jax_forward(unet, params, inputs)
    err = _rel_err(got, want)
    print(f"{name}: max relative error vs diffusers {err:.2e}")
    assert got.shape == want.shape
    assert err <= 1e-5


def test_sdxl_unet_time_ids_change_the_output(reference):
    # The micro-conditioning really reaches the output (a dropped add_embedding would not show
    # in a parity test whose reference ignored it too; here diffusers agrees on the difference).
    model, (unet, params) = reference["sdxl_shaped"]
    inputs = _inputs(TINY_SDXL)
    other = dict(inputs, time_ids=inputs["time_ids"][::-1].copy())
    delta_ours = _jax_forward(unet, params, other) - _jax_forward(unet, params, inputs)
    delta_theirs = _torch_forward(model, other) - _torch_forward(model, inputs)
    assert np.abs(delta_theirs).max() > 1e-3
    assert _rel_err(delta_ours, delta_theirs) <= 1e-4


def test_sdxl_unet_config_round_trips_through_diffusers(reference, tmp_path):
    model, (unet, params) = reference["per_layer_depths"]
    save_diffusers_unet(tmp_path, unet, params)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["addition_embed_type"] == "text_time"
    assert config["reverse_transformer_layers_per_block"] == [[3, 1], [1, 1]]
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    original = model.state_dict()
    exported = reloaded.state_dict()
    assert exported.keys() == original.keys()
    for k in original:
        assert torch.equal(exported[k], original[k]), k
    unet2, params2 = load_diffusers_unet(tmp_path)
    assert unet2 == unet
    jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.mark.parametrize(
    "name, cfg, known",
    [("base", SDXL_BASE_UNET_CONFIG, 2_567_463_684), ("refiner", SDXL_REFINER_UNET_CONFIG, 2_259_526_660)],
)
def test_sdxl_unet_param_count_matches_diffusers(name, cfg, known):
    unet = UNet.from_diffusers_config(cfg)
    boxed = jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), **unet.dummy_inputs()))
    ours = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nn.meta.unbox(boxed)))
    with torch.device("meta"):
        reference_model = UNet2DConditionModel(**cfg)
    theirs = sum(p.numel() for p in reference_model.parameters())
    print(f"SDXL {name} U-Net: {ours:,} parameters (diffusers {theirs:,})")
    assert ours == theirs == known
    # Our exported config builds the same network in diffusers.
    with torch.device("meta"):
        exported = UNet2DConditionModel.from_config(unet.to_diffusers_config())
    assert {k: v.shape for k, v in exported.state_dict().items()} == {
        k: v.shape for k, v in reference_model.state_dict().items()
    }
    # Same tensors, not only the same total.
    leaves = jax.tree.leaves(nn.meta.unbox(boxed))
    assert len(leaves) == len(list(reference_model.parameters()))
    # Every parameter (add_embedding included) carries logical axis names for sharding.
    boxes = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    assert all(isinstance(b, nn.LogicallyPartitioned) and len(b.names) == b.value.ndim for b in boxes)
    assert boxed["params"]["add_embedding"]["linear_1"]["kernel"].names == ("embed", "mlp")


def test_text_time_inputs_are_validated():
    unet = UNet.from_diffusers_config(TINY_SDXL)
    good = unet.dummy_inputs(batch_size=2, spatial=8)
    assert good["text_embeds"].shape == (2, 16) and good["time_ids"].shape == (2, 6)
    init = lambda **kw: jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), **{**good, **kw}))  # noqa: E731
    with pytest.raises(ValueError, match="text_embeds"):
        init(text_embeds=None)
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        init(time_ids=jnp.zeros((2, 5)))
    with pytest.raises(ValueError, match=r"time_ids must be \[B=2"):
        init(time_ids=jnp.zeros((1, 6)))
    plain = UNet.from_diffusers_config({**TINY_SDXL, "addition_embed_type": None})
    with pytest.raises(ValueError, match="text_time"):
        jax.eval_shape(lambda: plain.init(jax.random.PRNGKey(0), **good))


@pytest.mark.parametrize(
    "change, match",
    [
        ({"addition_time_embed_dim": None}, "addition_time_embed_dim"),
        ({"addition_embed_type": "text_image"}, "addition_embed_type"),
        ({"transformer_layers_per_block": ((1,), (2,)), "reverse_transformer_layers_per_block": None},
         "reverse_transformer_layers_per_block must be given"),
        ({"transformer_layers_per_block": ((1,), (2, 2))}, r"\(2, 2\) must be an int or 1 ints"),
    ],
)
def test_bad_sdxl_options_raise_naming_them(change, match):
    with pytest.raises(ValueError, match=match):
        UNet.from_diffusers_config({**TINY_PER_LAYER, **change})


def test_sdxl_time_ids_order_and_refiner_variant():
    # Order of the SDXL conditioning (SDXL paper sec. 2.2; sgm's ConcatTimestepEmbedderND inputs).
    np.testing.assert_array_equal(np.asarray(sdxl_time_ids((1024, 768), (16, 32), (896, 1152))),
                                  [1024, 768, 16, 32, 896, 1152])
    np.testing.assert_array_equal(np.asarray(sdxl_time_ids((1024, 768), (0, 0), aesthetic_score=6.0)),
                                  [1024, 768, 0, 0, 6.0])
    with pytest.raises(ValueError, match="target_size"):
        sdxl_time_ids((1024, 1024))
    with pytest.raises(ValueError, match="not both"):
        sdxl_time_ids((1024, 1024), (0, 0), (1024, 1024), aesthetic_score=6.0)
    with pytest.raises(ValueError, match="pairs"):
        sdxl_time_ids((1024,), (0, 0), (1024, 1024))
