"""LPIPS weights from local files into :class:`ldm_jax.models.lpips.LPIPS` params.

Nothing is downloaded. Accepted layouts (``.safetensors``, or ``.pth``/``.pt`` read with
``torch.load(weights_only=True)``):

* the state dict of the ``lpips`` package's ``LPIPS(net="vgg")`` module:
  ``net.slice1.0.weight`` ... ``net.slice5.28.bias`` and ``lin0.model.1.weight`` ...
  ``lin4.model.1.weight`` (``lin{k}.model.0.weight`` when built without dropout), optionally
  ``scaling_layer.shift`` / ``scaling_layer.scale`` (checked against the fixed constants);
* the same with the VGG16 trunk under torchvision's names ``features.0.weight`` ...
  ``features.28.bias`` (a torchvision ``vgg16`` state dict; its ``classifier.*`` is ignored).

The lpips package ships only the ``lin`` weights (``weights/v0.1/vgg.pth``) and takes the VGG
trunk from torchvision; pass that file as ``path`` and the torchvision ``vgg16`` state dict as
``vgg_path``.
"""

from __future__ import annotations

import logging
import os
import re

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
    load_state_dict,
)
from ldm_jax.models.lpips import LPIPS, LPIPS_SCALE, LPIPS_SHIFT

log = logging.getLogger(__name__)

# conv index in vgg16().features -> lpips slice that holds it
_SLICE_OF = {}
for _slice, (_lo, _hi) in enumerate(((0, 4), (4, 9), (9, 16), (16, 23), (23, 30)), start=1):
    for _i in range(_lo, _hi):
        _SLICE_OF[_i] = _slice


def _vgg_key(state: StateDict, index: int, leaf: str) -> str:
    lpips_name = f"net.slice{_SLICE_OF[index]}.{index}.{leaf}"
    return lpips_name if lpips_name in state else f"features.{index}.{leaf}"


def lpips_params_from_state_dict(tensors: dict, source: str = "checkpoint"):
    """LPIPS params (boxed with logical axis names) from a flat torch state dict; raises
    WeightsError naming any missing, mis-shaped or unexpected key."""
    tensors = dict(tensors)
    for key in [k for k in tensors if k.startswith("classifier.")]:
        del tensors[key]  # torchvision vgg16 head, not part of LPIPS
    state = StateDict(tensors, source=source)
    for name, expected in (("scaling_layer.shift", LPIPS_SHIFT), ("scaling_layer.scale", LPIPS_SCALE)):
        if name in state:
            value = np.asarray(state.take(name), np.float32).reshape(-1)
            if value.shape != expected.shape or not np.allclose(value, expected, atol=1e-6):
                raise WeightsError(f"{name} in {source} is {value.tolist()}, LPIPS uses {expected.tolist()}")

    abstract = jax.eval_shape(lambda: LPIPS().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32, 3))))
    flat = traverse_util.flatten_dict(abstract["params"])
    filled = {}
    for path, box in flat.items():
        spec = box.unbox()
        module, leaf = path[-2], path[-1]
        if module.startswith("features_"):
            index = int(module.split("_")[1])
            torch_leaf = "weight" if leaf == "kernel" else "bias"
            key = _vgg_key(state, index, torch_leaf)
        else:  # lin{k}
            k = int(re.fullmatch(r"lin(\d)", module).group(1))
            key = f"lin{k}.model.1.weight"
            if key not in state and f"lin{k}.model.0.weight" in state:
                key = f"lin{k}.model.0.weight"
        if leaf == "kernel":
            kh, kw, cin, cout = spec.shape
            value = conv_to_flax(np.asarray(state.take(key, (cout, cin, kh, kw)), np.float32))
        else:
            value = np.asarray(state.take(key, spec.shape), np.float32)
        filled[path] = box.replace_boxed(jnp.asarray(value, spec.dtype))
    state.finish()
    return traverse_util.unflatten_dict(filled)


def load_lpips_params(path: str | os.PathLike | None, vgg_path: str | os.PathLike | None = None):
    """Read LPIPS params from local file(s); ``path=None`` returns None and logs that the
    perceptual loss is OFF (the first-stage losses then use perceptual weight 0)."""
    if path is None:
        if vgg_path is not None:
            raise ValueError(f"vgg_path={os.fspath(vgg_path)!r} given without an LPIPS lin-weights path")
        log.warning("no LPIPS weights file given: the perceptual (LPIPS) loss is OFF (weight 0)")
        return None
    tensors = dict(load_state_dict(path))
    source = os.fspath(path)
    if vgg_path is not None:
        vgg = load_state_dict(vgg_path)
        clash = sorted(set(vgg) & set(tensors))
        if clash:
            raise WeightsError(f"key {clash[0]!r} is in both {source} and {os.fspath(vgg_path)}")
        tensors.update(vgg)
        source = f"{source} + {os.fspath(vgg_path)}"
    return lpips_params_from_state_dict(tensors, source=source)


def lpips_state_dict_from_params(params) -> dict[str, np.ndarray]:
    """Inverse of :func:`lpips_params_from_state_dict`, in the lpips package layout."""
    out = {}
    for path, value in traverse_util.flatten_dict(nn.meta.unbox(params)).items():
        module, leaf = path[-2], path[-1]
        value = np.asarray(value, np.float32)
        if module.startswith("features_"):
            index = int(module.split("_")[1])
            key = f"net.slice{_SLICE_OF[index]}.{index}.{'weight' if leaf == 'kernel' else 'bias'}"
        else:
            key = f"{module}.model.1.weight"
        out[key] = conv_from_flax(value) if leaf == "kernel" else value
    out["scaling_layer.shift"] = LPIPS_SHIFT.reshape(1, 3, 1, 1).copy()
    out["scaling_layer.scale"] = LPIPS_SCALE.reshape(1, 3, 1, 1).copy()
    return out
