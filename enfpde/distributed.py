"""Training and forecasting as several processes with JAX's multi-process runtime (``jax.distributed``).

One process runs per host (or per GPU); together they see every device of the job as one mesh. Training is
data parallel: every process computes the same global batch indices (the sampler is a pure function of the
seed and the step), builds only its own rows of each batch, and the rows of all processes form one global
array sharded over the ``batch`` axis. Parameters and optimiser states are replicated. Process 0 writes the run
directory (config, metadata, metrics, progress); orbax writes each checkpoint once, coordinated across the
processes. Checkpoints hold replicated arrays, so a run saved by N processes resumes on any M: the global
batch (``train.batch_size``) is unchanged and only its split over the processes changes, so the sequence of
batches and the parameters continue exactly.

Starting the runtime (:func:`initialize`), in order of precedence:

- explicit arguments (the CLI's ``--coordinator``, ``--num-processes``, ``--process-id``);
- the environment variables ``ENFPDE_COORDINATOR`` (host:port of process 0), ``ENFPDE_NUM_PROCESSES``,
  ``ENFPDE_PROCESS_ID``;
- a SLURM job step with more than one task (``SLURM_NTASKS > 1``): JAX reads everything from SLURM.

Otherwise nothing starts and the package runs as one process, as before. On CPU the cross-process collectives
use gloo.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

ENV_COORDINATOR = "ENFPDE_COORDINATOR"
ENV_NUM_PROCESSES = "ENFPDE_NUM_PROCESSES"
ENV_PROCESS_ID = "ENFPDE_PROCESS_ID"

_started = False


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    environ: Mapping[str, str] = os.environ,
) -> bool:
    """Start ``jax.distributed`` if the arguments or the environment ask for several processes.

    Call it before anything else touches JAX's devices. Returns whether this is a multi-process job.

    Raises:
        ValueError: a partial or invalid explicit setting (e.g. a coordinator without a process id).
    """
    global _started
    if _started:
        return jax.process_count() > 1
    coordinator = coordinator or environ.get(ENV_COORDINATOR) or None
    num_processes = _as_int(num_processes if num_processes is not None else environ.get(ENV_NUM_PROCESSES), "number of processes")
    process_id = _as_int(process_id if process_id is not None else environ.get(ENV_PROCESS_ID), "process id")
    explicit = {"coordinator": coordinator, "number of processes": num_processes, "process id": process_id}
    if any(v is not None for v in explicit.values()):
        missing = [name for name, v in explicit.items() if v is None]
        if missing:
            raise ValueError(
                f"a multi-process run needs the coordinator (host:port of process 0), the number of processes and this "
                f"process's id; missing: {', '.join(missing)} (flags --coordinator/--num-processes/--process-id or "
                f"{ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID})."
            )
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"process id must be in [0, {num_processes}) and the number of processes >= 1; found process id "
                f"{process_id} of {num_processes}."
            )
        if num_processes == 1:
            return False
        _start(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
        return True
    if "SLURM_JOB_ID" in environ and _as_int(environ.get("SLURM_NTASKS", "1"), "SLURM_NTASKS") > 1:
        _start()  # JAX's SLURM cluster detection supplies the coordinator, the count and the id
        return True
    return False


def initialize_from_args(args) -> bool:
    """:func:`initialize` with the flags of :func:`enfpde.cli.add_distributed_arguments` (absent flags fall back
    to the environment)."""
    return initialize(
        getattr(args, "coordinator", None), getattr(args, "num_processes", None), getattr(args, "process_id", None)
    )


def _start(**kwargs) -> None:
    global _started
    # CPU devices of different processes talk through gloo (no effect on GPU or TPU backends).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)
    _started = True


def _as_int(value, what: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"the {what} must be an integer, found {value!r}.") from None


def is_main_process() -> bool:
    """Whether this process writes files, logs and shows progress (process 0)."""
    return jax.process_index() == 0


def process_rows(global_rows: int) -> slice:
    """The rows of a global batch of ``global_rows`` that this process builds (equal contiguous shares)."""
    count, index = jax.process_count(), jax.process_index()
    if global_rows % count:
        raise ValueError(f"a batch of {global_rows} rows cannot be split evenly over {count} processes.")
    share = global_rows // count
    return slice(index * share, (index + 1) * share)


def replicate(tree, mesh: Mesh):
    """Every array leaf of ``tree`` as one array replicated on all devices of ``mesh`` (all processes pass the
    same values)."""
    sharding = NamedSharding(mesh, PartitionSpec())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return x  # already a global array
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = replicate(jax.random.key_data(x), mesh)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree)


def shard_rows(local_rows: np.ndarray, mesh: Mesh) -> jax.Array:
    """This process's rows of a batch as its part of one global array sharded over the mesh's ``batch`` axis."""
    sharding = NamedSharding(mesh, PartitionSpec("batch"))
    if jax.process_count() == 1:
        return jax.device_put(local_rows, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(local_rows))


def to_host(x) -> np.ndarray:
    """A replicated (or single-process) array as a NumPy array on this host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)


def gather(local: np.ndarray) -> np.ndarray:
    """Stack equal-shaped per-process arrays in process order: ``[...] -> [processes, ...]`` on every process."""
    if jax.process_count() == 1:
        return np.asarray(local)[None]
    return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=False))


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
