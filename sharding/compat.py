"""The few JAX entry points whose names moved between releases (0.6 .. 0.11)."""
from __future__ import annotations

import functools

import jax

if hasattr(jax, "shard_map"):
    shard_map = jax.shard_map
else:  # jax < 0.7: the experimental module, whose replication check had another name
    from jax.experimental.shard_map import shard_map as _old_shard_map

    def shard_map(f, *, mesh, in_specs, out_specs, check_vma=True):
        return _old_shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                              check_rep=check_vma)


def to_varying(x: jax.Array, axis: str) -> jax.Array:
    """Mark a value that is the same on every device of `axis` as varying over it.

    Under shard_map's type checking, combining an invariant value with a varying one inserts an
    implicit cast *at each use*, and each cast transposes to its own psum in the backward pass.
    Casting once, by hand, before a value's several uses gives their summed cotangent one psum.
    """
    if hasattr(jax.lax, "pcast"):
        return jax.lax.pcast(x, axis, to="varying")
    if hasattr(jax.lax, "pvary"):
        return jax.lax.pvary(x, axis)
    return x  # no varying-ness types: nothing to cast


all_gather = functools.partial(jax.lax.all_gather, tiled=True)
