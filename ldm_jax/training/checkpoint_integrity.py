"""Integrity manifests for checkpoints: a fingerprint of every saved array, checked on restore.

orbax-checkpoint 0.12 has no checksum over array data (its zarr3 layout checksums only the
shard index, and zstd frames are written without a content checksum), so 64 flipped bytes in
a data file can decode to wrong values without any error. The manifest closes that gap.

Why a device-side fingerprint and not a sha256 of host bytes: in a multi-process run no process
holds a whole sharded array. A hash of host bytes would either need every array gathered onto
process 0 (the full state through one host at every save) or per-shard hashes that only match
when the restore uses the same sharding and topology as the save. The fingerprint below is a
sum over elements, modulo 2**32, of a function of (global flat index, element bits): integer
addition is exact and associative, so XLA can reduce it over any sharding and every process
gets the same replicated value, whatever the mesh of the save or of the restore. It is
computed from the values handed to orbax at save time and from the values orbax decodes at
restore time, so it checks exactly what matters: that the restored arrays are the saved ones.

Two 32-bit lanes per array:
  lane 0 = sum_i  w(i) * v_i        with w(i) = fmix32(i ^ SEED0) | 1 (odd)
  lane 1 = sum_i  fmix32(v_i ^ fmix32(i + SEED1))
``v_i`` are the element's bits as uint32 words (8-byte types give two words). Lane 0 is linear
with odd weights, so a change of any single word is always detected (odd * d != 0 mod 2**32
for d != 0); lane 1 is non-linear, so independent random damage to many words escapes both
lanes with probability about 2**-64. This is an integrity check against accidents (bit rot, a
truncated or overwritten file), not a defence against someone forging a checkpoint.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

MANIFEST_FORMAT = "ldm_jax.checkpoint_manifest.v1"
FINGERPRINT_ALGORITHM = "fmix32-sum2-v1"
# Fields of the state whose non-finite values make a checkpoint unusable (optimizer states may
# legitimately hold inf, e.g. a plateau scheduler's best value, so they are not checked).
FINITE_FIELDS = ("params", "ema_params", "model_state")

SEED0 = np.uint32(0x9E3779B9)
SEED1 = np.uint32(0x7F4A7C15)


def _fmix32(h):
    """murmur3's 32-bit finaliser (an invertible avalanche mix), for jnp or np uint32."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The element bits as uint32 words; 8-byte types get a trailing axis of 2."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        unsigned = jnp.uint8 if size == 1 else jnp.uint16
        return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    raise TypeError(f"cannot fingerprint dtype {x.dtype}")


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Row-major flat index of every element, built from iotas so it keeps the operand's
    sharding (a reshape to 1-D would make XLA gather the array)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * np.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    words = _words(x)
    index = _flat_index(words.shape)
    lane0 = jnp.sum((_fmix32(index ^ SEED0) | np.uint32(1)) * words, dtype=jnp.uint32)
    lane1 = jnp.sum(_fmix32(words ^ _fmix32(index + SEED1)), dtype=jnp.uint32)
    return jnp.stack([lane0, lane1])


def _leaf_finite(x: jax.Array) -> jax.Array:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.all(jnp.isfinite(x))
    return jnp.asarray(True)


# Leaves of one shape, dtype and sharding are stacked (up to this many bytes a stack) and
# fingerprinted by one vmapped subgraph: the compile time of the manifest program grows with the
# number of subgraphs (~15 ms each on CPU: 7 s at the first save of a 480-leaf state, one
# subgraph per leaf), and params, EMA and both Adam moments always share their shapes. The bound
# keeps the stacks' transient copies small; larger leaves get a subgraph each, as before.
GROUP_BYTES = 32 * 2**20


def _groups(leaves: list) -> list[list[int]]:
    """Leaf indices in stacks of equal (shape, dtype, sharding), each <= GROUP_BYTES (a leaf
    larger than that alone)."""
    open_groups: dict[Any, list[int]] = {}
    groups: list[list[int]] = []
    for i, x in enumerate(leaves):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            groups.append([i])  # typed PRNG keys: few, and not worth stacking
            continue
        key = (tuple(np.shape(x)), str(x.dtype), getattr(x, "sharding", None))
        nbytes = int(np.prod(np.shape(x), dtype=np.int64)) * np.dtype(x.dtype).itemsize
        group = open_groups.get(key)
        if group is None or (len(group) + 1) * nbytes > GROUP_BYTES:
            group = open_groups[key] = []
            groups.append(group)
        group.append(i)
    return groups


@functools.partial(jax.jit, static_argnums=1)
def _grouped_fingerprints_and_finite(leaves: list[jax.Array], groups: tuple[tuple[int, ...], ...]):
    """Per group: fingerprints [n, 2] and finiteness [n] of its members (one output pair per
    group: hundreds of small outputs would cost compile time of their own)."""

    def one(x):
        return _leaf_fingerprint(x), _leaf_finite(x)

    out = []
    for group in groups:
        # uint32 sums wrap modulo 2**32, so a member's fingerprint is the same bits as alone
        stack = jnp.stack([leaves[i] for i in group])
        out.append(jax.vmap(one)(stack))
    return out


def _fingerprints_and_finite(leaves: list) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Fingerprints (uint32 [2]) and finiteness of every leaf, on the host."""
    groups = tuple(tuple(g) for g in _groups(leaves))
    out = jax.device_get(_grouped_fingerprints_and_finite(list(leaves), groups))
    prints: list = [None] * len(leaves)
    finite: list = [None] * len(leaves)
    for group, (group_prints, group_finite) in zip(groups, out):
        for j, i in enumerate(group):
            prints[i], finite[i] = group_prints[j], group_finite[j]
    return prints, finite


def numpy_fingerprint(x: np.ndarray) -> str:
    """The same fingerprint computed on the host with NumPy uint64 arithmetic (an independent
    implementation, used by the tests as the reference)."""
    x = np.asarray(x)
    if x.dtype == np.bool_:
        words = x.astype(np.uint64)
    elif x.dtype.itemsize in (1, 2):
        words = x.view(np.uint8 if x.dtype.itemsize == 1 else np.uint16).astype(np.uint64)
    elif x.dtype.itemsize == 4:
        words = x.view(np.uint32).astype(np.uint64)
    else:
        words = x.reshape(*x.shape, 1).view(np.uint32).astype(np.uint64)
    words = words.reshape(-1)
    mask = np.uint64(0xFFFFFFFF)
    index = np.arange(words.size, dtype=np.uint64) & mask

    def fmix(h):
        h = h & mask
        h ^= h >> np.uint64(16)
        h = (h * np.uint64(0x85EBCA6B)) & mask
        h ^= h >> np.uint64(13)
        h = (h * np.uint64(0xC2B2AE35)) & mask
        return h ^ (h >> np.uint64(16))

    weight = fmix(index ^ np.uint64(SEED0)) | np.uint64(1)
    lane0 = int(np.sum((weight * words) & mask, dtype=np.uint64) & mask)
    lane1 = int(np.sum(fmix(words ^ fmix(index + np.uint64(SEED1))), dtype=np.uint64) & mask)
    return f"{lane0:08x}{lane1:08x}"


def leaf_names(tree: Any) -> list[str]:
    """Stable names of the leaves (``.params['conv']['kernel']``), as stored in the manifest."""
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _finite_fields(tree: Any) -> dict[str, Any]:
    return {name: getattr(tree, name) for name in FINITE_FIELDS if getattr(tree, name, None) is not None}


def summarize(tree: Any) -> tuple[dict[str, dict], dict[str, bool], str | None]:
    """``(leaves, finite, first_non_finite)`` of a state: per-leaf shape, dtype and
    fingerprint; per checked field whether all its values are finite; the name of the first
    non-finite leaf (None when all are finite). One jitted call; every process gets the same
    values in a multi-process run."""
    names = leaf_names(tree)
    leaves = jax.tree.leaves(tree)
    prints, finite = _fingerprints_and_finite(leaves)  # already on the host
    summary = {
        name: {"shape": list(np.shape(x)), "dtype": str(x.dtype), "fp": f"{int(p[0]):08x}{int(p[1]):08x}"}
        for name, x, p in zip(names, leaves, prints)
    }
    finite_by_name = dict(zip(names, (bool(f) for f in finite)))
    fields: dict[str, bool] = {}
    first_bad = None
    for field in _finite_fields(tree):
        prefix = f".{field}"
        ok = True
        for name, good in finite_by_name.items():
            if name == prefix or name.startswith(prefix + "[") or name.startswith(prefix + "."):
                if not good:
                    ok = False
                    first_bad = first_bad or name
        fields[field] = ok
    return summary, fields, first_bad


def metadata_digest(metadata: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(metadata), sort_keys=True, default=str).encode()).hexdigest()


def build_manifest(step: int, tree: Any, metadata: Mapping[str, Any]) -> dict:
    leaves, finite, _ = summarize(tree)
    return {
        "format": MANIFEST_FORMAT,
        "algorithm": FINGERPRINT_ALGORITHM,
        "step": int(step),
        "leaves": leaves,
        "finite": finite,
        "metadata_sha256": metadata_digest(metadata),
    }


class ManifestMismatch(ValueError):
    """The restore target does not have the saved structure (a different model, not damage)."""


def check_target(manifest: Mapping[str, Any], abstract_tree: Any) -> None:
    """Raise ManifestMismatch (one line) when the target's leaves or shapes differ from the
    saved ones: restoring would fail the same way for every checkpoint, so it is not damage."""
    saved = manifest.get("leaves", {})
    names = leaf_names(abstract_tree)
    shapes = {n: list(np.shape(x)) for n, x in zip(names, jax.tree.leaves(abstract_tree))}
    dtypes = {n: str(x.dtype) for n, x in zip(names, jax.tree.leaves(abstract_tree))}
    missing = sorted(set(shapes) - set(saved))
    extra = sorted(set(saved) - set(shapes))
    changed = sorted(n for n in set(shapes) & set(saved)
                     if shapes[n] != saved[n]["shape"] or dtypes[n] != saved[n]["dtype"])
    if missing or extra or changed:
        parts = []
        if changed:
            n = changed[0]
            parts.append(f"{n} saved {saved[n]['dtype']}{tuple(saved[n]['shape'])} vs model {dtypes[n]}{tuple(shapes[n])}"
                         + (f" (+{len(changed) - 1} more)" if len(changed) > 1 else ""))
        if missing:
            parts.append(f"not in checkpoint: {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
        if extra:
            parts.append(f"not in model: {extra[0]}" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else ""))
        raise ManifestMismatch("; ".join(parts))


def verify(manifest: Mapping[str, Any], tree: Any, metadata: Mapping[str, Any]) -> str | None:
    """The reason ``tree``/``metadata`` are not what the manifest describes, or None."""
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("algorithm") != FINGERPRINT_ALGORITHM:
        return f"unknown manifest format {manifest.get('format')!r}/{manifest.get('algorithm')!r}"
    leaves, _, first_bad = summarize(tree)
    saved = manifest.get("leaves", {})
    if set(leaves) != set(saved):
        return "manifest lists other arrays than the checkpoint holds"
    wrong = [n for n in leaves if leaves[n] != saved[n]]
    if wrong:
        more = f" (+{len(wrong) - 1} more arrays)" if len(wrong) > 1 else ""
        return f"checksum mismatch in {wrong[0]}{more}"
    if manifest.get("metadata_sha256") != metadata_digest(metadata):
        return "checksum mismatch in metadata"
    if first_bad is not None:
        return f"non-finite values in {first_bad}"
    return None


def non_finite_reason(tree: Any) -> str | None:
    """For checkpoints without a manifest: only the finiteness check is possible."""
    _, _, first_bad = summarize(tree)
    return None if first_bad is None else f"non-finite values in {first_bad}"


def verify_subtree(manifest: Mapping[str, Any], subtree: Any, prefix: str) -> str | None:
    """Like ``verify`` for part of a state read on its own, e.g. the EMA params restored as
    host arrays for inference: ``verify_subtree(manifest, ema, ".ema_params")``."""
    leaves, _, first_bad = summarize(subtree)
    saved = manifest.get("leaves", {})
    for name, summary in leaves.items():
        full = prefix + name
        if full not in saved:
            return f"{full} is not in the manifest"
        if saved[full] != summary:
            return f"checksum mismatch in {full}"
    if first_bad is not None:
        return f"non-finite values in {prefix}{first_bad}"
    return None


def load_manifest(step_dir: str) -> dict | None:
    """The manifest stored in a step directory (``<dir>/<step>``), None when it has none.
    Reads only the small JSON item, for readers that do not hold a Checkpointer."""
    import os

    import orbax.checkpoint as ocp

    path = os.path.join(step_dir, "manifest")
    if not os.path.isdir(path):
        return None
    return dict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path))
