"""LoRA on embedding tables (`nn.Embed`), with HF PEFT's `Embedding` semantics.

An embedding module `{embedding [V, D]}` that `target_modules` names gets the same three leaves
as a Dense kernel, in the same orientation (the table is a kernel `[in=V, out=D]` read by a
one-hot input):

    lora_a [V, r]    = PEFT's lora_embedding_A.T   (lora_embedding_A [r, V])
    lora_b [r, D]    = PEFT's lora_embedding_B.T   (lora_embedding_B [D, r])
    lora_scale []    alpha / r (alpha / sqrt(r) with rsLoRA)

so `split`, the optimizer mask, checkpoints and sharding carry them as they carry a Dense
adapter. The lookup adds `scale * lora_a[ids] @ lora_b` (`adapter_op.adapt_embedding`); PEFT
applies no LoRA dropout to embeddings, and neither do we. Initialisation is PEFT's: A zero and
B standard normal (for `init_lora_weights=True` and `"gaussian"` alike), both normal for False.

A tied output head (`nn.Embed.attend`) stays on the base table unless
`LoraConfig(ensure_weight_tying=True)`, exactly as in PEFT 0.21, where the tied `lm_head` shares
only the base weight. Merging folds the delta into the table, so on a tied model without
`ensure_weight_tying` the merged head changes too (PEFT's merge does the same).
"""
from __future__ import annotations

import zlib
from typing import Mapping

import jax
import jax.numpy as jnp

from lora_jax.config import LoraConfig
from lora_jax.errors import LoraError
from lora_jax.tree import EMBEDDING, LORA_A, LORA_B, LORA_SCALE, Params


def embedding_adapter_leaves(path: str, table_shape: tuple[int, ...], config: LoraConfig,
                             rng: jax.Array) -> Params:
    """The three adapter leaves for the embedding table at `path`.

    Args:
      path: the module's dotted path (its rank/alpha patterns, its random key).
      table_shape: `[V, D]`.
      config: the `LoraConfig`.
      rng: the adapters' key; this table's draw is `fold_in(rng, crc32(path))` as for kernels.

    Returns:
      `{lora_a [V, r], lora_b [r, D], lora_scale []}`.

    Example:
      >>> leaves = embedding_adapter_leaves("model.embed_tokens", (96, 32), config, key)
    """
    if len(table_shape) != 2:
        raise LoraError(f"{path!r}: embedding table of shape {list(table_shape)}; LoRA on "
                        "embeddings needs a 2-D [num_embeddings, features] table (stacked or "
                        "scanned embeddings are not supported).")
    num, dim = table_shape
    rank = config.checked_rank(path, num, dim, "embedding table")
    dtype = jnp.dtype(config.adapter_dtype)
    key_a, key_b = jax.random.split(jax.random.fold_in(rng, zlib.crc32(path.encode())))
    b = jax.random.normal(key_b, (rank, dim), jnp.float32).astype(dtype)
    if config.init_lora_weights is False:  # PEFT keeps its torch.randn A too
        a = jax.random.normal(key_a, (num, rank), jnp.float32).astype(dtype)
    else:  # PEFT: zeros A, normal B, whatever the scheme's name
        a = jnp.zeros((num, rank), dtype)
    return {LORA_A: a, LORA_B: b, LORA_SCALE: jnp.asarray(config.scale_for(path), jnp.float32)}


def embedding_delta(module: Mapping) -> jax.Array:
    """`scale * lora_a @ lora_b` `[V, D]` in float32 (what merging adds to the table)."""
    a = jnp.asarray(module[LORA_A], jnp.float32)
    b = jnp.asarray(module[LORA_B], jnp.float32)
    scale = jnp.asarray(module[LORA_SCALE], jnp.float32)
    return scale * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def merged_embedding(module: Mapping) -> jax.Array:
    """One embedding module's `table + scale * A @ B`, in the table's dtype.

    Example:
      >>> table = merged_embedding(params["model"]["embed_tokens"])
    """
    table = module[EMBEDDING]
    return (table.astype(jnp.float32) + embedding_delta(module)).astype(table.dtype)
