"""CompVis single-file Stable Diffusion 1.x / 2.x checkpoints -> diffusers-layout state dicts.

A CompVis ``LatentDiffusion`` checkpoint (``sd-v1-5.ckpt``, ``v2-1_768-ema-pruned.safetensors``,
...) holds the whole pipeline in one flat dict:

* ``model.diffusion_model.*`` - the UNet (``input_blocks`` / ``middle_block`` / ``output_blocks``),
* ``first_stage_model.*``     - the KL autoencoder (``encoder.down.*`` / ``decoder.up.*``),
* ``cond_stage_model.transformer.*`` - SD 1.x: a Hugging Face ``CLIPTextModel`` (already in
  transformers layout), or ``cond_stage_model.model.*`` - SD 2.x: an OpenCLIP text tower,
* ``model_ema.*`` - EMA copies of the UNet weights (keys with the dots removed),
* diffusion schedule buffers (``betas``, ``alphas_cumprod``, ``posterior_*``, ...).

This module renames that dict into the three state dicts diffusers / transformers folders use
(``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel``), infers their configs from
tensor shapes, and can write a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``).
Every key is accounted for: a key that is neither converted nor a known-irrelevant buffer
raises :class:`~ldm_jax.interop.torch_weights.WeightsError` naming it.

All arrays stay NumPy arrays in PyTorch layout (``[out, in, kh, kw]`` convs, ``[out, in]``
linears); turning them into Flax parameters is the job of the diffusers-format loaders.
"""

from __future__ import annotations

import json
import os
import re
from typing import Mapping

import numpy as np

from ldm_jax.interop.torch_weights import StateDict, WeightsError, load_state_dict, save_state_dict

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
EMA_PREFIX = "model_ema."

VERSIONS = ("v1", "v2")

# LatentDiffusion's noise-schedule buffers: recomputed from the scheduler config, never weights.
_SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    # per-timestep loss weights used only by the training objective
    "logvar",
    "lvlb_weights",
)
# LitEma's bookkeeping scalars (not weights).
_EMA_BOOKKEEPING = ("model_ema.decay", "model_ema.num_updates")
# The autoencoder's training loss (LPIPS + discriminator) is saved by some trainers; inference never uses it.
_VAE_LOSS_PREFIX = VAE_PREFIX + "loss."

_VAE_SCALING_FACTOR = 0.18215  # LatentDiffusion's scale_factor for every SD 1.x / 2.x release
_OPEN_CLIP_HEAD_WIDTH = 64  # OpenCLIP and OpenAI CLIP text towers use 64-wide heads
_SD2_UNET_HEAD_WIDTH = 64  # SD 2.x: num_head_channels=64 (SD 1.x instead fixes num_heads=8)
_SD1_UNET_HEADS = 8

_TRANSFORMER_BLOCK_PARAMS = tuple(
    f"{name}.{p}"
    for name, params in (
        ("norm1", ("weight", "bias")),
        ("attn1.to_q", ("weight",)),
        ("attn1.to_k", ("weight",)),
        ("attn1.to_v", ("weight",)),
        ("attn1.to_out.0", ("weight", "bias")),
        ("norm2", ("weight", "bias")),
        ("attn2.to_q", ("weight",)),
        ("attn2.to_k", ("weight",)),
        ("attn2.to_v", ("weight",)),
        ("attn2.to_out.0", ("weight", "bias")),
        ("norm3", ("weight", "bias")),
        ("ff.net.0.proj", ("weight", "bias")),
        ("ff.net.2", ("weight", "bias")),
    )
    for p in params
)

_CLIP_LAYER_PARAMS = tuple(
    f"{name}.{p}"
    for name in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.out_proj",
        "layer_norm1",
        "mlp.fc1",
        "mlp.fc2",
        "layer_norm2",
    )
    for p in ("weight", "bias")
)


# ----------------------------------------------------------------------------------------------
# Reading and EMA selection


def select_ema_weights(sd: Mapping[str, np.ndarray], use_ema: bool = True) -> dict[str, np.ndarray]:
    """Return ``sd`` without ``model_ema.*`` keys, the UNet replaced by its EMA copy if asked.

    CompVis' ``LitEma`` stores the EMA of ``model.diffusion_model.<name>`` under
    ``model_ema.diffusion_model<name without dots>``. With ``use_ema`` and any EMA weights
    present, every UNet weight must have its EMA twin (and vice versa), else WeightsError
    naming the key. Without EMA weights (e.g. "-emaonly" / "pruned" files, whose UNet already
    is the EMA) the dict is returned as is.
    """
    ema_params = {k for k in sd if k.startswith(EMA_PREFIX) and k not in _EMA_BOOKKEEPING}
    out = {k: v for k, v in sd.items() if not k.startswith(EMA_PREFIX)}
    if not use_ema or not ema_params:
        return out
    for key in [k for k in out if k.startswith(UNET_PREFIX)]:
        ema_key = EMA_PREFIX + key[len("model.") :].replace(".", "")
        if ema_key not in ema_params:
            raise WeightsError(f"EMA weights are incomplete: missing key {ema_key!r} (EMA of {key!r})")
        if tuple(sd[ema_key].shape) != tuple(sd[key].shape):
            raise WeightsError(
                f"shape mismatch for key {ema_key!r}: {tuple(sd[ema_key].shape)} vs {key!r} {tuple(sd[key].shape)}"
            )
        out[key] = sd[ema_key]
        ema_params.discard(ema_key)
    if ema_params:
        raise WeightsError(f"unexpected key {sorted(ema_params)[0]!r}: an EMA weight with no UNet weight")
    return out


def read_compvis_checkpoint(path: str | os.PathLike, use_ema: bool = True) -> dict[str, np.ndarray]:
    """Load a CompVis single-file checkpoint as a flat ``{key: np.ndarray}`` dict.

    ``.safetensors`` is read without code execution; ``.ckpt``/``.pt`` with
    ``torch.load(weights_only=True)``, unwrapping Lightning's ``{"state_dict": ...}``.
    The UNet's EMA weights replace the raw ones when present and ``use_ema`` (see
    :func:`select_ema_weights`); the returned dict has no ``model_ema.*`` keys.
    """
    return select_ema_weights(load_state_dict(path), use_ema=use_ema)


# ----------------------------------------------------------------------------------------------
# Layout inference


def _indices(keys, prefix: str) -> list[int]:
    """Sorted integers ``i`` for which some key starts with ``prefix + f"{i}."``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = set()
    for key in keys:
        m = pattern.match(key)
        if m:
            found.add(int(m.group(1)))
    return sorted(found)


def _first_key(keys, prefix: str) -> str:
    return min(k for k in keys if k.startswith(prefix))


def _require(sd: Mapping[str, np.ndarray], key: str, ndim: int | tuple[int, ...] | None = None) -> np.ndarray:
    if key not in sd:
        raise WeightsError(f"missing key {key!r} in CompVis checkpoint")
    value = sd[key]
    allowed = (ndim,) if isinstance(ndim, int) else ndim
    if allowed is not None and value.ndim not in allowed:
        raise WeightsError(f"unexpected shape {tuple(value.shape)} for key {key!r} in CompVis checkpoint")
    return value


def _contiguous(indices: list[int], keys, prefix: str) -> None:
    """Raise naming the first key whose block index breaks 0..n-1 numbering."""
    for expected, got in enumerate(indices):
        if got != expected:
            raise WeightsError(
                f"unrecognised layout: key {_first_key(keys, f'{prefix}{got}.')!r} but no block {prefix}{expected}"
            )


def _unet_layout(sd: Mapping[str, np.ndarray]) -> dict:
    """Walk ``input_blocks`` to recover levels, channels and attention depth of a CompVis UNet."""
    keys = list(sd)
    p = UNET_PREFIX
    conv_in = _require(sd, p + "input_blocks.0.0.weight", 4)
    inputs = _indices(keys, p + "input_blocks.")
    _contiguous(inputs, keys, p + "input_blocks.")

    levels: list[list[int]] = [[]]
    for i in inputs[1:]:
        block = f"{p}input_blocks.{i}."
        if block + "0.op.weight" in sd:
            if not levels[-1]:
                raise WeightsError(f"unrecognised UNet layout: downsampler {block + '0.op.weight'!r} after no resnet")
            levels.append([])
        elif block + "0.in_layers.2.weight" in sd:
            levels[-1].append(i)
        else:
            raise WeightsError(f"unrecognised UNet layout at key {_first_key(keys, block)!r}")
    if not levels[-1]:
        last = f"{p}input_blocks.{inputs[-1]}.0.op.weight"
        raise WeightsError(f"unrecognised UNet layout: input_blocks end with a downsampler {last!r}")

    layers_per_block = len(levels[0])
    channels, depths = [], []
    for level in levels:
        first = f"{p}input_blocks.{level[0]}."
        if len(level) != layers_per_block:
            raise WeightsError(
                f"unrecognised UNet layout: level starting at {first + '0.in_layers.2.weight'!r} has "
                f"{len(level)} resnets, the first level {layers_per_block}"
            )
        level_channels, level_depths = set(), set()
        for i in level:
            block = f"{p}input_blocks.{i}."
            level_channels.add(_require(sd, block + "0.out_layers.3.weight", 4).shape[0])
            depth = len(_indices(keys, block + "1.transformer_blocks.")) if block + "1.proj_in.weight" in sd else 0
            level_depths.add(depth)
            if depth == 0 and any(k.startswith(block + "1.") for k in keys):
                raise WeightsError(f"unrecognised UNet layout at key {_first_key(keys, block + '1.')!r}")
        if len(level_channels) != 1 or len(level_depths) != 1:
            raise WeightsError(f"unrecognised UNet layout: resnets/attentions differ within level at {first!r}")
        channels.append(level_channels.pop())
        depths.append(level_depths.pop())

    proj_in = _require(sd, p + "middle_block.1.proj_in.weight", (2, 4))
    mid_depth = len(_indices(keys, p + "middle_block.1.transformer_blocks."))
    attn2_k = _require(sd, p + "middle_block.1.transformer_blocks.0.attn2.to_k.weight", 2)
    return dict(
        channels=tuple(int(c) for c in channels),
        depths=tuple(depths),
        mid_depth=mid_depth,
        layers_per_block=layers_per_block,
        in_channels=int(conv_in.shape[1]),
        out_channels=int(_require(sd, p + "out.2.weight", 4).shape[0]),
        context_dim=int(attn2_k.shape[1]),
        linear_projection=proj_in.ndim == 2,
    )


def _vae_layout(sd: Mapping[str, np.ndarray]) -> dict:
    keys = list(sd)
    p = VAE_PREFIX
    downs = _indices(keys, p + "encoder.down.")
    if not downs:
        raise WeightsError(f"missing key {p + 'encoder.down.0.block.0.conv1.weight'!r} in CompVis checkpoint")
    _contiguous(downs, keys, p + "encoder.down.")
    channels, layers = [], []
    for i in downs:
        blocks = _indices(keys, f"{p}encoder.down.{i}.block.")
        _contiguous(blocks, keys, f"{p}encoder.down.{i}.block.")
        channels.append(int(_require(sd, f"{p}encoder.down.{i}.block.0.conv1.weight", 4).shape[0]))
        layers.append(len(blocks))
    if len(set(layers)) != 1:
        raise WeightsError(f"unrecognised VAE layout: encoder levels have {layers} resnets at {p + 'encoder.down'!r}")
    post_quant = _require(sd, p + "post_quant_conv.weight", 4)
    return dict(
        channels=tuple(channels),
        layers_per_block=layers[0],
        in_channels=int(_require(sd, p + "encoder.conv_in.weight", 4).shape[1]),
        out_channels=int(_require(sd, p + "decoder.conv_out.weight", 4).shape[0]),
        latent_channels=int(post_quant.shape[0]),
    )


def detect_version(sd: Mapping[str, np.ndarray], version: str | None = None) -> str:
    """``"v1"`` (HF CLIP text encoder, 768-d context) or ``"v2"`` (OpenCLIP, 1024-d context).

    ``version`` overrides the detection (it must be one of ``VERSIONS``).
    """
    if version is not None:
        if version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
        return version
    has_clip = any(k.startswith(CLIP_PREFIX) for k in sd)
    has_open_clip = any(k.startswith(OPEN_CLIP_PREFIX) for k in sd)
    if has_clip and has_open_clip:
        raise WeightsError(
            f"both {CLIP_PREFIX!r} and {OPEN_CLIP_PREFIX!r} keys (e.g. {_first_key(sd, OPEN_CLIP_PREFIX)!r}): "
            "not an SD 1.x/2.x checkpoint"
        )
    if has_open_clip:
        return "v2"
    if has_clip:
        return "v1"
    key = UNET_PREFIX + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    context = int(_require(sd, key, 2).shape[1])
    if context == 1024:
        return "v2"
    if context == 768:
        return "v1"
    raise WeightsError(
        f"cannot tell SD 1.x from 2.x: no text encoder and context dim {context} at {key!r}; pass version="
    )


def _unet_config(layout: dict, version: str) -> dict:
    depths = layout["depths"]
    if version == "v1":
        heads: int | list[int] = _SD1_UNET_HEADS
    else:
        bad = [c for c in layout["channels"] if c % _SD2_UNET_HEAD_WIDTH]
        if bad:
            raise ValueError(
                f"SD 2.x UNet channels {layout['channels']} are not multiples of the {_SD2_UNET_HEAD_WIDTH}-wide "
                "heads; pass overrides={'unet': {'attention_head_dim': ...}}"
            )
        heads = [c // _SD2_UNET_HEAD_WIDTH for c in layout["channels"]]
    mid_depth = layout["mid_depth"]
    if {d for d in depths if d} <= {mid_depth}:
        transformer_layers: int | list[int] = mid_depth
    else:
        # diffusers gives the mid block the last down block's depth, so that entry must match
        transformer_layers = [d or mid_depth for d in depths]
        if transformer_layers[-1] != mid_depth:
            raise WeightsError(
                f"unsupported UNet layout: mid-block transformer depth {mid_depth} differs from the last level's "
                f"{transformer_layers[-1]} (key {UNET_PREFIX + 'middle_block.1.transformer_blocks.0.norm1.weight'!r})"
            )
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths]
    up = ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)]
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 64 if version == "v1" else 96,
        "in_channels": layout["in_channels"],
        "out_channels": layout["out_channels"],
        "center_input_sample": False,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": down,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": up,
        "only_cross_attention": False,
        "block_out_channels": list(layout["channels"]),
        "layers_per_block": layout["layers_per_block"],
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": layout["context_dim"],
        "transformer_layers_per_block": transformer_layers,
        "attention_head_dim": heads,
        "use_linear_projection": layout["linear_projection"],
        "upcast_attention": False,
        "dual_cross_attention": False,
    }


def _vae_config(layout: dict, version: str, sd: Mapping[str, np.ndarray]) -> dict:
    n = len(layout["channels"])
    scale = float(np.asarray(sd["scale_factor"])) if "scale_factor" in sd else _VAE_SCALING_FACTOR
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": layout["in_channels"],
        "out_channels": layout["out_channels"],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(layout["channels"]),
        "layers_per_block": layout["layers_per_block"],
        "act_fn": "silu",
        "latent_channels": layout["latent_channels"],
        "norm_num_groups": 32,
        "sample_size": 512 if version == "v1" else 768,
        "scaling_factor": scale,
    }


def _text_config(sd: Mapping[str, np.ndarray], version: str, open_clip_skip_last_layer: bool) -> dict:
    keys = list(sd)
    if version == "v1":
        p = CLIP_PREFIX + "text_model."
        tokens = _require(sd, p + "embeddings.token_embedding.weight", 2)
        positions = _require(sd, p + "embeddings.position_embedding.weight", 2)
        layer_ids = _indices(keys, p + "encoder.layers.")
        _contiguous(layer_ids, keys, p + "encoder.layers.")
        fc1 = _require(sd, p + "encoder.layers.0.mlp.fc1.weight", 2)
        layers, act, projection_dim = len(layer_ids), "quick_gelu", 768
    else:
        p = OPEN_CLIP_PREFIX
        tokens = _require(sd, p + "token_embedding.weight", 2)
        positions = _require(sd, p + "positional_embedding", 2)
        layer_ids = _indices(keys, p + "transformer.resblocks.")
        _contiguous(layer_ids, keys, p + "transformer.resblocks.")
        fc1 = _require(sd, p + "transformer.resblocks.0.mlp.c_fc.weight", 2)
        layers = len(layer_ids) - (1 if open_clip_skip_last_layer else 0)
        act, projection_dim = "gelu", 512
    width = int(tokens.shape[1])
    if width % _OPEN_CLIP_HEAD_WIDTH:
        raise ValueError(
            f"text width {width} is not a multiple of the {_OPEN_CLIP_HEAD_WIDTH}-wide CLIP heads; "
            "pass overrides={'text_encoder': {'num_attention_heads': ...}}"
        )
    # bos/eos/pad ids as in the SD 1.x/2.x hub text_encoder configs: eos_token_id=2 makes
    # transformers pool at argmax(input_ids), the end-of-text token of the CLIP tokenizer.
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": int(tokens.shape[0]),
        "hidden_size": width,
        "intermediate_size": int(fc1.shape[0]),
        "num_hidden_layers": layers,
        "num_attention_heads": width // _OPEN_CLIP_HEAD_WIDTH,
        "max_position_embeddings": int(positions.shape[0]),
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "projection_dim": projection_dim,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    }


_OVERRIDABLE = ("unet", "vae", "text_encoder")


def infer_configs(
    sd: Mapping[str, np.ndarray],
    version: str | None = None,
    *,
    overrides: Mapping[str, Mapping] | None = None,
    open_clip_skip_last_layer: bool = True,
) -> dict:
    """Infer diffusers / transformers configs of a CompVis checkpoint from its tensor shapes.

    Returns ``{"version", "unet", "vae", "text_encoder"}``; the last three are config dicts for
    ``UNet2DConditionModel``, ``AutoencoderKL`` and ``CLIPTextModel``.

    Shapes give channels, levels, layers per block, attention placement and depth, context
    dim, in/out channels (9 for inpainting), ``use_linear_projection`` (2-D ``proj_in``),
    latent channels and the text tower's sizes. What shapes cannot tell follows the SD
    releases: UNet heads (8 per block for v1, 64-wide for v2), 32 norm groups, VAE scaling
    factor 0.18215 (or the checkpoint's ``scale_factor``), sample sizes 512 (v1) / 768 (v2),
    ``upcast_attention=False``. ``overrides={"unet": {...}, "vae": {...}, "text_encoder": {...}}``
    replaces entries (e.g. ``upcast_attention=True`` for SD 2.1-768).

    SD 2.x conditions on the OpenCLIP tower's penultimate layer, so with
    ``open_clip_skip_last_layer`` (default) the text encoder has one layer fewer than the
    checkpoint, as in diffusers' SD 2 ``text_encoder``.
    """
    if overrides is not None:
        for name in overrides:
            if name not in _OVERRIDABLE:
                raise ValueError(f"overrides key must be one of {_OVERRIDABLE}, got {name!r}")
    version = detect_version(sd, version)
    unet_layout = _unet_layout(sd)
    configs = {
        "version": version,
        "unet": _unet_config(unet_layout, version),
        "vae": _vae_config(_vae_layout(sd), version, sd),
        "text_encoder": _text_config(sd, version, open_clip_skip_last_layer),
    }
    if unet_layout["context_dim"] != configs["text_encoder"]["hidden_size"]:
        raise WeightsError(
            f"UNet context dim {unet_layout['context_dim']} (key "
            f"{UNET_PREFIX + 'middle_block.1.transformer_blocks.0.attn2.to_k.weight'!r}) differs from the "
            f"text encoder width {configs['text_encoder']['hidden_size']}"
        )
    for name, values in (overrides or {}).items():
        configs[name].update(values)
    return configs


# ----------------------------------------------------------------------------------------------
# Renaming


def _copy(state: StateDict, src: str, out: dict, dst: str, params=("weight", "bias")) -> None:
    for param in params:
        out[f"{dst}.{param}"] = state.take(f"{src}.{param}")


def _unet_resnet(state: StateDict, src: str, out: dict, dst: str) -> None:
    conv1 = state.take(f"{src}.in_layers.2.weight")
    for old, new in (
        ("in_layers.0", "norm1"),
        ("in_layers.2", "conv1"),
        ("emb_layers.1", "time_emb_proj"),
        ("out_layers.0", "norm2"),
        ("out_layers.3", "conv2"),
    ):
        _copy(state, f"{src}.{old}", out, f"{dst}.{new}")
    # CompVis ResBlock and diffusers ResnetBlock2D both have a 1x1 shortcut iff channels change.
    if conv1.shape[0] != conv1.shape[1]:
        _copy(state, f"{src}.skip_connection", out, f"{dst}.conv_shortcut")


def _spatial_transformer(state: StateDict, src: str, out: dict, dst: str, depth: int) -> None:
    for name in ("norm", "proj_in", "proj_out"):
        _copy(state, f"{src}.{name}", out, f"{dst}.{name}")
    for k in range(depth):
        for param in _TRANSFORMER_BLOCK_PARAMS:
            out[f"{dst}.transformer_blocks.{k}.{param}"] = state.take(f"{src}.transformer_blocks.{k}.{param}")


def _convert_unet(state: StateDict, layout: dict) -> dict[str, np.ndarray]:
    p = UNET_PREFIX.rstrip(".")
    out: dict[str, np.ndarray] = {}
    _copy(state, f"{p}.time_embed.0", out, "time_embedding.linear_1")
    _copy(state, f"{p}.time_embed.2", out, "time_embedding.linear_2")
    _copy(state, f"{p}.input_blocks.0.0", out, "conv_in")
    _copy(state, f"{p}.out.0", out, "conv_norm_out")
    _copy(state, f"{p}.out.2", out, "conv_out")

    depths, lpb = layout["depths"], layout["layers_per_block"]
    n_levels = len(depths)
    i = 1
    for level, depth in enumerate(depths):
        for j in range(lpb):
            _unet_resnet(state, f"{p}.input_blocks.{i}.0", out, f"down_blocks.{level}.resnets.{j}")
            if depth:
                dst = f"down_blocks.{level}.attentions.{j}"
                _spatial_transformer(state, f"{p}.input_blocks.{i}.1", out, dst, depth)
            i += 1
        if level < n_levels - 1:
            _copy(state, f"{p}.input_blocks.{i}.0.op", out, f"down_blocks.{level}.downsamplers.0.conv")
            i += 1

    _unet_resnet(state, f"{p}.middle_block.0", out, "mid_block.resnets.0")
    _spatial_transformer(state, f"{p}.middle_block.1", out, "mid_block.attentions.0", layout["mid_depth"])
    _unet_resnet(state, f"{p}.middle_block.2", out, "mid_block.resnets.1")

    i = 0
    for up, depth in enumerate(reversed(depths)):
        for j in range(lpb + 1):
            _unet_resnet(state, f"{p}.output_blocks.{i}.0", out, f"up_blocks.{up}.resnets.{j}")
            if depth:
                _spatial_transformer(state, f"{p}.output_blocks.{i}.1", out, f"up_blocks.{up}.attentions.{j}", depth)
            if j == lpb and up < n_levels - 1:
                # the upsampler follows the attention (if any) inside the last output block of a level
                slot = 2 if depth else 1
                _copy(state, f"{p}.output_blocks.{i}.{slot}.conv", out, f"up_blocks.{up}.upsamplers.0.conv")
            i += 1
    return out


def _vae_resnet(state: StateDict, src: str, out: dict, dst: str) -> None:
    conv1 = state.take(f"{src}.conv1.weight")
    for name in ("norm1", "conv1", "norm2", "conv2"):
        _copy(state, f"{src}.{name}", out, f"{dst}.{name}")
    if conv1.shape[0] != conv1.shape[1]:
        _copy(state, f"{src}.nin_shortcut", out, f"{dst}.conv_shortcut")


def _vae_mid(state: StateDict, src: str, out: dict, dst: str) -> None:
    _vae_resnet(state, f"{src}.block_1", out, f"{dst}.resnets.0")
    _vae_resnet(state, f"{src}.block_2", out, f"{dst}.resnets.1")
    _copy(state, f"{src}.attn_1.norm", out, f"{dst}.attentions.0.group_norm")
    for old, new in (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
        key = f"{src}.attn_1.{old}.weight"
        weight = state.take(key)
        # CompVis' AttnBlock uses 1x1 convs, diffusers' Attention linears: [C, C, 1, 1] -> [C, C].
        if weight.ndim == 4 and weight.shape[2:] == (1, 1):
            weight = weight[:, :, 0, 0]
        elif weight.ndim != 2:
            raise WeightsError(f"unexpected shape {tuple(weight.shape)} for key {key!r}: expected a 1x1 conv")
        out[f"{dst}.attentions.0.{new}.weight"] = weight
        out[f"{dst}.attentions.0.{new}.bias"] = state.take(f"{src}.attn_1.{old}.bias")


def _convert_vae(state: StateDict, layout: dict) -> dict[str, np.ndarray]:
    p = VAE_PREFIX.rstrip(".")
    out: dict[str, np.ndarray] = {}
    n, lpb = len(layout["channels"]), layout["layers_per_block"]
    for part in ("encoder", "decoder"):
        _copy(state, f"{p}.{part}.conv_in", out, f"{part}.conv_in")
        _copy(state, f"{p}.{part}.norm_out", out, f"{part}.conv_norm_out")
        _copy(state, f"{p}.{part}.conv_out", out, f"{part}.conv_out")
        _vae_mid(state, f"{p}.{part}.mid", out, f"{part}.mid_block")
    for i in range(n):
        for j in range(lpb):
            _vae_resnet(state, f"{p}.encoder.down.{i}.block.{j}", out, f"encoder.down_blocks.{i}.resnets.{j}")
        if i < n - 1:
            _copy(state, f"{p}.encoder.down.{i}.downsample.conv", out, f"encoder.down_blocks.{i}.downsamplers.0.conv")
    # CompVis numbers decoder levels from the highest resolution (up.0 is the last one run);
    # diffusers numbers them in execution order.
    for i in range(n):
        up = n - 1 - i
        for j in range(lpb + 1):
            _vae_resnet(state, f"{p}.decoder.up.{i}.block.{j}", out, f"decoder.up_blocks.{up}.resnets.{j}")
        if i > 0:
            _copy(state, f"{p}.decoder.up.{i}.upsample.conv", out, f"decoder.up_blocks.{up}.upsamplers.0.conv")
    _copy(state, f"{p}.quant_conv", out, "quant_conv")
    _copy(state, f"{p}.post_quant_conv", out, "post_quant_conv")
    return out


def _convert_clip(state: StateDict, num_layers: int) -> dict[str, np.ndarray]:
    """SD 1.x: the checkpoint already holds a transformers CLIPTextModel under a prefix."""
    src = CLIP_PREFIX + "text_model."
    out: dict[str, np.ndarray] = {}
    for name in ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight"):
        out["text_model." + name] = state.take(src + name)
    if src + "embeddings.position_ids" in state:
        state.skip(src + "embeddings.position_ids")  # arange buffer, not a weight
    for n in range(num_layers):
        for param in _CLIP_LAYER_PARAMS:
            out[f"text_model.encoder.layers.{n}.{param}"] = state.take(f"{src}encoder.layers.{n}.{param}")
    _copy(state, src + "final_layer_norm", out, "text_model.final_layer_norm")
    return out


def _convert_open_clip(state: StateDict, num_checkpoint_layers: int, skip_last_layer: bool) -> dict[str, np.ndarray]:
    """SD 2.x: OpenCLIP text tower -> CLIPTextModel.

    OpenCLIP's ``nn.MultiheadAttention`` packs q, k, v projections row-wise into
    ``in_proj_weight`` [3W, W] / ``in_proj_bias`` [3W] (in that order).
    """
    p = OPEN_CLIP_PREFIX
    out: dict[str, np.ndarray] = {
        "text_model.embeddings.token_embedding.weight": state.take(p + "token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight": state.take(p + "positional_embedding"),
    }
    width = out["text_model.embeddings.token_embedding.weight"].shape[1]
    kept = num_checkpoint_layers - (1 if skip_last_layer else 0)
    for n in range(num_checkpoint_layers):
        src = f"{p}transformer.resblocks.{n}."
        dst = f"text_model.encoder.layers.{n}."
        if n >= kept:
            # SD 2.x conditions on the penultimate layer: the last block never runs.
            for key in [k for k in state.keys() if k.startswith(src)]:
                state.skip(key)
            continue
        in_w = state.take(src + "attn.in_proj_weight", (3 * width, width))
        in_b = state.take(src + "attn.in_proj_bias", (3 * width,))
        for t, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{dst}self_attn.{name}.weight"] = in_w[t * width : (t + 1) * width]
            out[f"{dst}self_attn.{name}.bias"] = in_b[t * width : (t + 1) * width]
        for old, new in (
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
            ("ln_2", "layer_norm2"),
        ):
            _copy(state, src + old, out, dst + new)
    _copy(state, p + "ln_final", out, "text_model.final_layer_norm")
    # CLIP's contrastive head: SD never uses the pooled, projected text embedding.
    for key in (p + "text_projection", p + "logit_scale", p + "attn_mask"):
        if key in state:
            state.skip(key)
    return out


def _skip_known_irrelevant(state: StateDict) -> None:
    for key in _SCHEDULE_BUFFERS + ("scale_factor",) + _EMA_BOOKKEEPING:
        if key in state:
            state.skip(key)
    for key in [k for k in state.keys() if k.startswith(_VAE_LOSS_PREFIX)]:
        state.skip(key)


def split_compvis_state_dict(
    sd: Mapping[str, np.ndarray],
    version: str | None = None,
    *,
    use_ema: bool = True,
    open_clip_skip_last_layer: bool = True,
) -> dict[str, dict[str, np.ndarray]]:
    """Split a CompVis SD 1.x/2.x state dict into diffusers/transformers-layout state dicts.

    Returns ``{"unet": ..., "vae": ..., "text_encoder": ...}``: flat dicts with the keys of
    ``UNet2DConditionModel``, ``AutoencoderKL`` and ``CLIPTextModel`` as stored in hub
    folders (text keys start with ``text_model.``; transformers >= 5.6 loads them as well).
    Tensors keep their PyTorch layout and dtype; the VAE's 1x1-conv attention projections
    become ``[C, C]`` linears, the OpenCLIP ``in_proj`` is split into q/k/v.

    Raises WeightsError naming the key for a missing weight or for any key that is neither
    converted nor a known-irrelevant buffer (schedule buffers, ``scale_factor``, CLIP
    ``position_ids``, OpenCLIP ``text_projection``/``logit_scale``, the VAE training loss).
    """
    sd = select_ema_weights(sd, use_ema=use_ema)
    version = detect_version(sd, version)
    unet_layout, vae_layout = _unet_layout(sd), _vae_layout(sd)
    state = StateDict(sd, source="CompVis checkpoint")
    _skip_known_irrelevant(state)
    unet = _convert_unet(state, unet_layout)
    vae = _convert_vae(state, vae_layout)
    if version == "v1":
        layers = _indices(list(sd), CLIP_PREFIX + "text_model.encoder.layers.")
        text = _convert_clip(state, len(layers))
    else:
        layers = _indices(list(sd), OPEN_CLIP_PREFIX + "transformer.resblocks.")
        _contiguous(layers, list(sd), OPEN_CLIP_PREFIX + "transformer.resblocks.")
        text = _convert_open_clip(state, len(layers), open_clip_skip_last_layer)
    state.finish()
    return {"unet": unet, "vae": vae, "text_encoder": text}


# ----------------------------------------------------------------------------------------------
# Writing a diffusers folder

_WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}


# by name, since ml_dtypes' bfloat16 is not an np.floating subtype
_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _write_json(obj: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def write_diffusers_folder(
    compvis_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    version: str | None = None,
    *,
    use_ema: bool = True,
    overrides: Mapping[str, Mapping] | None = None,
    open_clip_skip_last_layer: bool = True,
    dtype: str | np.dtype | None = None,
) -> dict:
    """Convert a CompVis single file into ``out_dir/{unet,vae,text_encoder}/`` diffusers folders.

    Each folder gets ``config.json`` and a ``.safetensors`` file (written atomically), loadable
    with ``UNet2DConditionModel.from_pretrained(out_dir, subfolder="unet")``,
    ``AutoencoderKL.from_pretrained(..., subfolder="vae")`` and
    ``CLIPTextModel.from_pretrained(out_dir, subfolder="text_encoder")``. ``dtype`` (e.g.
    ``"float16"``) casts floating tensors; by default they keep the checkpoint's dtype.
    Returns the configs written (see :func:`infer_configs`).
    """
    sd = read_compvis_checkpoint(compvis_path, use_ema=use_ema)
    configs = infer_configs(sd, version, overrides=overrides, open_clip_skip_last_layer=open_clip_skip_last_layer)
    parts = split_compvis_state_dict(
        sd, configs["version"], use_ema=use_ema, open_clip_skip_last_layer=open_clip_skip_last_layer
    )
    cast = np.dtype(dtype) if dtype is not None else None
    out_dir = os.fspath(out_dir)
    for name, tensors in parts.items():
        folder = os.path.join(out_dir, name)
        os.makedirs(folder, exist_ok=True)
        if cast is not None:
            tensors = {k: v.astype(cast) if v.dtype.name in _FLOAT_DTYPES else v for k, v in tensors.items()}
        save_state_dict(tensors, os.path.join(folder, _WEIGHT_FILES[name]), metadata={"format": "pt"})
        _write_json(configs[name], os.path.join(folder, "config.json"))
    return configs
