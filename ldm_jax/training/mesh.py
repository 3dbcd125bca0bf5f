"""Device mesh and the mapping from logical parameter axes to mesh shardings.

The mesh has three named axes:

  ``data``    pure data parallelism: params replicated, batch split.
  ``fsdp``    data parallelism whose replicas also split params and optimizer state
              (ZeRO-3 style); the batch is split over ``data`` x ``fsdp``.
  ``tensor``  tensor parallelism: the batch is replicated, weights are split along
              ``mlp``/``heads``.

Models name their parameter axes (``ldm_jax.models.partitioning``); the config's
``logical_axis_rules`` map those names to mesh axes. The rules follow flax's priority
semantics (``flax.linen.logical_to_mesh_axes``: earlier rules win, a mesh axis is used at
most once per array), with one addition: a rule that would split a dimension that the mesh
axis does not divide is dropped for that array only, so flax then tries the next rule
(e.g. a conv kernel with 4 input channels on fsdp=8 gets its output channels sharded
instead) and otherwise replicates that dimension.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension is split over every axis that holds a data-parallel replica.
BATCH_AXES = ("data", "fsdp")

LogicalRules = Sequence[tuple[str, Any]]

# Every logical name a model may use (ldm_jax.models.partitioning) appears in each preset, so
# a preset is an explicit statement about all of them.
PRESET_RULES: dict[str, tuple[tuple[str, Any], ...]] = {
    # Everything replicated; the batch is split over data (and fsdp, if that axis is > 1).
    "dp": (
        ("conv_height", None),
        ("conv_width", None),
        ("embed", None),
        ("mlp", None),
        ("heads", None),
        ("vocab", None),
        ("norm", None),
    ),
    # Params and optimizer state split over fsdp along one feature axis per array: the input
    # axis first, the output axis when the input axis is taken or not divisible.
    "fsdp": (
        ("conv_height", None),
        ("conv_width", None),
        ("embed", "fsdp"),
        ("vocab", "fsdp"),
        ("mlp", "fsdp"),
        ("heads", "fsdp"),
        ("norm", None),
    ),
    # fsdp plus Megatron-style tensor parallelism of the hidden/heads axes.
    "fsdp_tensor": (
        ("conv_height", None),
        ("conv_width", None),
        ("mlp", "tensor"),
        ("heads", "tensor"),
        ("embed", "fsdp"),
        ("vocab", "fsdp"),
        ("mlp", "fsdp"),
        ("heads", "fsdp"),
        ("norm", None),
    ),
}


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
    """Fill the single ``-1`` wildcard of ``shape`` from ``num_devices`` and check the result.

    Axes missing from ``shape`` get size 1. Returns ``{axis: size}`` in ``MESH_AXES`` order.
    Raises ValueError naming the offending value for unknown axes, more than one wildcard,
    non-positive sizes, or a product that differs from ``num_devices``.
    """
    unknown = [name for name in shape if name not in MESH_AXES]
    if unknown:
        raise ValueError(
            f"config.mesh.shape has unknown axis {unknown[0]!r}; known axes are {', '.join(MESH_AXES)}"
        )
    sizes = {name: int(shape.get(name, 1)) for name in MESH_AXES}
    wildcards = [name for name, size in sizes.items() if size == -1]
    if len(wildcards) > 1:
        raise ValueError(f"config.mesh.shape {dict(shape)} has more than one -1 wildcard ({wildcards})")
    bad = [(name, size) for name, size in sizes.items() if size == 0 or size < -1]
    if bad:
        raise ValueError(f"config.mesh.shape axis {bad[0][0]!r} has invalid size {bad[0][1]}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if wildcards:
        if num_devices % fixed:
            raise ValueError(
                f"config.mesh.shape {dict(shape)}: the fixed axes ({fixed} devices) do not divide "
                f"the {num_devices} available devices"
            )
        sizes[wildcards[0]] = num_devices // fixed
    total = math.prod(sizes.values())
    if total > num_devices:
        raise ValueError(
            f"config.mesh.shape {dict(shape)} needs {total} devices but only {num_devices} are available"
        )
    if total < num_devices:
        raise ValueError(
            f"config.mesh.shape {dict(shape)} uses {total} of {num_devices} devices; "
            "set one axis to -1 or make the sizes multiply to the device count"
        )
    return sizes


def make_mesh(mesh_config: Mapping[str, Any], devices: Sequence[Any] | None = None) -> Mesh:
    """The device mesh described by ``mesh_config = {"shape": {"data": -1, "fsdp": 1, "tensor": 1}}``.

    Built with ``jax.make_mesh``, which orders devices along the physical topology (TPU torus
    rings, GPU NVLink islands); axes are ``Auto`` so sharding follows ``jit``'s in/out
    shardings and constraints.
    """
    devices = list(devices) if devices is not None else jax.devices()
    sizes = resolve_mesh_shape(dict(mesh_config["shape"]), len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    return jax.make_mesh(
        shape,
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
        devices=devices,
    )


def logical_axis_rules(sharding_config: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The rules of ``sharding_config``: explicit ``logical_axis_rules`` if given, else those of
    ``preset`` (one of ``PRESET_RULES``). Raises ValueError for an unknown preset or a rule
    that names a mesh axis outside ``MESH_AXES``."""
    explicit = sharding_config.get("logical_axis_rules")
    if explicit:
        rules = tuple((str(name), _as_mesh_axes(target)) for name, target in explicit)
    else:
        preset = sharding_config.get("preset", "dp")
        if preset not in PRESET_RULES:
            raise ValueError(
                f"unknown config.sharding.preset {preset!r}; choose one of {', '.join(PRESET_RULES)}"
            )
        rules = PRESET_RULES[preset]
    for name, target in rules:
        targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        for axis in targets:
            if axis not in MESH_AXES:
                raise ValueError(
                    f"logical axis rule ({name!r}, {target!r}) names unknown mesh axis {axis!r}; "
                    f"known axes are {', '.join(MESH_AXES)}"
                )
    return rules


def _as_mesh_axes(target: Any) -> Any:
    # Rules read back from JSON/YAML arrive as lists; flax wants str, tuple or None.
    if target is None or isinstance(target, str):
        return target
    return tuple(target)


def _axis_size(mesh: Mesh, target: Any) -> int:
    if target is None:
        return 1
    if isinstance(target, str):
        return mesh.shape[target]
    return math.prod(mesh.shape[axis] for axis in target)


def mesh_partition_spec(
    names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: LogicalRules
) -> PartitionSpec:
    """The mesh PartitionSpec of one array whose dimensions carry logical ``names``.

    Applies ``rules`` with flax's semantics; a (name, mesh axis) rule whose mesh axis size does
    not divide that dimension is removed for this array and the resolution is redone, so a
    lower-priority rule can take over or the dimension is replicated.
    """
    if len(names) != len(shape):
        raise ValueError(f"logical names {tuple(names)} do not match array shape {tuple(shape)}")
    active = list(rules)
    while True:
        axes = nn.logical_to_mesh_axes(tuple(names), active)
        for dim, target in enumerate(axes):
            if target is not None and shape[dim] % _axis_size(mesh, target):
                active.remove((names[dim], target))
                break
        else:
            return PartitionSpec(*axes)


def _unbox_names(leaf: Any) -> tuple[Any, tuple[str | None, ...] | None]:
    if isinstance(leaf, nn.LogicallyPartitioned):
        return leaf.value, tuple(leaf.names)
    return leaf, None


def param_shardings(abstract_params: Any, mesh: Mesh, rules: LogicalRules) -> Any:
    """NamedShardings for a tree of (possibly ``nn.LogicallyPartitioned``-boxed) params.

    ``abstract_params`` is typically ``jax.eval_shape(model.init, ...)["params"]``. The result
    has the structure of the *unboxed* tree. Leaves without logical names are replicated.
    """

    def one(leaf):
        value, names = _unbox_names(leaf)
        if names is None:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, mesh_partition_spec(names, value.shape, mesh, rules))

    return jax.tree.map(one, abstract_params, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def mirror_param_shardings(abstract_tree: Any, abstract_params: Any, shardings: Any, mesh: Mesh) -> Any:
    """Shardings for a tree that contains copies of the param tree (an optax state).

    A leaf whose key path ends with a param's key path and has that param's shape gets that
    param's sharding (Adam's mu/nu, momentum, ...); every other leaf (step counts, scalars)
    is replicated. Works through ``optax.chain``/``masked``/``MultiSteps`` nesting because it
    matches paths, not tree structure.
    """
    by_path = {}
    flat_params = jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    flat_shardings = jax.tree.leaves(shardings)
    for (path, leaf), sharding in zip(flat_params, flat_shardings):
        by_path[tuple(path)] = (tuple(leaf.shape), sharding)
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(path, leaf):
        path = tuple(path)
        for start in range(len(path)):
            hit = by_path.get(path[start:])
            if hit is not None and hit[0] == tuple(np.shape(leaf)):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``BATCH_AXES``; other dimensions replicated.

    As a jit ``in_shardings`` prefix it applies to every leaf of a batch dict."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split (``data`` x ``fsdp``)."""
    return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def describe_shardings(tree: Any, shardings: Any, limit: int | None = None) -> list[str]:
    """Human-readable ``path shape -> spec (per-device shape)`` lines, for logs and reports."""
    lines = []
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for (path, leaf), sharding in zip(flat, jax.tree.leaves(shardings)):
        shape = tuple(np.shape(leaf))
        shard = sharding.shard_shape(shape)
        lines.append(f"{jax.tree_util.keystr(path)} {shape} -> {sharding.spec} per device {shard}")
        if limit is not None and len(lines) >= limit:
            break
    return lines


def place_frozen(frozen_params: Any, mesh: jax.sharding.Mesh, rules: LogicalRules) -> tuple[Any, Any]:
    """``(arrays, shardings)``: the frozen tree unboxed and placed on ``mesh`` (sharded by
    ``rules`` where leaves carry logical names, replicated otherwise). Every process must
    hold the same values (they are loaded from the same files); each places its own shards."""
    shardings = param_shardings(frozen_params, mesh, rules)
    values = nn.unbox(frozen_params)

    def place(value, sharding):
        if isinstance(value, jax.Array) and value.sharding == sharding:
            return value
        host = np.asarray(value)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, values, shardings), shardings
