"""``RunContext``: what a training run resolves ONCE at start-up and hands down.

``start_run(config)`` initialises ``jax.distributed`` (multi-host runs), checks the config
against the devices (``resolve_config``) and builds the mesh and the logical-axis rules.
``train.py`` calls it once and passes the context to the stage (``build_stage(...,
run=...)``) and the loop (``train(..., run=...)``); library callers that pass no context get
one made for them (the same calls, made once there).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding

from ldm_jax.data.loader import make_global_batch
from ldm_jax.training import mesh as mesh_lib
from ldm_jax.training.config import resolve_config
from ldm_jax.training.distributed import initialize_distributed


@dataclasses.dataclass(frozen=True)
class RunContext:
    """The resolved config (``resolve_config``'s checked copy), the training mesh and the
    logical-axis rules, with the placements work before the loop needs (frozen params,
    host batches)."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    rules: mesh_lib.LogicalRules

    @property
    def batch_sharding(self) -> NamedSharding:
        return mesh_lib.batch_sharding(self.mesh)

    @property
    def replicated(self) -> NamedSharding:
        return mesh_lib.replicated(self.mesh)

    @property
    def global_batch(self) -> int:
        return int(self.config.train.global_batch_size)

    def place(self, tree: Any) -> tuple[Any, Any]:
        """``(arrays, shardings)`` of a frozen tree on the mesh (``mesh.place_frozen``)."""
        return mesh_lib.place_frozen(tree, self.mesh, self.rules)

    def place_replicated(self, tree: Any) -> tuple[Any, Any]:
        """``(arrays, shardings)`` of a tree replicated on every device (e.g. what a preview
        program reads whole)."""
        return mesh_lib.place_frozen(tree, self.mesh, ())

    def batch(self, local: Any) -> Any:
        """This process's rows of a global batch -> global arrays split over the batch axes."""
        return make_global_batch(local, self.batch_sharding, self.global_batch)


def start_run(config: Any) -> RunContext:
    """Initialise distributed, resolve ``config`` against the devices and build the mesh."""
    initialize_distributed(config)
    resolved = resolve_config(config, jax.device_count(), jax.process_count())
    return RunContext(resolved, mesh_lib.make_mesh(resolved.mesh), mesh_lib.logical_axis_rules(resolved.sharding))

