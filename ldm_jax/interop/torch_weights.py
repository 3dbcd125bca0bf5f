"""Reading and writing PyTorch-layout weights without PyTorch pickles.

Weights are read from ``.safetensors`` (no code execution), or from a ``.ckpt``/``.bin``
with ``torch.load(weights_only=True)`` when torch is installed; never with plain pickle.
A :class:`StateDict` hands tensors out by key and, at the end, reports every key that was
never used, so that a converter that forgets a weight fails loudly instead of silently
leaving a randomly initialised parameter.
"""

from __future__ import annotations

import os
from typing import Iterable, Mapping

import numpy as np


class WeightsError(ValueError):
    """A checkpoint does not match the model: names the offending key."""


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Load a flat ``{name: array}`` dict from ``.safetensors`` or a torch ``.ckpt``/``.bin``/``.pt``.

    bf16 tensors come back as ``ml_dtypes.bfloat16`` NumPy arrays.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        out = {}
        try:
            with safe_open(path, framework="flax") as f:
                for key in f.keys():
                    out[key] = np.asarray(f.get_tensor(key))
        except Exception as error:  # noqa: BLE001 - truncated/garbled: SafetensorError, OSError, ...
            raise WeightsError(f"cannot read {path} (truncated or not a safetensors file?): "
                               f"{type(error).__name__}: {_one_line(error)}") from None
        return out
    if path.endswith((".ckpt", ".bin", ".pt", ".pth")):
        try:
            import torch
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(f"reading {path} needs torch; convert it to .safetensors instead") from e
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - UnpicklingError (refused object), EOFError, ...
            raise WeightsError(f"cannot read {path} with torch.load(weights_only=True) (a pickle holding code "
                               f"is refused; convert it to .safetensors): {type(error).__name__}: "
                               f"{_one_line(error, 200)}") from None
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        out = {}
        for key, value in obj.items():
            if hasattr(value, "detach"):
                value = value.detach()
                if value.dtype == torch.bfloat16:
                    value = value.float()
                out[key] = value.cpu().numpy()
        return out
    raise WeightsError(f"unsupported weights file extension: {path}")


def save_state_dict(state: Mapping[str, np.ndarray], path: str | os.PathLike, metadata=None) -> None:
    """Write a flat dict as ``.safetensors`` atomically (temp file + rename)."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    tmp = path + ".tmp"
    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in state.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


class StateDict:
    """A flat PyTorch state dict that tracks which keys were consumed.

    ``take(key, shape)`` returns the tensor (checking its shape when given) and marks it used;
    ``finish()`` raises :class:`WeightsError` naming every key that was never taken.
    Missing keys and shape mismatches raise :class:`WeightsError` naming the key.
    """

    def __init__(self, tensors: Mapping[str, np.ndarray], source: str = "checkpoint"):
        self._tensors = dict(tensors)
        self._used: set[str] = set()
        self.source = source

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def keys(self) -> Iterable[str]:
        return self._tensors.keys()

    def has_prefix(self, prefix: str) -> bool:
        return any(k.startswith(prefix) for k in self._tensors)

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if key not in self._tensors:
            raise WeightsError(f"missing key {key!r} in {self.source}")
        value = self._tensors[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise WeightsError(
                f"shape mismatch for key {key!r} in {self.source}: "
                f"checkpoint has {tuple(value.shape)}, model expects {tuple(shape)}"
            )
        self._used.add(key)
        return value

    def skip(self, key: str) -> None:
        """Mark a key as deliberately ignored (e.g. a buffer like ``position_ids``)."""
        self._used.add(key)

    def unused(self) -> list[str]:
        return sorted(set(self._tensors) - self._used)

    def finish(self) -> None:
        left = self.unused()
        if left:
            shown = ", ".join(repr(k) for k in left[:10])
            more = f" (and {len(left) - 10} more)" if len(left) > 10 else ""
            raise WeightsError(f"unexpected key {shown}{more} in {self.source}")


def torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The PyTorch shape of a Flax leaf: conv kernels HWIO -> OIHW, dense kernels transposed."""
    if path[-1] == "kernel":
        if len(shape) == 4:
            kh, kw, cin, cout = shape
            return (cout, cin, kh, kw)
        return tuple(reversed(shape))
    return tuple(shape)


def state_dict_to_params(
    sd: "StateDict", abstract, torch_key, param_dtype, *, linear_1x1: bool = True, place=None
) -> dict:
    """``abstract``'s (unboxed) params read from ``sd`` by ``torch_key(path)``, cast to
    ``param_dtype``. Every leaf must be found with its torch shape and every tensor used
    (``sd.finish()``), else WeightsError names the key. ``linear_1x1`` also accepts a 1x1 conv
    stored as a Linear weight [out, in] (conversions of SD 2.x checkpoints do this).

    ``place(path, host_array) -> array``: where each converted leaf goes (a NumPy array in
    ``param_dtype``, Flax layout), e.g. straight into its shards on a mesh, so that a large model
    never sits whole on one device; default ``jnp.asarray`` (the default device)."""
    import jax.numpy as jnp  # local: the readers above need no JAX
    from flax import traverse_util

    out = {}
    for path, leaf in traverse_util.flatten_dict(abstract).items():
        key = torch_key(path)
        expected = torch_shape(path, leaf.shape)
        if linear_1x1 and path[-1] == "kernel" and len(leaf.shape) == 4 and leaf.shape[:2] == (1, 1) and key in sd:
            value = sd.take(key)
            if tuple(value.shape) not in (expected, expected[:2]):
                raise WeightsError(
                    f"shape mismatch for key {key!r} in {sd.source}: checkpoint has {tuple(value.shape)}, "
                    f"model expects {expected}"
                )
        else:
            value = sd.take(key, expected)
        value = np.asarray(value, dtype=np.float32)
        if path[-1] == "kernel":
            value = conv_to_flax(value) if len(leaf.shape) == 4 else linear_to_flax(value)
        if place is None:
            out[path] = jnp.asarray(value, dtype=param_dtype)
        else:
            out[path] = place(path, np.asarray(value, dtype=np.dtype(param_dtype)))
    sd.finish()
    return traverse_util.unflatten_dict(out)


def params_to_state_dict(params, abstract, torch_key, dtype=np.float32) -> dict[str, np.ndarray]:
    """A Flax model's params (boxed or not; with or without the outer ``{"params": ...}``) as a
    PyTorch-layout state dict of NumPy arrays in ``dtype``. ``abstract`` is the model's abstract
    param tree (every leaf must be present with its shape, else WeightsError); ``torch_key(path)``
    names each tensor; ``kernel`` leaves go back to torch's linear / conv layout."""
    import jax  # local: the readers above need no JAX
    from flax import linen as nn
    from flax import traverse_util

    params = nn.meta.unbox(params)
    if set(params.keys()) == {"params"}:
        params = params["params"]
    expected = traverse_util.flatten_dict(abstract)
    flat = traverse_util.flatten_dict(params)
    missing = sorted("/".join(p) for p in set(expected) - set(flat))
    extra = sorted("/".join(p) for p in set(flat) - set(expected))
    if missing or extra:
        raise WeightsError(f"params do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    out = {}
    for path, value in flat.items():
        if tuple(value.shape) != tuple(expected[path].shape):
            raise WeightsError(f"param {'/'.join(path)} has shape {value.shape}, model expects {expected[path].shape}")
        value = np.asarray(jax.device_get(value), dtype=np.float32)
        if path[-1] == "kernel":
            value = conv_from_flax(value) if value.ndim == 4 else linear_from_flax(value)
        out[torch_key(path)] = value.astype(dtype)
    return out


def linear_to_flax(weight: np.ndarray) -> np.ndarray:
    """torch ``nn.Linear`` weight [out, in] -> flax Dense kernel [in, out]."""
    return np.ascontiguousarray(weight.T)


def linear_from_flax(kernel: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(kernel).T)


def conv_to_flax(weight: np.ndarray) -> np.ndarray:
    """torch ``nn.Conv2d`` weight [out, in, kh, kw] -> flax Conv kernel [kh, kw, in, out].

    A 1x1 conv stored as a Linear weight [out, in] (as SD 2.x proj_in/proj_out may be) is
    accepted too and becomes [1, 1, in, out].
    """
    if weight.ndim == 2:
        weight = weight[:, :, None, None]
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))


def conv_from_flax(kernel: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(kernel).transpose(3, 2, 0, 1))
