"""LoRA tests. Truth: diffusers + peft (a random-weight UNet2DConditionModel with a peft adapter,
files written by diffusers' save_lora_weights and read by its lora_state_dict /
load_lora_into_unet), transformers + peft for the text encoder, and float64 NumPy for merge
arithmetic and peft's initialisation bounds."""

from __future__ import annotations

import copy
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders import StableDiffusionLoraLoaderMixin as LoraLoader
from flax import traverse_util
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors.numpy import save_file

from ldm_jax.interop.diffusers_unet import params_from_diffusers_state_dict
from ldm_jax.interop.lora_formats import load_lora, lora_from_state_dict, module_name, read_lora_file, save_lora
from ldm_jax.interop.torch_weights import WeightsError
from ldm_jax.models import lora as L
from ldm_jax.models import partitioning as P
from ldm_jax.models.unet import UNet

TINY = dict(  # small widths and 8x8 inputs: every kind of layer, compiled and run in little time
    sample_size=8,
    block_out_channels=(16, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    norm_num_groups=8,
    cross_attention_dim=16,
    attention_head_dim=4,
)
# Attention, feed-forward, 3x3 and 1x1 convs: every kind of layer LoRA can touch.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv_shortcut", "proj_in"]


def _rel_err(got, want) -> float:
    want = np.asarray(want, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def _randomize_torch(model, seed, only_lora=False):
    """Norms/biases off (1, 0) for the base; LoRA A and B random non-zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "lora_" in name:
                p.copy_(0.3 * noise / math.sqrt(max(1, p[0].numel())))
            elif only_lora:
                continue
            elif "norm" in name:
                p.add_(0.1 * noise)
            elif name.endswith("bias"):
                p.add_(0.05 * noise)


@pytest.fixture(scope="module")
def ref():
    torch.manual_seed(0)
    model = UNet2DConditionModel(**TINY).eval()
    _randomize_torch(model, 1)
    base_sd = {k: v.numpy() for k, v in model.state_dict().items()}
    unet = UNet.from_diffusers_config(model.config)
    params = params_from_diffusers_state_dict(unet, base_sd)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    t = np.array([3.0, 700.0], np.float32)
    ctx = rng.standard_normal((2, 5, 16)).astype(np.float32)
    fwd = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c))
    # Eager: every test's LoRA has other layers, and a jitted merge would compile once per LoRA.
    merge = L.merge

    def ours(lora):
        """Our U-Net output with ``lora`` merged (one compiled U-Net for every LoRA)."""
        x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
        return np.asarray(fwd(merge(params, lora), x_nhwc, jnp.asarray(t), jnp.asarray(ctx)))

    def theirs(m):
        with torch.no_grad():
            out = m(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample
        return out.numpy().transpose(0, 2, 3, 1)

    return dict(model=model, unet=unet, params=params, ours=ours, theirs=theirs, base_out=theirs(model))


def _diffusers_load(model, folder, **kwargs):
    """What ``pipe.load_lora_weights`` does for the U-Net: state dict, network alphas and the
    file's adapter metadata into ``load_lora_into_unet``."""
    state_dict, alphas, metadata = LoraLoader.lora_state_dict(str(folder), return_lora_metadata=True, **kwargs)
    LoraLoader.load_lora_into_unet(state_dict, alphas, model, metadata=metadata)


def _random_lora(params, config, seed) -> L.Lora:
    """Our LoRA with non-zero random B (a trained one), from init_lora's A."""
    lora = L.init_lora(jax.random.PRNGKey(seed), params, config)
    rng = np.random.default_rng(seed)
    factors = {
        p: jnp.asarray(0.3 * rng.standard_normal(v.shape, np.float32) / math.sqrt(v.shape[-2]))
        if p[-1] == L.LORA_B else v
        for p, v in traverse_util.flatten_dict(lora.factors).items()
    }
    return lora.replace(factors=traverse_util.unflatten_dict(factors))


# ----------------------------------------------------------------------------- parameter-tree maths


class _Toy(nn.Module):
    """Attention-like Dense layers and 3x3 / 1x1 convs with the U-Net's names and axis names."""

    @nn.compact
    def __call__(self, x):
        h = P.conv(8, (3, 3), name="conv1")(x)
        h = P.conv(6, (1, 1), name="proj_in")(jax.nn.silu(h))
        b, hh, ww, c = h.shape
        tokens = h.reshape(b, hh * ww, c)
        block = lambda name: P.dense(6, names=("embed", "heads"), use_bias=False, name=name)  # noqa: E731
        q = block("to_q")(tokens)
        k = block("to_k")(tokens)
        attn = jax.nn.softmax(q @ k.transpose(0, 2, 1) / math.sqrt(6.0), axis=-1) @ tokens
        return P.dense(5, names=("heads", "embed"), name="to_out_0")(attn)


@pytest.fixture(scope="module")
def toy():
    model = _Toy()
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 3))
    # Abstract init + NumPy values: no compiled init program (slow to build on a loaded CPU).
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) / math.sqrt(math.prod(s.shape[:-1]) or 1)),
        nn.meta.unbox(boxed),
    )
    return dict(model=model, x=x, boxed=boxed, params=params)


def test_init_matches_peft_kaiming_uniform_bounds_and_zero_b(ref):
    lora = L.init_lora(jax.random.PRNGKey(0), ref["params"], L.LoraConfig(rank=4, target_modules=TARGETS))
    # the same layers peft would adapt (name == target or name ends with "." + target)
    peft_names = {n for n, _ in ref["model"].named_modules() if any(n == t or n.endswith("." + t) for t in TARGETS)}
    assert {module_name(p) for p in lora.layers} == peft_names
    kernels = L.adaptable_layers(ref["params"])
    for path, f in lora.layers.items():
        fan_in = math.prod(kernels[path][:-1])  # peft: kaiming_uniform(a=sqrt(5)) -> 1/sqrt(fan_in)
        a = np.asarray(f[L.LORA_A])
        assert a.shape == kernels[path][:-1] + (4,)
        assert np.abs(a).max() <= 1 / math.sqrt(fan_in) and np.abs(a).max() > 0.5 / math.sqrt(fan_in)
        assert not np.asarray(f[L.LORA_B]).any()


def test_target_patterns_select_like_peft(ref):
    attn = L.match_targets(ref["params"], L.UNET_ATTENTION_TARGETS)
    assert {p[-1] for p in attn} == {"to_q", "to_k", "to_v", "to_out_0"}
    assert len(attn) == 4 * 2 * 4  # 4 transformers x 2 attentions x 4 projections
    ff = L.match_targets(ref["params"], ("ff.net.0.proj",))
    assert ff and all(p[-3:] == ("ff", "net_0", "proj") for p in ff)
    rx = L.match_targets(ref["params"], r"mid_block/.*attn1/to_q")
    assert rx == [("mid_block", "attentions_0", "transformer_blocks_0", "attn1", "to_q")]
    with pytest.raises(ValueError, match="match no Dense/Conv layer"):
        L.match_targets(ref["params"], ("no_such_layer",))


def test_merge_several_loras_and_unmerge_match_float64_numpy(toy):
    params = toy["params"]
    l1 = _random_lora(params, L.LoraConfig(rank=4, alpha=8, target_modules=["to_q", "to_out.0", "conv1", "proj_in"]), 1)
    l2 = _random_lora(params, L.LoraConfig(rank=2, alpha=1, target_modules=("to_q", "conv1")), 2)
    merged = jax.jit(lambda p, a, b: L.merge(p, [(a, 0.7), (b, -1.3)]))(params, l1, l2)
    flat_m = traverse_util.flatten_dict(merged)
    flat_p = traverse_util.flatten_dict(params)
    expected = {k: np.asarray(v, np.float64) for k, v in flat_p.items()}
    for lora, scale, scaling in ((l1, 0.7, 8 / 4), (l2, -1.3, 1 / 2)):
        for path, f in lora.layers.items():
            a = np.asarray(f[L.LORA_A], np.float64)
            b = np.asarray(f[L.LORA_B], np.float64).reshape(a.shape[-1], -1)
            # conv: delta[h, w, i, o] = sum_r A[h, w, i, r] B[r, o] (peft's conv LoRA, transposed)
            expected[path + ("kernel",)] += scale * scaling * np.tensordot(a, b, axes=([a.ndim - 1], [0]))
    changed = 0
    for k, want in expected.items():
        np.testing.assert_allclose(np.asarray(flat_m[k], np.float64), want, rtol=1e-5, atol=1e-6, err_msg=str(k))
        changed += not np.array_equal(want, flat_p[k])
    assert changed == 4
    back = jax.jit(L.unmerge)(merged, [(l1, 0.7), (l2, -1.3)])
    for k, v in traverse_util.flatten_dict(back).items():
        np.testing.assert_allclose(v, flat_p[k], atol=1e-6, err_msg=str(k))
    # the merged model equals the unmerged LoRA forward x W + scaling * (x A) B on a Dense layer
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (7, 6)), np.float64)
    f = l1.layers[("to_out_0",)]
    w = np.asarray(params["to_out_0"]["kernel"], np.float64)
    want = x @ w + 0.7 * 2.0 * (x @ np.asarray(f[L.LORA_A], np.float64)) @ np.asarray(f[L.LORA_B], np.float64)
    f2 = np.asarray(jax.jit(L.merge)(params, [(l1, 0.7)])["to_out_0"]["kernel"], np.float64)
    np.testing.assert_allclose(x @ f2, want, rtol=1e-5, atol=1e-6)


def test_lora_loss_trains_only_factors_and_state_is_lora_sized(toy):
    params, model, x = toy["params"], toy["model"], toy["x"]
    lora = _random_lora(params, L.LoraConfig(rank=2, target_modules=["to_q", "to_k", "conv1"]), 3)

    def loss_fn(p, x):
        return jnp.mean(model.apply({"params": p}, x) ** 2)

    loss = jax.jit(L.lora_loss(loss_fn))
    tx = optax.adam(1e-2)
    state = tx.init(lora)
    grads = jax.jit(jax.grad(L.lora_loss(loss_fn)))(lora, params, x)
    assert isinstance(grads, L.Lora) and grads.scaling == lora.scaling
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads))
    updates, state = tx.update(grads, state, lora)
    new = optax.apply_updates(lora, updates)
    assert float(loss(new, params, x)) < float(loss(lora, params, x))

    lora_bytes = L.optimizer_state_bytes(tx, lora)
    full_bytes = L.optimizer_state_bytes(tx, params)
    assert lora_bytes == 2 * 4 * lora.num_params + 4  # adam mu + nu (float32) + the int32 step count
    assert full_bytes == 2 * 4 * sum(v.size for v in jax.tree.leaves(params)) + 4
    tree = {"base": params, "lora": lora}
    ftx = L.frozen_base_optimizer(tx)
    assert L.optimizer_state_bytes(ftx, tree) == lora_bytes  # multi_transform: no state for the base
    g = {"base": jax.tree.map(jnp.ones_like, params), "lora": grads}
    upd, _ = ftx.update(g, ftx.init(tree), tree)
    assert all(not np.asarray(u).any() for u in jax.tree.leaves(upd["base"]))
    assert all(np.asarray(u).any() for u in jax.tree.leaves(upd["lora"]))


def test_with_logical_axes_follow_the_base_kernel_names(toy):
    lora = L.init_lora(jax.random.PRNGKey(0), toy["params"], L.LoraConfig(target_modules=["to_q", "conv1"]))
    named = L.with_logical_axes(lora, toy["boxed"]).layers
    q = named[("to_q",)]
    assert q[L.LORA_A].names == ("embed", L.RANK_AXIS) and q[L.LORA_B].names == (L.RANK_AXIS, "heads")
    c = named[("conv1",)]
    assert c[L.LORA_A].names == ("conv_height", "conv_width", "embed", L.RANK_AXIS)
    assert c[L.LORA_B].names == (None, None, L.RANK_AXIS, "mlp")


# ----------------------------------------------------------------------------- files vs diffusers + peft


@pytest.fixture(scope="module")
def peft_file(ref, tmp_path_factory):
    """A peft adapter on the diffusers U-Net (ranks 4 and 2 via rank_pattern, alpha 8), random
    non-zero A and B, saved with diffusers' save_lora_weights; plus the adapted model's output."""
    model = copy.deepcopy(ref["model"])
    config = PeftLoraConfig(
        r=4, lora_alpha=8, target_modules=TARGETS,
        rank_pattern={"^mid_block.attentions.0.transformer_blocks.0.attn2.to_k": 2},
    )
    model.add_adapter(config)
    _randomize_torch(model, 7, only_lora=True)
    folder = tmp_path_factory.mktemp("peft_lora")
    LoraLoader.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(model), unet_lora_adapter_metadata=config.to_dict()
    )
    return dict(folder=folder, out=ref["theirs"](model))


def test_peft_lora_file_matches_diffusers_random_weights(ref, peft_file):
    lora = load_lora(peft_file["folder"], {"unet": ref["params"]})["unet"]
    assert lora.scaling_of(("mid_block", "attentions_0", "transformer_blocks_0", "attn2", "to_k")) == 8 / 2
    got = ref["ours"](lora)
    err = _rel_err(got, peft_file["out"])
    effect = _rel_err(ref["base_out"], peft_file["out"])
    print(f"peft file: max relative error {err:.2e} (the LoRA changes the output by {effect:.2e})")
    assert effect > 1e-2  # the adapter matters
    assert err <= 1e-5


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_our_lora_loads_in_diffusers_with_same_output(ref, tmp_path, fmt):
    lora = _random_lora(ref["params"], L.LoraConfig(rank=4, alpha=2, target_modules=TARGETS), 11)
    # Some layers with another rank and alpha. diffusers 0.42 reads a kohya alpha that differs
    # from the most common one only on non-attention layers (its network-alpha names of
    # attention layers carry ".processor.to_k_lora.down.weight" and match no module), so the
    # kohya case varies alpha on conv1 only.
    odd = ["conv1"] if fmt == "kohya" else ["attn2.to_k", "conv1"]
    small = _random_lora(ref["params"], L.LoraConfig(rank=2, alpha=3, target_modules=odd), 12)
    both = L.make_lora({
        **{p: (f[L.LORA_A], f[L.LORA_B], lora.scaling_of(p)) for p, f in lora.layers.items() if p not in small.layers},
        **{p: (f[L.LORA_A], f[L.LORA_B], small.scaling_of(p)) for p, f in small.layers.items()},
    })
    save_lora(tmp_path, {"unet": both}, format=fmt)
    model = copy.deepcopy(ref["model"])
    _diffusers_load(model, tmp_path)
    want = ref["theirs"](model)
    got = ref["ours"](both)
    err = _rel_err(got, want)
    print(f"ours ({fmt}) in diffusers: max relative error {err:.2e}, effect {_rel_err(ref['base_out'], want):.2e}")
    assert _rel_err(ref["base_out"], want) > 1e-2
    assert err <= 1e-5
    # and back into ldm_jax exactly
    again = load_lora(tmp_path, {"unet": ref["params"]})["unet"]
    assert again.scaling == both.scaling
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), again.factors, both.factors)


def test_kohya_file_loads_like_diffusers(ref, tmp_path):
    """A kohya-ss file written here from torch module names (lora_unet_<name with _>), with a
    different alpha per module: ours and diffusers' kohya conversion give the same U-Net."""
    rng = np.random.default_rng(5)
    tensors = {}
    for name, mod in ref["model"].named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) or not name.endswith(
            ("attn1.to_q", "to_out.0", "conv1", "ff.net.2")
        ):
            continue
        w = mod.weight
        r = 3
        k = "lora_unet_" + name.replace(".", "_")
        down = (r, w.shape[1], *w.shape[2:])
        up = (w.shape[0], r) + ((1, 1) if w.ndim == 4 else ())
        tensors[k + ".lora_down.weight"] = (rng.standard_normal(down) / math.sqrt(np.prod(down[1:]))).astype(np.float32)
        tensors[k + ".lora_up.weight"] = (0.5 * rng.standard_normal(up) / math.sqrt(r)).astype(np.float32)
        # kohya: scaling alpha / rank per module. diffusers 0.42 honours a per-module alpha only
        # on non-attention layers (see test_our_lora_loads_in_diffusers_with_same_output), so the
        # attention layers (the majority) share one.
        attention = ".attn" in name
        tensors[k + ".alpha"] = np.asarray(4.0 if attention else rng.uniform(1, 6), np.float32)
    file = tmp_path / "kohya.safetensors"
    save_file(tensors, str(file))
    model = copy.deepcopy(ref["model"])
    _diffusers_load(model, tmp_path, weight_name="kohya.safetensors")
    want = ref["theirs"](model)
    lora = load_lora(file, {"unet": ref["params"]})["unet"]
    assert len(lora.layers) == len(tensors) // 3
    err = _rel_err(ref["ours"](lora), want)
    print(f"kohya file: max relative error {err:.2e}, effect {_rel_err(ref['base_out'], want):.2e}")
    assert _rel_err(ref["base_out"], want) > 1e-2
    assert err <= 1e-5


def test_old_attention_processor_names_load_like_diffusers(ref, peft_file, tmp_path):
    """Pre-peft diffusers files: ``...attn1.processor.to_q_lora.down.weight`` (scaling 1)."""
    tensors, _ = read_lora_file(peft_file["folder"])
    old = {}
    for key, value in tensors.items():
        for proj, name in (("to_q", "to_q_lora"), ("to_k", "to_k_lora"), ("to_v", "to_v_lora"),
                           ("to_out.0", "to_out_lora")):
            for attn in ("attn1", "attn2"):
                for ab, du in (("lora_A", "down"), ("lora_B", "up")):
                    src = f".{attn}.{proj}.{ab}.weight"
                    if key.endswith(src):
                        old[key[: -len(src)] + f".{attn}.processor.{name}.{du}.weight"] = value
    assert old and all(".processor." in k for k in old)
    save_file(old, str(tmp_path / "pytorch_lora_weights.safetensors"))
    model = copy.deepcopy(ref["model"])
    _diffusers_load(model, tmp_path)
    want = ref["theirs"](model)
    lora = load_lora(tmp_path, {"unet": ref["params"]})["unet"]
    err = _rel_err(ref["ours"](lora), want)
    print(f"old processor names: max relative error {err:.2e}")
    assert err <= 1e-5


def test_bad_lora_files_raise_weights_error_naming_the_key(ref):
    lora = _random_lora(ref["params"], L.LoraConfig(rank=4, target_modules=["to_q"]), 4)
    from ldm_jax.interop.lora_formats import lora_to_state_dict

    tensors, meta = lora_to_state_dict({"unet": lora})
    key_a = next(k for k in tensors if k.endswith("lora_A.weight"))
    missing = {k: v for k, v in tensors.items() if k != key_a}
    with pytest.raises(WeightsError, match="missing key.*" + key_a.split(".lora_A")[0][5:].replace(".", r"\.")):
        lora_from_state_dict(missing, {"unet": ref["params"]}, metadata=meta)
    bad = dict(tensors, **{key_a: np.zeros((4, 3), np.float32)})
    with pytest.raises(WeightsError, match="shape mismatch for key '" + key_a.replace(".", r"\.")):
        lora_from_state_dict(bad, {"unet": ref["params"]}, metadata=meta)
    unknown = dict(tensors, **{"unet.down_blocks.9.attn1.to_q.lora_A.weight": np.zeros((4, 32), np.float32)})
    with pytest.raises(WeightsError, match=r"'unet\.down_blocks\.9\.attn1\.to_q\.lora_A\.weight'"):
        lora_from_state_dict(unknown, {"unet": ref["params"]}, metadata=meta)
    with pytest.raises(WeightsError, match="text_encoder, which was not given"):
        lora_from_state_dict({"text_encoder.text_model.x.lora_A.weight": np.zeros((1, 1))}, {"unet": ref["params"]})
    kohya_sdxl = {"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": np.zeros((1, 1), np.float32)}
    with pytest.raises(WeightsError, match="lora_unet_input_blocks_4_1_proj_in.*sgm"):
        lora_from_state_dict(kohya_sdxl, {"unet": ref["params"]})


def test_module_names_match_torch_named_modules(ref):
    torch_names = {n for n, m in ref["model"].named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    ours = {module_name(p) for p in L.adaptable_layers(ref["params"])}
    assert ours == torch_names


# ----------------------------------------------------------------------------- text encoder vs transformers + peft


def test_text_encoder_lora_matches_transformers_peft(tmp_path):
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel

    from ldm_jax.interop.transformers_clip import params_from_state_dict
    from ldm_jax.models.clip import CLIPTextConfig, CLIPTextEncoder

    torch.manual_seed(0)
    hf_config = HFConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=2,
                         pad_token_id=1)
    model = CLIPTextModel(hf_config).eval()
    config = CLIPTextConfig.from_dict(hf_config.to_dict())
    base_state = copy.deepcopy(model.state_dict())
    params = params_from_state_dict({k: v.numpy() for k, v in base_state.items()}, config)
    ids = np.random.default_rng(0).integers(3, 99, (2, 16))
    with torch.no_grad():
        base = model(torch.from_numpy(ids)).last_hidden_state.numpy()
    peft_config = PeftLoraConfig(r=4, lora_alpha=6, target_modules=list(L.TEXT_ENCODER_ATTENTION_TARGETS) + ["fc1"])
    # transformers 5.24's model.add_adapter wants peft >= 0.22; inject the adapter with peft itself.
    inject_adapter_in_model(peft_config, model)
    _randomize_torch(model, 9, only_lora=True)
    te_layers = {k.replace(".default", ""): v for k, v in model.state_dict().items() if ".lora_" in k}
    LoraLoader.save_lora_weights(tmp_path, text_encoder_lora_layers=te_layers,
                                 text_encoder_lora_adapter_metadata=peft_config.to_dict())
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).last_hidden_state.numpy()
    lora = load_lora(tmp_path, {"text_encoder": params})["text_encoder"]
    assert len(lora.layers) == 2 * 5
    encoder = CLIPTextEncoder(config)
    got = jax.jit(lambda p, lo, i: encoder.apply({"params": L.merge(p, lo)}, i).last_hidden_state)(
        params, lora, jnp.asarray(ids))
    err = _rel_err(got, want)
    print(f"text encoder LoRA: max relative error {err:.2e}, effect {_rel_err(base, want):.2e}")
    assert _rel_err(base, want) > 1e-2
    assert err <= 1e-5

    # ...and our writers: the same LoRA saved by us loads into a fresh transformers model in diffusers
    for fmt in ("diffusers", "kohya"):
        folder = tmp_path / fmt
        save_lora(folder, {"text_encoder": lora}, format=fmt)
        fresh = CLIPTextModel(hf_config).eval()
        fresh.load_state_dict(base_state)
        state_dict, alphas, metadata = LoraLoader.lora_state_dict(str(folder), return_lora_metadata=True)
        LoraLoader.load_lora_into_text_encoder(state_dict, alphas, fresh, prefix="text_encoder", metadata=metadata)
        with torch.no_grad():
            again = fresh(torch.from_numpy(ids)).last_hidden_state.numpy()
        print(f"text encoder LoRA written as {fmt}, read by diffusers: max relative error {_rel_err(again, want):.2e}")
        assert _rel_err(again, want) <= 1e-5
