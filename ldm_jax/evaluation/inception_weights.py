"""Weights for :class:`~ldm_jax.evaluation.inception.FIDInceptionV3` from a local file.

Accepted files (nothing is ever downloaded):
  * pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (read with
    ``torch.load(weights_only=True)``; needs torch), the published FID network;
  * a ``.safetensors`` file with the same tensor names, as written by
    ``scripts/convert_inception.py`` (no torch needed).

Names map one to one: torch ``Mixed_5b.branch1x1.conv.weight`` [out, in, kh, kw] is Flax
``params/Mixed_5b/branch1x1/conv/kernel`` [kh, kw, in, out]; ``*.bn.{weight,bias}`` are
``bn/{scale,bias}``; ``*.bn.running_{mean,var}`` are ``batch_stats/.../bn/{mean,var}``;
``fc.weight`` / ``fc.bias`` are ``fc/kernel`` (transposed) / ``fc/bias``. Every tensor must be
used and every parameter found, else :class:`WeightsError` names the key.
"""

from __future__ import annotations

import functools
import os
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from flax.core import meta

from ldm_jax.evaluation.inception import FIDInceptionV3
from ldm_jax.interop.torch_weights import (
    StateDict,
    WeightsError,
    conv_from_flax,
    conv_to_flax,
    linear_from_flax,
    linear_to_flax,
    load_state_dict,
)

_SKIPPED_BUFFER = "num_batches_tracked"
_PARAM_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_STAT_TO_TORCH = {"mean": "running_mean", "var": "running_var"}


def abstract_variables(module: FIDInceptionV3 | None = None) -> dict:
    """Shapes of ``{"params", "batch_stats"}`` (no computation; 75 px is the smallest input)."""
    return _abstract_variables(FIDInceptionV3() if module is None else module)


@functools.lru_cache(maxsize=4)
def _abstract_variables(module: FIDInceptionV3) -> dict:
    shapes = jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3)), resize=False)
    )
    return meta.unbox(shapes)


def _torch_name(collection: str, path: tuple[str, ...]) -> str:
    table = _PARAM_TO_TORCH if collection == "params" else _STAT_TO_TORCH
    return ".".join(path[:-1] + (table[path[-1]],))


def variables_from_state_dict(tensors: Mapping[str, np.ndarray], source: str = "checkpoint") -> dict:
    """A torch FID-Inception state dict -> ``{"params", "batch_stats"}`` for ``FIDInceptionV3``."""
    state = StateDict(tensors, source=source)
    for key in list(state.keys()):
        if key.endswith(_SKIPPED_BUFFER):
            state.skip(key)
    out = {}
    for collection, tree in abstract_variables().items():
        flat = {}
        for path, leaf in traverse_util.flatten_dict(tree).items():
            key = _torch_name(collection, path)
            if path[-1] == "kernel" and len(leaf.shape) == 4:
                value = conv_to_flax(state.take(key, tuple(leaf.shape[i] for i in (3, 2, 0, 1))))
            elif path[-1] == "kernel":
                value = linear_to_flax(state.take(key, tuple(leaf.shape[::-1])))
            else:
                value = state.take(key, tuple(leaf.shape))
            flat[path] = jnp.asarray(np.asarray(value, dtype=np.float32))
        out[collection] = traverse_util.unflatten_dict(flat)
    state.finish()
    return out


def state_dict_from_variables(variables: Mapping) -> dict[str, np.ndarray]:
    """``{"params", "batch_stats"}`` -> torch-named float32 arrays (the inverse mapping)."""
    variables = meta.unbox(variables)
    out = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in traverse_util.flatten_dict(variables[collection]).items():
            leaf = np.asarray(leaf, dtype=np.float32)
            if path[-1] == "kernel":
                leaf = conv_from_flax(leaf) if leaf.ndim == 4 else linear_from_flax(leaf)
            out[_torch_name(collection, path)] = leaf
    return out


def load_inception(path: str | os.PathLike) -> tuple[FIDInceptionV3, dict]:
    """``(module, variables)`` from a pytorch-fid ``.pth`` or a converted ``.safetensors`` file.

    Raises ``FileNotFoundError`` for a missing file and ``WeightsError`` for one that is not the
    FID Inception (naming the first wrong key)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Inception weights not found: {path} (pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
            "or a .safetensors file from scripts/convert_inception.py)"
        )
    return FIDInceptionV3(), variables_from_state_dict(load_state_dict(path), source=path)


def random_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
    """Random FID-Inception weights in torch layout with activations of order one (He-normal
    convolutions, non-trivial BatchNorm statistics): for tests and smoke runs, never for
    reporting numbers. A fresh dict of (cached, shared) arrays: do not modify the arrays."""
    return dict(_random_state_dict(seed))


@functools.lru_cache(maxsize=2)
def _random_state_dict(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for collection, tree in abstract_variables().items():
        for path, leaf in traverse_util.flatten_dict(tree).items():
            shape = leaf.shape
            if path[-1] == "kernel":
                fan_in = int(np.prod(shape[:-1]))
                value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
            elif path[-1] == "scale":
                value = rng.uniform(0.5, 1.5, shape)
            elif path[-1] == "bias":
                value = rng.normal(0.0, 0.1, shape)
            elif path[-1] == "mean":
                value = rng.normal(0.0, 0.1, shape)
            else:  # var
                value = rng.uniform(0.5, 2.0, shape)
            out[(collection, path)] = value.astype(np.float32)
    variables: dict = {"params": {}, "batch_stats": {}}
    for (collection, path), value in out.items():
        variables[collection][path] = value
    return state_dict_from_variables({c: traverse_util.unflatten_dict(v) for c, v in variables.items()})


__all__ = ["WeightsError", "abstract_variables", "load_inception", "random_state_dict",
           "state_dict_from_variables", "variables_from_state_dict"]
