"""The key/value cache for incremental decoding, one array pair for all layers.

A cache has `max_len` slots per sequence. Each call writes its T new keys/values at slots
`[end, end + T)`, marks in `valid` which of those slots hold real tokens (left padding does not),
and advances `end`. Attention is causal over slots: a query in slot s sees slots <= s that are
valid. Positions (for RoPE / learned embeddings) are separate from slots: see `models.generate`.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
    """k, v: [L, B, max_len, kv_heads, head_dim]; valid: [B, max_len] bool; end: int32 []."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    end: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def init_cache(config: Any, batch: int, max_len: int, dtype: Any = None) -> KVCache:
    """An empty cache for `config` (any family config with `kv_cache_shape`).

    Example:
      >>> cache = init_cache(model.config, batch=2, max_len=64)
      >>> logits, cache = model.apply({"params": p}, prompt, cache=cache)
    """
    layers, kv_heads, head_dim = config.kv_cache_shape
    shape = (layers, batch, max_len, kv_heads, head_dim)
    dtype = config.dtype if dtype is None else dtype
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid=jnp.zeros((batch, max_len), bool), end=jnp.zeros((), jnp.int32))
