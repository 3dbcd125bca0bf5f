"""CLIP text encoder, its transformers interop, and the CLIP BPE tokenizer, checked against
transformers (random-weight CLIPTextModel; CLIPTokenizer on a locally built vocabulary)."""

import collections
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import regex
import torch
from safetensors.numpy import load_file, save_file
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel
from transformers import CLIPTokenizer as HFCLIPTokenizer

from ldm_jax.interop.torch_weights import WeightsError
from ldm_jax.interop.transformers_clip import (
    load_clip_text_encoder,
    params_from_state_dict,
    save_clip_text_encoder,
    state_dict_from_params,
)
from ldm_jax.models.clip import CLIPTextConfig, CLIPTextEncoder
from ldm_jax.models.tokenizers import CLIPTokenizer

VOCAB, BOS, EOS = 1000, 998, 999


def _normalized_max_error(ours, ref) -> float:
    """max |ours - ref| / max |ref| in float64."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _input_ids() -> np.ndarray:
    """Three prompts shaped like tokenizer output: BOS, words, EOS, then padding (EOS or 0)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, BOS, size=(3, 77))
    ids[:, 0] = BOS
    ids[0, 10], ids[0, 11:] = EOS, EOS  # SD 1.x style: padded with EOS
    ids[1, 76] = EOS  # full-length prompt
    ids[2, 30], ids[2, 31:] = EOS, 0  # SD 2.x style: padded with "!" (id 0)
    return ids.astype(np.int64)


@pytest.fixture(scope="module", params=[("quick_gelu", 2), ("gelu", EOS)], ids=["quick_gelu-legacy_eos", "gelu-eos_id"])
def reference(request, tmp_path_factory):
    """A small random transformers CLIPTextModel saved with save_pretrained, plus its outputs.

    quick_gelu/eos_token_id=2 pools at argmax(ids) (SD 1.x configs); gelu/eos_token_id=999 pools
    at the first EOS (newer configs, OpenCLIP activation)."""
    act, eos_token_id = request.param
    torch.manual_seed(0)
    config = HFCLIPTextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act=act, bos_token_id=BOS, eos_token_id=eos_token_id,
        pad_token_id=EOS,
    )
    model = CLIPTextModel(config).eval()
    folder = tmp_path_factory.mktemp(f"clip_{act}")
    model.save_pretrained(folder)
    ids = _input_ids()
    mask = np.ones_like(ids)
    mask[0, 11:] = 0
    mask[2, 31:] = 0
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
        out_masked = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        penultimate = model.final_layer_norm(out.hidden_states[-2])
    return dict(model=model, folder=folder, ids=ids, mask=mask, out=out, out_masked=out_masked,
                penultimate=penultimate.numpy())


def test_clip_matches_transformers_random_weights(reference):
    module, params = load_clip_text_encoder(reference["folder"], context_layer="penultimate")
    ids = jnp.asarray(reference["ids"])
    out = jax.jit(lambda p, x: module.apply({"params": p}, x, output_hidden_states=True))(params, ids)
    ref = reference["out"]
    errors = {
        "last_hidden_state": _normalized_max_error(out.last_hidden_state, ref.last_hidden_state),
        "pooled_output": _normalized_max_error(out.pooled_output, ref.pooler_output),
        "penultimate+final_ln": _normalized_max_error(out.context, reference["penultimate"]),
    }
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        errors[f"hidden_states[{i}]"] = _normalized_max_error(ours, theirs)
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    print(module.config.hidden_act, {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) <= 1e-4, errors
    assert out.context.shape == (3, 77, 64) and out.pooled_output.shape == (3, 64)

    # With a padding mask on top of the causal mask.
    masked = module.apply({"params": params}, ids, attention_mask=jnp.asarray(reference["mask"]))
    err = _normalized_max_error(masked.last_hidden_state, reference["out_masked"].last_hidden_state)
    print("masked last_hidden_state", f"{err:.2e}")
    assert err <= 1e-4


def test_clip_context_layer_last_is_last_hidden_state(reference):
    module, params = load_clip_text_encoder(reference["folder"])
    out = module.apply({"params": params}, jnp.asarray(reference["ids"]))
    assert out.hidden_states is None
    assert _normalized_max_error(out.context, reference["out"].last_hidden_state) <= 1e-4
    # SDXL-style penultimate context skips the final LayerNorm: raw hidden_states[-2].
    raw = CLIPTextEncoder(module.config, context_layer="penultimate", context_final_norm=False)
    out = raw.apply({"params": params}, jnp.asarray(reference["ids"]))
    assert _normalized_max_error(out.context, reference["out"].hidden_states[-2]) <= 1e-4


def test_clip_export_round_trip_loads_in_transformers(reference, tmp_path):
    module, params = load_clip_text_encoder(reference["folder"])
    save_clip_text_encoder(tmp_path, module.config, params)
    reloaded, info = CLIPTextModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    original = reference["model"].state_dict()
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, original[key]), key
    assert reloaded.config.hidden_act == reference["model"].config.hidden_act
    assert reloaded.config.eos_token_id == reference["model"].config.eos_token_id
    with torch.no_grad():
        pooled = reloaded(torch.from_numpy(reference["ids"])).pooler_output
    assert torch.equal(pooled, reference["out"].pooler_output)
    # And back into ours: identical arrays.
    module2, params2 = load_clip_text_encoder(tmp_path)
    assert module2.config == module.config
    jax.tree.map(np.testing.assert_array_equal, params2, params)


def test_clip_state_dict_errors_name_the_key(reference, tmp_path):
    module, params = load_clip_text_encoder(reference["folder"])
    config = module.config
    # transformers >= 5 writes unprefixed keys; Stable Diffusion checkpoints use "text_model.".
    unprefixed = load_file(os.path.join(reference["folder"], "model.safetensors"))
    assert "final_layer_norm.weight" in unprefixed
    prefixed = state_dict_from_params(params, config)
    assert set(prefixed) == {"text_model." + k for k in unprefixed}
    with_buffer = dict(prefixed, **{"text_model.embeddings.position_ids": np.arange(77)[None]})
    jax.tree.map(np.testing.assert_array_equal, params_from_state_dict(with_buffer, config), params)
    compvis = {"cond_stage_model.transformer." + k: v for k, v in with_buffer.items()}
    loaded = params_from_state_dict(compvis, config, prefix="cond_stage_model.transformer.text_model.")
    jax.tree.map(np.testing.assert_array_equal, loaded, params)

    missing = dict(prefixed)
    del missing["text_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(WeightsError, match=r"missing key 'text_model.encoder.layers.1.mlp.fc2.bias'"):
        params_from_state_dict(missing, config)
    extra = dict(prefixed, **{"text_model.encoder.layers.2.mlp.fc1.weight": np.zeros((128, 64), np.float32)})
    with pytest.raises(WeightsError, match=r"unexpected key 'text_model.encoder.layers.2.mlp.fc1.weight'"):
        params_from_state_dict(extra, config)
    bad_shape = dict(prefixed, **{"text_model.encoder.layers.0.self_attn.q_proj.weight": np.zeros((64, 32), np.float32)})
    with pytest.raises(WeightsError, match=r"shape mismatch for key 'text_model.encoder.layers.0.self_attn.q_proj"):
        params_from_state_dict(bad_shape, config)
    # A checkpoint with a layer config.json does not describe.
    save_file(extra, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    with pytest.raises(WeightsError, match="unexpected key"):
        load_clip_text_encoder(tmp_path)


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_clip_vit_l14_param_count():
    with torch.device("meta"):
        reference = CLIPTextModel(HFCLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
        ))
    expected = sum(p.numel() for p in reference.parameters())
    module = CLIPTextEncoder(CLIPTextConfig.vit_l14())
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))
    ours = _count(nn.unbox(shapes["params"]))
    print("ViT-L/14 text tower parameters: ours", ours, "transformers", expected)
    assert ours == expected == 123_060_480


def test_clip_params_carry_logical_axis_names():
    config = CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16)
    boxed = jax.eval_shape(CLIPTextEncoder(config).init, jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert len(leaves) == 2 + 2 * 16 + 2
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        assert len(leaf.names) == leaf.value.ndim and all(isinstance(n, str) for n in leaf.names)
    q = boxed["encoder"]["layers_0"]["self_attn"]
    assert q["q_proj"]["kernel"].names == ("embed", "heads") and q["out_proj"]["kernel"].names == ("heads", "embed")


# --------------------------------------------------------------------------------------------
# BPE tokenizer


def _byte_alphabet() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable character map, written out independently of the code under test."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    mapping = {b: chr(b) for b in keep}  # insertion order = CLIP's vocabulary order
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _learn_bpe(words: list[str], num_merges: int):
    """Plain frequency-based BPE learning over words ending in </w>; returns (vocab, merges)
    in CLIP's layout: 256 byte chars, their </w> forms, merge products, then specials."""
    alphabet = _byte_alphabet()
    counts = collections.Counter()
    for w in words:
        symbols = [alphabet[b] for b in w.encode("utf-8")]
        symbols[-1] += "</w>"
        counts[tuple(symbols)] += 1
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, c in counts.items():
            for pair in zip(word[:-1], word[1:]):
                pairs[pair] += c
        if not pairs:
            break
        best = max(sorted(pairs), key=pairs.__getitem__)
        merges.append(best)
        merged_counts = collections.Counter()
        for word, c in counts.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged_counts[tuple(out)] += c
        counts = merged_counts
    chars = list(alphabet.values())  # CLIP order: printable bytes first, so "!" has id 0
    tokens = chars + [c + "</w>" for c in chars]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


CORPUS = (
    "a photograph of an astronaut riding a horse on the moon, trending on artstation, highly detailed. "
    "the quick brown fox jumps over the lazy dog; it's 2024 and we're testing tokenizers! they'll see. "
    "a painting of a castle in the mountains at sunset by greg rutkowski, 4k, hdr, octane render... "
    "ein foto von einer katze. café naïve résumé straße 東京 タワー дом кошка "
)

TRICKY = [
    "a photograph of an astronaut riding a horse",
    "",
    "   ",
    "  Hello,   WORLD!!  ",
    "it's we're they'll I'd you've I'm don't CAN'T",
    "1234567 3.14 $100 50% 1st 2nd",
    "café naïve ÉCOLE Straße",
    "e\u0301 combining accent (NFC)",
    "東京タワー дом КОШКА 🤖🚀 emoji",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u2003em-space",
    "...!?;:-- ((masterpiece)), [best quality] {x}",
    "'''s '' ' s \"quoted\"",
    "a <|endoftext|> in the middle<|startoftext|>",
    "upper <|EndOfText|> also counts",
    "ΟΔΟΣ Σ final sigma",
    "x" * 300,
    " ".join(["astronaut"] * 100),
    "trending on artstation, " * 20,
]


@pytest.fixture(scope="module")
def bpe_folder(tmp_path_factory):
    words = regex.findall(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", CORPUS.lower())
    vocab, merges = _learn_bpe(words, 400)
    assert len(merges) > 150
    folder = tmp_path_factory.mktemp("bpe")
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    return folder


def _added_token(content, normalized, **extra):
    return dict(content=content, lstrip=False, normalized=normalized, rstrip=False, single_word=False, **extra)


def _tokenizer_configs(kind):
    """(tokenizer_config.json, special_tokens_map.json or None) as the Stable Diffusion repos ship them."""
    bos = _added_token("<|startoftext|>", True, __type="AddedToken")
    eos = _added_token("<|endoftext|>", True, __type="AddedToken")
    config = {"add_prefix_space": False, "bos_token": bos, "do_lower_case": True, "eos_token": eos,
              "errors": "replace", "model_max_length": 77, "pad_token": "<|endoftext|>",
              "tokenizer_class": "CLIPTokenizer", "unk_token": eos}
    strip = lambda t: {k: v for k, v in t.items() if k != "__type"}  # noqa: E731
    specials = {"bos_token": strip(bos), "eos_token": strip(eos), "pad_token": "<|endoftext|>", "unk_token": strip(eos)}
    if kind == "sd1":  # pads with EOS
        return config, specials
    if kind == "sd2":  # pads with "!" (id 0)
        return config, dict(specials, pad_token="!")
    if kind == "added_tokens_decoder":  # newer transformers: flags live in tokenizer_config.json
        decoder = {str(i): dict(_added_token(t, False), special=True) for t, i in (("!", 0), ("<|endoftext|>", 1))}
        return {"model_max_length": 77, "pad_token": "!", "added_tokens_decoder": decoder}, None
    if kind == "bare":  # vocab.json + merges.txt only: transformers' defaults
        return {}, None
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["sd1", "sd2", "added_tokens_decoder", "bare"])
def test_bpe_tokenizer_matches_transformers(bpe_folder, kind, tmp_path):
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((bpe_folder / name).read_bytes())
    config, specials = _tokenizer_configs(kind)
    if config:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if specials:
        (folder / "special_tokens_map.json").write_text(json.dumps(specials))

    theirs = HFCLIPTokenizer.from_pretrained(folder)
    ours = CLIPTokenizer.from_pretrained(tmp_path)  # a pipeline folder: finds tokenizer/
    assert ours.pad_token == theirs.pad_token and ours.pad_id == theirs.pad_token_id
    assert ours.pad_id == (0 if kind in ("sd2", "added_tokens_decoder") else ours.eos_id)
    batch = theirs(TRICKY, padding="max_length", max_length=77, truncation=True)
    tokens = ours(TRICKY)
    assert tokens.ids.dtype == np.int32 and tokens.ids.shape == (len(TRICKY), 77)
    mismatches = [t for t, a, b in zip(TRICKY, tokens.ids.tolist(), batch["input_ids"]) if a != b]
    assert not mismatches, mismatches
    np.testing.assert_array_equal(tokens.mask, np.asarray(batch["attention_mask"], dtype=bool))
    # Untruncated token streams too (no BOS/EOS, no length limit).
    for text in TRICKY:
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], text
    # Random strings over an alphabet of troublemakers.
    rng = np.random.default_rng(1)
    pool = list("aeiouxyzAEQ019 !?.,'-\t\nßé東🤖Σ\u0301\u00a0") + ["'s", "'LL", " ", "<|endoftext|>", "<|EndOfText|>",
                                                        "<|startoftext|>", "astronaut", "...", "!!"]
    for _ in range(200):
        text = "".join(rng.choice(pool, size=rng.integers(0, 30)))
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], repr(text)
    # The BPE actually merged: fewer tokens than bytes for ordinary words.
    assert len(ours.encode("astronaut riding")) < len("astronautriding")
    assert tokens.ids[1, :3].tolist() == [ours.bos_id, ours.eos_id, ours.pad_id]


def test_bpe_tokenizer_decode_matches_transformers(bpe_folder):
    theirs = HFCLIPTokenizer.from_pretrained(bpe_folder)
    ours = CLIPTokenizer.from_files(bpe_folder / "vocab.json", bpe_folder / "merges.txt")
    for text in ["a photograph of an astronaut", "café 東京 🤖 it's 3.14!", "  spaced   out  "]:
        ids = ours(text).ids[0]
        assert ours.decode(ids) == theirs.decode(ids.tolist(), skip_special_tokens=True)


def test_bpe_tokenizer_rejects_bad_inputs(bpe_folder):
    vocab = json.loads((bpe_folder / "vocab.json").read_text(encoding="utf-8"))
    with pytest.raises(ValueError, match="'<pad>'"):
        CLIPTokenizer(vocab, [], pad_token="<pad>")
    with pytest.raises(ValueError, match="'zzq'"):
        CLIPTokenizer(vocab, [("zz", "q")])
    tok = CLIPTokenizer(vocab, [])
    with pytest.raises(ValueError, match="max_length=8"):
        tok("a long sentence that does not fit", max_length=8, truncation=False)
    with pytest.raises(ValueError, match="12"):
        tok([12])


def test_clip_rejects_bad_arguments():
    config = CLIPTextConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16)
    init = lambda module, length: jax.eval_shape(  # noqa: E731
        module.init, jax.random.key(0), jnp.zeros((1, length), jnp.int32))
    with pytest.raises(ValueError, match="'second_to_last'"):
        init(CLIPTextEncoder(config, context_layer="second_to_last"), 16)
    with pytest.raises(ValueError, match="17"):
        init(CLIPTextEncoder(config), 17)
    with pytest.raises(ValueError, match="'relu'"):
        CLIPTextConfig(hidden_act="relu")
    with pytest.raises(ValueError, match="30"):
        CLIPTextConfig(hidden_size=30, num_attention_heads=4)
