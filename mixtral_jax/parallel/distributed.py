"""Multi-process start-up: one process per host (TPU pods, GPU clusters), or several on one host.

`initialize()` calls `jax.distributed.initialize` when the environment asks for it, before any
JAX computation:

  explicit  coordinator address, process count and process id from arguments (train.py's
            --coordinator / --num-processes / --process-id) or the environment variables
            JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID;
  detected  a cluster JAX recognises by itself: Cloud TPU pods, SLURM jobs and Open MPI runs of
            more than one task (jax.distributed.initialize() without arguments);
  none      one process (the default): nothing to do.

After it, `jax.devices()` lists every process's devices, each process loads only the rows of a
global batch that live on its own devices (`process_rows`) and builds the global array from them
(`global_batch`), and only process 0 logs, shows progress and writes metadata (`is_main`).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Sharding

from mixtral_jax.config import ConfigError

_DETECTED_CLUSTER_ENV = {  # variable -> minimum value that means "more than one process"
    "SLURM_NTASKS": 2,
    "OMPI_COMM_WORLD_SIZE": 2,
    "TPU_WORKER_HOSTNAMES": None,
}


def _cluster_detected() -> bool:
    for name, at_least in _DETECTED_CLUSTER_ENV.items():
        value = os.environ.get(name)
        if value is None:
            continue
        if at_least is None:  # TPU pods list their hosts, comma-separated
            if len([h for h in value.split(",") if h.strip()]) > 1:
                return True
        elif value.isdigit() and int(value) >= at_least:
            return True
    return False


def _int(value, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={value!r}: must be an integer") from None


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Starts JAX's multi-process runtime when asked for; returns whether it did.

    Raises ConfigError (one line) for an incomplete or inconsistent explicit set-up.
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
        num_processes = _int(os.environ["JAX_NUM_PROCESSES"], "JAX_NUM_PROCESSES")
    if process_id is None and "JAX_PROCESS_ID" in os.environ:
        process_id = _int(os.environ["JAX_PROCESS_ID"], "JAX_PROCESS_ID")
    if coordinator:
        if num_processes is None or process_id is None:
            raise ConfigError(
                f"coordinator {coordinator!r} given without both the process count "
                "and this process's id (--num-processes, --process-id)"
            )
        if num_processes < 1:
            raise ConfigError(f"num_processes={num_processes}: must be >= 1")
        if not 0 <= process_id < num_processes:
            raise ConfigError(
                f"process_id={process_id}: must be in [0, num_processes={num_processes})"
            )
        if num_processes == 1:
            return False
        jax.distributed.initialize(coordinator, num_processes, process_id)
        return True
    if num_processes not in (None, 1) or process_id not in (None, 0):
        raise ConfigError(
            "a process count or id was given without a coordinator address "
            "(--coordinator or JAX_COORDINATOR_ADDRESS)"
        )
    if _cluster_detected():
        jax.distributed.initialize()
        return True
    return False


def is_main() -> bool:
    """True on the process that logs, shows progress and writes metadata (process 0)."""
    return jax.process_index() == 0


def process_rows(
    sharding: Sharding, global_shape: tuple[int, ...], axis: int = 0, devices=None
) -> np.ndarray:
    """Sorted indices along `axis` of the rows that `devices` (default: this process's) hold of
    an array of `global_shape` placed with `sharding`: the rows this process must load."""
    index_map = sharding.devices_indices_map(tuple(global_shape))
    devices = sharding.addressable_devices if devices is None else devices
    rows: set[int] = set()
    for device in devices:
        rows.update(range(*index_map[device][axis].indices(global_shape[axis])))
    return np.array(sorted(rows), dtype=np.int64)


def global_batch(
    local: np.ndarray, sharding: Sharding, global_shape: tuple[int, ...] | None = None
) -> jax.Array:
    """The global array of `global_shape` whose rows on this process's devices are `local`
    (this process's rows only, in `process_rows` order; every row with one process)."""
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def host_array(x) -> np.ndarray:
    """The whole value of `x` on this host: a plain copy, or an all-gather across processes for a
    global array whose shards live on several processes (every process must call it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
