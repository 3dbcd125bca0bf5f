"""Conditioners (host-side inputs -> U-Net keyword arguments inside ``jit``), the same objects
in training and inference, and the channel-concatenated conditions.

Every conditioner has ``kind``, ``has_null`` (classifier-free guidance applies),
``drop_prob`` (training: the probability of the null condition), ``input_keys`` (the
host arrays it reads), ``params_key`` (where its
parameters live in the model's param tree, or None) and ``trainable`` (those params are
trained, rather than frozen), ``context_dim`` (cross-attention width, or None),
``host_inputs(conditions)``, ``null_host_inputs(count, negative=None)``,
``encode(params, inputs) -> U-Net kwargs``, ``drop(inputs, key)`` and ``init_params(key)``:

* :class:`TextConditioner` - a tokenizer (CLIP BPE or byte) and a text encoder
  (``CLIPTextEncoder``, frozen, or the from-scratch ``TextTransformer``, trained) ->
  ``context`` [B, L, D]; the null condition is the empty prompt (or a negative prompt);
* :class:`ClassConditioner` - class ids -> the U-Net's own class embedding
  (``class_labels``), or a :class:`~ldm_jax.models.conditioning.ClassEmbedder` used as a
  one-token cross-attention ``context``; the null condition is label ``num_classes``;
* :class:`SDXLConditioner` - SDXL's two CLIP towers (context, pooled ``text_embeds``) and
  the per-image micro-conditioning ``time_ids``;
* :class:`Unconditional`.

``config.conditioning.kind`` picks a builder from :data:`CONDITIONER_BUILDERS` (a new kind,
e.g. SDXL's pooled text + time ids, is one builder and one conditioner class).

Channel-concatenation conventions (the U-Net's ``in_channels`` is the sum; training must build
its inputs with the same functions):

* inpainting (Stable Diffusion inpainting layout, ``in_channels = 2 * latent + 1``):
  ``[noisy latents, mask (1 = repaint) at latent resolution, latents of the masked image]``,
  see :func:`latent_mask` and :func:`masked_image`;
* low-res conditioning (super-resolution / latent upscaling,
  ``in_channels = latent + low-res channels``): ``[noisy latents, low_res]`` with the low-res
  image in [-1, 1] resized to the latent grid by :func:`low_res_condition`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.guidance import check_guidance_interval, drop_conditioning
from ldm_jax.ldm.sections import CONDITIONING_KINDS, choice
from ldm_jax.models.clip import CLIPTextEncoder
from ldm_jax.models.conditioning import ClassEmbedder, TextTransformer
from ldm_jax.models.tokenizers import ByteTokenizer, CLIPTokenizer

CONCAT_KINDS = (None, "inpainting", "low_res")


class _Conditioner:
    """The classifier-free-guidance drop every conditioner shares."""

    drop_prob: float = 0.0

    def drop(self, inputs: Mapping[str, Any], key) -> dict:
        """Replace each example's condition by the null one with probability ``drop_prob``."""
        if not self.has_null or self.drop_prob <= 0:
            return dict(inputs)
        null = {k: jnp.asarray(v) for k, v in self.null_host_inputs(1).items()}
        return drop_conditioning(key, dict(inputs), null, self.drop_prob)


@dataclasses.dataclass(frozen=True, eq=False)
class TextConditioner(_Conditioner):
    """Prompts -> cross-attention context.

    Attributes:
      tokenizer: :class:`CLIPTokenizer` or :class:`ByteTokenizer` (runs on the host).
      encoder: :class:`CLIPTextEncoder` (frozen; its ``context`` output, no attention mask, as
        the Stable Diffusion pipelines) or :class:`TextTransformer` (trained jointly; padding
        mask from the tokenizer).
      drop_prob: training's probability of the empty prompt.
    """

    tokenizer: CLIPTokenizer | ByteTokenizer
    encoder: CLIPTextEncoder | TextTransformer
    drop_prob: float = 0.0
    kind = "text"
    has_null = True
    params_key = "text_encoder"
    unet_num_classes = None
    input_keys = ("ids", "mask")

    def __post_init__(self):
        if not isinstance(self.encoder, (CLIPTextEncoder, TextTransformer)):
            raise ValueError(f"text encoder must be a CLIPTextEncoder or TextTransformer, got {type(self.encoder).__name__}")

    @property
    def trainable(self) -> bool:
        return isinstance(self.encoder, TextTransformer)

    @property
    def context_dim(self) -> int:
        if isinstance(self.encoder, CLIPTextEncoder):
            return int(self.encoder.config.hidden_size)
        return int(self.encoder.width)

    def host_inputs(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """Prompts -> ``{"ids": int32 [B, L], "mask": bool [B, L]}``."""
        for p in prompts:
            if not isinstance(p, str):
                raise ValueError(f"prompts must be strings, got {p!r}")
        tokens = self.tokenizer(list(prompts))
        return {"ids": np.asarray(tokens.ids, np.int32), "mask": np.asarray(tokens.mask, bool)}

    def null_host_inputs(self, count: int, negative: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The unconditional inputs: ``negative`` prompts, or the empty prompt."""
        return self.host_inputs([""] * count if negative is None else negative)

    def encode(self, params, inputs) -> dict[str, jax.Array]:
        """-> ``{"context": [B, L, D]}`` (U-Net keyword arguments)."""
        if isinstance(self.encoder, CLIPTextEncoder):
            context = self.encoder.apply({"params": params}, inputs["ids"]).context
        else:
            context = self.encoder.apply({"params": params}, inputs["ids"], inputs["mask"])
        return {"context": context.astype(jnp.float32)}

    def init_params(self, key):
        tokens = self.tokenizer([""])
        return self.encoder.init(key, jnp.asarray(tokens.ids), jnp.asarray(tokens.mask))["params"]


@dataclasses.dataclass(frozen=True, eq=False)
class ClassConditioner(_Conditioner):
    """Class ids -> the U-Net's class embedding (``embedder`` None: ``class_labels``) or a
    :class:`ClassEmbedder` used as a one-token cross-attention context ``[B, 1, D]``.
    Label ``num_classes`` is the null class of classifier-free guidance."""

    num_classes: int
    embedder: ClassEmbedder | None = None
    drop_prob: float = 0.0
    kind = "class"
    has_null = True
    input_keys = ("labels",)

    def __post_init__(self):
        if not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
        if self.embedder is not None and self.embedder.num_classes != self.num_classes:
            raise ValueError(f"ClassEmbedder has {self.embedder.num_classes} classes, expected {self.num_classes}")

    @property
    def params_key(self) -> str | None:
        return None if self.embedder is None else "class_embedder"

    @property
    def trainable(self) -> bool:
        return self.embedder is not None

    @property
    def context_dim(self) -> int | None:
        return None if self.embedder is None else int(self.embedder.embed_dim)

    @property
    def unet_num_classes(self) -> int | None:
        """The U-Net's class table size (labels go straight to the U-Net), or None."""
        return int(self.num_classes) if self.embedder is None else None

    def host_inputs(self, labels: Sequence[int]) -> dict[str, np.ndarray]:
        """Class ids -> ``{"labels": int32 [B]}``; each id must be in [0, num_classes)."""
        out = np.zeros((len(labels),), np.int32)
        for i, label in enumerate(labels):
            if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < self.num_classes:
                raise ValueError(f"class label {label!r} is not an integer in [0, {self.num_classes})")
            out[i] = int(label)
        return {"labels": out}

    def null_host_inputs(self, count: int, negative=None) -> dict[str, np.ndarray]:
        if negative is not None:
            raise ValueError("negative_prompt applies to text-conditioned models, not class-conditional ones")
        return {"labels": np.full((count,), self.num_classes, np.int32)}

    def encode(self, params, inputs) -> dict[str, jax.Array]:
        if self.embedder is None:
            return {"class_labels": inputs["labels"]}
        context = self.embedder.apply({"params": params}, inputs["labels"], as_context=True)
        return {"context": context.astype(jnp.float32)}

    def init_params(self, key):
        return self.embedder.init(key, jnp.zeros((1,), jnp.int32), as_context=True)["params"]


@dataclasses.dataclass(frozen=True)
class Unconditional(_Conditioner):
    """No conditioning (classifier-free guidance does not apply)."""

    kind = "none"
    has_null = False
    params_key = None
    trainable = False
    context_dim = None
    unet_num_classes = None
    input_keys = ()

    def host_inputs(self, conditions) -> dict[str, np.ndarray]:
        return {}

    def null_host_inputs(self, count: int, negative=None) -> dict[str, np.ndarray]:
        raise ValueError("an unconditional model has no null condition")

    def encode(self, params, inputs) -> dict[str, jax.Array]:
        return {}


# ----------------------------------------------------------------------------- SDXL


def _pairs(value, n: int, name: str) -> np.ndarray:
    """A (height, width) / (top, left) pair, or one pair per image -> float32 [n, 2]."""
    array = np.asarray(value, np.float64)
    if array.shape == (2,):
        array = np.broadcast_to(array, (n, 2))
    if array.shape != (n, 2) or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be a (height, width) / (top, left) pair or {n} such pairs, got {value!r}")
    return array.astype(np.float32)


def _scores(value, n: int, name: str) -> np.ndarray:
    array = np.asarray(value, np.float64)
    if array.ndim == 0:
        array = np.broadcast_to(array, (n,))
    if array.shape != (n,) or not np.all(np.isfinite(array)):
        raise ValueError(f"{name} must be a number or {n} numbers, got {value!r}")
    return array.astype(np.float32)[:, None]


@dataclasses.dataclass(frozen=True, eq=False)
class SDXLConditioner(_Conditioner):
    """SDXL's conditioning: prompts through CLIP ViT-L/14 and OpenCLIP bigG (penultimate hidden
    states, concatenated on the feature axis to ``context`` [B, 77, 768 + 1280]) plus bigG's
    projected pooled output (``text_embeds``), and the per-image micro-conditioning
    ``time_ids`` (base: original size, crop top-left, target size; refiner, ``aesthetic``:
    original size, crop top-left, aesthetic score), as diffusers' SDXL pipelines build them.

    Attributes:
      tokenizer_2, encoder_2: OpenCLIP bigG (``CLIPTextEncoder`` with projection).
      tokenizer, encoder: CLIP ViT-L/14, or None (the refiner has only the second encoder).
      aesthetic: time ids carry an aesthetic score instead of the target size (the refiner,
        diffusers' ``requires_aesthetics_score``).
      force_zeros_for_empty_prompt: the unconditional branch without a negative prompt is all
        zeros (context and pooled), as diffusers' SDXL pipelines and as SDXL was trained to drop
        text; False encodes the empty prompt.
      drop_prob: training's probability of the null (zero) text condition; the size
        conditioning is never dropped.

    Host inputs: ``ids`` (and ``ids_2``) int32 [B, 77], ``time_ids`` float32 [B, 6 | 5] and
    ``null`` float32 [B] (1 = zero text embeddings).
    """

    tokenizer_2: CLIPTokenizer
    encoder_2: CLIPTextEncoder
    tokenizer: CLIPTokenizer | None = None
    encoder: CLIPTextEncoder | None = None
    aesthetic: bool = False
    force_zeros_for_empty_prompt: bool = True
    drop_prob: float = 0.0
    kind = "sdxl"
    has_null = True
    params_key = "text_encoders"
    trainable = False
    unet_num_classes = None

    def __post_init__(self):
        if not isinstance(self.encoder_2, CLIPTextEncoder) or not self.encoder_2.with_projection:
            raise ValueError("SDXL's second text encoder must be a CLIPTextEncoder with_projection (OpenCLIP bigG)")
        if (self.encoder is None) != (self.tokenizer is None):
            raise ValueError("SDXL's first text encoder and tokenizer must be given together (or neither)")

    @property
    def input_keys(self) -> tuple[str, ...]:
        return (("ids",) if self.encoder is not None else ()) + ("ids_2", "time_ids", "null")

    @property
    def num_time_ids(self) -> int:
        return 5 if self.aesthetic else 6

    @property
    def context_dim(self) -> int:
        first = 0 if self.encoder is None else int(self.encoder.config.hidden_size)
        return first + int(self.encoder_2.config.hidden_size)

    @property
    def pooled_dim(self) -> int:
        return int(self.encoder_2.config.projection_dim)

    def time_ids(self, n: int, original_size, crops_coords_top_left=(0, 0), target_size=None,
                 aesthetic_score=6.0) -> np.ndarray:
        """float32 [n, 6 | 5] micro-conditioning rows (``ldm_jax.models.embeddings.sdxl_time_ids``
        order); every argument is one value for all images or one per image."""
        if original_size is None:
            raise ValueError("SDXL micro-conditioning needs original_size (height, width)")
        parts = [_pairs(original_size, n, "original_size"), _pairs(crops_coords_top_left, n, "crops_coords_top_left")]
        if self.aesthetic:
            parts.append(_scores(aesthetic_score, n, "aesthetic_score"))
        else:
            if target_size is None:
                raise ValueError("SDXL micro-conditioning needs target_size (height, width)")
            parts.append(_pairs(target_size, n, "target_size"))
        return np.concatenate(parts, axis=1)

    def _tokens(self, prompts, prompts_2=None) -> dict[str, np.ndarray]:
        for p in list(prompts) + list(prompts_2 or []):
            if not isinstance(p, str):
                raise ValueError(f"prompts must be strings, got {p!r}")
        prompts_2 = list(prompts) if prompts_2 is None else list(prompts_2)
        if len(prompts_2) != len(prompts):
            raise ValueError(f"prompt_2 has {len(prompts_2)} entries, expected {len(prompts)}")
        out = {"ids_2": np.asarray(self.tokenizer_2(prompts_2).ids, np.int32)}
        if self.encoder is not None:
            out["ids"] = np.asarray(self.tokenizer(list(prompts)).ids, np.int32)
        return out

    def host_inputs(self, prompts: Sequence[str], *, prompts_2: Sequence[str] | None = None, original_size=None,
                    crops_coords_top_left=(0, 0), target_size=None, aesthetic_score=6.0) -> dict[str, np.ndarray]:
        """Prompts (``prompts_2`` for the second encoder, default the same) and their images'
        micro-conditioning -> host inputs."""
        n = len(prompts)
        out = self._tokens(prompts, prompts_2)
        out["time_ids"] = self.time_ids(n, original_size, crops_coords_top_left, target_size, aesthetic_score)
        out["null"] = np.zeros((n,), np.float32)
        return out

    def null_host_inputs(self, count: int, negative: Sequence[str] | None = None, *,
                         negative_2: Sequence[str] | None = None, original_size=None, crops_coords_top_left=(0, 0),
                         target_size=None, aesthetic_score=2.5) -> dict[str, np.ndarray]:
        """The unconditional branch: ``negative`` prompts (``negative_2`` for the second encoder,
        default the same), or - without one - zeros (``force_zeros_for_empty_prompt``) or the
        empty prompt; with the negative micro-conditioning given (diffusers' defaults are the
        caller's: see ``ldm_jax.pipeline.sdxl``)."""
        zeros = negative is None and self.force_zeros_for_empty_prompt
        prompts = [""] * count if negative is None else list(negative)
        prompts_2 = negative_2 if negative_2 is not None else (None if negative is None else prompts)
        out = self._tokens(prompts, prompts_2)
        out["time_ids"] = self.time_ids(count, original_size, crops_coords_top_left, target_size, aesthetic_score)
        out["null"] = np.full((count,), 1.0 if zeros else 0.0, np.float32)
        return out

    def drop(self, inputs: Mapping[str, Any], key) -> dict:
        """Training: zero the text embeddings of each example with probability ``drop_prob``
        (SDXL's unconditional text, sgm's ``ucg_rate``); the size conditioning stays."""
        out = dict(inputs)
        if self.drop_prob <= 0:
            return out
        null = jnp.asarray(out["null"], jnp.float32)
        dropped = jax.random.bernoulli(key, self.drop_prob, null.shape).astype(jnp.float32)
        out["null"] = jnp.maximum(null, dropped)
        return out

    def encode(self, params, inputs) -> dict[str, jax.Array]:
        """-> ``{"context" [B, 77, D1 + D2], "text_embeds" [B, P], "time_ids" [B, 6 | 5]}``."""
        contexts = []
        if self.encoder is not None:
            contexts.append(self.encoder.apply({"params": params["text_encoder"]}, inputs["ids"]).context)
        second = self.encoder_2.apply({"params": params["text_encoder_2"]}, inputs["ids_2"])
        contexts.append(second.context)
        context = jnp.concatenate([c.astype(jnp.float32) for c in contexts], axis=-1)
        pooled = second.text_embeds.astype(jnp.float32)
        keep = jnp.asarray(inputs["null"]) < 0.5
        return {
            "context": jnp.where(keep[:, None, None], context, 0.0),
            "text_embeds": jnp.where(keep[:, None], pooled, 0.0),
            "time_ids": jnp.asarray(inputs["time_ids"], jnp.float32),
        }


Conditioner = Any  # TextConditioner | ClassConditioner | Unconditional | SDXLConditioner


def _read_json_file(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing {path}")
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None


def load_clip_tokenizer(folder: str) -> CLIPTokenizer:
    """A CLIP tokenizer folder: ``vocab.json`` + ``merges.txt`` (the Stable Diffusion repos), or
    only the fast-tokenizer ``tokenizer.json`` (what transformers >= 5 ``save_pretrained`` writes),
    whose BPE vocabulary and merges are the same data."""
    if os.path.isfile(os.path.join(folder, "vocab.json")):
        return CLIPTokenizer.from_pretrained(folder)
    fast = _read_json_file(os.path.join(folder, "tokenizer.json"))
    model = fast.get("model", {})
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != "</w>":
        raise ValueError(f"{folder}/tokenizer.json is not a CLIP BPE tokenizer")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    config_path = os.path.join(folder, "tokenizer_config.json")
    config = _read_json_file(config_path) if os.path.isfile(config_path) else {}
    kwargs: dict[str, Any] = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        if value is not None:
            kwargs[key] = value["content"] if isinstance(value, Mapping) else value
    max_length = config.get("model_max_length")
    if isinstance(max_length, int) and 2 <= max_length <= 100_000:  # transformers' "no limit" is ~1e30
        kwargs["max_length"] = max_length
    specials = {kwargs.get(k, "<|startoftext|>" if k == "bos_token" else "<|endoftext|>")
                for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    normalized = {t["content"] for t in fast.get("added_tokens", []) if t.get("normalized")} & specials
    return CLIPTokenizer(model["vocab"], merges, normalized_special_tokens=normalized, **kwargs)


def load_sdxl_conditioner(folder: str, *, dtype: Any = jnp.float32, variant: str | None = None,
                          aesthetic: bool | None = None) -> tuple[SDXLConditioner, dict]:
    """``(SDXLConditioner, {"text_encoder"?, "text_encoder_2"})`` of a diffusers SDXL folder
    (base: ``tokenizer/``, ``text_encoder/``, ``tokenizer_2/``, ``text_encoder_2/``; refiner:
    only the second pair). ``model_index.json`` gives ``force_zeros_for_empty_prompt`` and
    ``requires_aesthetics_score`` (``aesthetic`` None: from there, default False)."""
    from ldm_jax.interop.transformers_clip import load_clip_text_encoder

    index_path = os.path.join(folder, "model_index.json")
    index = _read_json_file(index_path) if os.path.isfile(index_path) else {}
    kw = dict(context_layer="penultimate", context_final_norm=False, dtype=dtype, variant=variant)
    params = {}
    encoder_2, params["text_encoder_2"] = load_clip_text_encoder(folder, subfolder="text_encoder_2", **kw)
    tokenizer_2 = load_clip_tokenizer(os.path.join(folder, "tokenizer_2"))
    encoder = tokenizer = None
    entry = index.get("text_encoder")
    if os.path.isdir(os.path.join(folder, "text_encoder")) and (entry is None or entry[0] is not None):
        encoder, params["text_encoder"] = load_clip_text_encoder(folder, subfolder="text_encoder", **kw)
        tokenizer = load_clip_tokenizer(os.path.join(folder, "tokenizer"))
    if aesthetic is None:
        aesthetic = bool(index.get("requires_aesthetics_score", False))
    conditioner = SDXLConditioner(
        tokenizer_2, encoder_2, tokenizer, encoder, aesthetic=aesthetic,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
    )
    return conditioner, params


# ----------------------------------------------------------------------------- building from a config


def check_guidance_setting(interval: Any, conditioner: Any, where: str) -> None:
    """Refuse, in one line, a ``guidance_interval`` (set, i.e. not ``()``) that is malformed or
    that a model without a null condition could never apply: silently sampling unguided would
    make the setting look effective. (``guidance_scale`` itself defaults to 3 for every model
    and is ignored by unconditional ones, so only the explicit interval is refused.)"""
    interval = tuple(interval or ())
    if not interval:
        return
    try:
        check_guidance_interval(interval)
    except ValueError as error:
        raise ValueError(f"{where}.{error}") from None
    if not getattr(conditioner, "has_null", False):
        raise ValueError(f"{where}.guidance_interval={interval} needs classifier-free guidance, but the model's "
                         f"conditioning {getattr(conditioner, 'kind', 'none')!r} has no null condition to guide against")


def _build_none(cond, drop_prob, num_classes, has_captions):
    return Unconditional(), None


def _build_class(cond, drop_prob, num_classes, has_captions):
    if not num_classes:
        raise ValueError("config.conditioning.kind='class' but the dataset has no labels")
    embedder = None
    if cond.class_as_context:
        embedder = ClassEmbedder(num_classes=int(num_classes), embed_dim=int(cond.class_embed_dim))
    return ClassConditioner(int(num_classes), embedder, drop_prob=drop_prob), None


def _build_text(cond, drop_prob, num_classes, has_captions):
    length = int(cond.text_max_length)
    encoder = TextTransformer(
        max_length=length, width=int(cond.text_width), depth=int(cond.text_depth), num_heads=int(cond.text_heads)
    )
    return TextConditioner(ByteTokenizer(length), encoder, drop_prob=drop_prob), None


def _build_clip(cond, drop_prob, num_classes, has_captions):
    from ldm_jax.interop.transformers_clip import load_clip_text_encoder

    path = str(cond.clip_path or "")
    if not path or not os.path.isdir(path):
        raise ValueError(f"config.conditioning.clip_path {path!r} is not a directory")
    encoder, params = load_clip_text_encoder(path, context_layer=cond.clip_context_layer)
    tokenizer_dir = os.path.join(path, "tokenizer") if os.path.isdir(os.path.join(path, "tokenizer")) else path
    return TextConditioner(CLIPTokenizer.from_pretrained(tokenizer_dir), encoder, drop_prob=drop_prob), params


def _build_sdxl(cond, drop_prob, num_classes, has_captions):
    path = str(cond.clip_path or "")
    if not path or not os.path.isdir(path):
        raise ValueError(f"config.conditioning.clip_path {path!r} is not an SDXL diffusers folder")
    conditioner, params = load_sdxl_conditioner(path)
    return dataclasses.replace(conditioner, drop_prob=drop_prob), params


# config.conditioning.kind -> builder(section, drop_prob, num_classes, has_captions) ->
# (conditioner, frozen params or None). Kinds that need captions are listed in NEEDS_CAPTIONS.
CONDITIONER_BUILDERS: dict[str, Callable[..., tuple[Conditioner, Any]]] = {
    "none": _build_none,
    "class": _build_class,
    "text": _build_text,
    "clip": _build_clip,
    "sdxl": _build_sdxl,
}
NEEDS_CAPTIONS = ("text", "clip", "sdxl")
assert tuple(CONDITIONER_BUILDERS) == CONDITIONING_KINDS


def build_conditioner(cond: Any, num_classes: int | None, has_captions: bool) -> tuple[Conditioner, Any]:
    """``(conditioner, frozen params or None)`` of a completed ``config.conditioning`` for a
    dataset with ``num_classes`` labels (or None) and captions (or not)."""
    kind = choice("config.conditioning.kind", cond.kind, CONDITIONING_KINDS)
    drop_prob = float(cond.drop_prob)
    if not 0.0 <= drop_prob <= 1.0:
        raise ValueError(f"config.conditioning.drop_prob must be in [0, 1], got {drop_prob}")
    if kind in NEEDS_CAPTIONS and not has_captions:
        raise ValueError(f"config.conditioning.kind={kind!r} but the dataset has no captions")
    if kind == "none":
        drop_prob = 0.0
    return CONDITIONER_BUILDERS[kind](cond, drop_prob, num_classes, has_captions)


# ----------------------------------------------------------------------------- concat conditions


def binarize_mask(mask) -> jax.Array:
    """A repaint mask in [0, 1] -> {0, 1} float32 (>= 0.5 is 1), as diffusers binarises."""
    return (jnp.asarray(mask, jnp.float32) >= 0.5).astype(jnp.float32)


def latent_mask(mask, factor: int, mode: str = "nearest") -> jax.Array:
    """Pixel repaint mask [B, H, W, 1] (1 = repaint) -> latent grid [B, H/f, W/f, 1].

    ``"nearest"`` keeps the top-left pixel of each f x f block (torch's nearest interpolation,
    which Stable Diffusion's inpainting models were trained with); ``"max"`` marks a latent
    cell for repainting when any of its pixels is (so every pixel the user asked to repaint is
    regenerated; used for known-region replacement).
    """
    mask = binarize_mask(mask)
    if factor == 1:
        return mask
    if mode == "nearest":
        return mask[:, ::factor, ::factor, :]
    if mode == "max":
        b, h, w, c = mask.shape
        return mask.reshape(b, h // factor, factor, w // factor, factor, c).max(axis=(2, 4))
    raise ValueError(f"unknown latent mask mode {mode!r}; expected 'nearest' or 'max'")


def masked_image(images, mask) -> jax.Array:
    """The image the inpainting U-Net's extra latents encode: pixels to repaint set to 0 (grey
    in [-1, 1]), as diffusers' ``init_image * (mask < 0.5)``."""
    return images * (1.0 - binarize_mask(mask))


def low_res_condition(low_res, latent_hw: tuple[int, int]) -> jax.Array:
    """Low-resolution image [B, h, w, C] in [-1, 1] -> the channels concatenated to the U-Net
    input: resized to the latent grid ``latent_hw`` with bicubic interpolation (identity when
    it already has that size). Training a super-resolution model must use this function."""
    low_res = jnp.asarray(low_res, jnp.float32)
    b, h, w, c = low_res.shape
    if (h, w) == tuple(latent_hw):
        return low_res
    return jax.image.resize(low_res, (b, *latent_hw, c), method="cubic")
