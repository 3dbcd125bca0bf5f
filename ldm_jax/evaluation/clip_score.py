"""CLIP score (Hessel et al. 2021) with a Flax CLIP: the vision tower, the text tower of
:mod:`ldm_jax.models.clip`, and both projections, laid out like transformers' ``CLIPModel``.

Score, as torchmetrics' ``CLIPScore`` computes it: per pair ``100 * cos(E_img, E_txt)`` of the
projected embeddings, and the reported value ``max(mean over pairs, 0)``.
(torchmetrics clamps the *mean* at zero, not each pair; :func:`clip_score` returns both the
per-pair values and that aggregate.)

Vision tower (transformers ``CLIPVisionTransformer``): a patch convolution (no bias), a learned
class token, learned positions, ``pre_layrnorm`` (transformers' spelling), N pre-LayerNorm
non-causal transformer layers, and ``post_layernorm`` of the class token as the pooled output.
Image preprocessing is ``CLIPImageProcessor``'s default with the PIL backend (transformers 4's
default; ``CLIPImageProcessorPil`` in 5): shortest side resized to ``image_size`` with PIL
bicubic, centre crop, ``/255``, OpenAI mean/std normalisation (:func:`preprocess`, host side,
NumPy). transformers 5's torchvision-backed default differs by one or two uint8 levels on ~1%
of the pixels.

Weights: :func:`load_clip_model` reads a local transformers ``CLIPModel`` folder
(``config.json`` + ``model.safetensors``, e.g. ``openai/clip-vit-large-patch14`` saved with
``save_pretrained``); nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ldm_jax.interop import transformers_clip
from ldm_jax.interop.torch_weights import StateDict, WeightsError, conv_to_flax, linear_to_flax, load_state_dict
from ldm_jax.models import partitioning as P
from ldm_jax.models.clip import ACTIVATIONS, CLIPTextConfig, CLIPTextEncoder, Encoder

Dtype = Any

OPENAI_CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
OPENAI_CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Hyper-parameters, named as in transformers' ``CLIPVisionConfig`` (defaults: ViT-B/32)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; expected one of {ACTIVATIONS}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "CLIPVisionConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names and v is not None})


class VisionEmbeddings(nn.Module):
    """Patches + class token + positions: pixels [B, S, S, 3] -> [B, 1 + (S/p)^2, D]."""

    config: CLIPVisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        cfg = self.config
        p = cfg.patch_size
        patches = P.conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                         dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embedding")(pixels)
        b = patches.shape[0]
        patches = patches.reshape(b, -1, cfg.hidden_size)  # row-major (h, w), as torch's flatten(2)
        cls_token = self.param("class_embedding",
                               nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)),
                               (cfg.hidden_size,), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls_token.astype(self.dtype), (b, 1, cfg.hidden_size)), patches], 1)
        positions = P.embed(cfg.num_positions, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                            name="position_embedding")(jnp.arange(cfg.num_positions))
        return x + positions[None]


class CLIPVisionEncoder(nn.Module):
    """CLIP vision transformer: normalised pixels [B, S, S, 3] -> (last_hidden_state [B, T, D],
    pooled_output [B, D]) with S = ``config.image_size``."""

    config: CLIPVisionConfig = CLIPVisionConfig()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        cfg = self.config
        if pixels.ndim != 4 or pixels.shape[1:] != (cfg.image_size, cfg.image_size, 3):
            raise ValueError(f"pixels must be [batch, {cfg.image_size}, {cfg.image_size}, 3], got {pixels.shape}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = VisionEmbeddings(cfg, name="embeddings", **kw)(pixels.astype(self.dtype))
        norm = lambda name: P.layer_norm(epsilon=cfg.layer_norm_eps, param_dtype=self.param_dtype, name=name)  # noqa: E731
        x = norm("pre_layrnorm")(x).astype(self.dtype)
        states = Encoder(cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act,
                         cfg.layer_norm_eps, causal=False, name="encoder", **kw)(x)
        last = states[-1]
        return last, norm("post_layernorm")(last[:, 0]).astype(self.dtype)


class CLIPModel(nn.Module):
    """Both towers and projections. Methods: ``image_embeds(pixels)`` -> [B, P] and
    ``text_embeds(input_ids, attention_mask=None)`` -> [B, P] (projected, not normalised, as
    transformers' ``get_image_features`` / ``get_text_features``)."""

    text_config: CLIPTextConfig
    vision_config: CLIPVisionConfig
    projection_dim: int = 512
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_model = CLIPTextEncoder(self.text_config, **kw)
        self.vision_model = CLIPVisionEncoder(self.vision_config, **kw)
        self.visual_projection = P.dense(self.projection_dim, use_bias=False, **kw)
        self.text_projection = P.dense(self.projection_dim, use_bias=False, **kw)

    def image_embeds(self, pixels):
        return self.visual_projection(self.vision_model(pixels)[1])

    def text_embeds(self, input_ids, attention_mask=None):
        return self.text_projection(self.text_model(input_ids, attention_mask).pooled_output)

    def __call__(self, pixels, input_ids, attention_mask=None):
        return self.image_embeds(pixels), self.text_embeds(input_ids, attention_mask)


def _vision_params(state: StateDict, cfg: CLIPVisionConfig, prefix: str) -> dict:
    d, inner, p = cfg.hidden_size, cfg.intermediate_size, cfg.patch_size

    def linear(key, out_dim, in_dim):
        return {"kernel": linear_to_flax(state.take(key + ".weight", (out_dim, in_dim))),
                "bias": state.take(key + ".bias", (out_dim,))}

    def norm(key):
        return {"scale": state.take(key + ".weight", (d,)), "bias": state.take(key + ".bias", (d,))}

    e = prefix + "embeddings."
    state.skip(e + "position_ids") if e + "position_ids" in state else None
    params = {
        "embeddings": {
            "patch_embedding": {"kernel": conv_to_flax(state.take(e + "patch_embedding.weight", (d, 3, p, p)))},
            "class_embedding": state.take(e + "class_embedding", (d,)),
            "position_embedding": {"embedding": state.take(e + "position_embedding.weight", (cfg.num_positions, d))},
        },
        "pre_layrnorm": norm(prefix + "pre_layrnorm"),
        "post_layernorm": norm(prefix + "post_layernorm"),
        "encoder": {},
    }
    for i in range(cfg.num_hidden_layers):
        t = f"{prefix}encoder.layers.{i}."
        params["encoder"][f"layers_{i}"] = {
            "layer_norm1": norm(t + "layer_norm1"),
            "self_attn": {n: linear(t + "self_attn." + n, d, d) for n in ("q_proj", "k_proj", "v_proj", "out_proj")},
            "layer_norm2": norm(t + "layer_norm2"),
            "mlp": {"fc1": linear(t + "mlp.fc1", inner, d), "fc2": linear(t + "mlp.fc2", d, inner)},
        }
    return params


def params_from_state_dict(tensors: Mapping[str, np.ndarray], text_config: CLIPTextConfig,
                           vision_config: CLIPVisionConfig, projection_dim: int, source: str = "checkpoint") -> dict:
    """A transformers ``CLIPModel`` state dict -> params for :class:`CLIPModel`; every tensor
    must be used (``logit_scale`` and ``position_ids`` buffers are skipped)."""
    text_keys = {k: v for k, v in tensors.items() if k.startswith("text_model.")}
    rest = StateDict({k: v for k, v in tensors.items() if not k.startswith("text_model.")}, source=source)
    if "logit_scale" in rest:
        rest.skip("logit_scale")
    vision = _vision_params(rest, vision_config, "vision_model.")
    params = {
        "text_model": transformers_clip.params_from_state_dict(text_keys, text_config, source=source,
                                                               prefix="text_model."),
        "vision_model": vision,
        "visual_projection": {"kernel": linear_to_flax(rest.take(
            "visual_projection.weight", (projection_dim, vision_config.hidden_size)))},
        "text_projection": {"kernel": linear_to_flax(rest.take(
            "text_projection.weight", (projection_dim, text_config.hidden_size)))},
    }
    rest.finish()
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x, np.float32)), params)


def load_clip_model(folder: str | os.PathLike) -> tuple[CLIPModel, dict]:
    """``(module, params)`` from a local transformers ``CLIPModel`` folder."""
    folder = os.fspath(folder)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"CLIP model folder has no config.json: {folder}")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if "vision_config" not in config or "text_config" not in config:
        raise WeightsError(f"{config_path} is not a CLIPModel config (needs text_config and vision_config)")
    text_config = CLIPTextConfig.from_dict(config["text_config"])
    vision_config = CLIPVisionConfig.from_dict(config["vision_config"])
    projection_dim = int(config.get("projection_dim", 512))
    weights = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(weights):
        weights = os.path.join(folder, "pytorch_model.bin")
    params = params_from_state_dict(load_state_dict(weights), text_config, vision_config, projection_dim, weights)
    return CLIPModel(text_config, vision_config, projection_dim), params


def preprocess(image: np.ndarray, size: int = 224) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [size, size, 3]: ``CLIPImageProcessor`` defaults (module docstring)."""
    pil = Image.fromarray(np.asarray(image, np.uint8))
    w, h = pil.size
    short = min(w, h)
    # transformers' get_resize_output_image_size: the short side to `size`, the long side scaled (int()).
    new_w, new_h = (size, int(size * h / w)) if w == short else (int(size * w / h), size)
    pil = pil.resize((new_w, new_h), Image.BICUBIC)
    x = np.asarray(pil, np.float32)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[top:top + size, left:left + size]
    return ((x / 255.0) - OPENAI_CLIP_MEAN) / OPENAI_CLIP_STD


class CLIPScoreResult(NamedTuple):
    score: float  # torchmetrics' CLIPScore: max(mean of per_pair, 0)
    per_pair: np.ndarray  # [N] 100 * cosine similarity


def clip_score_from_embeddings(image_embeds, text_embeds) -> CLIPScoreResult:
    """Score of paired embeddings [N, P], [N, P] (torchmetrics' definition, float64)."""
    a, b = np.asarray(image_embeds, np.float64), np.asarray(text_embeds, np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"need paired non-empty embeddings, got image {a.shape} and text {b.shape}")
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    per_pair = 100.0 * (a * b).sum(-1)
    return CLIPScoreResult(float(max(per_pair.mean(), 0.0)), per_pair)


class CLIPScorer:
    """Batched CLIP score of (image, prompt) pairs with a loaded :class:`CLIPModel`.

    ``update(images uint8 [B, H, W, 3], prompts [B])`` accumulates embeddings' per-pair scores;
    ``result()`` gives the torchmetrics aggregate. Embeddings are computed jitted on the
    default device (CLIP score sets are small next to FID's)."""

    def __init__(self, module: CLIPModel, params, tokenizer):
        self.module, self.params, self.tokenizer = module, params, tokenizer
        def image(p, x):
            with jax.default_matmul_precision("float32"):  # no bf16 passes on accelerators
                return module.apply({"params": p}, x, method="image_embeds")

        def text(p, i, m):
            with jax.default_matmul_precision("float32"):
                return module.apply({"params": p}, i, m, method="text_embeds")

        self._image, self._text = jax.jit(image), jax.jit(text)
        self.per_pair: list[np.ndarray] = []

    def update(self, images, prompts) -> None:
        images = np.asarray(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        if not len(images):
            return
        size = self.module.vision_config.image_size
        pixels = np.stack([preprocess(np.repeat(im, 3, -1) if im.shape[-1] == 1 else im, size) for im in images])
        tokens = self.tokenizer(list(prompts), max_length=self.module.text_config.max_position_embeddings)
        img = self._image(self.params, pixels)
        txt = self._text(self.params, tokens.ids, tokens.mask.astype(np.int32))
        self.per_pair.append(clip_score_from_embeddings(img, txt).per_pair)

    def result(self) -> CLIPScoreResult:
        if not self.per_pair:
            raise ValueError("no image/prompt pairs were scored")
        per_pair = np.concatenate(self.per_pair)
        return CLIPScoreResult(float(max(per_pair.mean(), 0.0)), per_pair)
