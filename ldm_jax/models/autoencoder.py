"""First-stage autoencoders of latent diffusion: the KL-regularised ``AutoencoderKL`` (Stable
Diffusion's VAE) and the vector-quantised ``VQModel`` (LDM's VQ-f4/f8), both NHWC.

Parameter names mirror diffusers (``encoder.down_blocks.0.resnets.1.conv2`` becomes
``encoder/down_blocks_0/resnets_1/conv2``), so ``ldm_jax.interop.diffusers_vae`` converts
weights by renaming and transposing only.

Latents seen by the diffusion model
-----------------------------------
The diffusion stage never sees raw autoencoder latents. It sees::

    latents_for_diffusion = scale_factor * (z - shift_factor)      # shift_factor defaults to 0

with ``z`` a posterior sample (KL) or the pre-quantisation encoder output (VQ; LDM's VQ
models let the decoder quantise, see ``VQModel.decode``). ``scale_factor`` makes the latents
roughly unit variance (Stable Diffusion 1.x/2.x: 0.18215, SDXL: 0.13025; LDM paper sec. 4.3.2 /
D.1). An ``AutoencoderKL`` with per-channel ``latents_mean``/``latents_std`` (diffusers' config
keys, e.g. Playground v2.5's SDXL VAE) instead uses, as diffusers' SDXL pipelines do::

    latents_for_diffusion = scale_factor * (z - latents_mean) / latents_std

Use
:meth:`AutoencoderKL.latents_for_diffusion` and :meth:`AutoencoderKL.latents_from_diffusion`
rather than repeating the formula.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.kernels import dot_product_attention
from ldm_jax.models import partitioning as P
from ldm_jax.models.layers import Downsample, ResnetBlock, Upsample
from ldm_jax.models.quantizer import QuantizerOutput, VectorQuantizer

Dtype = Any

# diffusers builds every autoencoder ResnetBlock2D, attention GroupNorm and output norm with 1e-6.
_NORM_EPS = 1e-6
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def _check_channels(block_out_channels: Sequence[int], norm_num_groups: int) -> None:
    if len(block_out_channels) == 0:
        raise ValueError(f"block_out_channels must be non-empty, got {tuple(block_out_channels)}")
    for c in block_out_channels:
        if c <= 0 or c % norm_num_groups:
            raise ValueError(
                f"block_out_channels entry {c} is not a positive multiple of norm_num_groups={norm_num_groups}"
            )


class SpatialSelfAttention(nn.Module):
    """Single-head self-attention over all H*W positions with a residual connection, as in the
    mid block of the LDM / diffusers VAE: ``x + to_out(attn(to_q(gn(x)), to_k(gn(x)), to_v(gn(x))))``.

    Shapes: x [B, H, W, C] -> [B, H, W, C]. Softmax runs in float32 whatever ``dtype`` is.
    """

    groups: int = 32
    eps: float = _NORM_EPS
    attention: str = "auto"  # ldm_jax.kernels backend name
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = P.group_norm(self.groups, epsilon=self.eps, param_dtype=self.param_dtype, name="group_norm")(x)
        y = y.astype(self.dtype).reshape(b, h * w, c)
        proj_in = ("embed", "heads")
        q = P.dense(c, names=proj_in, name="to_q", **kw)(y)
        k = P.dense(c, names=proj_in, name="to_k", **kw)(y)
        v = P.dense(c, names=proj_in, name="to_v", **kw)(y)
        # [B, T, heads=1, C]; the default scale is 1/sqrt(C), the single head's width.
        out = dot_product_attention(q[:, :, None, :], k[:, :, None, :], v[:, :, None, :], backend=self.attention)
        out = P.dense(c, names=("heads", "embed"), name="to_out_0", **kw)(out.reshape(b, h * w, c))
        return x.astype(self.dtype) + out.reshape(b, h, w, c)


class MidBlock(nn.Module):
    """ResnetBlock -> (SpatialSelfAttention) -> ResnetBlock at the lowest resolution."""

    groups: int = 32
    add_attention: bool = True
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res = dict(groups=self.groups, eps=_NORM_EPS, use_time_embedding=False, **kw)
        x = ResnetBlock(name="resnets_0", **res)(x)
        if self.add_attention:
            x = SpatialSelfAttention(groups=self.groups, attention=self.attention, name="attentions_0", **kw)(x)
        return ResnetBlock(name="resnets_1", **res)(x)


class Encoder(nn.Module):
    """Image -> latent moments. ``conv_in``; per resolution ``layers_per_block`` ResnetBlocks and
    (except at the last level) a stride-2 conv with bottom/right padding; the mid block;
    GroupNorm -> SiLU -> ``conv_out`` to ``2*latent_channels`` (``double_z``, mean and
    log-variance) or ``latent_channels``.

    Shapes: x [B, H, W, C_in] -> [B, H/f, W/f, (2*)latent_channels], f = 2**(len(block_out_channels)-1).
    """

    latent_channels: int = 4
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    double_z: bool = True
    mid_block_add_attention: bool = True
    attention: str = "auto"  # mid-block attention backend (ldm_jax.kernels)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        _check_channels(self.block_out_channels, self.norm_num_groups)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = P.conv(self.block_out_channels[0], (3, 3), name="conv_in", **kw)(x.astype(self.dtype))
        last = len(self.block_out_channels) - 1
        for i, channels in enumerate(self.block_out_channels):
            h = _ResnetStack(
                out_channels=channels,
                num_layers=self.layers_per_block,
                groups=self.norm_num_groups,
                resample="down" if i != last else None,
                name=f"down_blocks_{i}",
                **kw,
            )(h)
        h = MidBlock(groups=self.norm_num_groups, add_attention=self.mid_block_add_attention, attention=self.attention, name="mid_block", **kw)(h)
        h = P.group_norm(self.norm_num_groups, epsilon=_NORM_EPS, param_dtype=self.param_dtype, name="conv_norm_out")(h)
        h = nn.silu(h).astype(self.dtype)
        out_channels = 2 * self.latent_channels if self.double_z else self.latent_channels
        return P.conv(out_channels, (3, 3), name="conv_out", **kw)(h)


class _ResnetStack(nn.Module):
    """``num_layers`` ResnetBlocks, then an optional stride-2 Downsample or x2 Upsample
    (diffusers' DownEncoderBlock2D / UpDecoderBlock2D)."""

    out_channels: int
    num_layers: int
    groups: int
    resample: str | None = None  # None | "down" | "up"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock(
                out_channels=self.out_channels, groups=self.groups, eps=_NORM_EPS,
                use_time_embedding=False, name=f"resnets_{j}", **kw,
            )(x)
        if self.resample == "down":
            x = Downsample(padding="asymmetric", name="downsamplers_0", **kw)(x)
        elif self.resample == "up":
            x = Upsample(name="upsamplers_0", **kw)(x)
        return x


class Decoder(nn.Module):
    """Latent -> image, mirroring :class:`Encoder` with ``layers_per_block + 1`` ResnetBlocks per
    level and nearest-neighbour x2 upsampling. ``up_blocks_0`` is the lowest resolution.

    With ``return_last_layer_input=True`` it returns the activation that enters ``conv_out``
    (after GroupNorm and SiLU) instead of the image: the adaptive GAN weight of taming/LDM needs
    gradients with respect to the last layer only, and :func:`apply_last_layer` recomputes the
    image from this activation.

    Shapes: z [B, h, w, latent_channels] -> [B, h*f, w*f, out_channels].
    """

    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    attention: str = "auto"  # mid-block attention backend (ldm_jax.kernels)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z, return_last_layer_input: bool = False):
        _check_channels(self.block_out_channels, self.norm_num_groups)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        reversed_channels = list(reversed(self.block_out_channels))
        h = P.conv(reversed_channels[0], (3, 3), name="conv_in", **kw)(z.astype(self.dtype))
        h = MidBlock(groups=self.norm_num_groups, add_attention=self.mid_block_add_attention, attention=self.attention, name="mid_block", **kw)(h)
        last = len(reversed_channels) - 1
        for i, channels in enumerate(reversed_channels):
            h = _ResnetStack(
                out_channels=channels,
                num_layers=self.layers_per_block + 1,
                groups=self.norm_num_groups,
                resample="up" if i != last else None,
                name=f"up_blocks_{i}",
                **kw,
            )(h)
        h = P.group_norm(self.norm_num_groups, epsilon=_NORM_EPS, param_dtype=self.param_dtype, name="conv_norm_out")(h)
        h = nn.silu(h).astype(self.dtype)
        conv_out = P.conv(self.out_channels, (3, 3), name="conv_out", **kw)
        if return_last_layer_input:
            if self.is_initializing():
                conv_out(h)  # create conv_out's params even when init asks for the activation
            return h
        return conv_out(h)


def apply_last_layer(conv_out_params, h, dtype: Dtype = jnp.float32):
    """The decoder's ``conv_out`` as a pure function of its params ``{"kernel", "bias"}``.

    Shapes: h [B, H, W, C] (from ``return_last_layer_input=True``) -> [B, H, W, out_channels].
    With ``dtype`` the model's compute dtype, ``decode(z)`` equals
    ``apply_last_layer(params["decoder"]["conv_out"], h)`` exactly.
    """
    kernel = nn.meta.unbox(conv_out_params["kernel"])
    layer = nn.Conv(kernel.shape[-1], (3, 3), padding="SAME", dtype=dtype, use_bias="bias" in conv_out_params)
    return layer.apply({"params": nn.meta.unbox(dict(conv_out_params))}, h)


def last_layer_params(params):
    """``params["decoder"]["conv_out"]`` (unboxed): the 'last layer' of the adaptive GAN weight."""
    return nn.meta.unbox(params["decoder"]["conv_out"])


@flax.struct.dataclass
class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) over latents, per element. Shapes: [B, h, w, C].

    ``logvar`` is clipped to [-30, 20] at construction (LDM / diffusers) so ``exp`` never
    overflows in float32.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments) -> "DiagonalGaussian":
        """Split [B, h, w, 2C] encoder moments: the first C channels are the mean."""
        if moments.shape[-1] % 2:
            raise ValueError(f"moments need an even channel count, got shape {moments.shape}")
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self):
        return jnp.exp(self.logvar)

    def sample(self, key):
        """mean + std * eps with eps ~ N(0, I) from ``key`` (reparameterised, differentiable)."""
        eps = jax.random.normal(key, self.mean.shape, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self):
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None):
        """KL(self || other) summed over h, w, C -> [B]; ``other=None`` is N(0, I)."""
        axes = tuple(range(1, self.mean.ndim))
        if other is None:
            terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
        else:
            terms = (
                jnp.square(self.mean - other.mean) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
            )
        return 0.5 * jnp.sum(terms, axis=axes)

    def nll(self, sample):
        """-log N(sample; mean, var) summed over h, w, C -> [B]."""
        axes = tuple(range(1, self.mean.ndim))
        terms = np.log(2.0 * np.pi) + self.logvar + jnp.square(sample - self.mean) / self.var
        return 0.5 * jnp.sum(terms, axis=axes)


class _FirstStage:
    """What both autoencoders share: the latent scaling for the diffusion stage and the
    encoder/decoder construction arguments."""

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def _coder_kwargs(self) -> dict:
        return dict(
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            mid_block_add_attention=self.mid_block_add_attention,
            attention=self.attention,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def latents_for_diffusion(self, z):
        """z -> scale_factor * (z - shift_factor): what the diffusion model is trained on."""
        shift = self.shift_factor or 0.0
        return self.scale_factor * (z - shift)

    def latents_from_diffusion(self, latents):
        """Inverse of :meth:`latents_for_diffusion`: latents / scale_factor + shift_factor."""
        shift = self.shift_factor or 0.0
        return latents / self.scale_factor + shift


class AutoencoderKL(nn.Module, _FirstStage):
    """The KL-regularised autoencoder of LDM / Stable Diffusion (diffusers ``AutoencoderKL``).

    ``encode(x) -> DiagonalGaussian`` over latents [B, H/f, W/f, latent_channels];
    ``decode(z) -> images`` [B, H, W, out_channels]; ``__call__(x, key)`` returns
    ``(reconstruction, posterior)`` decoding a posterior sample (``key`` given) or its mean.

    ``scale_factor`` (SD: 0.18215, SDXL: 0.13025) and optional ``shift_factor`` or per-channel
    ``latents_mean``/``latents_std`` relate latents to what the diffusion stage sees (module
    docstring). Images are expected in [-1, 1].

    ``force_upcast`` (diffusers' config key, default True as there): with a float16 ``dtype``
    the whole autoencoder computes in float32 (params may stay float16), because SDXL's VAE
    overflows float16 activations; bfloat16 (float32's range) is left as is.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scale_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: Sequence[float] | None = None
    latents_std: Sequence[float] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    attention: str = "auto"  # mid-block attention backend (ldm_jax.kernels)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        super().__post_init__()
        if (self.latents_mean is None) != (self.latents_std is None):
            raise ValueError("latents_mean and latents_std must be given together")
        if self.latents_mean is not None:
            for name in ("latents_mean", "latents_std"):
                value = getattr(self, name)
                if len(value) != self.latent_channels:
                    raise ValueError(
                        f"{name}={tuple(value)!r} needs one entry per latent channel ({self.latent_channels})"
                    )
            if self.shift_factor is not None:
                raise ValueError("set shift_factor or latents_mean/latents_std, not both")
            if min(self.latents_std) <= 0:
                raise ValueError(f"latents_std={tuple(self.latents_std)!r} must be positive")

    @property
    def compute_dtype(self) -> Dtype:
        """The dtype the autoencoder really computes in (see ``force_upcast``)."""
        if self.force_upcast and jnp.dtype(self.dtype) == jnp.float16:
            return jnp.float32
        return self.dtype

    def _coder_kwargs(self) -> dict:
        return dict(super()._coder_kwargs(), dtype=self.compute_dtype)

    def latents_for_diffusion(self, z):
        if self.latents_mean is None:
            return super().latents_for_diffusion(z)
        mean, std = jnp.asarray(self.latents_mean, jnp.float32), jnp.asarray(self.latents_std, jnp.float32)
        return self.scale_factor * (z - mean) / std  # per channel: the last (NHWC) axis

    def latents_from_diffusion(self, latents):
        if self.latents_mean is None:
            return super().latents_from_diffusion(latents)
        mean, std = jnp.asarray(self.latents_mean, jnp.float32), jnp.asarray(self.latents_std, jnp.float32)
        return latents * std / self.scale_factor + mean

    def setup(self):
        kw = dict(dtype=self.compute_dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(latent_channels=self.latent_channels, double_z=True, **self._coder_kwargs())
        self.decoder = Decoder(out_channels=self.out_channels, **self._coder_kwargs())
        if self.use_quant_conv:
            self.quant_conv = P.conv(2 * self.latent_channels, (1, 1), padding="VALID", **kw)
        if self.use_post_quant_conv:
            self.post_quant_conv = P.conv(self.latent_channels, (1, 1), padding="VALID", **kw)

    def _check_input(self, x):
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"expected NHWC images with {self.in_channels} channels, got shape {x.shape}")

    def encode(self, x) -> DiagonalGaussian:
        """Images [B, H, W, C_in] in [-1, 1] -> posterior over [B, H/f, W/f, latent_channels]."""
        self._check_input(x)
        moments = self.encoder(x)
        if self.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian.from_moments(moments.astype(jnp.float32))

    def decode(self, z, return_last_layer_input: bool = False):
        """Latents [B, h, w, latent_channels] (unscaled: divide diffusion latents by scale_factor
        first, see ``latents_from_diffusion``) -> images [B, h*f, w*f, out_channels]."""
        if z.ndim != 4 or z.shape[-1] != self.latent_channels:
            raise ValueError(f"expected NHWC latents with {self.latent_channels} channels, got shape {z.shape}")
        z = z.astype(self.compute_dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z, return_last_layer_input=return_last_layer_input)

    def __call__(self, x, key=None, return_last_layer_input: bool = False):
        """Reconstruct: decode a posterior sample (``key`` given) or the posterior mean.

        Returns ``(reconstruction [B, H, W, C_out], posterior)``; with
        ``return_last_layer_input=True`` the first item is the decoder's ``conv_out`` input.
        """
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z, return_last_layer_input=return_last_layer_input), posterior


class VQModel(nn.Module, _FirstStage):
    """The vector-quantised autoencoder of taming / LDM (diffusers ``VQModel``).

    ``encode(x)`` -> continuous pre-quantisation latents h [B, H/f, W/f, vq_embed_dim] (after
    ``quant_conv``); ``quantize_latents(h)`` -> (z_q, :class:`QuantizerOutput`); ``decode(h)`` quantises
    (unless ``quantize=False``), applies ``post_quant_conv`` and the decoder. As in LDM the
    diffusion stage works on ``scale_factor * h`` and the decoder absorbs quantisation.
    ``__call__(x, update_ema=False)`` -> (reconstruction, QuantizerOutput) for training.

    With ``use_ema=True`` the codebook is not a gradient-trained parameter: it lives, with its
    EMA statistics, in the ``"vq_ema"`` collection and is updated when ``update_ema=True`` and
    that collection is mutable (see :class:`ldm_jax.models.quantizer.VectorQuantizer`).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: Sequence[int] = (128, 256, 512)
    layers_per_block: int = 2
    latent_channels: int = 3
    num_vq_embeddings: int = 8192
    vq_embed_dim: int | None = None
    norm_num_groups: int = 32
    beta: float = 0.25
    legacy_beta: bool = False
    use_ema: bool = False
    ema_decay: float = 0.99
    ema_epsilon: float = 1e-5
    scale_factor: float = 1.0
    shift_factor: float | None = None
    mid_block_add_attention: bool = True
    attention: str = "auto"  # mid-block attention backend (ldm_jax.kernels)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def embed_dim(self) -> int:
        return self.vq_embed_dim or self.latent_channels

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(latent_channels=self.latent_channels, double_z=False, **self._coder_kwargs())
        self.quant_conv = P.conv(self.embed_dim, (1, 1), padding="VALID", **kw)
        self.quantize = VectorQuantizer(
            num_embeddings=self.num_vq_embeddings,
            embedding_dim=self.embed_dim,
            beta=self.beta,
            legacy_beta=self.legacy_beta,
            use_ema=self.use_ema,
            ema_decay=self.ema_decay,
            ema_epsilon=self.ema_epsilon,
            param_dtype=self.param_dtype,
        )
        self.post_quant_conv = P.conv(self.latent_channels, (1, 1), padding="VALID", **kw)
        self.decoder = Decoder(out_channels=self.out_channels, **self._coder_kwargs())

    def encode(self, x):
        """Images [B, H, W, C_in] -> pre-quantisation latents [B, H/f, W/f, vq_embed_dim]."""
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"expected NHWC images with {self.in_channels} channels, got shape {x.shape}")
        return self.quant_conv(self.encoder(x))

    def quantize_latents(self, h, update_ema: bool = False) -> tuple[jax.Array, QuantizerOutput]:
        """Pre-quantisation latents -> (straight-through quantised latents, QuantizerOutput)."""
        return self.quantize(h, update_ema=update_ema)

    def decode_quantized(self, z_q, return_last_layer_input: bool = False):
        """Quantised latents [B, h, w, vq_embed_dim] -> images."""
        return self.decoder(self.post_quant_conv(z_q.astype(self.dtype)), return_last_layer_input=return_last_layer_input)

    def decode(self, h, quantize: bool = True):
        """Pre-quantisation latents -> images, quantising first unless ``quantize=False``."""
        if h.ndim != 4 or h.shape[-1] != self.embed_dim:
            raise ValueError(f"expected NHWC latents with {self.embed_dim} channels, got shape {h.shape}")
        if quantize:
            h, _ = self.quantize(h)
        return self.decode_quantized(h)

    def decode_indices(self, indices):
        """Codebook indices [B, h, w] (int) -> images."""
        return self.decode_quantized(self.quantize.lookup(indices))

    def __call__(self, x, update_ema: bool = False, return_last_layer_input: bool = False):
        """Returns ``(reconstruction [B, H, W, C_out], QuantizerOutput)``; with
        ``return_last_layer_input=True`` the first item is the decoder's ``conv_out`` input."""
        z_q, aux = self.quantize(self.encode(x), update_ema=update_ema)
        return self.decode_quantized(z_q, return_last_layer_input=return_last_layer_input), aux
