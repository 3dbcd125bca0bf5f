"""diffusers ``AutoencoderKL`` / ``VQModel`` folders <-> ``ldm_jax.models.autoencoder``.

A diffusers folder is ``config.json`` + ``diffusion_pytorch_model.safetensors`` (or ``.bin``,
read with ``torch.load(weights_only=True)``). Our parameter tree mirrors diffusers' module
names, so the conversion is: ``encoder/down_blocks_0/resnets_1/conv1/kernel`` <->
``encoder.down_blocks.0.resnets.1.conv1.weight``, transposing conv kernels
([kh, kw, in, out] <-> [out, in, kh, kw]) and linear kernels ([in, out] <-> [out, in]);
GroupNorm ``scale`` <-> ``weight``.

Checkpoints with the pre-0.14 attention names (``query``/``key``/``value``/``proj_attn``, as
in the original Stable Diffusion VAE upload) and 1x1-conv-shaped attention weights are
accepted too. Any key the model does not use, any key it needs but is missing, and any shape
mismatch raise :class:`ldm_jax.interop.torch_weights.WeightsError` naming the key.

Loaded parameters keep their logical axis names (``nn.LogicallyPartitioned`` leaves), so they
can be sharded exactly like freshly initialised ones.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from ldm_jax.interop.torch_weights import (
    StateDict,
    WeightsError,
    conv_from_flax,
    conv_to_flax,
    linear_from_flax,
    linear_to_flax,
    load_state_dict,
    save_state_dict,
    torch_shape,
)
from ldm_jax.models.autoencoder import AutoencoderKL, VQModel
from ldm_jax.models.quantizer import EMA_COLLECTION

WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
CONFIG_NAME = "config.json"

_INDEXED = re.compile(r"^(down_blocks|up_blocks|resnets|attentions|downsamplers|upsamplers|to_out)_(\d+)$")
_DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# ----------------------------------------------------------------------------- configs


def _read_config(folder: str) -> dict:
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}")
    with open(path) as f:
        return json.load(f)


def _common_kwargs(config: Mapping[str, Any], class_name: str, latent_channels: int) -> dict:
    """Validate the fields both autoencoder configs share and map them to module arguments
    (defaults are diffusers' ``__init__`` defaults)."""
    cls = config.get("_class_name", class_name)
    if cls != class_name:
        raise ValueError(f"config is for {cls!r}, not {class_name!r}")
    for key, expected in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        for block in config.get(key, ()):
            if block != expected:
                raise ValueError(f"unsupported {key} entry {block!r} (only {expected!r})")
    act = config.get("act_fn", "silu")
    if act != "silu":
        raise ValueError(f"unsupported act_fn {act!r} (only 'silu')")
    n_levels = len(config["block_out_channels"])
    for key in ("down_block_types", "up_block_types"):
        if key in config and len(config[key]) != n_levels:
            raise ValueError(f"{key} has {len(config[key])} entries but block_out_channels has {n_levels}")
    return dict(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        block_out_channels=tuple(config["block_out_channels"]),
        layers_per_block=config.get("layers_per_block", 1),
        latent_channels=config.get("latent_channels", latent_channels),
        norm_num_groups=config.get("norm_num_groups", 32),
        scale_factor=float(config.get("scaling_factor", 0.18215)),
        mid_block_add_attention=config.get("mid_block_add_attention", True),
    )


def autoencoder_kl_from_config(config: Mapping[str, Any], **overrides) -> AutoencoderKL:
    """Our :class:`AutoencoderKL` for a diffusers ``AutoencoderKL`` config dict.

    ``overrides`` (e.g. ``dtype=jnp.bfloat16``) are passed to the module constructor.
    """
    kwargs = _common_kwargs(config, "AutoencoderKL", latent_channels=4)
    stats = {}
    for key in ("latents_mean", "latents_std"):
        if config.get(key) is not None:
            stats[key] = tuple(float(v) for v in config[key])
    kwargs.update(
        stats,
        force_upcast=bool(config.get("force_upcast", True)),
        shift_factor=None if config.get("shift_factor") is None else float(config["shift_factor"]),
        use_quant_conv=config.get("use_quant_conv", True),
        use_post_quant_conv=config.get("use_post_quant_conv", True),
    )
    kwargs.update(overrides)
    return AutoencoderKL(**kwargs)


def _common_config(model, class_name: str, sample_size: int) -> dict:
    n = len(model.block_out_channels)
    return {
        "_class_name": class_name,
        "_diffusers_version": _diffusers_version(),
        "in_channels": model.in_channels,
        "out_channels": model.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(model.block_out_channels),
        "layers_per_block": model.layers_per_block,
        "act_fn": "silu",
        "latent_channels": model.latent_channels,
        "norm_num_groups": model.norm_num_groups,
        "sample_size": sample_size,
        "scaling_factor": model.scale_factor,
        "mid_block_add_attention": model.mid_block_add_attention,
    }


def autoencoder_kl_to_config(model: AutoencoderKL, sample_size: int = 512) -> dict:
    """The diffusers config dict of ``model``. ``sample_size`` only sets diffusers' tiling size."""
    return dict(
        _common_config(model, "AutoencoderKL", sample_size),
        shift_factor=model.shift_factor,
        latents_mean=None if model.latents_mean is None else list(model.latents_mean),
        latents_std=None if model.latents_std is None else list(model.latents_std),
        force_upcast=model.force_upcast,
        use_quant_conv=model.use_quant_conv,
        use_post_quant_conv=model.use_post_quant_conv,
    )


def vq_model_from_config(config: Mapping[str, Any], **overrides) -> VQModel:
    """Our :class:`VQModel` for a diffusers ``VQModel`` config dict.

    diffusers' quantiser has beta = 0.25 on the codebook term (``legacy_beta=True``); that is
    the default here too so commitment-loss values match; override it for new training.
    """
    kwargs = _common_kwargs(config, "VQModel", latent_channels=3)
    norm_type = config.get("norm_type", "group")
    if norm_type != "group":
        raise ValueError(f"unsupported norm_type {norm_type!r} (only 'group'; 'spatial' is MoVQ)")
    kwargs.update(
        num_vq_embeddings=config.get("num_vq_embeddings", 256),
        vq_embed_dim=config.get("vq_embed_dim"),
        beta=0.25,
        legacy_beta=True,
    )
    kwargs.update(overrides)
    return VQModel(**kwargs)


def vq_model_to_config(model: VQModel, sample_size: int = 256) -> dict:
    """The diffusers config dict of ``model`` (the EMA settings have no diffusers equivalent)."""
    return dict(
        _common_config(model, "VQModel", sample_size),
        num_vq_embeddings=model.num_vq_embeddings,
        vq_embed_dim=model.vq_embed_dim,
        norm_type="group",
        lookup_from_codebook=False,
        force_upcast=False,
    )


def _diffusers_version() -> str:
    try:
        import diffusers

        return diffusers.__version__
    except ImportError:  # the folder format does not depend on diffusers being installed here
        return "0.30.0"


# ----------------------------------------------------------------------------- names


def torch_key(path: tuple[str, ...]) -> str:
    """Our flat parameter path -> the diffusers state-dict key."""
    *modules, leaf = path
    if modules and modules[-1] == "quantize" and leaf == "embedding":
        return "quantize.embedding.weight"
    parts = []
    for name in modules:
        m = _INDEXED.match(name)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m else name)
    if leaf in ("kernel", "scale"):
        parts.append("weight")
    elif leaf == "bias":
        parts.append("bias")
    else:
        raise WeightsError(f"no diffusers name for parameter {'/'.join(path)!r}")
    return ".".join(parts)


def _to_torch(path, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if path[-1] == "kernel":
        return conv_from_flax(value) if value.ndim == 4 else linear_from_flax(value)
    return value


def _to_flax(path, value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        return conv_to_flax(value) if value.ndim == 4 else linear_to_flax(value)
    return value


def _modernise_keys(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename pre-0.14 attention keys and squeeze 1x1-conv attention projections to Linear."""
    out = {}
    for key, value in tensors.items():
        parts = key.split(".")
        if "attentions" in parts and len(parts) >= 2 and parts[-2] in _DEPRECATED_ATTENTION:
            key = ".".join(parts[:-2] + [_DEPRECATED_ATTENTION[parts[-2]], parts[-1]])
        if ".attentions." in key and key.endswith(".weight") and value.ndim == 4 and value.shape[2:] == (1, 1):
            if any(f".{p}." in key for p in ("to_q", "to_k", "to_v", "to_out.0")):
                value = value[:, :, 0, 0]
        out[key] = value
    return out


# ----------------------------------------------------------------------------- state dicts


def _abstract_variables(model):
    """Shapes, dtypes and logical-axis boxes of ``model.init``, without computing anything."""
    size = max(8, model.downsample_factor)
    image = jax.ShapeDtypeStruct((1, size, size, model.in_channels), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), image)


def variables_from_state_dict(model, tensors: Mapping[str, np.ndarray], source: str = "checkpoint") -> dict:
    """Fill ``model``'s variables (``params`` and, for an EMA VQModel, ``vq_ema``) from a flat
    diffusers state dict. Raises WeightsError naming missing, unexpected or mis-shaped keys."""
    state = StateDict(_modernise_keys(tensors), source=source)
    out = {}
    # every variable of our models is created with logical axis names, i.e. boxed
    for collection, tree in _abstract_variables(model).items():
        boxes = traverse_util.flatten_dict(tree)
        values = {}
        for path, box in boxes.items():
            if collection == EMA_COLLECTION and path[-1] != "embedding":
                continue  # EMA statistics are not in diffusers checkpoints: set below
            spec = box.unbox()
            value = state.take(torch_key(path), torch_shape(path, spec.shape))
            values[path] = jnp.asarray(_to_flax(path, np.asarray(value, np.float32)), spec.dtype)
        if collection == EMA_COLLECTION:
            # fresh statistics consistent with the loaded codebook (N = 1, m = e)
            for path, box in boxes.items():
                if path[-1] == "cluster_size":
                    values[path] = jnp.ones(box.unbox().shape, jnp.float32)
                elif path[-1] == "embed_sum":
                    values[path] = values[path[:-1] + ("embedding",)]
        out[collection] = traverse_util.unflatten_dict({p: boxes[p].replace_boxed(v) for p, v in values.items()})
    state.finish()
    return out


def state_dict_from_variables(variables) -> dict[str, np.ndarray]:
    """Flat diffusers state dict (float32 NumPy) from our variables (boxed or not).

    Accepts ``{"params": ...}`` (optionally with ``"vq_ema"``) or a bare params tree.
    """
    if "params" not in variables:
        variables = {"params": variables}
    out = {}
    for collection, tree in variables.items():
        flat = traverse_util.flatten_dict(nn.meta.unbox(tree))
        for path, value in flat.items():
            if collection == EMA_COLLECTION and path[-1] != "embedding":
                continue
            out[torch_key(path)] = _to_torch(path, np.asarray(value))
    return out


def _weights_name(name: str, variant: str | None) -> str:
    """``diffusion_pytorch_model.safetensors`` -> ``diffusion_pytorch_model.<variant>.safetensors``."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def _weights_path(folder: str, variant: str | None = None) -> str:
    names = [_weights_name(n, variant) for n in WEIGHTS_NAMES]
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no {' or '.join(names)} in {folder}")


# ----------------------------------------------------------------------------- folders


def _write_folder(folder, config: dict, state: dict, dtype=None, variant: str | None = None) -> None:
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    if dtype is not None:
        state = {k: np.asarray(v).astype(dtype) for k, v in state.items()}
    save_state_dict(state, os.path.join(folder, _weights_name(WEIGHTS_NAMES[0], variant)))


def load_diffusers_autoencoder_kl(
    folder: str | os.PathLike, *, variant: str | None = None, **overrides
) -> tuple[AutoencoderKL, dict]:
    """Load a diffusers ``AutoencoderKL`` folder -> (module, params).

    ``overrides`` go to the module constructor (e.g. ``dtype=jnp.bfloat16``). ``params`` is
    the ``"params"`` collection with logical-axis boxes: ``module.apply({"params": params}, x)``.
    ``variant="fp16"`` reads ``diffusion_pytorch_model.fp16.safetensors`` (cast to ``param_dtype``).
    """
    folder = os.fspath(folder)
    model = autoencoder_kl_from_config(_read_config(folder), **overrides)
    path = _weights_path(folder, variant)
    variables = variables_from_state_dict(model, load_state_dict(path), source=path)
    return model, variables["params"]


def save_diffusers_autoencoder_kl(
    model: AutoencoderKL,
    params,
    folder: str | os.PathLike,
    sample_size: int = 512,
    *,
    dtype=None,
    variant: str | None = None,
):
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` that
    ``diffusers.AutoencoderKL.from_pretrained(folder)`` loads. ``dtype`` (e.g. ``np.float16``)
    casts the weights; ``variant="fp16"`` names the file ``diffusion_pytorch_model.fp16.safetensors``."""
    state = state_dict_from_variables({"params": params})
    _write_folder(folder, autoencoder_kl_to_config(model, sample_size), state, dtype, variant)


def load_diffusers_vq_model(folder: str | os.PathLike, **overrides) -> tuple[VQModel, dict]:
    """Load a diffusers ``VQModel`` folder -> (module, variables).

    ``variables`` is ``{"params": ...}``, plus ``{"vq_ema": ...}`` (codebook, fresh EMA
    statistics) when ``use_ema=True`` is among ``overrides``.
    """
    folder = os.fspath(folder)
    model = vq_model_from_config(_read_config(folder), **overrides)
    path = _weights_path(folder)
    return model, variables_from_state_dict(model, load_state_dict(path), source=path)


def save_diffusers_vq_model(model: VQModel, variables, folder: str | os.PathLike, sample_size: int = 256):
    """Write a folder ``diffusers.VQModel.from_pretrained`` loads (EMA statistics are dropped)."""
    _write_folder(folder, vq_model_to_config(model, sample_size), state_dict_from_variables(variables))
