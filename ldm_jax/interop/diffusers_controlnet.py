"""Load and save diffusers ``ControlNetModel`` folders (``config.json`` +
``diffusion_pytorch_model.safetensors``) as :class:`ldm_jax.models.controlnet.ControlNet` params.

The flax tree mirrors the diffusers state dict as for the U-Net
(``controlnet_down_blocks_3/kernel`` <-> ``controlnet_down_blocks.3.weight``,
``controlnet_cond_embedding/blocks_1`` <-> ``controlnet_cond_embedding.blocks.1``). Conversion
walks the model's abstract tree, so a missing, unused or mis-shaped key raises
:class:`~ldm_jax.interop.torch_weights.WeightsError` naming it.

    controlnet, params = load_diffusers_controlnet("sd-controlnet-canny")
    save_diffusers_controlnet("out/controlnet", controlnet, params)  # ControlNetModel.from_pretrained
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from ldm_jax.interop.diffusers_unet import CONFIG_NAME, WEIGHTS_NAME, _find_weights
from ldm_jax.interop.lora_formats import module_name
from ldm_jax.interop.torch_weights import (
    StateDict,
    load_state_dict,
    params_to_state_dict,
    save_state_dict,
    state_dict_to_params,
)
from ldm_jax.models.controlnet import ControlNet

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "embedding": "weight"}


def torch_key(path: tuple[str, ...]) -> str:
    """Flax param path -> diffusers state-dict key."""
    if path[-1] not in _LEAF_NAMES:
        raise ValueError(f"no diffusers name for parameter {'/'.join(path)}")
    return f"{module_name(path[:-1])}.{_LEAF_NAMES[path[-1]]}"


def abstract_params(controlnet: ControlNet) -> dict:
    boxed = jax.eval_shape(lambda: controlnet.init(jax.random.PRNGKey(0), **controlnet.dummy_inputs()))
    return nn.meta.unbox(boxed)["params"]


def params_from_diffusers_state_dict(
    controlnet: ControlNet, state_dict: Mapping[str, np.ndarray], source: str = "state dict"
) -> dict:
    """A diffusers ``ControlNetModel`` state dict -> ``controlnet``'s (unboxed) params."""
    sd = state_dict if isinstance(state_dict, StateDict) else StateDict(state_dict, source=source)
    return state_dict_to_params(sd, abstract_params(controlnet), torch_key, controlnet.param_dtype)


def params_to_diffusers_state_dict(controlnet: ControlNet, params, dtype=np.float32) -> dict[str, np.ndarray]:
    """``controlnet``'s params as a diffusers ``ControlNetModel`` state dict in ``dtype``."""
    return params_to_state_dict(params, abstract_params(controlnet), torch_key, dtype)


def load_diffusers_controlnet(path, *, variant: str | None = None, **overrides) -> tuple[ControlNet, dict]:
    """Load a diffusers ``ControlNetModel`` folder -> ``(controlnet, params)``."""
    folder = os.fspath(path)
    config_path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}")
    with open(config_path) as f:
        config = json.load(f)
    controlnet = ControlNet.from_diffusers_config(config, **overrides)
    tensors: dict[str, np.ndarray] = {}
    files = _find_weights(folder, variant)
    for file in files:
        tensors.update(load_state_dict(file))
    return controlnet, params_from_diffusers_state_dict(controlnet, tensors, source=", ".join(files))


def save_diffusers_controlnet(path, controlnet: ControlNet, params, *, dtype=np.float32) -> None:
    """Write a folder that ``ControlNetModel.from_pretrained(path)`` loads as the same network."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    state = params_to_diffusers_state_dict(controlnet, params, dtype=dtype)
    config: dict[str, Any] = controlnet.to_diffusers_config()
    try:
        config["_diffusers_version"] = importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:  # informational only
        pass
    save_state_dict(state, os.path.join(path, f"{WEIGHTS_NAME}.safetensors"), metadata={"format": "pt"})
    tmp = os.path.join(path, CONFIG_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(path, CONFIG_NAME))
