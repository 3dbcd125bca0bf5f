"""Convert between transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` folders and
:class:`CLIPTextEncoder` params.

A folder holds ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``, or a
sharded ``model.safetensors.index.json``); a diffusers pipeline's ``text_encoder/`` folder is
such a folder. Keys may carry the ``text_model.`` prefix (transformers < 5 and every Stable
Diffusion checkpoint) or not (transformers >= 5); both load. Export writes ``text_model.``-
prefixed keys, which both transformers 4.x and 5.x read. ``CLIPTextModelWithProjection`` (SDXL's
``text_encoder_2``) adds ``text_projection.weight`` beside the ``text_model.`` keys; the folder's
``architectures`` entry says which class it is. fp16 variants (``model.fp16.safetensors``) load
with ``variant="fp16"``.

    module, params = load_clip_text_encoder("sd15/text_encoder")
    out = module.apply({"params": params}, ids)
    save_clip_text_encoder("out/text_encoder", module.config, params)
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax.core import meta

from ldm_jax.interop.torch_weights import (
    StateDict,
    WeightsError,
    linear_from_flax,
    linear_to_flax,
    load_state_dict,
    save_state_dict,
)
from ldm_jax.models.clip import CLIPTextConfig, CLIPTextEncoder

EXPORT_PREFIX = "text_model."
_NON_PARAMETER_BUFFERS = ("embeddings.position_ids",)


def _layer_names(config: CLIPTextConfig):
    """(flax path, torch name, kind) for every parameter; kind in {linear, norm, embed}."""
    yield ("embeddings", "token_embedding"), "embeddings.token_embedding", "embed"
    yield ("embeddings", "position_embedding"), "embeddings.position_embedding", "embed"
    for i in range(config.num_hidden_layers):
        f, t = ("encoder", f"layers_{i}"), f"encoder.layers.{i}"
        yield f + ("layer_norm1",), f"{t}.layer_norm1", "norm"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            yield f + ("self_attn", proj), f"{t}.self_attn.{proj}", "linear"
        yield f + ("layer_norm2",), f"{t}.layer_norm2", "norm"
        yield f + ("mlp", "fc1"), f"{t}.mlp.fc1", "linear"
        yield f + ("mlp", "fc2"), f"{t}.mlp.fc2", "linear"
    yield ("final_layer_norm",), "final_layer_norm", "norm"


def _detect_prefix(state: StateDict) -> str:
    if state.has_prefix(EXPORT_PREFIX):
        return EXPORT_PREFIX
    return ""


def params_from_state_dict(
    tensors: Mapping[str, np.ndarray],
    config: CLIPTextConfig,
    source: str = "checkpoint",
    dtype=jnp.float32,
    prefix: str | None = None,
    with_projection: bool = False,
) -> dict:
    """A flat torch ``CLIPTextModel`` state dict -> Flax params for ``CLIPTextEncoder(config)``.

    ``prefix`` is prepended to every torch name; None detects ``"text_model."`` or no prefix.
    (A CompVis SD 1.x checkpoint's text encoder lives under
    ``"cond_stage_model.transformer.text_model."``; pass only those keys.)
    ``with_projection`` also reads ``text_projection.weight`` [projection_dim, hidden_size], which
    sits beside the ``text_model.`` tree (the prefix without its ``text_model.`` tail).
    Raises ``WeightsError`` naming any missing, unexpected or mis-shaped key. The
    ``position_ids`` buffer is skipped when present.
    """
    state = StateDict(tensors, source=source)
    if prefix is None:
        prefix = _detect_prefix(state)
    for buffer in _NON_PARAMETER_BUFFERS:
        if prefix + buffer in state:
            state.skip(prefix + buffer)
    d, inner = config.hidden_size, config.intermediate_size
    linear_shapes = {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "out_proj": (d, d),
                     "fc1": (inner, d), "fc2": (d, inner)}
    params: dict = {}
    for path, torch_name, kind in _layer_names(config):
        key = prefix + torch_name
        if kind == "embed":
            rows = config.vocab_size if path[-1] == "token_embedding" else config.max_position_embeddings
            leaf = {"embedding": state.take(key + ".weight", (rows, d))}
        elif kind == "norm":
            leaf = {"scale": state.take(key + ".weight", (d,)), "bias": state.take(key + ".bias", (d,))}
        else:
            out_dim, in_dim = linear_shapes[path[-1]]
            leaf = {"kernel": linear_to_flax(state.take(key + ".weight", (out_dim, in_dim))),
                    "bias": state.take(key + ".bias", (out_dim,))}
        node = params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = {k: jnp.asarray(np.asarray(v, dtype=np.float32), dtype=dtype) for k, v in leaf.items()}
    if with_projection:
        key = _projection_key(prefix)
        kernel = linear_to_flax(state.take(key, (config.projection_dim, d)))
        params["text_projection"] = {"kernel": jnp.asarray(np.asarray(kernel, dtype=np.float32), dtype=dtype)}
    state.finish()
    return params


def _projection_key(prefix: str) -> str:
    root = prefix[: -len(EXPORT_PREFIX)] if prefix.endswith(EXPORT_PREFIX) else prefix
    return root + "text_projection.weight"


def state_dict_from_params(params: Mapping, config: CLIPTextConfig, prefix: str = EXPORT_PREFIX) -> dict[str, np.ndarray]:
    """Flax params (boxed or not) -> flat torch ``CLIPTextModel`` state dict (float32 NumPy)."""
    params = meta.unbox(params)
    if "params" in params and "embeddings" not in params:
        params = params["params"]
    out = {}
    for path, torch_name, kind in _layer_names(config):
        node = params
        try:
            for name in path:
                node = node[name]
        except KeyError as e:
            raise WeightsError(f"params are missing {'/'.join(path)}") from e
        as_np = lambda x: np.asarray(x, dtype=np.float32)  # noqa: E731
        key = prefix + torch_name
        if kind == "embed":
            out[key + ".weight"] = as_np(node["embedding"])
        elif kind == "norm":
            out[key + ".weight"] = as_np(node["scale"])
            out[key + ".bias"] = as_np(node["bias"])
        else:
            out[key + ".weight"] = linear_from_flax(as_np(node["kernel"]))
            out[key + ".bias"] = as_np(node["bias"])
    if "text_projection" in params:  # CLIPTextModelWithProjection
        out[_projection_key(prefix)] = linear_from_flax(np.asarray(params["text_projection"]["kernel"], np.float32))
    return out


def _read_folder_weights(folder: str, variant: str | None = None) -> dict[str, np.ndarray]:
    suffix = f".{variant}" if variant else ""
    # transformers puts a variant before the last suffix: "model.safetensors.index.fp16.json".
    index_name = f"model.safetensors.index.{variant}.json" if variant else "model.safetensors.index.json"
    index = os.path.join(folder, index_name)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors: dict[str, np.ndarray] = {}
        for shard in shards:
            tensors.update(load_state_dict(os.path.join(folder, shard)))
        return tensors
    names = (f"model{suffix}.safetensors", f"pytorch_model{suffix}.bin")
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return load_state_dict(path)
    raise FileNotFoundError(f"no {' or '.join(names)} in {folder}")


_PROJECTION_ARCHITECTURE = "CLIPTextModelWithProjection"


def _resolve_folder(folder: str, subfolder: str | None) -> str:
    if subfolder is not None:
        return os.path.join(folder, subfolder)
    if not os.path.isfile(os.path.join(folder, "config.json")) and os.path.isfile(
        os.path.join(folder, "text_encoder", "config.json")
    ):
        return os.path.join(folder, "text_encoder")
    return folder


def load_clip_text_encoder(
    folder: str | os.PathLike,
    *,
    context_layer: str = "last",
    context_final_norm: bool = True,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    subfolder: str | None = None,
    variant: str | None = None,
) -> tuple[CLIPTextEncoder, dict]:
    """Load a transformers ``CLIPTextModel`` or ``CLIPTextModelWithProjection`` folder ->
    ``(module, params)`` (unboxed arrays); the config's ``architectures`` decides
    ``with_projection``.

    A diffusers pipeline folder works too: its ``text_encoder/`` subfolder by default, or
    ``subfolder`` (SDXL: ``"text_encoder_2"``). ``variant="fp16"`` reads ``model.fp16.safetensors``.
    """
    folder = _resolve_folder(os.fspath(folder), subfolder)
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"config.json not found in {folder}")
    with open(config_path, encoding="utf-8") as f:
        raw = json.load(f)
    config = CLIPTextConfig.from_dict(raw)
    architectures = raw.get("architectures") or ["CLIPTextModel"]
    with_projection = _PROJECTION_ARCHITECTURE in architectures
    params = params_from_state_dict(_read_folder_weights(folder, variant), config, source=folder, dtype=param_dtype,
                                    with_projection=with_projection)
    module = CLIPTextEncoder(config, context_layer=context_layer, context_final_norm=context_final_norm,
                             with_projection=with_projection, dtype=dtype, param_dtype=param_dtype)
    return module, params


def save_clip_text_encoder(
    folder: str | os.PathLike, config: CLIPTextConfig, params: Mapping, *, dtype=np.float32, variant: str | None = None
) -> None:
    """Write ``config.json`` + ``model.safetensors`` that ``transformers.CLIPTextModel.from_pretrained``
    (``CLIPTextModelWithProjection`` when ``params`` hold ``text_projection``) loads.

    ``dtype`` casts the weights (e.g. ``np.float16``); ``variant="fp16"`` names the file
    ``model.fp16.safetensors`` as diffusers' fp16 folders do."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    state = {k: v.astype(dtype) for k, v in state_dict_from_params(params, config).items()}
    suffix = f".{variant}" if variant else ""
    save_state_dict(state, os.path.join(folder, f"model{suffix}.safetensors"), metadata={"format": "pt"})
    tree = meta.unbox(params)
    if "params" in tree and "embeddings" not in tree:
        tree = tree["params"]
    with_projection = "text_projection" in tree
    tmp = os.path.join(folder, "config.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(config.to_dict(with_projection=with_projection), f, indent=2, sort_keys=True)
    os.replace(tmp, os.path.join(folder, "config.json"))
