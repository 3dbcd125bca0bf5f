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
import os
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.guidance import drop_conditioning
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


Conditioner = Any  # TextConditioner | ClassConditioner | Unconditional


# ----------------------------------------------------------------------------- building from a config


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


# config.conditioning.kind -> builder(section, drop_prob, num_classes, has_captions) ->
# (conditioner, frozen params or None). Kinds that need captions are listed in NEEDS_CAPTIONS.
CONDITIONER_BUILDERS: dict[str, Callable[..., tuple[Conditioner, Any]]] = {
    "none": _build_none,
    "class": _build_class,
    "text": _build_text,
    "clip": _build_clip,
}
NEEDS_CAPTIONS = ("text", "clip")
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
