"""DiT / PixArt-alpha tests. Truth comes from diffusers (random-weight DiTTransformer2DModel,
PixArtTransformer2DModel and legacy Transformer2DModel, same inputs; get_2d_sincos_pos_embed),
diffusers' parameter counts on torch's meta device (nothing allocated or downloaded), float64 NumPy
attention and an explicit-loop patch layout."""

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
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, Transformer2DModel
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from flax import traverse_util
from jax.sharding import PartitionSpec as PS

from ldm_jax.interop.diffusers_dit import (
    abstract_params,
    load_diffusers_dit,
    params_from_diffusers_state_dict,
    save_diffusers_dit,
)
from ldm_jax.interop.torch_weights import WeightsError
from ldm_jax.models.dit import DIT_XL_2_256_CONFIG, DiT, attend, dit_config, sincos_pos_embed_2d, unpatchify
from ldm_jax.models.pixart import PIXART_XL_2_512_CONFIG, PixArtDiT

# Learned-sigma DiT as the brief's tiny config: 8x8 latents, patch 2, 2 layers of 2 heads x 8.
DIT_TINY = dict(
    sample_size=8, patch_size=2, num_layers=2, num_attention_heads=2, attention_head_dim=8,
    in_channels=4, out_channels=8, num_embeds_ada_norm=10,
)
# The other switches: affine norm3, exact GELU, no q/k/v bias, eps 1e-6, out = in, patch 4.
DIT_VARIANT = dict(
    sample_size=8, patch_size=4, num_layers=1, num_attention_heads=2, attention_head_dim=8,
    in_channels=4, num_embeds_ada_norm=5, norm_elementwise_affine=True, activation_fn="gelu",
    attention_bias=False, norm_eps=1e-6,
)
# PixArt with T5-style caption projection, 1024-model micro-conditions, affine norms (width 24: /3 and /4).
PIXART_CAPTION = dict(
    sample_size=8, patch_size=2, num_layers=2, num_attention_heads=3, attention_head_dim=8,
    in_channels=4, out_channels=8, cross_attention_dim=24, caption_channels=12,
    use_additional_conditions=True, norm_elementwise_affine=True,
)
# PixArt attending to the context directly (no caption projection, no micro-conditions).
PIXART_PLAIN = dict(
    sample_size=8, patch_size=2, num_layers=1, num_attention_heads=2, attention_head_dim=8,
    in_channels=4, out_channels=4, cross_attention_dim=20, use_additional_conditions=False,
)
DIT_CONFIGS = {"dit_learned_sigma": DIT_TINY, "dit_variant": DIT_VARIANT}
PIXART_CONFIGS = {"pixart_caption": PIXART_CAPTION, "pixart_plain": PIXART_PLAIN}

def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Move norms off 1 and biases / modulation tables off their init, so a swapped chunk, a dropped
    bias or a wrong table row shows."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and p.ndim == 1:
                p.add_(0.1 * noise)
            elif name.endswith("bias"):
                p.add_(0.05 * noise)
            elif "scale_shift_table" in name:
                p.add_(0.1 * noise)


def _random_params(abstract, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in traverse_util.flatten_dict(abstract).items():
        noise = rng.standard_normal(leaf.shape).astype(np.float32)
        if path[-1] == "kernel":
            value = noise / np.sqrt(math.prod(leaf.shape[:-1]))
        elif path[-1] == "scale":
            value = 1.0 + 0.1 * noise
        elif path[-1] in ("bias", "scale_shift_table"):
            value = 0.05 * noise
        else:
            value = noise
        out[path] = jnp.asarray(value)
    return traverse_util.unflatten_dict(out)


def _rel_err(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


T = np.array([3.7, 999.0], np.float32)  # fractional and near-final timesteps


def _dit_inputs(cfg, spatial=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, cfg["in_channels"], spatial, spatial)).astype(np.float32)
    labels = np.array([3, cfg["num_embeds_ada_norm"]])  # a class and the null label
    return x, labels


def _pixart_inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, cfg["in_channels"], 8, 8)).astype(np.float32)
    ctx_dim = cfg.get("caption_channels") or cfg["cross_attention_dim"]
    ctx = rng.standard_normal((2, 5, ctx_dim)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int64)  # padded first prompt
    extra = {}
    if cfg.get("use_additional_conditions"):
        extra = dict(
            resolution=np.array([[64.0, 48.0], [32.0, 32.0]], np.float32),
            aspect_ratio=np.array([[0.75], [1.0]], np.float32),
        )
    return x, ctx, mask, extra


def _torch_dit(model, x, labels):
    with torch.no_grad():
        out = model(torch.from_numpy(x), timestep=torch.from_numpy(T), class_labels=torch.from_numpy(labels))
    return out.sample.numpy().transpose(0, 2, 3, 1)


def _torch_pixart(model, x, ctx, mask, extra):
    added = {k: torch.from_numpy(v) for k, v in extra.items()} if extra else None
    with torch.no_grad():
        out = model(
            torch.from_numpy(x), torch.from_numpy(ctx), torch.from_numpy(T),
            added_cond_kwargs=added, encoder_attention_mask=torch.from_numpy(mask),
        )
    return out.sample.numpy().transpose(0, 2, 3, 1)


def _apply_impl(module, params, x, t, kwargs):
    return module.apply({"params": params}, x, t, **kwargs)


_apply = jax.jit(_apply_impl, static_argnums=0)


def _jax(module, params, x, **kwargs) -> np.ndarray:
    kwargs = {k: jnp.asarray(v) for k, v in kwargs.items()}
    return np.asarray(_apply(module, params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(T), kwargs))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """name -> (diffusers model, its save_pretrained folder, our (model, params) loaded from it)."""
    out = {}
    classes = {n: DiTTransformer2DModel for n in DIT_CONFIGS} | {n: PixArtTransformer2DModel for n in PIXART_CONFIGS}
    for i, (name, cfg) in enumerate({**DIT_CONFIGS, **PIXART_CONFIGS}.items()):
        torch.manual_seed(i)
        model = classes[name](**cfg).eval()
        _randomize(model, seed=100 + i)
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        out[name] = (model, folder, load_diffusers_dit(folder))
    return out


@pytest.mark.parametrize("name", list(DIT_CONFIGS))
def test_dit_matches_diffusers_random_weights(reference, name):
    model, _, (dit, params) = reference[name]
    assert isinstance(dit, DiT)
    x, labels = _dit_inputs(DIT_CONFIGS[name])
    want = _torch_dit(model, x, labels)
    got = _jax(dit, params, x, class_labels=labels)
    err = _rel_err(got, want)
    print(f"{name}: max relative error vs diffusers {err:.2e}")
    assert got.shape == want.shape
    assert err <= 1e-5


@pytest.mark.parametrize("name", list(PIXART_CONFIGS))
def test_pixart_matches_diffusers_random_weights(reference, name):
    model, _, (pixart, params) = reference[name]
    assert isinstance(pixart, PixArtDiT)
    x, ctx, mask, extra = _pixart_inputs(PIXART_CONFIGS[name])
    want = _torch_pixart(model, x, ctx, mask, extra)
    got = _jax(pixart, params, x, context=ctx, context_mask=mask, **extra)
    err = _rel_err(got, want)
    print(f"{name}: max relative error vs diffusers {err:.2e}")
    assert got.shape == want.shape
    assert err <= 1e-5
    # The mask is live: unmasking the padding changes the first example only.
    unmasked = _jax(pixart, params, x, context=ctx, context_mask=np.ones_like(mask), **extra)
    assert _rel_err(unmasked[1], got[1]) == 0.0 and _rel_err(unmasked[0], got[0]) > 1e-4


def test_dit_other_resolution_matches_diffusers(reference):
    # 16x16 input on a model trained at 8x8: diffusers rescales the position grid to base_size.
    model, _, (dit, params) = reference["dit_learned_sigma"]
    x, labels = _dit_inputs(DIT_TINY, spatial=16, seed=3)
    err = _rel_err(_jax(dit, params, x, class_labels=labels), _torch_dit(model, x, labels))
    print(f"16x16 on an 8x8 model: max relative error vs diffusers {err:.2e}")
    assert err <= 1e-5


def test_legacy_transformer2d_folder_matches_diffusers(tmp_path):
    # facebook/DiT-XL-2-256 ships its transformer as a legacy Transformer2DModel config.
    torch.manual_seed(7)
    cfg = {**DIT_TINY, "num_layers": 1}
    model = Transformer2DModel(**cfg, norm_type="ada_norm_zero", activation_fn="gelu-approximate",
                               attention_bias=True, norm_elementwise_affine=False).eval()
    _randomize(model, seed=7)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["_class_name"] == "Transformer2DModel"
    dit, params = load_diffusers_dit(tmp_path)
    assert dit == DiT.from_diffusers_config(cfg)
    x, labels = _dit_inputs(cfg, seed=4)
    err = _rel_err(_jax(dit, params, x, class_labels=labels), _torch_dit(model, x, labels))
    print(f"legacy Transformer2DModel: max relative error vs diffusers {err:.2e}")
    assert err <= 1e-5


@pytest.mark.parametrize(
    "name, cls", [("dit_learned_sigma", DiTTransformer2DModel), ("pixart_caption", PixArtTransformer2DModel)]
)
def test_export_loads_strictly_in_diffusers_same_weights_and_outputs(reference, tmp_path, name, cls):
    model, _, (ours, params) = reference[name]
    save_diffusers_dit(tmp_path, ours, params)
    reloaded = cls.from_pretrained(tmp_path).eval()
    original = {k: v.numpy() for k, v in model.state_dict().items()}
    exported = {k: v.numpy() for k, v in reloaded.state_dict().items()}
    assert exported.keys() == original.keys()
    for k in original:
        np.testing.assert_array_equal(exported[k], original[k], err_msg=k)
    assert {k: v for k, v in reloaded.config.items() if not k.startswith("_")} == {
        k: v for k, v in model.config.items() if not k.startswith("_")
    }
    # Same weights and config, so diffusers computes the same function (matched to ours above).
    if cls is DiTTransformer2DModel:
        x, labels = _dit_inputs(DIT_TINY, seed=5)
        np.testing.assert_array_equal(_torch_dit(reloaded, x, labels), _torch_dit(model, x, labels))
    else:
        inputs = _pixart_inputs(PIXART_CAPTION, seed=5)
        np.testing.assert_array_equal(_torch_pixart(reloaded, *inputs), _torch_pixart(model, *inputs))
    # ...and back into ldm_jax, bit for bit.
    ours2, params2 = load_diffusers_dit(tmp_path)
    assert ours2 == ours
    jax.tree.map(np.testing.assert_array_equal, params2, params)


@pytest.fixture(scope="module")
def xl_abstract():
    """name -> (our boxed abstract variables, diffusers model class, config)."""
    out = {}
    for name, cls, ref_cls, cfg in (
        ("DiT-XL/2", DiT, DiTTransformer2DModel, DIT_XL_2_256_CONFIG),
        ("PixArt-XL/2-512", PixArtDiT, PixArtTransformer2DModel, PIXART_XL_2_512_CONFIG),
    ):
        module = cls.from_diffusers_config(cfg)
        boxed = jax.eval_shape(lambda m=module: m.init(jax.random.PRNGKey(0), **m.dummy_inputs()))
        out[name] = (boxed, ref_cls, cfg)
    return out


@pytest.mark.parametrize("name, known", [("DiT-XL/2", 749_826_464), ("PixArt-XL/2-512", 610_856_096)])
def test_xl_param_count_matches_diffusers(xl_abstract, name, known):
    boxed, ref_cls, cfg = xl_abstract[name]
    ours = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nn.meta.unbox(boxed)))
    with torch.device("meta"):
        reference_model = ref_cls(**cfg)
    theirs = sum(p.numel() for p in reference_model.parameters())
    print(f"{name}: {ours:,} parameters (diffusers {theirs:,})")
    assert ours == theirs == known


def test_dit_size_presets_match_the_paper_table():
    # Peebles & Xie 2023, Table 1: (layers, hidden size, heads) and Gflops-relevant shapes; XL/2 is
    # exactly the facebook/DiT-XL-2-256 config.
    assert dit_config("DiT-XL/2") == DIT_XL_2_256_CONFIG
    small = DiT.from_diffusers_config(dit_config("DiT-S/4", sample_size=8))
    assert (small.num_layers, small.num_attention_heads * small.attention_head_dim, small.patch_size) == (12, 384, 4)
    with pytest.raises(ValueError, match="DiT-M/2"):
        dit_config("DiT-M/2")


def test_every_param_has_logical_axis_names(xl_abstract):
    allowed = {"conv_height", "conv_width", "embed", "mlp", "heads", "vocab", "norm"}
    for name, (boxed, _, _) in xl_abstract.items():
        leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
        assert len(leaves) > 28 * 10, name
        for leaf in leaves:
            assert isinstance(leaf, nn.LogicallyPartitioned), (name, leaf)
            assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= allowed, (name, leaf.names)
    table = xl_abstract["DiT-XL/2"][0]["params"]["transformer_blocks_0"]["norm1"]["emb"]["class_embedder"]
    assert table["embedding_table"]["embedding"].names == ("vocab", "embed")
    assert table["embedding_table"]["embedding"].value.shape == (1001, 1152)  # 1000 classes + null


@pytest.mark.parametrize(
    "grid, base_size, scale", [((4, 4), 4, 1.0), ((4, 6), 4, 1.0), ((6, 3), 2, 2.0), ((16, 16), 8, 1.0)]
)
def test_sincos_pos_embed_matches_diffusers(grid, base_size, scale):
    want = get_2d_sincos_pos_embed(32, grid, base_size=base_size, interpolation_scale=scale, output_type="pt")
    got = sincos_pos_embed_2d(32, *grid, base_size=base_size, interpolation_scale=scale)
    assert got.shape == (grid[0] * grid[1], 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, want.float().numpy(), rtol=0, atol=1e-6)


def test_unpatchify_matches_explicit_patch_layout():
    # Token (i, j) of a gh x gw grid holds pixel (i*p + a, j*p + b, c) at feature (a*p + b)*C + c.
    gh, gw, p, c = 2, 3, 2, 5
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, gh * p, gw * p, c))
    tokens = np.zeros((1, gh * gw, p * p * c))
    for i in range(gh):
        for j in range(gw):
            for a in range(p):
                for b in range(p):
                    tokens[0, i * gw + j, (a * p + b) * c : (a * p + b + 1) * c] = image[0, i * p + a, j * p + b]
    got = np.asarray(unpatchify(jnp.asarray(tokens), gh, gw, p, c))
    np.testing.assert_array_equal(got, image.astype(np.float32))


def test_attend_matches_float64_softmax_with_key_mask():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 6, 3, 8)).astype(np.float32)
    k = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
    v = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
    mask = np.array([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], bool)
    got = np.asarray(attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), key_mask=jnp.asarray(mask)))
    logits = np.einsum("bthd,bshd->bhts", q.astype(np.float64), k) / np.sqrt(8)
    logits = np.where(mask[:, None, None, :], logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.einsum("bhts,bshd->bthd", probs, v)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="flash_made_up"):
        attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), backend="flash_made_up")


@pytest.fixture(scope="module")
def dit_state_dict(reference):
    return {k: v.numpy() for k, v in reference["dit_learned_sigma"][0].state_dict().items()}


def test_loader_missing_key_names_it(reference, dit_state_dict):
    dit = reference["dit_learned_sigma"][2][0]
    key = "transformer_blocks.1.norm1.emb.class_embedder.embedding_table.weight"
    sd = {k: v for k, v in dit_state_dict.items() if k != key}
    with pytest.raises(WeightsError, match=f"missing key '{key}'"):
        params_from_diffusers_state_dict(dit, sd)


def test_loader_extra_key_names_it(reference, dit_state_dict):
    dit = reference["dit_learned_sigma"][2][0]
    sd = dict(dit_state_dict, **{"transformer_blocks.0.attn1.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(WeightsError, match="transformer_blocks.0.attn1.extra.weight"):
        params_from_diffusers_state_dict(dit, sd)


def test_loader_wrong_shape_names_it(reference, dit_state_dict):
    dit = reference["dit_learned_sigma"][2][0]
    key = "pos_embed.proj.weight"
    sd = dict(dit_state_dict, **{key: np.zeros((16, 4, 3, 3), np.float32)})
    with pytest.raises(WeightsError, match=f"shape mismatch for key '{key}'"):
        params_from_diffusers_state_dict(dit, sd)


@pytest.mark.parametrize(
    "cls, option, value",
    [
        (DiT, "norm_type", "ada_norm"),
        (DiT, "activation_fn", "geglu"),
        (DiT, "made_up_option", 1),
        (PixArtDiT, "attention_type", "gated"),
        (PixArtDiT, "norm_type", "ada_norm_zero"),
    ],
)
def test_unsupported_diffusers_option_raises_naming_it(cls, option, value):
    base = DIT_TINY if cls is DiT else PIXART_PLAIN
    with pytest.raises(ValueError, match=option):
        cls.from_diffusers_config({**base, option: value})


def test_bad_construction_raises_naming_the_value():
    with pytest.raises(ValueError, match="patch_size=3"):
        DiT(sample_size=8, patch_size=3)
    with pytest.raises(ValueError, match="cross_attention_dim=20"):
        PixArtDiT.from_diffusers_config({**PIXART_PLAIN, "caption_channels": 12})
    with pytest.raises(ValueError, match="divisible by 3"):
        PixArtDiT.from_diffusers_config({**PIXART_PLAIN, "use_additional_conditions": True})
    with pytest.raises(ValueError, match="flash_made_up"):
        DiT(attention="flash_made_up")


def test_bad_call_arguments_raise_value_error():
    dit = DiT.from_diffusers_config(DIT_TINY)
    good = dit.dummy_inputs(batch_size=2, spatial=4)
    init = lambda m, **kw: jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), **kw))  # noqa: E731
    with pytest.raises(ValueError, match="class_labels"):
        init(dit, **{**good, "class_labels": None})
    with pytest.raises(ValueError, match="context"):
        init(dit, **good, context=jnp.zeros((2, 3, 16)))
    with pytest.raises(ValueError, match="divisible by patch_size"):
        init(dit, **{**good, "x": jnp.zeros((2, 5, 4, 4))})
    pixart = PixArtDiT.from_diffusers_config(PIXART_CAPTION)
    good = pixart.dummy_inputs(batch_size=2, spatial=4)
    with pytest.raises(ValueError, match="context must be"):
        init(pixart, **{**good, "context": jnp.zeros((2, 3, 24))})
    with pytest.raises(ValueError, match="context_mask"):
        init(pixart, **good, context_mask=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="aspect_ratio"):
        init(pixart, **{**good, "aspect_ratio": None})


def test_adaln_zero_init_makes_the_network_output_zero():
    # The paper's adaLN-Zero init: zero modulation and final projections -> every block is the
    # identity and the prediction is exactly 0, whatever the input.
    dit = DiT(sample_size=4, patch_size=2, num_layers=1, num_attention_heads=1, attention_head_dim=8, num_classes=3)
    inputs = dit.dummy_inputs(batch_size=2, spatial=4)
    inputs["x"] = jnp.asarray(np.random.default_rng(0).standard_normal((2, 4, 4, 4)), jnp.float32)
    out = jax.jit(lambda: dit.init_with_output(jax.random.PRNGKey(0), **inputs)[0])()
    assert out.shape == (2, 4, 4, 4)
    assert not np.asarray(out).any()


def test_bf16_compute_close_to_float32(reference):
    _, _, (dit, params) = reference["dit_learned_sigma"]
    x, labels = _dit_inputs(DIT_TINY)
    f32 = _jax(dit, params, x, class_labels=labels)
    out = _apply(dit.clone(dtype=jnp.bfloat16), params, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(T),
                 {"class_labels": jnp.asarray(labels)})
    assert out.dtype == jnp.bfloat16
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()
    err = _rel_err(out, f32)
    print(f"bf16 compute: max error / max|f32 output| = {err:.2e}")
    # bf16's unit roundoff is 2^-8 = 3.9e-3; ~20 bf16 roundings (projections, residual adds) in two
    # blocks accumulate like a random walk to ~2e-2. A structural bug (wrong cast, dropped branch) is O(1).
    assert err <= 5e-2


def test_remat_same_output_and_grads():
    dit = DiT(sample_size=4, patch_size=2, num_layers=2, num_attention_heads=1, attention_head_dim=8, num_classes=3)
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 4, 4, 4)), jnp.float32)
    t, labels = jnp.array([1.5, 700.0]), jnp.array([0, 3])
    params = _random_params(abstract_params(dit), seed=4)
    results = {}
    for remat in (False, True):
        module = dit.clone(remat=remat)

        def loss(params):
            out = module.apply({"params": params}, x, t, class_labels=labels)
            return jnp.mean(out**2), out

        forward = str(jax.make_jaxpr(loss)(params))
        assert len(re.findall(r"= (?:remat\w*|checkpoint)\[", forward)) == (2 if remat else 0)
        results[remat] = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    (l0, o0), g0 = results[False]
    (l1, o1), g1 = results[True]
    np.testing.assert_allclose(np.asarray(o1), np.asarray(o0), rtol=1e-6, atol=1e-6)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)  # noqa: E731
    jax.tree.map(close, g1, g0)
    assert float(jnp.abs(g0["transformer_blocks_1"]["norm1"]["linear"]["kernel"]).max()) > 0


def test_logical_axes_shard_dit_xl_and_sharded_forward_matches_single_device(xl_abstract, reference):
    from ldm_jax.training import logical_axis_rules, make_mesh, param_shardings

    mesh = make_mesh({"shape": {"data": 2, "fsdp": 2, "tensor": 2}})
    rules = logical_axis_rules({"preset": "fsdp_tensor"})
    # Megatron layout on DiT-XL/2: q/k/v column-parallel, out row-parallel, MLP likewise.
    sh = param_shardings(xl_abstract["DiT-XL/2"][0]["params"], mesh, rules)["transformer_blocks_5"]
    assert sh["attn1"]["to_q"]["kernel"].spec == PS("fsdp", "tensor")
    assert sh["attn1"]["to_out_0"]["kernel"].spec == PS("tensor", "fsdp")
    assert sh["ff"]["net_0"]["proj"]["kernel"].spec == PS("fsdp", "tensor")
    assert sh["ff"]["net_2"]["kernel"].spec == PS("tensor", "fsdp")
    # Sharding must not change the math: the tiny reference DiT with every param laid out by the
    # same rules (width 16 splits over fsdp x tensor) gives the single-device output.
    _, _, (dit, params) = reference["dit_learned_sigma"]
    boxed = jax.eval_shape(lambda: dit.init(jax.random.PRNGKey(0), **dit.dummy_inputs()))["params"]
    sharded = jax.device_put(params, param_shardings(boxed, mesh, rules))
    assert any(len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
               for leaf in jax.tree.leaves(sharded))
    x, labels = _dit_inputs(DIT_TINY)
    single = _jax(dit, params, x, class_labels=labels)
    multi = _jax(dit, sharded, x, class_labels=labels)
    np.testing.assert_allclose(multi, single, rtol=1e-5, atol=1e-5)


def test_pixart_remat_wraps_every_block():
    # Same remat mechanism as DiT (whose outputs and grads are checked above); here only the
    # structure: one checkpoint per block, none without remat. Tracing only, nothing compiled.
    pixart = PixArtDiT.from_diffusers_config(PIXART_CAPTION)
    inputs = pixart.dummy_inputs(batch_size=1, spatial=4)
    params = abstract_params(pixart)
    for remat, expected in ((False, 0), (True, PIXART_CAPTION["num_layers"])):
        module = pixart.clone(remat=remat)
        jaxpr = str(jax.make_jaxpr(lambda p, m=module: m.apply({"params": p}, train=True, **inputs))(params))
        assert len(re.findall(r"= (?:remat\w*|checkpoint)\[", jaxpr)) == expected
