"""Multi-process (multi-host) start-up and process-local data placement.

``initialize_distributed`` must run before anything touches a JAX device. Sources, in order:
``config.distributed`` fields, then the environment variables ``LDM_JAX_COORDINATOR_ADDRESS``,
``LDM_JAX_NUM_PROCESSES``, ``LDM_JAX_PROCESS_ID``. With ``config.distributed.auto = True``
JAX's own cluster detection is used (TPU pods, SLURM, Open MPI); otherwise a run with no
coordinator or one process is single-process and nothing happens.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
from jax.sharding import NamedSharding

ENV_PREFIX = "LDM_JAX_"


def _setting(dist_config: Mapping[str, Any], name: str) -> Any:
    value = dist_config.get(name)
    if value is None or value == "":
        value = os.environ.get(ENV_PREFIX + name.upper()) or None
    return value


def initialize_distributed(config: Any) -> bool:
    """Start ``jax.distributed`` from ``config.distributed`` or the environment.

    Returns True if this call (or an earlier one) set up a multi-process run, False for a
    single-process run. Idempotent. Raises ValueError naming the missing or bad value when
    a multi-process setting is incomplete.
    """
    dist = dict(config.get("distributed") or {}) if hasattr(config, "get") else {}
    if jax.distributed.is_initialized():
        return True
    if dist.get("auto"):
        jax.distributed.initialize()
        return True
    address = _setting(dist, "coordinator_address")
    num_processes = _setting(dist, "num_processes")
    process_id = _setting(dist, "process_id")
    if address is None and num_processes in (None, 1, "1"):
        return False
    if address is None:
        raise ValueError(
            f"num_processes={num_processes} but no coordinator_address "
            f"(config.distributed.coordinator_address or {ENV_PREFIX}COORDINATOR_ADDRESS)"
        )
    if num_processes is None or process_id is None:
        raise ValueError(
            f"coordinator_address={address!r} needs num_processes and process_id "
            f"(config.distributed or {ENV_PREFIX}NUM_PROCESSES / {ENV_PREFIX}PROCESS_ID)"
        )
    num_processes, process_id = int(num_processes), int(process_id)
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} is outside [0, num_processes={num_processes})")
    if num_processes == 1:
        return False
    kwargs = {}
    local_ids = dist.get("local_device_ids")
    if local_ids is not None:
        kwargs["local_device_ids"] = list(local_ids)
    jax.distributed.initialize(
        coordinator_address=str(address), num_processes=num_processes, process_id=process_id, **kwargs
    )
    return True


def process_batch_rows(sharding: NamedSharding, global_batch_size: int) -> slice:
    """The contiguous rows ``[start, stop)`` of the global batch this process must load.

    Derived from the batch sharding's device assignment, so it stays right whatever order
    ``jax.make_mesh`` gives the devices. Raises ValueError when this process's rows are not
    contiguous (a mesh layout that process-local loading cannot serve).
    """
    index_map = sharding.addressable_devices_indices_map((global_batch_size,))
    ranges = sorted({(idx[0].start or 0, global_batch_size if idx[0].stop is None else idx[0].stop)
                     for idx in index_map.values()})
    start, stop = ranges[0][0], ranges[0][1]
    for lo, hi in ranges[1:]:
        if lo != stop:
            raise ValueError(
                f"process {jax.process_index()} owns non-contiguous batch rows {ranges}; "
                "reorder the mesh so each process holds a contiguous block"
            )
        stop = hi
    return slice(start, stop)
