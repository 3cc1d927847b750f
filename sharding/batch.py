"""Input batches as global arrays: split over dp x fsdp, each process supplying its own rows.

With context parallelism (a `cp` axis) the sequence axis (axis 1) is split over cp as well, in
contiguous chunks: `sharding.context` computes attention across them.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sharding.mesh import BATCH_AXES, CP, axis_size, check_batch_fits


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Rows over dp x fsdp, the rest (sequence, features) whole: `[B, ...]`; with a cp axis, an
    array of `ndim` >= 2 (`[B, S, ...]`) has its sequence split over cp too."""
    if ndim >= 2 and axis_size(mesh, CP) > 1:
        return NamedSharding(mesh, P(BATCH_AXES, CP))
    return NamedSharding(mesh, P(BATCH_AXES))


def _seq(x: np.ndarray) -> int | None:
    return x.shape[1] if x.ndim >= 2 else None


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Global arrays from a tree of host arrays that *every process holds whole* (`[B, ...]`).

    Each device receives its rows only. For data that each process loads for itself, use
    `from_process_local`.

    Example:
      >>> ids = shard_batch(np.asarray(tokens), mesh)      # [B, T] split over dp x fsdp
    """
    def place(x):
        x = np.asarray(x)
        check_batch_fits(mesh, batch=x.shape[0], seq=_seq(x))
        return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim),
                                            lambda index: x[index])

    return jax.tree.map(place, batch)


def from_process_local(batch: Any, mesh: Mesh) -> Any:
    """Global arrays from each process's own rows (`[B / process_count, ...]` each, in process
    order), the usual multi-host input pipeline."""
    def place(x):
        x = np.asarray(x)
        check_batch_fits(mesh, batch=x.shape[0] * jax.process_count(), seq=_seq(x))
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree.map(place, batch)


def process_rows(mesh: Mesh, global_batch: int) -> slice:
    """The rows of a `[global_batch, ...]` batch that this process's devices hold, for loaders
    that read only those (then `from_process_local`)."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    ranges = sorted({index[0].indices(global_batch)[:2] for index in index_map.values()})
    lo, hi = ranges[0][0], ranges[-1][1]
    if sum(stop - start for start, stop in ranges) != hi - lo:
        raise ValueError(f"this process's rows {ranges} are not contiguous; feed the batch with "
                         "shard_batch (every process holding it whole) instead")
    return slice(lo, hi)
