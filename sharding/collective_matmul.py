"""Collective matmul: sequence parallelism's all-gather and reduce-scatter split into ring steps
(`jax.lax.ppermute`) so that each step's transfer can overlap the previous chunk's matmul.

Both functions run inside `shard_map` (they name a mesh axis) on `[batch, seq, features]`
activations whose sequence (axis 1) is, or becomes, split over that axis.

`allgather_matmul(x, w, axis)` == `all_gather(x, axis, axis=1, tiled=True) @ w`:
  x [B, S/n, in] (this device's sequence chunk), w [in, out_local] -> [B, S, out_local].
  Step k (k = 0 .. n-1): device i holds chunk (i + k) mod n; it sends that chunk to device
  i - 1 (receiving chunk (i + k + 1) mod n from i + 1) while it multiplies the chunk it holds
  and writes the product into that chunk's sequence slot. n - 1 ppermutes, n matmuls of S/n
  rows, the same products as the gathered matmul and no sums across steps (bit-equal, unless
  the backend's GEMM blocks fewer rows differently: ~1 ulp seen on XLA CPU for odd shapes).

`matmul_reducescatter(x, w, axis)` == `psum_scatter(x @ w, axis, scatter_dimension=1,
tiled=True)`, up to float summation order:
  x [B, S, in_local], w [in_local, out] -> [B, S/n, out] (this device's sequence chunk).
  Step k: device i multiplies the rows of chunk (i - k - 1) mod n, adds the running sum it
  received from device i - 1, and passes it on to device i + 1; after n - 1 ppermutes the sum
  that arrives at device i is chunk i's, complete. n matmuls of S/n rows.

Cost model (per layer, n devices on the ring): the plain path moves the same bytes in one
collective and then (or before) runs one [S, in] x [in, out] matmul: time ~ T_comm + T_mm. The
ring moves (n-1)/n of the activation in n-1 point-to-point steps of 1/n each, interleaved with
n matmuls of 1/n the rows: time ~ max(T_comm, T_mm) + one step's T_mm/n (the first or last
chunk has nothing to overlap), provided the compiler schedules step k's transfer concurrently
with step k's matmul (on GPU: XLA's latency-hiding scheduler, see docs/sharding.md). It pays
n small matmuls for one big one, which lowers GEMM efficiency when S/n rows are few.

Differentiable: the transpose of a ppermute is the reverse ppermute, so the backward pass of
`allgather_matmul` is itself a ring reduce-scatter of the input gradient (and vice versa).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sharding.compat import to_varying

SEQ_AXIS = 1


def _ring_size(axis: str) -> int:
    """The number of devices on `axis`, a Python int (the loops below unroll over it)."""
    if hasattr(jax.lax, "axis_size"):
        return jax.lax.axis_size(axis)
    return jax.lax.psum(1, axis)  # older jax: a psum of a constant folds to the size


def _check_3d(name: str, x: jax.Array, w: jax.Array) -> None:
    if x.ndim != 3 or w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"{name} needs x [batch, seq, in] and w [in, out] with matching in, "
                         f"got x {x.shape} and w {w.shape}")


def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    # The dot_general `sharding.layers._matmul` and nn.Dense issue (default precision).
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def gather_and_matmul(x: jax.Array, w: jax.Array, axis: str) -> tuple[jax.Array, jax.Array]:
    """`allgather_matmul`, also returning the gathered x [B, S, in] that the ring assembled on
    the way (the column layer's adapter reads it: no second gather of the activation)."""
    _check_3d("allgather_matmul", x, w)
    n = _ring_size(axis)
    if n == 1:
        return _matmul(x, w), x
    chunk = x.shape[SEQ_AXIS]
    me = jax.lax.axis_index(axis)
    # Device i sends to i - 1: after k steps it holds the chunk that started on i + k.
    to_previous = [(j, (j - 1) % n) for j in range(n)]
    out = to_varying(jnp.zeros((x.shape[0], n * chunk, w.shape[1]),
                               jnp.result_type(x.dtype, w.dtype)), axis)
    gathered = to_varying(jnp.zeros((x.shape[0], n * chunk, x.shape[2]), x.dtype), axis)
    held = x
    for k in range(n):
        # Issue the next transfer before this step's matmul: the two are independent, so the
        # scheduler can run them at once.
        incoming = jax.lax.ppermute(held, axis, to_previous) if k < n - 1 else None
        start = ((me + k) % n) * chunk
        out = jax.lax.dynamic_update_slice_in_dim(out, _matmul(held, w), start, SEQ_AXIS)
        gathered = jax.lax.dynamic_update_slice_in_dim(gathered, held, start, SEQ_AXIS)
        held = incoming
    return out, gathered


def allgather_matmul(x: jax.Array, w: jax.Array, axis: str) -> jax.Array:
    """`all_gather(x, axis, axis=1, tiled=True) @ w` as a ring of n - 1 ppermutes, each
    overlapping one chunk's matmul (see the module docstring). Call inside `shard_map`.

    Args:
      x: this device's sequence chunk, [B, S/n, in] (the sequence split over `axis`).
      w: this device's kernel, [in, out_local].
      axis: the mesh axis name the sequence is split over (tensor parallelism's `"tp"`).

    Returns:
      [B, S, out_local]: every device's rows, in sequence order; the gathered matmul's
      products, with no sums across steps.

    Example:
      >>> f = shard_map(lambda x, w: allgather_matmul(x, w, "tp"), mesh=mesh,
      ...               in_specs=(P(None, "tp"), P(None, "tp")), out_specs=P(None, None, "tp"))
      >>> f(x, w)   # == x @ w, x [B, S, in] split on S, w [in, out] split on out
    """
    return gather_and_matmul(x, w, axis)[0]


def matmul_reducescatter(x: jax.Array, w: jax.Array, axis: str,
                         addend: jax.Array | None = None) -> jax.Array:
    """`psum_scatter(x @ w + addend, axis, scatter_dimension=1, tiled=True)` as a ring of n - 1
    ppermutes, each overlapping one chunk's matmul (see the module docstring). Call inside
    `shard_map`.

    Args:
      x: this device's input features, [B, S, in_local] (the whole sequence).
      w: this device's kernel rows, [in_local, out].
      axis: the mesh axis name the partial sums are over (tensor parallelism's `"tp"`).
      addend: an optional [B, S, out] partial term summed with the product before it travels
        (the row layer's LoRA partial rides the same ring: no extra communication).

    Returns:
      [B, S/n, out]: this device's sequence chunk of the sum over the axis; equal to the
      reduce-scatter up to float summation order (the same n terms per entry).

    Example:
      >>> f = shard_map(lambda x, w: matmul_reducescatter(x, w, "tp"), mesh=mesh,
      ...               in_specs=(P(None, None, "tp"), P("tp")), out_specs=P(None, "tp"))
      >>> f(x, w)   # == x @ w, x [B, S, in] split on in, w [in, out] split on in
    """
    _check_3d("matmul_reducescatter", x, w)
    n = _ring_size(axis)
    if addend is not None and addend.shape[:2] != x.shape[:2]:
        raise ValueError(f"matmul_reducescatter: addend {addend.shape} must be [batch, seq, out] "
                         f"like x @ w, x {x.shape}")
    if x.shape[SEQ_AXIS] % n:
        raise ValueError(f"matmul_reducescatter: seq {x.shape[SEQ_AXIS]} is not divisible by "
                         f"the {n} devices of axis {axis!r}")
    chunk = x.shape[SEQ_AXIS] // n
    me = jax.lax.axis_index(axis)
    to_next = [(j, (j + 1) % n) for j in range(n)]
    acc = None
    for k in range(n):
        # Chunk (i - k - 1) mod n: the running sum device i receives from i - 1 at step k is for
        # the same chunk, and at step n - 1 it is chunk i, device i's own.
        start = ((me - k - 1) % n) * chunk
        part = _matmul(jax.lax.dynamic_slice_in_dim(x, start, chunk, SEQ_AXIS), w)
        if addend is not None:
            part = part + jax.lax.dynamic_slice_in_dim(addend, start, chunk,
                                                        SEQ_AXIS).astype(part.dtype)
        # The previous step's send is in flight while `part` is computed.
        acc = part if acc is None else acc + part
        if k < n - 1:
            acc = jax.lax.ppermute(acc, axis, to_next)
    return acc
