"""Flax CLIP (vision tower + projections + text tower) against transformers' CLIPModel with a
random small config; CLIP score as torchmetrics defines it."""

import importlib
import numpy as np
import pytest

torch = importlib.import_module("torch")
transformers = importlib.import_module("transformers")

import jax  # noqa: E402

from ldm_jax.evaluation.clip_score import (  # noqa: E402
    OPENAI_CLIP_STD,
    clip_score_from_embeddings,
    load_clip_model,
    preprocess,
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, eos_token_id=98, pad_token_id=1,
                         bos_token_id=0),
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
                           image_size=32, patch_size=8, hidden_act="gelu"),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    return model, folder


def _unwrap(features):
    # transformers 5 returns an output object whose pooler_output is the projected embedding.
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def test_image_and_text_embeddings_match_transformers_clipmodel(reference):
    model, folder = reference
    module, params = load_clip_model(folder)
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    ids = rng.integers(2, 98, size=(3, 10))
    ids[:, 7] = 98  # end of text, then padding
    ids[:, 8:] = 1
    mask = np.ones_like(ids)
    mask[:, 8:] = 0
    with torch.no_grad():
        img_ref = _unwrap(model.get_image_features(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))).numpy()
        txt_ref = _unwrap(model.get_text_features(input_ids=torch.from_numpy(ids),
                                                  attention_mask=torch.from_numpy(mask))).numpy()
    img = np.asarray(jax.jit(lambda p, x: module.apply({"params": p}, x, method="image_embeds"))(params, pixels))
    txt = np.asarray(jax.jit(lambda p, i, m: module.apply({"params": p}, i, m, method="text_embeds"))(params, ids, mask))
    err_img = np.max(np.abs(img - img_ref)) / np.max(np.abs(img_ref))
    err_txt = np.max(np.abs(txt - txt_ref)) / np.max(np.abs(txt_ref))
    print(f"\nCLIP parity: image embeds rel {err_img:.2e}, text embeds rel {err_txt:.2e}")
    assert err_img < 1e-5 and err_txt < 1e-5

    # torchmetrics' CLIPScore (functional/multimodal/clip_score.py): normalise, 100 * dot, clamp the mean.
    a = torch.from_numpy(img_ref).double()
    b = torch.from_numpy(txt_ref).double()
    per_pair = 100 * ((a / a.norm(p=2, dim=-1, keepdim=True)) * (b / b.norm(p=2, dim=-1, keepdim=True))).sum(-1)
    expected = torch.max(per_pair.mean(0), torch.zeros(())).item()
    ours = clip_score_from_embeddings(img, txt)
    np.testing.assert_allclose(ours.per_pair, per_pair.numpy(), atol=1e-3)
    assert ours.score == pytest.approx(expected, abs=1e-3)


def test_clip_score_clamps_the_mean_not_each_pair():
    e = np.eye(2)
    result = clip_score_from_embeddings(np.stack([e[0], e[0]]), np.stack([e[0], -e[0] * 0.5 + e[1] * 0.0]))
    np.testing.assert_allclose(result.per_pair, [100.0, -100.0])
    assert result.score == 0.0
    assert clip_score_from_embeddings(e, e).score == pytest.approx(100.0)


def test_preprocess_matches_clip_image_processor_defaults():
    """Exactly the PIL processor (transformers 4's default); within 2 uint8 levels of transformers
    5's torchvision-backed default (its antialiased bicubic rounds differently)."""
    image = np.random.default_rng(1).integers(0, 256, size=(48, 80, 3), dtype=np.uint8)
    ours = preprocess(image)
    pil_processor = importlib.import_module("transformers.models.clip.image_processing_pil_clip").CLIPImageProcessorPil()
    theirs = pil_processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    torchvision_processor = transformers.CLIPImageProcessor()
    theirs = torchvision_processor(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    diff = np.abs(ours - theirs) * 255 * OPENAI_CLIP_STD
    print(f"\npreprocess vs torchvision CLIPImageProcessor: {np.mean(diff > 0.5):.2%} of values differ, "
          f"max {diff.max():.2f} uint8 levels")
    assert diff.max() <= 2.01 and np.mean(diff > 0.5) < 0.02


def test_clip_scorer_pairs_images_with_prompts_as_transformers_does(reference):
    """uint8 images + prompts through CLIPScorer == PIL preprocessing + transformers' CLIPModel +
    torchmetrics' formula, with a toy tokenizer (ids below the tiny vocabulary)."""
    from ldm_jax.evaluation.clip_score import CLIPScorer
    from ldm_jax.models.tokenizers import TokenizedText

    model, folder = reference
    module, params = load_clip_model(folder)

    def tokenizer(texts, max_length):
        ids = np.ones((len(texts), max_length), np.int32)  # pad id 1
        for row, text in enumerate(texts):
            body = [2 + (ord(ch) % 90) for ch in text][: max_length - 2]
            ids[row, : len(body) + 2] = [0, *body, 98]  # BOS, body, EOS
        return TokenizedText(ids, ids != 1)

    images = np.random.default_rng(3).integers(0, 256, size=(3, 40, 36, 3), dtype=np.uint8)
    prompts = ["a cat", "two dogs", "a red circle on a blue square"]
    scorer = CLIPScorer(module, params, tokenizer)
    scorer.update(images[:2], prompts[:2])
    scorer.update(images[2:], prompts[2:])
    ours = scorer.result()

    pixels = np.stack([preprocess(im, 32) for im in images]).transpose(0, 3, 1, 2)
    tokens = tokenizer(prompts, 16)
    with torch.no_grad():
        a = _unwrap(model.get_image_features(pixel_values=torch.from_numpy(pixels))).double()
        b = _unwrap(model.get_text_features(input_ids=torch.from_numpy(tokens.ids).long(),
                                            attention_mask=torch.from_numpy(tokens.mask.astype(np.int64)))).double()
    per_pair = 100 * ((a / a.norm(dim=-1, keepdim=True)) * (b / b.norm(dim=-1, keepdim=True))).sum(-1)
    np.testing.assert_allclose(ours.per_pair, per_pair.numpy(), atol=1e-3)
    assert ours.score == pytest.approx(max(per_pair.mean().item(), 0.0), abs=1e-3)
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer.update(images[:2], prompts[:1])
