"""Load and save diffusers ``UNet2DConditionModel`` folders (``config.json`` +
``diffusion_pytorch_model.safetensors`` or ``.bin``) as ``ldm_jax.models.unet.UNet`` params.

The parameter tree of ``UNet`` mirrors the diffusers state dict: a flax path
``down_blocks_0/attentions_1/transformer_blocks_0/attn1/to_out_0/kernel`` is the torch key
``down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0.weight``. Conversion walks the
*model's* parameter tree (from ``jax.eval_shape``, nothing allocated) and takes each tensor from a
:class:`~ldm_jax.interop.torch_weights.StateDict`, so a missing key, an unused key or a shape
mismatch raises :class:`~ldm_jax.interop.torch_weights.WeightsError` naming the key.

Example::

    unet, params = load_diffusers_unet("stable-diffusion-v1-5/unet")
    eps = unet.apply({"params": params}, x_nhwc, t, context=text_embeddings)
    save_diffusers_unet("out/unet", unet, params)   # UNet2DConditionModel.from_pretrained("out/unet")
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from ldm_jax.interop.torch_weights import (
    StateDict,
    load_state_dict,
    params_to_state_dict,
    save_state_dict,
    state_dict_to_params,
)
from ldm_jax.models.unet import UNet

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model"

# Module names that are list indices in diffusers (``resnets.0``), written ``resnets_0`` in flax.
_LIST_MODULES = re.compile(
    r"^(down_blocks|up_blocks|resnets|attentions|transformer_blocks|downsamplers|upsamplers|to_out|net)_(\d+)$"
)
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}


def diffusers_key(path: tuple[str, ...]) -> str:
    """Flax param path -> diffusers state-dict key."""
    parts = []
    for name in path[:-1]:
        m = _LIST_MODULES.match(name)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m else name)
    leaf = path[-1]
    if leaf not in _LEAF_NAMES:
        raise ValueError(f"no diffusers name for parameter {'/'.join(path)}")
    parts.append(_LEAF_NAMES[leaf])
    return ".".join(parts)


def abstract_params(unet: UNet) -> dict:
    """The unboxed param tree of ``unet`` as ShapeDtypeStructs (nothing allocated)."""
    boxed = jax.eval_shape(lambda: unet.init(jax.random.PRNGKey(0), **unet.dummy_inputs()))
    return nn.meta.unbox(boxed)["params"]


def params_from_diffusers_state_dict(
    unet: UNet, state_dict: Mapping[str, np.ndarray], source: str = "state dict", *, place=None
) -> dict:
    """Convert a diffusers ``UNet2DConditionModel`` state dict into ``unet``'s params.

    Every model parameter must be found with the right shape, and every checkpoint tensor
    used; otherwise :class:`WeightsError` names the key. Arrays are cast to ``unet.param_dtype``.
    Returns the (unboxed) ``params`` collection. ``place(path, host_array)``: where each leaf
    goes (``torch_weights.state_dict_to_params``; default the default device).
    """
    sd = state_dict if isinstance(state_dict, StateDict) else StateDict(state_dict, source=source)
    return state_dict_to_params(sd, abstract_params(unet), diffusers_key, unet.param_dtype, place=place)


def params_to_diffusers_state_dict(unet: UNet, params, dtype=np.float32) -> dict[str, np.ndarray]:
    """``unet``'s params (boxed or not; with or without the outer ``{"params": ...}``) as a
    diffusers state dict of NumPy arrays in ``dtype``."""
    return params_to_state_dict(params, abstract_params(unet), diffusers_key, dtype)


def _find_weights(folder: str, variant: str | None) -> list[str]:
    suffix = f".{variant}" if variant else ""
    for ext in (".safetensors", ".bin"):
        single = os.path.join(folder, f"{WEIGHTS_NAME}{suffix}{ext}")
        if os.path.isfile(single):
            return [single]
        # diffusers puts a variant before the last suffix: "...safetensors.index.fp16.json".
        index_name = f"{WEIGHTS_NAME}{ext}.index.{variant}.json" if variant else f"{WEIGHTS_NAME}{ext}.index.json"
        index = os.path.join(folder, index_name)
        if os.path.isfile(index):
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(folder, s) for s in shards]
    raise FileNotFoundError(
        f"no {WEIGHTS_NAME}{suffix}.safetensors or .bin (or sharded index) in {folder}"
    )


def _resolve_folder(path: str) -> str:
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return path
    sub = os.path.join(path, "unet")
    if os.path.isfile(os.path.join(sub, CONFIG_NAME)):
        return sub  # a whole pipeline folder
    raise FileNotFoundError(f"no {CONFIG_NAME} in {path} (nor in {sub})")


def load_diffusers_unet(path, *, variant: str | None = None, **unet_overrides) -> tuple[UNet, dict]:
    """Load a diffusers ``UNet2DConditionModel`` folder (or a pipeline folder with ``unet/``).

    ``variant`` selects e.g. ``diffusion_pytorch_model.fp16.safetensors``. ``unet_overrides``
    (``dtype``, ``param_dtype``, ``remat``, ``attention``) go to the module.
    ``.bin`` files are read with ``torch.load(weights_only=True)``, never plain pickle.

    Returns ``(unet, params)`` with ``params`` the unboxed ``"params"`` collection; call
    ``unet.apply({"params": params}, x, t, context)``.
    """
    folder, config = _read_config(path)
    unet = UNet.from_diffusers_config(config, **unet_overrides)
    tensors, source = _read_weights(folder, variant)
    params = params_from_diffusers_state_dict(unet, tensors, source=source)
    return unet, params


def _read_config(path) -> tuple[str, dict]:
    """(the U-Net folder, its config.json) of a U-Net or pipeline folder."""
    folder = _resolve_folder(path)
    with open(os.path.join(folder, CONFIG_NAME)) as f:
        return folder, json.load(f)


def _read_weights(folder: str, variant: str | None) -> tuple[dict[str, np.ndarray], str]:
    """(every tensor of the folder's weights file(s), their names for error messages)."""
    tensors: dict[str, np.ndarray] = {}
    files = _find_weights(folder, variant)
    for file in files:
        tensors.update(load_state_dict(file))
    return tensors, ", ".join(files)


# What fixes a U-Net's function given its weights, beyond the tensor shapes: the module fields
# and the per-block settings of ``UNet.resolved()`` (heads, depths), by the config key named in
# an error. Not compared: ``sample_size`` (informational), ``dropout`` (a training choice) and
# the compute settings (dtype, remat, attention backend).
_ARCHITECTURE_FIELDS = (
    "in_channels", "out_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type",
    "up_block_types", "mid_block_scale_factor", "norm_num_groups", "norm_eps", "use_linear_projection",
    "upcast_attention", "resnet_time_scale_shift", "addition_embed_type", "addition_time_embed_dim",
    "projection_class_embeddings_input_dim", "conv_in_kernel", "conv_out_kernel",
)  # fmt: skip
_RESOLVED_NAMES = {
    "channels": "block_out_channels", "layers": "layers_per_block", "heads": "attention_head_dim",
    "cross": "cross_attention_dim", "depth_down": "transformer_layers_per_block",
    "depth_mid": "transformer_layers_per_block", "depth_up": "reverse_transformer_layers_per_block",
    "class_rows": "num_classes", "time_embed_dim": "time_embedding_dim",
}  # fmt: skip


def architecture_mismatch(unet: UNet, other: UNet) -> tuple[str, Any, Any] | None:
    """``(name, unet's value, other's value)`` of the first architecture setting in which the two
    U-Nets differ (diffusers' config name), or None when the same weights mean the same network."""

    def same(a, b):
        if {type(a), type(b)} <= {bool, type(None)}:  # released configs write upcast_attention: null
            return bool(a) == bool(b)
        return (tuple(a) if isinstance(a, (list, tuple)) else a) == (tuple(b) if isinstance(b, (list, tuple)) else b)

    for name in _ARCHITECTURE_FIELDS:
        if not same(getattr(unet, name), getattr(other, name)):
            return name, getattr(unet, name), getattr(other, name)
    mine, theirs = unet.resolved(), other.resolved()
    for key, name in _RESOLVED_NAMES.items():
        if mine[key] != theirs[key]:
            # The settings as written (layers_per_block=2), unless only their broadcast differs.
            a, b = getattr(unet, name, None), getattr(other, name, None)
            return (name, a, b) if not same(a, b) else (name, mine[key], theirs[key])
    return None


def load_diffusers_unet_weights(path, unet: UNet, *, variant: str | None = None, place=None) -> dict:
    """The weights of a diffusers ``UNet2DConditionModel`` folder (or a pipeline / ldm_jax model
    folder with ``unet/``) as the params of the given ``unet`` (built elsewhere, e.g. from a
    training config). The folder's ``config.json`` must describe the same network (else
    ValueError naming the first differing setting, as ``config.unet.<name>``), and its tensors
    must match ``unet``'s tree (else :class:`WeightsError` naming the key). ``place(path,
    host_array)`` puts each converted leaf where it belongs (see ``state_dict_to_params``)."""
    folder, config = _read_config(path)
    try:
        theirs = UNet.from_diffusers_config(config)
    except ValueError as error:
        raise ValueError(f"{os.path.join(folder, CONFIG_NAME)}: {error}") from None
    mismatch = architecture_mismatch(unet, theirs)
    if mismatch is not None:
        name, mine, other = mismatch
        raise ValueError(
            f"config.unet.{name} is {json.dumps(mine, default=str)} but {os.path.join(folder, CONFIG_NAME)} has "
            f"{json.dumps(other, default=str)}: the weights are for another U-Net"
        )
    tensors, source = _read_weights(folder, variant)
    return params_from_diffusers_state_dict(unet, tensors, source=source, place=place)


def save_diffusers_unet(path, unet: UNet, params, *, dtype=np.float32, variant: str | None = None) -> None:
    """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` (weights in ``dtype``,
    default float32) so that ``UNet2DConditionModel.from_pretrained(path)`` loads the same network.
    ``variant="fp16"`` names the file ``diffusion_pytorch_model.fp16.safetensors`` (diffusers'
    ``from_pretrained(..., variant="fp16")``); pair it with ``dtype=np.float16``."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    state = params_to_diffusers_state_dict(unet, params, dtype=dtype)
    config: dict[str, Any] = unet.to_diffusers_config()
    try:
        config["_diffusers_version"] = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:  # informational only
        pass
    suffix = f".{variant}" if variant else ""
    save_state_dict(state, os.path.join(path, f"{WEIGHTS_NAME}{suffix}.safetensors"), metadata={"format": "pt"})
    tmp = os.path.join(path, CONFIG_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(path, CONFIG_NAME))
