"""The parts a :class:`~ldm_jax.pipeline.pipeline.LatentDiffusionPipeline` is built from,
behind small uniform interfaces, and the conditioning conventions shared with training.

First stages (pixels <-> what the U-Net sees), all NHWC, images in [-1, 1]:

* :class:`KLFirstStage` - ``AutoencoderKL`` (Stable Diffusion's VAE);
* :class:`VQFirstStage` - ``VQModel`` (LDM's VQ-f4/f8; decoding quantises);
* :class:`PixelSpace` - the identity, for pixel-space diffusion.

Each has ``encode(variables, images, noise) -> latents`` (diffusion scale:
``scale_factor * (z - shift_factor)``; ``noise`` None takes the posterior mean) and
``decode(variables, latents) -> images``.

Conditioners (host-side inputs -> U-Net keyword arguments inside ``jit``):

* :class:`TextConditioner` - a tokenizer (CLIP BPE or byte) and a text encoder
  (``CLIPTextEncoder`` or the from-scratch ``TextTransformer``) -> ``context`` [B, L, D];
  the null condition is the empty prompt (or a negative prompt);
* :class:`ClassConditioner` - class ids -> the U-Net's own class embedding
  (``class_labels``), or a :class:`~ldm_jax.models.conditioning.ClassEmbedder` used as a
  one-token cross-attention ``context``; the null condition is label ``num_classes``;
* :class:`Unconditional`.

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
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models.autoencoder import AutoencoderKL, VQModel
from ldm_jax.models.clip import CLIPTextEncoder
from ldm_jax.models.conditioning import ClassEmbedder, TextTransformer
from ldm_jax.models.tokenizers import ByteTokenizer, CLIPTokenizer

CONCAT_KINDS = (None, "inpainting", "low_res")

# ----------------------------------------------------------------------------- first stages


@dataclasses.dataclass(frozen=True, eq=False)
class KLFirstStage:
    """``AutoencoderKL``; ``encode`` samples the posterior with the given standard-normal
    ``noise`` (or takes its mean when ``noise`` is None)."""

    module: AutoencoderKL
    kind = "kl"

    @property
    def factor(self) -> int:
        return self.module.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.module.latent_channels

    @property
    def image_channels(self) -> int:
        return self.module.in_channels

    def encode(self, variables, images, noise=None):
        """images [B, H, W, C] in [-1, 1] -> diffusion latents [B, H/f, W/f, latent_channels]."""

        def fn(m, x):
            posterior = m.encode(x)
            z = posterior.mean if noise is None else posterior.mean + posterior.std * noise
            return m.latents_for_diffusion(z)

        return self.module.apply(variables, images, method=fn)

    def decode(self, variables, latents):
        """diffusion latents [B, h, w, latent_channels] -> images [B, h*f, w*f, C], ~[-1, 1]."""
        return self.module.apply(variables, latents, method=lambda m, z: m.decode(m.latents_from_diffusion(z)))


@dataclasses.dataclass(frozen=True, eq=False)
class VQFirstStage:
    """``VQModel``: the diffusion model works on ``scale_factor * h`` with ``h`` the
    pre-quantisation latents; decoding quantises (as LDM). ``noise`` is ignored."""

    module: VQModel
    kind = "vq"

    @property
    def factor(self) -> int:
        return self.module.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.module.embed_dim

    @property
    def image_channels(self) -> int:
        return self.module.in_channels

    def encode(self, variables, images, noise=None):
        return self.module.apply(variables, images, method=lambda m, x: m.latents_for_diffusion(m.encode(x)))

    def decode(self, variables, latents):
        return self.module.apply(variables, latents, method=lambda m, z: m.decode(m.latents_from_diffusion(z)))


@dataclasses.dataclass(frozen=True)
class PixelSpace:
    """The identity first stage of a pixel-space diffusion model (``channels`` image channels)."""

    channels: int = 3
    kind = "identity"
    factor = 1

    @property
    def latent_channels(self) -> int:
        return self.channels

    @property
    def image_channels(self) -> int:
        return self.channels

    def encode(self, variables, images, noise=None):
        return images.astype(jnp.float32)

    def decode(self, variables, latents):
        return latents


FirstStage = Any  # KLFirstStage | VQFirstStage | PixelSpace

# ----------------------------------------------------------------------------- conditioners


@dataclasses.dataclass(frozen=True, eq=False)
class TextConditioner:
    """Prompts -> cross-attention context.

    Attributes:
      tokenizer: :class:`CLIPTokenizer` or :class:`ByteTokenizer` (runs on the host).
      encoder: :class:`CLIPTextEncoder` (its ``context`` output; no attention mask, as the
        Stable Diffusion pipelines) or :class:`TextTransformer` (padding mask from the
        tokenizer).
    """

    tokenizer: CLIPTokenizer | ByteTokenizer
    encoder: CLIPTextEncoder | TextTransformer
    kind = "text"
    has_null = True

    def __post_init__(self):
        if not isinstance(self.encoder, (CLIPTextEncoder, TextTransformer)):
            raise ValueError(f"text encoder must be a CLIPTextEncoder or TextTransformer, got {type(self.encoder).__name__}")

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


@dataclasses.dataclass(frozen=True, eq=False)
class ClassConditioner:
    """Class ids -> the U-Net's class embedding (``embedder`` None: ``class_labels``) or a
    :class:`ClassEmbedder` used as a one-token cross-attention context ``[B, 1, D]``.
    Label ``num_classes`` is the null class of classifier-free guidance."""

    num_classes: int
    embedder: ClassEmbedder | None = None
    kind = "class"
    has_null = True

    def __post_init__(self):
        if not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
        if self.embedder is not None and self.embedder.num_classes != self.num_classes:
            raise ValueError(f"ClassEmbedder has {self.embedder.num_classes} classes, expected {self.num_classes}")

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


@dataclasses.dataclass(frozen=True)
class Unconditional:
    """No conditioning (classifier-free guidance does not apply)."""

    kind = "none"
    has_null = False

    def host_inputs(self, conditions) -> dict[str, np.ndarray]:
        return {}

    def null_host_inputs(self, count: int, negative=None) -> dict[str, np.ndarray]:
        raise ValueError("an unconditional model has no null condition")

    def encode(self, params, inputs) -> dict[str, jax.Array]:
        return {}


Conditioner = Any  # TextConditioner | ClassConditioner | Unconditional

# ----------------------------------------------------------------------------- concat conventions


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
