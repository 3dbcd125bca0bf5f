"""Stability's single-file SDXL checkpoints (``sgm`` / generative-models layout) -> diffusers-layout
state dicts and folders.

An SDXL single file (``sd_xl_base_1.0.safetensors``, ``sd_xl_refiner_1.0.safetensors``) holds:

* ``model.diffusion_model.*`` - the U-Net in the CompVis ``openaimodel`` layout, plus
  ``label_emb.0.{0,2}``: the micro-conditioning MLP (diffusers' ``add_embedding``);
* ``first_stage_model.*``     - the KL autoencoder (CompVis layout, as SD 1.x/2.x);
* ``conditioner.embedders.0.transformer.*`` - base only: CLIP ViT-L/14, already a transformers
  ``CLIPTextModel`` under a prefix;
* ``conditioner.embedders.{1 (base), 0 (refiner)}.model.*`` - OpenCLIP ViT-bigG/14's text tower:
  ``in_proj_weight`` packs q/k/v, ``text_projection`` is applied as ``x @ P`` (so transformers'
  ``text_projection.weight`` is ``P.T``).

The renaming is tensor for tensor what diffusers' ``single_file_utils`` converters
(``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``) produce; the U-Net and VAE walks are shared with
:mod:`ldm_jax.interop.compvis` (same layouts). Every key is accounted for: a missing, mis-shaped
or unknown key raises :class:`~ldm_jax.interop.torch_weights.WeightsError` naming it.
"""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np

from ldm_jax.interop import compvis
from ldm_jax.interop.torch_weights import StateDict, WeightsError, save_state_dict

UNET_PREFIX = compvis.UNET_PREFIX
VAE_PREFIX = compvis.VAE_PREFIX
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIXES = {"base": "conditioner.embedders.1.model.", "refiner": "conditioner.embedders.0.model."}
KINDS = ("base", "refiner")

# What shapes cannot tell, as in the SDXL releases (sd_xl_base.yaml / sd_xl_refiner.yaml).
SDXL_VAE_SCALING_FACTOR = 0.13025
_TIME_ID_EMBED_DIM = 256  # ConcatTimestepEmbedderND(outdim=256) for each micro-conditioning id
_UNET_HEAD_WIDTH = 64  # num_head_channels: 64
_TEXT_HEAD_WIDTH = 64

# Non-weights some SGM files carry: the discrete denoiser's sigma tables and CLIP's logit scale.
_IRRELEVANT = ("denoiser.sigmas", "denoiser.log_sigmas")


def detect_kind(sd: Mapping[str, np.ndarray]) -> str:
    """``"base"`` (CLIP-L + bigG text encoders) or ``"refiner"`` (bigG only), from the keys."""
    if any(k.startswith(OPEN_CLIP_PREFIXES["base"]) for k in sd):
        if not any(k.startswith(CLIP_L_PREFIX) for k in sd):
            raise WeightsError(f"missing key {CLIP_L_PREFIX + 'text_model.embeddings.token_embedding.weight'!r} "
                               "(an SDXL base checkpoint has both text encoders)")
        return "base"
    if any(k.startswith(OPEN_CLIP_PREFIXES["refiner"]) for k in sd):
        return "refiner"
    raise WeightsError(
        f"not an SDXL single-file checkpoint: no {OPEN_CLIP_PREFIXES['base']!r} or "
        f"{OPEN_CLIP_PREFIXES['refiner']!r} keys"
    )


# ----------------------------------------------------------------------------------------------
# Configs


def _unet_config(sd: Mapping[str, np.ndarray], layout: dict) -> dict:
    channels, depths, mid = layout["channels"], layout["depths"], layout["mid_depth"]
    bad = [c for c in channels if c % _UNET_HEAD_WIDTH]
    if bad:
        raise WeightsError(f"U-Net channels {channels} are not multiples of the {_UNET_HEAD_WIDTH}-wide heads")
    if {d for d in depths if d} <= {mid}:
        transformer_layers: int | list[int] = mid
    else:
        # Entries of levels without attention are unused, except the last, which sizes the mid block.
        transformer_layers = [d or 1 for d in depths[:-1]] + [depths[-1] or mid]
        if transformer_layers[-1] != mid:
            raise WeightsError(
                f"unsupported U-Net layout: mid-block transformer depth {mid} differs from the last level's "
                f"{transformer_layers[-1]} (key {UNET_PREFIX + 'middle_block.1.transformer_blocks.0.norm1.weight'!r})"
            )
    adm = compvis._require(sd, UNET_PREFIX + "label_emb.0.0.weight", 2)
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": 128,
        "in_channels": layout["in_channels"],
        "out_channels": layout["out_channels"],
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        "block_out_channels": list(channels),
        "layers_per_block": layout["layers_per_block"],
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": layout["context_dim"],
        "transformer_layers_per_block": transformer_layers,
        "attention_head_dim": [c // _UNET_HEAD_WIDTH for c in channels],
        "use_linear_projection": layout["linear_projection"],
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": _TIME_ID_EMBED_DIM,
        "projection_class_embeddings_input_dim": int(adm.shape[1]),
    }


def _vae_config(layout: dict) -> dict:
    n = len(layout["channels"])
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
        "sample_size": 1024,
        "scaling_factor": SDXL_VAE_SCALING_FACTOR,
        "force_upcast": True,
    }


def _text_config(width: int, vocab: int, positions: int, layers: int, inner: int, act: str, **extra) -> dict:
    if width % _TEXT_HEAD_WIDTH:
        raise WeightsError(f"text width {width} is not a multiple of the {_TEXT_HEAD_WIDTH}-wide CLIP heads")
    # bos/eos/pad ids as in the SDXL hub text encoder configs (legacy eos_token_id=2: argmax pooling).
    return {
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": inner,
        "num_hidden_layers": layers,
        "num_attention_heads": width // _TEXT_HEAD_WIDTH,
        "max_position_embeddings": positions,
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_range": 0.02,
        "initializer_factor": 1.0,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        **extra,
    }


def _clip_l_config(sd: Mapping[str, np.ndarray]) -> dict:
    p = CLIP_L_PREFIX + "text_model."
    tokens = compvis._require(sd, p + "embeddings.token_embedding.weight", 2)
    positions = compvis._require(sd, p + "embeddings.position_embedding.weight", 2)
    layers = compvis._indices(list(sd), p + "encoder.layers.")
    compvis._contiguous(layers, list(sd), p + "encoder.layers.")
    fc1 = compvis._require(sd, p + "encoder.layers.0.mlp.fc1.weight", 2)
    return _text_config(int(tokens.shape[1]), int(tokens.shape[0]), int(positions.shape[0]), len(layers),
                        int(fc1.shape[0]), "quick_gelu", architectures=["CLIPTextModel"], projection_dim=768)


def _open_clip_config(sd: Mapping[str, np.ndarray], prefix: str) -> dict:
    tokens = compvis._require(sd, prefix + "token_embedding.weight", 2)
    positions = compvis._require(sd, prefix + "positional_embedding", 2)
    layers = compvis._indices(list(sd), prefix + "transformer.resblocks.")
    compvis._contiguous(layers, list(sd), prefix + "transformer.resblocks.")
    fc1 = compvis._require(sd, prefix + "transformer.resblocks.0.mlp.c_fc.weight", 2)
    projection = compvis._require(sd, prefix + "text_projection", 2)
    return _text_config(int(tokens.shape[1]), int(tokens.shape[0]), int(positions.shape[0]), len(layers),
                        int(fc1.shape[0]), "gelu", architectures=["CLIPTextModelWithProjection"],
                        projection_dim=int(projection.shape[1]))


def infer_configs(sd: Mapping[str, np.ndarray], kind: str | None = None) -> dict:
    """diffusers / transformers configs of an SDXL single file, from its tensor shapes.

    Returns ``{"kind", "unet", "vae", "text_encoder_2"}`` plus ``"text_encoder"`` for the base.
    What shapes cannot tell follows the SDXL releases: 64-wide U-Net and text heads, 256-wide
    time-id embeddings, VAE scaling factor 0.13025 with ``force_upcast``, sample size 128.
    """
    kind = detect_kind(sd) if kind is None else kind
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    layout = compvis._unet_layout(sd)
    configs = {
        "kind": kind,
        "unet": _unet_config(sd, layout),
        "vae": _vae_config(compvis._vae_layout(sd)),
        "text_encoder_2": _open_clip_config(sd, OPEN_CLIP_PREFIXES[kind]),
    }
    widths = [configs["text_encoder_2"]["hidden_size"]]
    if kind == "base":
        configs["text_encoder"] = _clip_l_config(sd)
        widths.insert(0, configs["text_encoder"]["hidden_size"])
    # The U-Net attends to the concatenated penultimate hidden states of the text encoders.
    if layout["context_dim"] != sum(widths):
        raise WeightsError(
            f"U-Net context dim {layout['context_dim']} (key "
            f"{UNET_PREFIX + 'middle_block.1.transformer_blocks.0.attn2.to_k.weight'!r}) != text widths {widths} summed"
        )
    return configs


# ----------------------------------------------------------------------------------------------
# Renaming


def _convert_unet(state: StateDict, layout: dict) -> dict[str, np.ndarray]:
    out = compvis._convert_unet(state, layout)
    p = UNET_PREFIX + "label_emb.0."
    compvis._copy(state, p + "0", out, "add_embedding.linear_1")
    compvis._copy(state, p + "2", out, "add_embedding.linear_2")
    return out


def _convert_clip_l(state: StateDict, num_layers: int) -> dict[str, np.ndarray]:
    src = CLIP_L_PREFIX + "text_model."
    out: dict[str, np.ndarray] = {}
    for name in ("embeddings.token_embedding.weight", "embeddings.position_embedding.weight"):
        out["text_model." + name] = state.take(src + name)
    if src + "embeddings.position_ids" in state:
        state.skip(src + "embeddings.position_ids")  # arange buffer, not a weight
    for n in range(num_layers):
        for param in compvis._CLIP_LAYER_PARAMS:
            out[f"text_model.encoder.layers.{n}.{param}"] = state.take(f"{src}encoder.layers.{n}.{param}")
    compvis._copy(state, src + "final_layer_norm", out, "text_model.final_layer_norm")
    return out


def _convert_open_clip(state: StateDict, prefix: str, num_layers: int) -> dict[str, np.ndarray]:
    """OpenCLIP text tower -> transformers ``CLIPTextModelWithProjection`` (all layers: SDXL picks
    the penultimate hidden state at run time, and pools after the last layer)."""
    tokens = state.take(prefix + "token_embedding.weight")
    width = tokens.shape[1]
    out: dict[str, np.ndarray] = {
        "text_model.embeddings.token_embedding.weight": tokens,
        "text_model.embeddings.position_embedding.weight": state.take(prefix + "positional_embedding"),
    }
    for n in range(num_layers):
        src, dst = f"{prefix}transformer.resblocks.{n}.", f"text_model.encoder.layers.{n}."
        # nn.MultiheadAttention packs [q; k; v] row-wise.
        in_w = state.take(src + "attn.in_proj_weight", (3 * width, width))
        in_b = state.take(src + "attn.in_proj_bias", (3 * width,))
        for t, name in enumerate(("q_proj", "k_proj", "v_proj")):
            out[f"{dst}self_attn.{name}.weight"] = in_w[t * width : (t + 1) * width]
            out[f"{dst}self_attn.{name}.bias"] = in_b[t * width : (t + 1) * width]
        for old, new in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("mlp.c_fc", "mlp.fc1"),
                         ("mlp.c_proj", "mlp.fc2"), ("ln_2", "layer_norm2")):
            compvis._copy(state, src + old, out, dst + new)
    compvis._copy(state, prefix + "ln_final", out, "text_model.final_layer_norm")
    projection = state.take(prefix + "text_projection")
    if projection.ndim != 2 or projection.shape[0] != width:
        raise WeightsError(f"unexpected shape {tuple(projection.shape)} for key {prefix + 'text_projection'!r}: "
                           f"expected [{width}, projection_dim]")
    out["text_projection.weight"] = np.ascontiguousarray(projection.T)  # applied as x @ P in OpenCLIP
    for key in (prefix + "logit_scale", prefix + "attn_mask"):
        if key in state:
            state.skip(key)  # CLIP's contrastive temperature and a causal-mask buffer: not weights
    return out


def split_sgm_state_dict(
    sd: Mapping[str, np.ndarray], kind: str | None = None, *, use_ema: bool = True
) -> dict[str, dict[str, np.ndarray]]:
    """Split an SDXL single-file state dict into diffusers/transformers-layout state dicts.

    Returns ``{"unet", "vae", "text_encoder_2"}`` (+ ``"text_encoder"`` for the base): flat
    dicts with the keys of ``UNet2DConditionModel``, ``AutoencoderKL``, ``CLIPTextModel`` and
    ``CLIPTextModelWithProjection`` (text keys start with ``text_model.``). Tensors keep their
    PyTorch layout and dtype. Raises WeightsError naming the key for any missing, mis-shaped or
    unconverted key (known non-weights - schedule/sigma buffers, ``position_ids``,
    ``logit_scale`` - are skipped).
    """
    sd = compvis.select_ema_weights(sd, use_ema=use_ema)
    kind = detect_kind(sd) if kind is None else kind
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    unet_layout, vae_layout = compvis._unet_layout(sd), compvis._vae_layout(sd)
    state = StateDict(sd, source="SDXL single-file checkpoint")
    compvis._skip_known_irrelevant(state)
    for key in _IRRELEVANT:
        if key in state:
            state.skip(key)
    parts = {"unet": _convert_unet(state, unet_layout), "vae": compvis._convert_vae(state, vae_layout)}
    if kind == "base":
        layers = compvis._indices(list(sd), CLIP_L_PREFIX + "text_model.encoder.layers.")
        parts["text_encoder"] = _convert_clip_l(state, len(layers))
    prefix = OPEN_CLIP_PREFIXES[kind]
    layers = compvis._indices(list(sd), prefix + "transformer.resblocks.")
    compvis._contiguous(layers, list(sd), prefix + "transformer.resblocks.")
    parts["text_encoder_2"] = _convert_open_clip(state, prefix, len(layers))
    state.finish()
    return parts


# ----------------------------------------------------------------------------------------------
# Writing a diffusers folder

_WEIGHT_FILES = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}


def write_diffusers_folder(
    sgm_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    kind: str | None = None,
    use_ema: bool = True,
    dtype: str | np.dtype | None = None,
    variant: str | None = None,
) -> dict:
    """Convert an SDXL single file into ``out_dir/{unet,vae,text_encoder,text_encoder_2}/``.

    Each folder gets ``config.json`` and ``<weights>[.variant].safetensors``, loadable by
    diffusers / transformers ``from_pretrained(out_dir, subfolder=..., variant=...)`` and by
    ldm_jax's loaders. ``dtype`` (e.g. ``"float16"``) casts floating tensors. Tokenizers,
    scheduler and ``model_index.json`` are not in single files and are not written.
    Returns the configs written (see :func:`infer_configs`).
    """
    sd = compvis.read_compvis_checkpoint(sgm_path, use_ema=use_ema)
    configs = infer_configs(sd, kind)
    parts = split_sgm_state_dict(sd, configs["kind"], use_ema=use_ema)
    cast = np.dtype(dtype) if dtype is not None else None
    suffix = f".{variant}" if variant else ""
    for name, tensors in parts.items():
        folder = os.path.join(os.fspath(out_dir), name)
        os.makedirs(folder, exist_ok=True)
        if cast is not None:
            tensors = {k: v.astype(cast) if v.dtype.name in compvis._FLOAT_DTYPES else v for k, v in tensors.items()}
        save_state_dict(tensors, os.path.join(folder, f"{_WEIGHT_FILES[name]}{suffix}.safetensors"),
                        metadata={"format": "pt"})
        compvis._write_json(configs[name], os.path.join(folder, "config.json"))
    return configs
