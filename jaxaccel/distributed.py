"""Multi-host start-up: one process per host, all devices of all hosts in one mesh.

    jaxaccel.distributed.initialize()                       # TPU VM / pod slice: automatic
    jaxaccel.distributed.initialize("10.0.0.1:1234", 2, i)  # GPU cluster, or CPU processes in tests

Call it first, before anything touches a device. Afterwards `jax.devices()` lists every
device of every process, `sharding.build_mesh` spans them all, arrays made with
`sharding.from_host` / `shard_batch` hold only this process's shards, and orbax checkpoints
(checkpoints/store.py) are written cooperatively by all processes.
"""

from __future__ import annotations

import os

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids=None, cpu_collectives: str = "gloo") -> dict:
    """Join the cluster (no-op when already joined or when running as a single process).

    Without arguments jax finds the cluster itself (TPU VMs, SLURM, Open MPI, Kubernetes) or
    reads JAXACCEL_COORDINATOR / JAXACCEL_NUM_PROCESSES / JAXACCEL_PROCESS_ID. CPU processes
    need collectives across processes: `cpu_collectives` ("gloo" or "mpi") is set first.
    Returns `info()`.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAXACCEL_COORDINATOR")
    if num_processes is None and env.get("JAXACCEL_NUM_PROCESSES"):
        num_processes = int(env["JAXACCEL_NUM_PROCESSES"])
    if process_id is None and env.get("JAXACCEL_PROCESS_ID"):
        process_id = int(env["JAXACCEL_PROCESS_ID"])
    given = [x is not None for x in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("give coordinator_address, num_processes and process_id together (or none of them "
                         "on a TPU VM / SLURM / Open MPI cluster, where jax discovers them)")
    if all(given) and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id {process_id} must be in [0, {num_processes})")
    if _joined() or num_processes == 1:
        return info()
    if not any(given) and _backend_started():
        return info()  # devices already in use here (e.g. the CLI called in-process): stay one process
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids=local_device_ids)
    except ValueError:
        if any(given):
            raise
        # no cluster found: a single process on one host
    return info()


def _backend_started() -> bool:
    from jax._src import xla_bridge  # the public API has no "backend initialized" query

    return xla_bridge.backends_are_initialized()


def _joined() -> bool:
    from jax._src import distributed  # the public API has no "is initialized" query

    return distributed.global_state.client is not None


def info() -> dict:
    """This process's place in the cluster (for logs)."""
    return {"process": jax.process_index(), "processes": jax.process_count(),
            "local_devices": jax.local_device_count(), "devices": jax.device_count(),
            "backend": jax.default_backend()}


def is_main() -> bool:
    """True on process 0 (print tables, write summaries there only)."""
    return jax.process_index() == 0


def gather(tree):
    """Global arrays (sharded over all processes) -> host numpy on every process."""
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def barrier(name: str) -> None:
    """Wait until every process reaches `name` (a no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def shutdown() -> None:
    if _joined():
        jax.distributed.shutdown()
