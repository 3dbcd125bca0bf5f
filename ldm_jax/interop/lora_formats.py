"""LoRA files in and out: diffusers/peft ``pytorch_lora_weights.safetensors`` and kohya-ss.

diffusers/peft (what ``pipe.save_lora_weights`` writes and ``pipe.load_lora_weights`` reads)::

    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight   [r, in]
    unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight   [out, r]
    text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight
  (conv layers: A [r, in, kh, kw], B [out, r, 1, 1]). ``alpha`` is not a tensor: it comes from
  the safetensors metadata entry ``lora_adapter_metadata`` (peft ``LoraConfig`` kwargs per
  component: ``unet.r``, ``unet.lora_alpha``, ``unet.rank_pattern``, ``unet.alpha_pattern``,
  ``unet.use_rslora``) and, without it, is the rank (scaling 1), as in diffusers. Older diffusers
  spellings load too: ``...attn1.processor.to_q_lora.down.weight`` (attention processors),
  ``.lora.down/.up`` and ``.lora_linear_layer.down/.up``, and text-encoder ``to_q_lora``.

kohya-ss (SD 1.x/2.x, diffusers module names with ``_`` for ``.``)::

    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight
    lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha      (scalar)
    lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight
  scaling ``alpha / rank`` per module (alpha missing: rank). Names are resolved against the
  model's own module names (not by string surgery), so every key either names a real layer or
  raises :class:`WeightsError`. SDXL's ``input_blocks``-style (sgm) kohya names, LyCORIS and
  DoRA tensors are not supported and raise naming the key.

Components are given as ``{"unet": params, "text_encoder": params}`` (unboxed arrays or
``jax.eval_shape`` structs); the result is ``{"unet": Lora, ...}`` for
:func:`ldm_jax.models.lora.merge`.
"""

from __future__ import annotations

import collections
import json
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from safetensors.numpy import save_file

from ldm_jax.interop.torch_weights import WeightsError, conv_from_flax, conv_to_flax
from ldm_jax.models.lora import LORA_A, LORA_B, Lora, Path, adaptable_layers, make_lora

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY

# Prefix of a component's module names inside its torch model (CLIPTextModel wraps everything
# in ``text_model``; our CLIPTextEncoder does not).
_MODULE_PREFIX = {"unet": "", "controlnet": "", "text_encoder": "text_model.", "text_encoder_2": "text_model."}
_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
_KOHYA_ALIASES = {"lora_te1_": "text_encoder"}
# Flax module names that are list indices in torch (``resnets_0`` <-> ``resnets.0``).
_LIST_MODULE = re.compile(
    r"^(down_blocks|up_blocks|resnets|attentions|transformer_blocks|downsamplers|upsamplers|to_out|net|layers|"
    r"controlnet_down_blocks|blocks)_(\d+)$"
)


def module_name(path: Path, component: str = "unet") -> str:
    """Flax layer path -> torch module name (``("down_blocks_0", ..., "to_out_0")`` ->
    ``"down_blocks.0....to_out.0"``), with the component's model prefix."""
    parts = []
    for name in path:
        m = _LIST_MODULE.match(name)
        parts.append(f"{m.group(1)}.{m.group(2)}" if m else name)
    return _MODULE_PREFIX.get(component, "") + ".".join(parts)


def _layer_index(params, component: str) -> dict[str, tuple[Path, tuple[int, ...]]]:
    return {module_name(p, component): (p, s) for p, s in adaptable_layers(params).items()}


def _torch_shapes(kernel_shape: tuple[int, ...], rank: int) -> tuple[tuple, tuple]:
    if len(kernel_shape) == 2:
        cin, cout = kernel_shape
        return (rank, cin), (cout, rank)
    kh, kw, cin, cout = kernel_shape
    return (rank, cin, kh, kw), (cout, rank, 1, 1)


def _to_flax(value: np.ndarray) -> np.ndarray:
    value = np.asarray(value, np.float32)
    return conv_to_flax(value) if value.ndim == 4 else np.ascontiguousarray(value.T)


def _from_flax(value) -> np.ndarray:
    value = np.asarray(jax.device_get(value), np.float32)
    return conv_from_flax(value) if value.ndim == 4 else np.ascontiguousarray(value.T)


# ----------------------------------------------------------------------------- key normalisation

# Older diffusers spellings -> peft's ``<module>.lora_A/B.weight``. Order matters (first hit).
_UNET_OLD = (
    (".to_out_lora.down.", ".to_out.0.lora_A."), (".to_out_lora.up.", ".to_out.0.lora_B."),
    *((f".to_{p}_lora.down.", f".to_{p}.lora_A.") for p in "qkv"),
    *((f".to_{p}_lora.up.", f".to_{p}.lora_B.") for p in "qkv"),
)
_TEXT_OLD = (
    (".to_out_lora.down.", ".out_proj.lora_A."), (".to_out_lora.up.", ".out_proj.lora_B."),
    *((f".to_{p}_lora.down.", f".{p}_proj.lora_A.") for p in "qkv"),
    *((f".to_{p}_lora.up.", f".{p}_proj.lora_B.") for p in "qkv"),
)
_GENERIC_OLD = (
    (".lora_linear_layer.down.", ".lora_A."), (".lora_linear_layer.up.", ".lora_B."),
    (".lora.down.", ".lora_A."), (".lora.up.", ".lora_B."),
)


def _normalise_diffusers_key(key: str, component: str) -> str:
    key = key.replace(".processor.", ".")
    for old, new in (_TEXT_OLD if component.startswith("text_encoder") else _UNET_OLD) + _GENERIC_OLD:
        if old in key:
            return key.replace(old, new)
    return key


# ----------------------------------------------------------------------------- reading


def _pattern_value(patterns: Mapping[str, Any], module: str):
    """peft's ``get_pattern_key``: the first pattern p with ``re.match(r"(.*\\.)?(p)$", module)``."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def _collect(
    entries: Mapping[str, dict[str, Any]], params, component: str, scaling_of, source: str
) -> Lora:
    """``entries``: {torch module name: {"A": (key, torch array), "B": ..., "alpha": ...}}."""
    index = _layer_index(params, component)
    alt = {}
    if _MODULE_PREFIX.get(component):  # also accept names without the text_model. prefix
        alt = {k[len(_MODULE_PREFIX[component]):]: v for k, v in index.items()}
    layers = {}
    for module, e in sorted(entries.items()):
        hit = index.get(module) or alt.get(module)
        any_key = next(iter(v[0] for v in e.values()))
        if hit is None:
            raise WeightsError(f"LoRA key {any_key!r} in {source} names {module!r}, which is not a Dense/Conv "
                               f"layer of the {component}")
        path, kernel_shape = hit
        for part in ("A", "B"):
            if part not in e:
                other = "lora_A/lora_down" if part == "A" else "lora_B/lora_up"
                raise WeightsError(f"missing key: {other} weight of {module!r} (have {any_key!r}) in {source}")
        a_key, a = e["A"]
        b_key, b = e["B"]
        rank = a.shape[0]
        want_a, want_b = _torch_shapes(kernel_shape, rank)
        for key, value, want in ((a_key, a, want_a), (b_key, b, want_b)):
            if tuple(value.shape) != want:
                raise WeightsError(f"shape mismatch for key {key!r} in {source}: file has {tuple(value.shape)}, "
                                   f"the {component} layer expects {want}")
        s = scaling_of(module, rank, e.get("alpha"))
        layers[path] = (jnp.asarray(_to_flax(a)), jnp.asarray(_to_flax(b)), s)
    return make_lora(layers)


def _diffusers_scaling(meta: Mapping[str, Any] | None, source: str):
    def scaling_of(module: str, rank: int, alpha_entry) -> float:
        if alpha_entry is not None:  # a network-alpha tensor next to the factors
            return _scalar(alpha_entry) / rank
        if not meta:
            return 1.0  # diffusers/peft convention without metadata: alpha = rank
        r = _pattern_value(meta.get("rank_pattern") or {}, module) or meta.get("r", 8)
        alpha = _pattern_value(meta.get("alpha_pattern") or {}, module) or meta.get("lora_alpha", 8)
        if int(r) != rank:
            raise WeightsError(f"metadata of {source} gives rank {r} for {module!r}, its factors have rank {rank}")
        return float(alpha) / (np.sqrt(rank) if meta.get("use_rslora") else rank)

    return scaling_of


def _kohya_scaling(module, rank, alpha_entry) -> float:
    return 1.0 if alpha_entry is None else _scalar(alpha_entry) / rank


def _scalar(entry) -> float:
    key, value = entry
    value = np.asarray(value, np.float64)
    if value.size != 1:
        raise WeightsError(f"LoRA alpha {key!r} must be a scalar, has shape {value.shape}")
    return float(value.reshape(()))


def _is_kohya(tensors: Mapping[str, Any]) -> bool:
    prefixes = tuple(_KOHYA_PREFIX.values()) + tuple(_KOHYA_ALIASES)
    return bool(tensors) and all(k.startswith(prefixes) for k in tensors)


def _read_kohya(tensors, components, source) -> dict[str, Lora]:
    prefix_of = {**{p: c for c, p in _KOHYA_PREFIX.items()}, **_KOHYA_ALIASES}
    names: dict[str, tuple[str, str]] = {}  # kohya name -> (component, torch module name)
    for component, params in components.items():
        if component not in _KOHYA_PREFIX:
            continue
        for module in _layer_index(params, component):
            for p, c in prefix_of.items():
                if c == component:
                    names[p + module.replace(".", "_")] = (component, module)
    entries: dict[str, dict[str, dict]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        name, _, suffix = key.partition(".")
        part = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}.get(suffix)
        if part is None:
            raise WeightsError(f"unsupported kohya LoRA key {key!r} in {source} (only lora_down/lora_up/alpha; "
                               "LyCORIS and DoRA tensors are not supported)")
        if name not in names:
            comp = next((c for p, c in prefix_of.items() if name.startswith(p)), "?")
            sgm = "input_blocks" in name or "output_blocks" in name
            hint = " (SDXL sgm-style names are not supported)" if sgm else ""
            if comp not in components:
                raise WeightsError(f"LoRA key {key!r} in {source} is for the {comp}, which was not given{hint}")
            raise WeightsError(f"LoRA key {key!r} in {source} names no Dense/Conv layer of the {comp}{hint}")
        component, module = names[name]
        entries[component].setdefault(module, {})[part] = (key, value)
    return {c: _collect(e, components[c], c, _kohya_scaling, source) for c, e in entries.items()}


def _read_diffusers(tensors, components, metadata, source, default_component) -> dict[str, Lora]:
    entries: dict[str, dict[str, dict]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        component, _, rest = key.partition(".")
        if component not in _MODULE_PREFIX:
            if default_component is None:
                raise WeightsError(f"LoRA key {key!r} in {source} has no component prefix (unet./text_encoder.)")
            component, rest = default_component, key
        if component not in components:
            raise WeightsError(f"LoRA key {key!r} in {source} is for the {component}, which was not given")
        rest = _normalise_diffusers_key(rest, component)
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", rest)
        if m:
            module, part = m.group(1), m.group(2)[-1]
        elif rest.endswith(".alpha"):
            module, part = rest[: -len(".alpha")], "alpha"
        else:
            raise WeightsError(f"unsupported LoRA key {key!r} in {source} (lora_B bias, DoRA magnitude and "
                               "other adapter types are not supported)")
        entries[component].setdefault(module, {})[part] = (key, value)
    out = {}
    for component, e in entries.items():
        meta = None
        if metadata:
            pre = component + "."
            meta = {k[len(pre):]: v for k, v in metadata.items() if k.startswith(pre)} or None
        out[component] = _collect(e, components[component], component, _diffusers_scaling(meta, source), source)
    return out


def lora_from_state_dict(
    tensors: Mapping[str, np.ndarray],
    components: Mapping[str, Any],
    *,
    metadata: Mapping[str, Any] | None = None,
    source: str = "LoRA state dict",
    default_component: str | None = None,
) -> dict[str, Lora]:
    """A flat LoRA state dict (diffusers/peft, older diffusers, or kohya; detected from the
    keys) -> ``{component: Lora}`` for the given ``components`` (``{"unet": params, ...}``).

    ``metadata`` is the parsed ``lora_adapter_metadata`` dict (keys ``unet.r`` ...).
    ``default_component`` is used for keys without a ``unet.`` / ``text_encoder.`` prefix (a
    bare peft ``get_peft_model_state_dict``). Raises :class:`WeightsError` naming any key that
    names no layer, misses its partner factor or has the wrong shape.
    """
    if not tensors:
        raise WeightsError(f"no tensors in {source}")
    if _is_kohya(tensors):
        return _read_kohya(tensors, components, source)
    return _read_diffusers(tensors, components, metadata, source, default_component)


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """``(tensors, lora_adapter_metadata or None)`` of a ``.safetensors`` LoRA file or of a folder
    holding ``pytorch_lora_weights.safetensors``."""
    from safetensors import safe_open

    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHT_NAME)
    if not path.endswith(".safetensors"):
        raise WeightsError(f"LoRA files are read from .safetensors only (no pickles): {path}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    tensors = {}
    with safe_open(path, framework="numpy") as f:
        file_meta = f.metadata() or {}
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    raw = file_meta.get(METADATA_KEY)
    return tensors, (json.loads(raw) if raw else None)


def load_lora(path: str | os.PathLike, components: Mapping[str, Any], **kwargs) -> dict[str, Lora]:
    """Read a LoRA file (see :func:`read_lora_file`) into ``{component: Lora}``."""
    tensors, metadata = read_lora_file(path)
    return lora_from_state_dict(tensors, components, metadata=metadata, source=os.fspath(path), **kwargs)


# ----------------------------------------------------------------------------- writing


def _module_entries(lora: Lora, component: str):
    for path, f in sorted(lora.layers.items()):
        a = _from_flax(f[LORA_A])
        b = _from_flax(f[LORA_B])
        yield module_name(path, component), a, b, lora.scaling_of(path)


def lora_to_state_dict(loras: Mapping[str, Lora], format: str = "diffusers") -> tuple[dict, dict | None]:
    """``{component: Lora}`` -> ``(tensors, lora_adapter_metadata)`` in ``format``
    (``"diffusers"``: peft keys + metadata with each module's rank and alpha; ``"kohya"``:
    ``lora_down/lora_up/alpha``, metadata None). alpha is written as ``scaling * rank``."""
    tensors: dict[str, np.ndarray] = {}
    if format == "kohya":
        for component, lora in loras.items():
            if component not in _KOHYA_PREFIX:
                raise ValueError(f"kohya format has no prefix for component {component!r}")
            for module, a, b, s in _module_entries(lora, component):
                name = _KOHYA_PREFIX[component] + module.replace(".", "_")
                tensors[name + ".lora_down.weight"] = a
                tensors[name + ".lora_up.weight"] = b
                tensors[name + ".alpha"] = np.asarray(s * a.shape[0], np.float32)
        return tensors, None
    if format != "diffusers":
        raise ValueError(f"unknown LoRA format {format!r}; expected 'diffusers' or 'kohya'")
    metadata: dict[str, Any] = {}
    for component, lora in loras.items():
        ranks, alphas = {}, {}
        for module, a, b, s in _module_entries(lora, component):
            tensors[f"{component}.{module}.lora_A.weight"] = a
            tensors[f"{component}.{module}.lora_B.weight"] = b
            ranks[module] = int(a.shape[0])
            alphas[module] = float(s * a.shape[0])
        r = collections.Counter(ranks.values()).most_common(1)[0][0]
        alpha = collections.Counter(v for m, v in alphas.items() if ranks[m] == r).most_common(1)[0][0]
        # Metadata names: "^name" anchors peft's pattern match to the whole module name (peft
        # PR 2419). A text encoder's modules are named "text_model.encoder..." in transformers 4
        # and "encoder..." in 5 (diffusers strips the prefix from keys, not from metadata), so
        # there the names go without the prefix and unanchored: a suffix match in both.
        prefix = _MODULE_PREFIX.get(component, "")
        anchor = "" if prefix else "^"
        short = lambda m: m[len(prefix):] if prefix and m.startswith(prefix) else m  # noqa: E731
        config = {
            "r": r,
            "lora_alpha": alpha,
            "rank_pattern": {f"{anchor}{short(m)}": v for m, v in ranks.items() if v != r},
            "alpha_pattern": {f"{anchor}{short(m)}": v for m, v in alphas.items() if v != alpha},
            "target_modules": sorted(short(m) for m in ranks),
            "use_rslora": False,
            "lora_dropout": 0.0,
            "init_lora_weights": True,
        }
        metadata.update({f"{component}.{k}": v for k, v in config.items()})
    return tensors, metadata


def save_lora(path: str | os.PathLike, loras: Mapping[str, Lora], format: str = "diffusers") -> str:
    """Write ``loras`` to ``path`` (a ``.safetensors`` file, or a folder that gets
    ``pytorch_lora_weights.safetensors``). diffusers' ``pipe.load_lora_weights(folder)`` /
    ``load_lora_into_unet`` read both formats. Returns the file written."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        os.makedirs(path, exist_ok=True)
        path = os.path.join(path, WEIGHT_NAME)
    tensors, metadata = lora_to_state_dict(loras, format)
    file_meta = {"format": "pt"}
    if metadata:
        file_meta[METADATA_KEY] = json.dumps(metadata, indent=2, sort_keys=True)
    # Not torch_weights.save_state_dict: its ascontiguousarray turns kohya's 0-d alphas into [1].
    tmp = path + ".tmp"
    save_file({k: np.asarray(v) for k, v in tensors.items()}, tmp, metadata=file_meta)
    os.replace(tmp, path)
    return path
