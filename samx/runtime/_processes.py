"""A mesh that spans several processes (``jax.distributed``): what each one holds.

In a multi-controller JAX program every process runs the same code and feeds
its own part of each global batch. These helpers turn process-local data into
global arrays, check once that every process feeds as many examples, replicate
process-local values on the mesh, copy a replicated array to one of this
process's devices, and lay out one value per process as rows of a global
array, so that a jitted mean over the rows averages across processes.
"""

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding


def local_rows(mesh: Mesh, axis: str) -> int:
    """How many positions along ``axis`` this process's devices occupy."""
    k = mesh.axis_names.index(axis)
    me = jax.process_index()
    rows = np.moveaxis(mesh.devices, k, 0).reshape(mesh.devices.shape[k], -1)
    return sum(any(d.process_index == me for d in row) for row in rows)


def put_batch(fn: str, batch: Any, sharding: Any) -> Any:
    """``batch`` on ``sharding``; on a multi-process mesh, ``batch`` is this
    process's part of the global batch (``make_array_from_process_local_data``).
    """
    if not (isinstance(sharding, NamedSharding) and sharding.mesh.is_multi_process):
        return jax.device_put(batch, sharding)
    check_local(fn, batch)
    # An explicit transfer, as ``device_put`` is (JAX's guard counts this one
    # as implicit).
    with jax.transfer_guard_host_to_device("allow"):
        return jax.make_array_from_process_local_data(sharding, batch)


def agree_batch_size(fn: str, size: int) -> None:
    """Every process's part of the batch has ``size`` examples; a clear error,
    on every process, if not.

    A collective (every process calls it), so run it once per run, at its
    first step, not at every step: the later steps check their size locally
    against the first. With unequal parts, ``make_array_from_process_local_data``
    builds a different global array in each process.
    """
    sizes = [int(x) for x in allgather([size])[:, 0]]
    if len(set(sizes)) > 1:
        each = ", ".join(f"process {r}: {k}" for r, k in enumerate(sizes))
        raise ValueError(
            f"`{fn}(batch=...)`: the processes' parts of the batch differ in"
            f" size ({each} examples; this is process {jax.process_index()}):"
            " on a mesh that spans several processes, every process must pass"
            " the same number of examples, its equal share of the global batch."
        )


def allgather(values: Any) -> np.ndarray:
    """Each process's ``values`` (a few int32s), one row per process.

    A collective and a host synchronisation: every process calls it, and it
    waits for all of them. Run only once per run or per calibration, before
    training (the first step's batch-size agreement, the calibrated b'), never
    inside a step. A deliberate transfer, so allowed under any
    ``jax.transfer_guard`` the caller's loop runs in.
    """
    from jax.experimental import multihost_utils

    row = np.asarray(values, np.int32).reshape(-1)
    with jax.transfer_guard("allow"):
        rows = multihost_utils.process_allgather(row)
    return np.asarray(rows).reshape(-1, row.size)


def replicate(tree: Any, sharding: NamedSharding) -> Any:
    """``tree`` replicated on ``sharding``: a copy of every leaf.

    On one process, ``jax.device_put``. On a mesh that spans several
    processes each process passes the same values, on the host or on its own devices
    (committed to one, or RNG key arrays: ``jax.device_put`` onto a mesh over
    several processes takes neither). Each leaf is copied to this process's
    devices of the mesh and assembled into a global array; a leaf already on
    the mesh, and a tracer (``jax.eval_shape``), go through
    ``jax.device_put``. Every leaf is a copy (never an alias of the input).
    """
    if not sharding.mesh.is_multi_process:
        return jax.device_put(tree, sharding, may_alias=False)
    # In the mesh's order: JAX assembles a key array from its pieces in the
    # order given (other arrays by their devices).
    me = jax.process_index()
    devices = [d for d in sharding.mesh.devices.flat if d.process_index == me]

    def put(x):
        if isinstance(x, jax.core.Tracer) or (
            isinstance(x, jax.Array) and not x.is_fully_addressable
        ):
            return jax.device_put(x, sharding, may_alias=False)
        pieces = [jax.device_put(x, d, may_alias=False) for d in devices]
        return jax.make_array_from_single_device_arrays(
            pieces[0].shape, sharding, pieces
        )

    return jax.tree.map(put, tree)


def check_local(fn: str, batch: Any) -> None:
    """On a mesh over several processes: ``batch`` is this process's part."""
    for leaf in jax.tree.leaves(batch):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            raise ValueError(
                f"`{fn}(batch=...)`: on a mesh that spans several processes, pass"
                " this process's part of the batch (NumPy arrays, or arrays on"
                " this process's devices), not a global array."
            )


def local_copy(tree: Any, device: jax.Device) -> Any:
    """A replicated global ``tree`` copied to ``device``, one of this process's."""
    return jax.tree.map(lambda x: jax.device_put(x.addressable_data(0), device), tree)


def as_rows(tree: Any, sharding: NamedSharding) -> Any:
    """Each leaf ``x[None]`` (one per process) as a row of a global array.

    ``sharding`` splits the leading axis along the batch axis of a mesh; this
    process's value fills the rows its devices hold, so the mean over the rows
    is the mean over processes (each holding the same number of rows).
    """
    devices = sharding.addressable_devices
    n = sharding.mesh.shape[sharding.spec[0]]

    def rows(x):
        pieces = [jax.device_put(x, d) for d in devices]
        return jax.make_array_from_single_device_arrays(
            (n, *x.shape[1:]), sharding, pieces
        )

    return jax.tree.map(rows, tree)
