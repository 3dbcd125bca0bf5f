"""Load and save diffusers ``DiTTransformer2DModel`` and ``PixArtTransformer2DModel`` folders
(``config.json`` + ``diffusion_pytorch_model.safetensors``, the layout of facebook/DiT-XL-2-256's and
PixArt-alpha's ``transformer/`` subfolders) as ``ldm_jax.models.dit.DiT`` /
``ldm_jax.models.pixart.PixArtDiT`` modules and params.

The flax parameter tree mirrors the diffusers state dict: ``transformer_blocks_0/norm1/emb/
class_embedder/embedding_table/embedding`` is ``transformer_blocks.0.norm1.emb.class_embedder.
embedding_table.weight``; raw parameters (``scale_shift_table``) keep their name. Conversion walks the
*model's* parameter tree (``jax.eval_shape``, nothing allocated) and takes each tensor from a
:class:`~ldm_jax.interop.torch_weights.StateDict`, so a missing key, an unused key or a shape mismatch
raises :class:`~ldm_jax.interop.torch_weights.WeightsError` naming the key. The position table is a
non-persistent buffer in diffusers and a constant here: neither side stores it.

Example::

    dit, params = load_diffusers_dit("DiT-XL-2-256/transformer")
    out = dit.apply({"params": params}, x_nhwc, t, class_labels=labels)   # [B, H, W, 8]
    save_diffusers_dit("out/transformer", dit, params)   # DiTTransformer2DModel.from_pretrained(...)
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
from ldm_jax.models.dit import DiT
from ldm_jax.models.pixart import PixArtDiT

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model"

_LIST_MODULES = re.compile(r"^(transformer_blocks|to_out|net)_(\d+)$")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}
_RAW_PARAMS = ("scale_shift_table",)  # nn.Parameter in diffusers, stored under its own name

# config _class_name -> module; a legacy Transformer2DModel config is told apart by its norm_type.
_CLASSES = {"DiTTransformer2DModel": DiT, "PixArtTransformer2DModel": PixArtDiT}
_LEGACY_NORM_TYPES = {"ada_norm_zero": DiT, "ada_norm_single": PixArtDiT}

Model = DiT | PixArtDiT


def diffusers_key(path: tuple[str, ...]) -> str:
    """Flax param path -> diffusers state-dict key."""
    parts = []
    for name in path[:-1]:
        m = _LIST_MODULES.match(name)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m else name)
    leaf = path[-1]
    if leaf in _RAW_PARAMS:
        parts.append(leaf)
    elif leaf in _LEAF_NAMES:
        parts.append(_LEAF_NAMES[leaf])
    else:
        raise ValueError(f"no diffusers name for parameter {'/'.join(path)}")
    return ".".join(parts)


def abstract_params(model: Model) -> dict:
    """The unboxed param tree of ``model`` as ShapeDtypeStructs (nothing allocated)."""
    boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), **model.dummy_inputs()))
    return nn.meta.unbox(boxed)["params"]


def params_from_diffusers_state_dict(
    model: Model, state_dict: Mapping[str, np.ndarray], source: str = "state dict"
) -> dict:
    """Convert a diffusers DiT/PixArt state dict into ``model``'s (unboxed) params, cast to
    ``model.param_dtype``. Every parameter must be found with its shape and every tensor used,
    else :class:`WeightsError` names the key."""
    sd = state_dict if isinstance(state_dict, StateDict) else StateDict(state_dict, source=source)
    # DiT/PixArt have no 1x1 convs that checkpoints store as Linear weights.
    return state_dict_to_params(sd, abstract_params(model), diffusers_key, model.param_dtype, linear_1x1=False)


def params_to_diffusers_state_dict(model: Model, params, dtype=np.float32) -> dict[str, np.ndarray]:
    """``model``'s params (boxed or not, with or without the outer ``{"params": ...}``) as a
    diffusers state dict of NumPy arrays in ``dtype``."""
    return params_to_state_dict(params, abstract_params(model), diffusers_key, dtype)


def model_from_diffusers_config(config: Mapping[str, Any], **overrides) -> Model:
    """:class:`DiT` or :class:`PixArtDiT`, whichever the config's ``_class_name`` (or, for a legacy
    ``Transformer2DModel`` config, its ``norm_type``) names."""
    name = config.get("_class_name")
    if name == "Transformer2DModel":
        cls = _LEGACY_NORM_TYPES.get(config.get("norm_type"))
        if cls is None:
            raise ValueError(
                f"Transformer2DModel config with norm_type={config.get('norm_type')!r} is not a DiT/PixArt "
                f"(supported: {sorted(_LEGACY_NORM_TYPES)})"
            )
    elif name in _CLASSES:
        cls = _CLASSES[name]
    else:
        raise ValueError(f"config _class_name={name!r} is not one of {sorted(_CLASSES)} (or Transformer2DModel)")
    return cls.from_diffusers_config(config, **overrides)


def _find_weights(folder: str, variant: str | None) -> list[str]:
    suffix = f".{variant}" if variant else ""
    for ext in (".safetensors", ".bin"):
        single = os.path.join(folder, f"{WEIGHTS_NAME}{suffix}{ext}")
        if os.path.isfile(single):
            return [single]
        index = single + ".index.json"
        if os.path.isfile(index):
            with open(index) as f:
                return [os.path.join(folder, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
    raise FileNotFoundError(f"no {WEIGHTS_NAME}{suffix}.safetensors or .bin (or sharded index) in {folder}")


def _resolve_folder(path) -> str:
    path = os.fspath(path)
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        return path
    sub = os.path.join(path, "transformer")
    if os.path.isfile(os.path.join(sub, CONFIG_NAME)):
        return sub  # a whole pipeline folder
    raise FileNotFoundError(f"no {CONFIG_NAME} in {path} (nor in {sub})")


def load_diffusers_dit(path, *, variant: str | None = None, **overrides) -> tuple[Model, dict]:
    """Load a diffusers DiT / PixArt transformer folder (or a pipeline folder with ``transformer/``).

    ``variant`` picks e.g. ``diffusion_pytorch_model.fp16.safetensors``; ``overrides`` (``dtype``,
    ``param_dtype``, ``remat``, ``attention``) go to the module. ``.bin`` files are read with
    ``torch.load(weights_only=True)``. Returns ``(model, params)``, params unboxed.
    """
    folder = _resolve_folder(path)
    with open(os.path.join(folder, CONFIG_NAME)) as f:
        config = json.load(f)
    model = model_from_diffusers_config(config, **overrides)
    files = _find_weights(folder, variant)
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        tensors.update(load_state_dict(file))
    return model, params_from_diffusers_state_dict(model, tensors, source=", ".join(files))


def save_diffusers_dit(path, model: Model, params, *, dtype=np.float32) -> None:
    """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (weights in ``dtype``) that
    ``DiTTransformer2DModel`` / ``PixArtTransformer2DModel.from_pretrained(path)`` loads as the same network."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    state = params_to_diffusers_state_dict(model, params, dtype=dtype)
    config = model.to_diffusers_config()
    try:
        config["_diffusers_version"] = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:  # informational only
        pass
    save_state_dict(state, os.path.join(path, f"{WEIGHTS_NAME}.safetensors"), metadata={"format": "pt"})
    tmp = os.path.join(path, CONFIG_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(path, CONFIG_NAME))
