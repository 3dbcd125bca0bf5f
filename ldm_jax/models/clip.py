"""CLIP text encoder (the text tower of CLIP ViT-L/14 used by Stable Diffusion 1.x and SDXL, of
OpenCLIP ViT-H/14 used by 2.x, and of OpenCLIP ViT-bigG/14 used by SDXL), laid out like
transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` so that weights convert by
renaming (see ``ldm_jax.interop.transformers_clip``).

Architecture: token + learned position embeddings -> N pre-LayerNorm transformer layers
(causal self-attention, MLP with quick_gelu or gelu) -> final LayerNorm. The pooled output is
the final hidden state at the end-of-text token; ``with_projection`` adds transformers'
``text_projection`` (no bias) of it, ``text_embeds`` (SDXL's pooled conditioning).

Parameter tree (Flax names, torch names in brackets)::

    embeddings/token_embedding/embedding           [embeddings.token_embedding.weight]
    embeddings/position_embedding/embedding        [embeddings.position_embedding.weight]
    encoder/layers_{i}/layer_norm1/{scale,bias}     [encoder.layers.{i}.layer_norm1.{weight,bias}]
    encoder/layers_{i}/self_attn/{q,k,v,out}_proj   [encoder.layers.{i}.self_attn.{q,k,v,out}_proj]
    encoder/layers_{i}/layer_norm2
    encoder/layers_{i}/mlp/fc1, mlp/fc2
    final_layer_norm
    text_projection/kernel (with_projection)      [text_projection.weight]
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.kernels import dot_product_attention
from ldm_jax.models import partitioning as P

Dtype = Any

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")
CONTEXT_LAYERS = ("last", "penultimate")

# The EOS id in configs written before transformers PR #24773 (SD 1.x/2.x text encoders); with it
# transformers pools at argmax(input_ids), which is EOS for the original CLIP vocabulary.
LEGACY_EOS_TOKEN_ID = 2


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Hyper-parameters, named as in transformers' ``CLIPTextConfig``.

    ``eos_token_id`` selects the pooling rule exactly as transformers does: ``2`` (legacy
    configs, including Stable Diffusion's) pools at ``argmax(input_ids)``; any other value pools
    at the first position holding ``eos_token_id``.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 0
    eos_token_id: int = LEGACY_EOS_TOKEN_ID
    pad_token_id: int = 1
    projection_dim: int = 512  # width of text_embeds (only used with_projection)

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; expected one of {ACTIVATIONS}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "projection_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    @classmethod
    def vit_l14(cls) -> "CLIPTextConfig":
        """OpenAI CLIP ViT-L/14 text tower (Stable Diffusion 1.x, SDXL's first encoder):
        123,060,480 parameters."""
        return cls(projection_dim=768)

    @classmethod
    def open_clip_vit_h14(cls, num_hidden_layers: int = 23) -> "CLIPTextConfig":
        """OpenCLIP ViT-H/14 text tower as in Stable Diffusion 2.x. diffusers ships it with the
        last of its 24 layers removed (23), which equals the "penultimate" output of the full tower."""
        return cls(hidden_size=1024, intermediate_size=4096, num_hidden_layers=num_hidden_layers,
                   num_attention_heads=16, hidden_act="gelu")

    @classmethod
    def open_clip_vit_bigg14(cls) -> "CLIPTextConfig":
        """OpenCLIP ViT-bigG/14 text tower, SDXL's ``text_encoder_2`` (a transformers
        ``CLIPTextModelWithProjection``: 32 layers of width 1280, 1280-wide projection)."""
        return cls(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "CLIPTextConfig":
        """From a transformers ``config.json`` dict (a full ``CLIPConfig`` uses its ``text_config``).
        Unknown keys are ignored."""
        if "text_config" in config and isinstance(config["text_config"], Mapping):
            config = config["text_config"]
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in names and v is not None}
        if isinstance(kwargs.get("eos_token_id"), list):
            raise ValueError(f"a list eos_token_id is not supported: {kwargs['eos_token_id']!r}")
        return cls(**kwargs)

    def to_dict(self, with_projection: bool = False) -> dict[str, Any]:
        """A transformers-loadable ``CLIPTextModel`` (``CLIPTextModelWithProjection``) config dict."""
        out = dataclasses.asdict(self)
        architecture = "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"
        out.update(architectures=[architecture], model_type="clip_text_model", attention_dropout=0.0,
                   initializer_factor=1.0, initializer_range=0.02, torch_dtype="float32")
        return out


def activation(name: str, x: jax.Array) -> jax.Array:
    """transformers' ACT2FN entries used by CLIP text towers."""
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    raise ValueError(f"unsupported activation {name!r}; expected one of {ACTIVATIONS}")


class SelfAttention(nn.Module):
    """Multi-head self-attention with q/k/v/out projections (CLIP names).

    Shapes: x [B, L, D]; key_mask bool [B, L] (True = attend) or None -> [B, L, D].
    """

    num_heads: int
    causal: bool = False
    attention: str = "auto"  # ldm_jax.kernels backend name
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask=None):
        b, l, d = x.shape
        head_dim = d // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        proj = lambda name: P.dense(d, names=("embed", "heads"), name=name, **kw)  # noqa: E731
        q = proj("q_proj")(x).reshape(b, l, self.num_heads, head_dim)
        k = proj("k_proj")(x).reshape(b, l, self.num_heads, head_dim)
        v = proj("v_proj")(x).reshape(b, l, self.num_heads, head_dim)
        if key_mask is not None:
            key_mask = key_mask.astype(bool)  # [B, L(key)]
        out = dot_product_attention(q, k, v, key_mask=key_mask, is_causal=self.causal, backend=self.attention)
        out = out.reshape(b, l, d)
        return P.dense(d, names=("heads", "embed"), name="out_proj", **kw)(out)


class MLP(nn.Module):
    """fc1 -> activation -> fc2. Shapes: [B, L, D] -> [B, L, D]."""

    intermediate_size: int
    hidden_act: str = "quick_gelu"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = P.dense(self.intermediate_size, names=("embed", "mlp"), name="fc1", **kw)(x)
        h = activation(self.hidden_act, h)
        return P.dense(x.shape[-1], names=("mlp", "embed"), name="fc2", **kw)(h)


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``.

    LayerNorms run in float32 and are cast back to ``dtype``.
    Shapes: x [B, L, D]; key_mask bool [B, L] or None -> [B, L, D].
    """

    num_heads: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    causal: bool = False
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = P.layer_norm(epsilon=self.layer_norm_eps, param_dtype=self.param_dtype, name="layer_norm1")(x)
        h = SelfAttention(self.num_heads, causal=self.causal, attention=self.attention, name="self_attn", **kw)(h.astype(self.dtype), key_mask)
        x = x + h
        h = P.layer_norm(epsilon=self.layer_norm_eps, param_dtype=self.param_dtype, name="layer_norm2")(x)
        h = MLP(self.intermediate_size, self.hidden_act, name="mlp", **kw)(h.astype(self.dtype))
        return x + h


class Encoder(nn.Module):
    """A stack of ``EncoderLayer`` named ``layers_{i}``; returns the input and every layer's
    output: a tuple of ``num_layers + 1`` arrays [B, L, D] (transformers' ``hidden_states``)."""

    num_layers: int
    num_heads: int
    intermediate_size: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    causal: bool = False
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, key_mask=None):
        states = [x]
        for i in range(self.num_layers):
            x = EncoderLayer(
                self.num_heads, self.intermediate_size, self.hidden_act, self.layer_norm_eps, self.causal,
                attention=self.attention, dtype=self.dtype, param_dtype=self.param_dtype, name=f"layers_{i}",
            )(x, key_mask)
            states.append(x)
        return tuple(states)


class CLIPTextOutput(NamedTuple):
    """Outputs of :class:`CLIPTextEncoder`.

    context: [B, L, D], the cross-attention context chosen by ``context_layer``.
    last_hidden_state: [B, L, D], final LayerNorm of the last layer (transformers' name).
    pooled_output: [B, D], ``last_hidden_state`` at the end-of-text token.
    hidden_states: tuple of num_layers + 1 arrays [B, L, D] (embeddings, then each layer,
      without final LayerNorm) when requested, else None.
    text_embeds: [B, projection_dim], ``text_projection(pooled_output)`` when the encoder was
      built ``with_projection`` (transformers' ``CLIPTextModelWithProjection.text_embeds``), else None.
    """

    context: jax.Array
    last_hidden_state: jax.Array
    pooled_output: jax.Array
    hidden_states: tuple | None = None
    text_embeds: jax.Array | None = None


class CLIPTextEncoder(nn.Module):
    """CLIP text transformer (transformers ``CLIPTextModel`` numerics and layout).

    Attributes:
      config: :class:`CLIPTextConfig`.
      context_layer: ``"last"`` (SD 1.x: ``last_hidden_state``) or ``"penultimate"`` (SD 2.x with
        the full 24-layer OpenCLIP tower: ``hidden_states[-2]``, followed by the final LayerNorm
        when ``context_final_norm``; SDXL-style skips that norm).
      context_final_norm: apply ``final_layer_norm`` to the penultimate context.
      with_projection: add ``text_projection`` and return ``text_embeds`` (SDXL's second
        encoder is ``context_layer="penultimate", context_final_norm=False, with_projection=True``;
        its first, CLIP ViT-L/14, the same without projection).
      dtype: compute dtype (LayerNorms and softmax stay float32); param_dtype: parameters.

    Call: ``(input_ids int [B, L], attention_mask [B, L] or None, output_hidden_states=False)``
    with ``L <= max_position_embeddings`` -> :class:`CLIPTextOutput`. The causal mask is always
    applied; ``attention_mask`` additionally hides padding keys (Stable Diffusion passes none).
    All layers always run, so ``pooled_output`` is the full tower's in either mode.
    """

    config: CLIPTextConfig = CLIPTextConfig()
    context_layer: str = "last"
    context_final_norm: bool = True
    with_projection: bool = False
    attention: str = "auto"  # attention backend (ldm_jax.kernels); "auto" picks per platform/shape
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False) -> CLIPTextOutput:
        cfg = self.config
        if self.context_layer not in CONTEXT_LAYERS:
            raise ValueError(f"unknown context_layer {self.context_layer!r}; expected one of {CONTEXT_LAYERS}")
        if self.context_layer == "penultimate" and cfg.num_hidden_layers < 2:
            raise ValueError(f"context_layer 'penultimate' needs >= 2 layers, got {cfg.num_hidden_layers}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        length = input_ids.shape[1]
        if length > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings {cfg.max_position_embeddings}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        x = TextEmbeddings(cfg.vocab_size, cfg.max_position_embeddings, cfg.hidden_size, name="embeddings", **kw)(
            input_ids
        )
        states = Encoder(
            cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size, cfg.hidden_act,
            cfg.layer_norm_eps, causal=True, attention=self.attention, name="encoder", **kw,
        )(x, attention_mask)
        final_norm = P.layer_norm(epsilon=cfg.layer_norm_eps, param_dtype=self.param_dtype, name="final_layer_norm")
        last = final_norm(states[-1]).astype(self.dtype)

        if cfg.eos_token_id == LEGACY_EOS_TOKEN_ID:
            eos_index = jnp.argmax(input_ids, axis=-1)
        else:
            # First EOS (the pad token may equal EOS); assumes every row holds one, as transformers does.
            eos_index = jnp.argmax(input_ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, eos_index[:, None, None], axis=1)[:, 0]

        if self.context_layer == "last":
            context = last if self.context_final_norm else states[-1]
        else:
            context = final_norm(states[-2]).astype(self.dtype) if self.context_final_norm else states[-2]
        text_embeds = None
        if self.with_projection:
            text_embeds = P.dense(cfg.projection_dim, use_bias=False, name="text_projection", **kw)(pooled)
        return CLIPTextOutput(context, last, pooled, states if output_hidden_states else None, text_embeds)


class TextEmbeddings(nn.Module):
    """Token plus learned absolute position embeddings: ids [B, L] -> [B, L, D]."""

    vocab_size: int
    max_positions: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = P.embed(self.vocab_size, self.features, name="token_embedding", **kw)(input_ids)
        positions = P.embed(self.max_positions, self.features, name="position_embedding", **kw)(
            jnp.arange(input_ids.shape[1])
        )
        return tokens + positions[None]
