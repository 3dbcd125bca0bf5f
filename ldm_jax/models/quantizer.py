"""Vector quantisation with a straight-through gradient (VQ-VAE, van den Oord et al. 2017), with
an optional exponential-moving-average codebook (their appendix A.1; VQ-VAE-2).

Loss (gradient-trained codebook)::

    codebook_loss   = mean ||sg[z] - e||^2          (moves the codebook)
    commitment_loss = mean ||z - sg[e]||^2          (moves the encoder)
    loss = codebook_loss + beta * commitment_loss

``legacy_beta=True`` swaps where ``beta`` goes (``beta * codebook_loss + commitment_loss``),
which is what taming-transformers' / diffusers' ``VectorQuantizer`` computes by default; use it
to reproduce their loss values.

EMA codebook (``use_ema=True``): the codebook gets no gradient, ``loss = beta * commitment``,
and a step with ``update_ema=True`` (collection ``"vq_ema"`` mutable) sets, with one-hot
assignments of the batch (n_i = #vectors assigned to code i, s_i = their sum)::

    N_i <- decay * N_i + (1 - decay) * n_i
    m_i <- decay * m_i + (1 - decay) * s_i
    N~_i = (N_i + eps) / (sum_j N_j + K eps) * sum_j N_j        (Laplace smoothing)
    e_i  = m_i / N~_i

The statistics start at N_i = 1, m_i = e_i (the initial codebook), so the codebook is
consistent with its statistics from the start; starting from N = 0 instead makes e = m / N~
of still unused codes explode to ~e / eps on the first update. Under ``jax.jit`` with a
data-sharded batch, n and s are global sums, so every device applies the same update.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Dtype = Any

EMA_COLLECTION = "vq_ema"


@flax.struct.dataclass
class QuantizerOutput:
    """What a quantiser step reports. ``loss`` is the term to add (times codebook_weight) to the
    autoencoder loss; ``perplexity`` = exp(entropy of the batch's code histogram) (K when all
    K codes are used equally, 1 when one code takes everything); ``codebook_usage`` = fraction
    of the K codes used at least once in the batch. ``indices``: [B, h, w] int32."""

    loss: jax.Array
    codebook_loss: jax.Array
    commitment_loss: jax.Array
    indices: jax.Array
    perplexity: jax.Array
    codebook_usage: jax.Array


def nearest_code(z_flat, codebook):
    """Index of the nearest (squared Euclidean) codebook row for each row of ``z_flat``.

    Shapes: z_flat [N, D], codebook [K, D] -> [N] int32. Computed in float32 at full matmul
    precision so ties are broken like an exact computation would.
    """
    z_flat = z_flat.astype(jnp.float32)
    codebook = codebook.astype(jnp.float32)
    distances = (
        jnp.sum(jnp.square(z_flat), axis=1, keepdims=True)
        - 2.0 * jnp.matmul(z_flat, codebook.T, precision=jax.lax.Precision.HIGHEST)
        + jnp.sum(jnp.square(codebook), axis=1)[None, :]
    )
    return jnp.argmin(distances, axis=1).astype(jnp.int32)


def code_histogram_stats(indices, num_embeddings: int):
    """(perplexity, usage fraction) of integer code ``indices`` (any shape) over K codes."""
    counts = jnp.bincount(indices.reshape(-1), length=num_embeddings).astype(jnp.float32)
    probs = counts / jnp.maximum(jnp.sum(counts), 1.0)
    entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)), 0.0))
    return jnp.exp(entropy), jnp.mean((counts > 0).astype(jnp.float32))


def ema_codebook_update(cluster_size, embed_sum, z_flat, indices, decay: float, epsilon: float):
    """One EMA step (see the module docstring). Returns new (cluster_size, embed_sum, codebook).

    Shapes: cluster_size [K], embed_sum [K, D], z_flat [N, D], indices [N].
    """
    num_embeddings = cluster_size.shape[0]
    one_hot = jax.nn.one_hot(indices, num_embeddings, dtype=jnp.float32)
    batch_counts = jnp.sum(one_hot, axis=0)
    batch_sums = jnp.matmul(one_hot.T, z_flat.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    cluster_size = decay * cluster_size + (1.0 - decay) * batch_counts
    embed_sum = decay * embed_sum + (1.0 - decay) * batch_sums
    total = jnp.sum(cluster_size)
    smoothed = (cluster_size + epsilon) / (total + num_embeddings * epsilon) * total
    return cluster_size, embed_sum, embed_sum / smoothed[:, None]


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantisation of the last axis with a straight-through estimator.

    Shapes: z [..., D] -> (z_q [..., D] in z's dtype, :class:`QuantizerOutput`).
    The forward value of ``z_q`` is the codebook entry; its gradient with respect to ``z`` is
    the identity (``z + sg[e - z]``).

    Variables: ``params/embedding`` [K, D] (gradient-trained), or with ``use_ema=True`` the
    ``vq_ema`` collection {``embedding`` [K, D], ``cluster_size`` [K], ``embed_sum`` [K, D]}.
    """

    num_embeddings: int
    embedding_dim: int
    beta: float = 0.25
    legacy_beta: bool = False
    use_ema: bool = False
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.num_embeddings < 1:
            raise ValueError(f"num_embeddings must be >= 1, got {self.num_embeddings}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        k, d = self.num_embeddings, self.embedding_dim
        # taming / diffusers initialise the codebook uniformly in [-1/K, 1/K].
        init = nn.initializers.uniform(scale=2.0 / k)

        def codebook_init(key, shape, dtype):
            return init(key, shape, dtype) - 1.0 / k

        if self.use_ema:
            self.embedding_var = self.variable(
                EMA_COLLECTION,
                "embedding",
                nn.with_logical_partitioning(codebook_init, ("vocab", "embed")),
                self.make_rng("params") if self.is_initializing() else None,
                (k, d),
                jnp.float32,
            )
            self.cluster_size = self.variable(
                EMA_COLLECTION, "cluster_size", nn.with_logical_partitioning(jnp.ones, ("vocab",)), (k,), jnp.float32
            )
            # Starts equal to the initial codebook (with N = 1): see the module docstring.
            self.embed_sum = self.variable(
                EMA_COLLECTION,
                "embed_sum",
                nn.with_logical_partitioning(lambda: jnp.asarray(self.embedding_var.value), ("vocab", "embed")),
            )
        else:
            self.embedding = self.param(
                "embedding", nn.with_logical_partitioning(codebook_init, ("vocab", "embed")), (k, d), self.param_dtype
            )

    def codebook(self):
        """[K, D] float32 codebook."""
        table = self.embedding_var.value if self.use_ema else self.embedding
        return jnp.asarray(table, jnp.float32)

    def lookup(self, indices):
        """Integer indices [...] -> codebook vectors [..., D] (float32)."""
        return jnp.take(self.codebook(), indices, axis=0)

    def __call__(self, z, update_ema: bool = False):
        if z.shape[-1] != self.embedding_dim:
            raise ValueError(f"expected last axis {self.embedding_dim}, got shape {z.shape}")
        codebook = self.codebook()
        z32 = z.astype(jnp.float32)
        z_flat = z32.reshape(-1, self.embedding_dim)
        indices = nearest_code(jax.lax.stop_gradient(z_flat), codebook)
        e = jnp.take(codebook, indices, axis=0).reshape(z32.shape)

        commitment = jnp.mean(jnp.square(z32 - jax.lax.stop_gradient(e)))
        if self.use_ema:
            codebook_loss = jnp.zeros((), jnp.float32)
            loss = self.beta * commitment
        else:
            codebook_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z32) - e))
            loss = self.beta * codebook_loss + commitment if self.legacy_beta else codebook_loss + self.beta * commitment

        if update_ema:
            if not self.use_ema:
                raise ValueError("update_ema=True needs a quantizer built with use_ema=True")
            if not self.is_mutable_collection(EMA_COLLECTION):
                raise ValueError(f"update_ema=True needs apply(..., mutable=[{EMA_COLLECTION!r}])")
            if not self.is_initializing():
                cluster_size, embed_sum, new_codebook = ema_codebook_update(
                    self.cluster_size.value,
                    self.embed_sum.value,
                    jax.lax.stop_gradient(z_flat),
                    indices,
                    self.ema_decay,
                    self.ema_epsilon,
                )
                self.cluster_size.value = cluster_size
                self.embed_sum.value = embed_sum
                self.embedding_var.value = new_codebook

        z_q = z32 + jax.lax.stop_gradient(e - z32)
        perplexity, usage = code_histogram_stats(indices, self.num_embeddings)
        out = QuantizerOutput(
            loss=loss,
            codebook_loss=codebook_loss,
            commitment_loss=commitment,
            indices=indices.reshape(z.shape[:-1]),
            perplexity=perplexity,
            codebook_usage=usage,
        )
        return z_q.astype(z.dtype), out
