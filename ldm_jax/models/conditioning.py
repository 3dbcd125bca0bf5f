"""Conditioning encoders trained with the diffusion model: class labels and a from-scratch text
transformer (the LDM paper's BERT-like text-to-image encoder), plus condition dropout for
classifier-free guidance.

* :class:`ClassEmbedder`: labels [B] -> [B, D] (added to the U-Net time embedding) or
  [B, 1, D] (a one-token cross-attention context). Row ``num_classes`` is the null label.
* :class:`TextTransformer`: ids [B, L] + mask [B, L] from
  :class:`ldm_jax.models.tokenizers.ByteTokenizer` -> context [B, L, D]. The unconditional
  input for guidance is the tokenized empty string ``""``.
* :func:`drop_labels` / :func:`drop_to_null`: replace a random fraction of a batch's
  conditions with the null condition.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models import partitioning as P
from ldm_jax.models.clip import ACTIVATIONS, Encoder, TextEmbeddings

Dtype = Any


class ClassEmbedder(nn.Module):
    """Class-label embedding with a learned null label for classifier-free guidance.

    The table has ``num_classes + 1`` rows; label ``num_classes`` (:attr:`null_label`) is the
    "no class" embedding. Labels outside ``[0, num_classes]`` are not checked under ``jit``
    (``nn.Embed`` clamps them); keep them in range.

    Call: ``labels`` int [B] -> [B, embed_dim], or [B, 1, embed_dim] with ``as_context=True``.
    Rows are initialised N(0, 1) like ``torch.nn.Embedding`` in LDM's ``ClassEmbedder``.
    """

    num_classes: int
    embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def null_label(self) -> int:
        return self.num_classes

    @nn.compact
    def __call__(self, labels, as_context: bool = False):
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
        if labels.ndim != 1:
            raise ValueError(f"labels must have shape [batch], got {labels.shape}")
        table = P.embed(
            self.num_classes + 1, self.embed_dim, dtype=self.dtype, param_dtype=self.param_dtype,
            embedding_init=nn.initializers.normal(stddev=1.0), name="embedding",
        )
        emb = table(labels)
        return emb[:, None, :] if as_context else emb


def drop_to_null(values: jax.Array, key: jax.Array, p: float, null_value) -> jax.Array:
    """Replace each row of ``values`` [B, ...] by ``null_value`` (broadcastable to one row
    ``values.shape[1:]``) independently with probability ``p``. Pure; jit-friendly."""
    if isinstance(p, (int, float)) and not 0.0 <= p <= 1.0:
        raise ValueError(f"drop probability must be in [0, 1], got {p!r}")
    drop = jax.random.bernoulli(key, p, (values.shape[0],))
    drop = drop.reshape((-1,) + (1,) * (values.ndim - 1))
    return jnp.where(drop, jnp.asarray(null_value, dtype=values.dtype), values)


def drop_labels(labels: jax.Array, key: jax.Array, p: float, null_label: int) -> jax.Array:
    """Condition dropout for class labels: each label [B] becomes ``null_label`` with probability ``p``."""
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape [batch], got {labels.shape}")
    return drop_to_null(labels, key, p, null_label)


class TextTransformer(nn.Module):
    """Bidirectional text transformer trained from scratch (LDM's BERT-like text encoder).

    Token + learned position embeddings -> ``depth`` pre-LayerNorm layers (self-attention
    that ignores padding keys, GELU MLP) -> final LayerNorm.

    Call: ``ids`` int [B, L] and ``mask`` bool [B, L] (True at real tokens, e.g. from
    ``ByteTokenizer``; None = no padding), ``L <= max_length`` -> context [B, L, width].
    Outputs at padded positions are computed but meaningless; the U-Net's cross-attention
    attends to them like the reference LDM does, so padding must be deterministic (it is).
    """

    vocab_size: int = 259
    max_length: int = 77
    width: int = 512
    depth: int = 6
    num_heads: int = 8
    mlp_ratio: int = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids, mask=None):
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r}; expected one of {ACTIVATIONS}")
        if ids.ndim != 2:
            raise ValueError(f"ids must be [batch, length], got shape {ids.shape}")
        if ids.shape[1] > self.max_length:
            raise ValueError(f"sequence length {ids.shape[1]} exceeds max_length {self.max_length}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = TextEmbeddings(self.vocab_size, self.max_length, self.width, name="embeddings", **kw)(ids)
        states = Encoder(
            self.depth, self.num_heads, self.width * self.mlp_ratio, self.hidden_act, self.layer_norm_eps,
            causal=False, name="encoder", **kw,
        )(x, mask)
        out = P.layer_norm(epsilon=self.layer_norm_eps, param_dtype=self.param_dtype, name="final_layer_norm")(
            states[-1]
        )
        return out.astype(self.dtype)
