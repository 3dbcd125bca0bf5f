"""SDXL's two text encoders and tokenizers, checked against transformers and diffusers.

Truth: random-weight transformers ``CLIPTextModel`` (CLIP ViT-L/14-shaped) and
``CLIPTextModelWithProjection`` (OpenCLIP bigG-shaped), transformers' ``CLIPTokenizer`` on
locally written tokenizer folders (the second one pads with "!" as SDXL's ``tokenizer_2``), and
diffusers' ``StableDiffusionXLPipeline.encode_prompt`` on those components; the bigG parameter
count from transformers on torch's meta device."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTextConfig as HFCLIPTextConfig
from transformers import CLIPTextModel, CLIPTextModelWithProjection
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

PROMPTS = ["a photo of an astronaut riding a horse!", "", "wow!! what a castle"]


def _byte_vocab() -> dict[str, int]:
    """A merge-free CLIP-layout vocabulary written out here: 256 byte characters (printable
    ones first, so "!" is id 0), their </w> forms, then BOS and EOS (EOS = the largest id, so
    legacy argmax pooling finds it)."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = [chr(b) for b in keep] + [chr(256 + i) for i in range(256 - len(keep))]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}


def _write_tokenizer(folder, pad_token: str) -> None:
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(_byte_vocab(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    special = lambda t: dict(content=t, lstrip=False, normalized=True, rstrip=False, single_word=False)  # noqa: E731
    specials = {"bos_token": special("<|startoftext|>"), "eos_token": special("<|endoftext|>"),
                "unk_token": special("<|endoftext|>"), "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    config = dict(specials, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def _text_config(**kw) -> HFCLIPTextConfig:
    vocab = len(_byte_vocab())
    # eos_token_id=2: the legacy value SDXL's text_encoder/_2 configs carry (argmax pooling).
    return HFCLIPTextConfig(vocab_size=vocab, max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=2,
                            pad_token_id=1, **kw)


@pytest.fixture(scope="module")
def sdxl_text_folder(tmp_path_factory):
    """A diffusers SDXL pipeline folder's text half: tokenizer/, tokenizer_2/, text_encoder/
    (CLIP-L-shaped CLIPTextModel, quick_gelu) and text_encoder_2/ (bigG-shaped, gelu, projection)."""
    root = tmp_path_factory.mktemp("sdxl_text")
    _write_tokenizer(root / "tokenizer", "<|endoftext|>")
    _write_tokenizer(root / "tokenizer_2", "!")
    torch.manual_seed(0)
    te = CLIPTextModel(_text_config(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                    num_attention_heads=4, hidden_act="quick_gelu", projection_dim=32)).eval()
    te2 = CLIPTextModelWithProjection(_text_config(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                                   num_attention_heads=4, hidden_act="gelu",
                                                   projection_dim=40)).eval()
    te.save_pretrained(root / "text_encoder")
    te2.save_pretrained(root / "text_encoder_2")
    return root, te, te2


def _normalized_max_error(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_sdxl_tokenizers_match_transformers_including_bang_padding(sdxl_text_folder):
    root, _, _ = sdxl_text_folder
    for sub, pad_is_bang in (("tokenizer", False), ("tokenizer_2", True)):
        ours = CLIPTokenizer.from_pretrained(root, subfolder=sub)
        theirs = HFCLIPTokenizer.from_pretrained(root / sub)
        assert ours.pad_id == theirs.pad_token_id
        assert ours.pad_id == (0 if pad_is_bang else ours.eos_id)
        want = theirs(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
        got = ours(PROMPTS).ids
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=sub)


def test_bigg_shaped_encoder_with_projection_matches_transformers(sdxl_text_folder):
    root, _, te2 = sdxl_text_folder
    module, params = load_clip_text_encoder(root, subfolder="text_encoder_2", context_layer="penultimate",
                                            context_final_norm=False)
    assert module.with_projection and module.config.projection_dim == 40
    ids = np.asarray(CLIPTokenizer.from_pretrained(root, subfolder="tokenizer_2")(PROMPTS).ids, np.int64)
    out = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, jnp.asarray(ids))
    with torch.no_grad():
        ref = te2(torch.from_numpy(ids), output_hidden_states=True)
    errors = {
        "penultimate": _normalized_max_error(out.context, ref.hidden_states[-2]),
        "text_embeds": _normalized_max_error(out.text_embeds, ref.text_embeds),
        "last_hidden_state": _normalized_max_error(out.last_hidden_state, ref.last_hidden_state),
    }
    print({k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) <= 1e-5, errors
    assert out.text_embeds.shape == (3, 40)


def test_encoders_match_diffusers_sdxl_encode_prompt(sdxl_text_folder):
    """Our two encoders give diffusers' SDXL prompt embeddings: concat(CLIP-L penultimate,
    bigG penultimate) on the feature axis, and bigG's projected pooled output."""
    root, te, te2 = sdxl_text_folder
    pipe = StableDiffusionXLPipeline(
        vae=None, text_encoder=te, text_encoder_2=te2, tokenizer=HFCLIPTokenizer.from_pretrained(root / "tokenizer"),
        tokenizer_2=HFCLIPTokenizer.from_pretrained(root / "tokenizer_2"), unet=None, scheduler=None,
    )
    with torch.no_grad():
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    contexts, text_embeds = [], None
    for enc, tok in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")):
        module, params = load_clip_text_encoder(root, subfolder=enc, context_layer="penultimate",
                                                context_final_norm=False)
        ids = jnp.asarray(CLIPTokenizer.from_pretrained(root, subfolder=tok)(PROMPTS).ids)
        out = module.apply({"params": params}, ids)
        contexts.append(out.context)
        text_embeds = out.text_embeds if out.text_embeds is not None else text_embeds
    context = jnp.concatenate(contexts, axis=-1)
    assert context.shape == tuple(prompt_embeds.shape) == (3, 77, 32 + 48)
    err_ctx = _normalized_max_error(context, prompt_embeds)
    err_pooled = _normalized_max_error(text_embeds, pooled)
    print(f"encode_prompt: context {err_ctx:.2e}, pooled {err_pooled:.2e}")
    assert err_ctx <= 1e-5 and err_pooled <= 1e-5


def test_with_projection_round_trips_and_fp16_variant(sdxl_text_folder, tmp_path):
    root, _, te2 = sdxl_text_folder
    module, params = load_clip_text_encoder(root, subfolder="text_encoder_2")
    save_clip_text_encoder(tmp_path / "fp32", module.config, params)
    reloaded, info = CLIPTextModelWithProjection.from_pretrained(tmp_path / "fp32", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for key, value in te2.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    # fp16 variant, as diffusers' "fp16" folders name it: model.fp16.safetensors.
    save_clip_text_encoder(tmp_path / "fp16", module.config, params, dtype=np.float16, variant="fp16")
    assert (tmp_path / "fp16" / "model.fp16.safetensors").is_file()
    theirs = CLIPTextModelWithProjection.from_pretrained(tmp_path / "fp16", variant="fp16", dtype=torch.float16)
    assert theirs.text_projection.weight.dtype == torch.float16
    module16, params16 = load_clip_text_encoder(tmp_path / "fp16", variant="fp16")
    assert module16.with_projection
    want = jax.tree.map(lambda a: np.asarray(a, np.float32).astype(np.float16).astype(np.float32), params)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params16), want)


def test_projection_key_errors_name_the_key(sdxl_text_folder):
    root, _, _ = sdxl_text_folder
    module, params = load_clip_text_encoder(root, subfolder="text_encoder_2")
    sd = state_dict_from_params(params, module.config)
    assert "text_projection.weight" in sd
    missing = {k: v for k, v in sd.items() if k != "text_projection.weight"}
    with pytest.raises(WeightsError, match="missing key 'text_projection.weight'"):
        params_from_state_dict(missing, module.config, with_projection=True)
    bad = dict(sd, **{"text_projection.weight": np.zeros((40, 47), np.float32)})
    with pytest.raises(WeightsError, match="shape mismatch for key 'text_projection.weight'"):
        params_from_state_dict(bad, module.config, with_projection=True)
    with pytest.raises(WeightsError, match="unexpected key 'text_projection.weight'"):
        params_from_state_dict(sd, module.config, with_projection=False)


def test_bigg_text_encoder_param_count_matches_transformers():
    config = CLIPTextConfig.open_clip_vit_bigg14()
    module = CLIPTextEncoder(config, with_projection=True)
    ids = jnp.zeros((1, 77), jnp.int32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids))
    ours = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    with torch.device("meta"):
        reference = CLIPTextModelWithProjection(HFCLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            hidden_act="gelu", projection_dim=1280, vocab_size=49408, max_position_embeddings=77,
        ))
    theirs = sum(p.numel() for p in reference.parameters())
    print(f"OpenCLIP bigG text encoder: {ours:,} parameters (transformers {theirs:,})")
    assert ours == theirs
