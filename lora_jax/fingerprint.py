"""Content checksums of array trees, stored beside checkpoints to catch silent corruption.

Orbax notices truncated files, but a file with flipped or zeroed bytes can still decode. Each
leaf's checksum is a position-weighted sum of its raw bit patterns (uint32 arithmetic, wrapping),
computed on device under `jit`, so it works on sharded and multi-host arrays and costs one
reduction per leaf. It detects any single changed word and any moved block; it is not a
cryptographic hash.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.tree import dotted

_GOLDEN = np.uint32(2654435761)  # Knuth's multiplicative hash constant: spreads positions


def _leaf_checksum(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = min(x.dtype.itemsize, 4) * 8
    words = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{width}")).astype(jnp.uint32)
    words = words.reshape(-1)
    weights = jnp.arange(words.size, dtype=jnp.uint32) * _GOLDEN + jnp.uint32(1)
    return jnp.sum(words * weights, dtype=jnp.uint32)


_tree_checksum = jax.jit(lambda tree: jax.tree.map(_leaf_checksum, tree))


def checksums(tree: Any) -> dict[str, int]:
    """`{"a/b/leaf": checksum}` for every array leaf of `tree`.

    Example:
      >>> checksums({"w": jnp.ones(3)})
      {'w': 1277326574}
    """
    sums = jax.device_get(_tree_checksum(tree))
    flat = jax.tree_util.tree_flatten_with_path(sums)[0]
    return {dotted(path, "/"): int(value) for path, value in flat}


def mismatches(expected: Mapping[str, int], tree: Any) -> list[str]:
    """Leaf paths whose checksum differs from `expected` (or that are missing/extra)."""
    actual = checksums(tree)
    keys = sorted(set(expected) | set(actual))
    return [k for k in keys if expected.get(k) != actual.get(k)]
