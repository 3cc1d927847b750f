"""Scaled dot-product attention through `jax.nn.dot_product_attention`, masks and cache writes.

Three cases, chosen per forward pass by `attention_context`:
  * no padding mask, no cache: `is_causal=True` and no mask array, the form cuDNN flash
    attention accepts (implementation="cudnn" on GPU);
  * a padding mask [B, T]: an explicit causal-and-padding boolean mask;
  * a KV cache: causal over cache slots, restricted to valid slots.
Softmax runs in float32 inside `jax.nn.dot_product_attention` whatever the compute dtype.
"""
from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from models.cache import KVCache


@flax.struct.dataclass
class AttentionContext:
    """What every layer's attention needs besides q, k, v (broadcast to all layers).

    mask: [B, 1, T, S] bool or None (None means plain causal over the T tokens).
    end: int32 [] first cache slot written by this call, or None without a cache.
    cos, sin: [B, T, head_dim] float32 rotary angles (families with RoPE), else None.
    """

    mask: jax.Array | None
    end: jax.Array | None
    cos: jax.Array | None = None
    sin: jax.Array | None = None


def default_positions(batch: int, length: int, start: jax.Array | int = 0) -> jax.Array:
    """[B, T] int32 positions start, start+1, ..."""
    pos = jnp.arange(length, dtype=jnp.int32) + jnp.asarray(start, jnp.int32)
    return jnp.broadcast_to(pos[None, :], (batch, length))


def begin_forward(input_ids: jax.Array, positions: jax.Array | None,
                  attention_mask: jax.Array | None, cache: KVCache | None):
    """Shared start of a causal-LM forward: ([B, T] positions, context, advanced cache or None).

    Default positions continue from the cache (`end`, `end + 1`, ...) or start at 0.
    """
    batch, length = input_ids.shape
    if positions is None:
        positions = default_positions(batch, length, 0 if cache is None else cache.end)
    positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (batch, length))
    ctx, cache_next = attention_context(batch, length, attention_mask, cache)
    return positions, ctx, cache_next


def finish_forward(out: jax.Array, kv, cache_next: KVCache | None):
    """`out` alone without a cache; `(out, cache)` with the layers' new keys/values stored."""
    if cache_next is None:
        return out
    return out, cache_next.replace(k=kv[0], v=kv[1])


def attention_context(batch: int, length: int, attention_mask: jax.Array | None,
                      cache: KVCache | None) -> tuple[AttentionContext, KVCache | None]:
    """Masks for one forward pass, and the cache with `valid`/`end` advanced (k/v not yet).

    attention_mask: [B, T] (1 = real token) for the T tokens of this call, or None.
    """
    if cache is None:
        if attention_mask is None:
            return AttentionContext(mask=None, end=None), None
        causal = jnp.tril(jnp.ones((length, length), bool))
        mask = causal[None, None] & attention_mask.astype(bool)[:, None, None, :]
        return AttentionContext(mask=mask, end=None), None
    new = (jnp.ones((batch, length), bool) if attention_mask is None
           else attention_mask.astype(bool))
    valid = jax.lax.dynamic_update_slice(cache.valid, new, (0, cache.end))
    query_slot = cache.end + jnp.arange(length)
    key_slot = jnp.arange(cache.max_len)
    causal = key_slot[None, :] <= query_slot[:, None]                       # [T, S]
    mask = causal[None, None] & valid[:, None, None, :]                      # [B, 1, T, S]
    ctx = AttentionContext(mask=mask, end=cache.end)
    return ctx, cache.replace(valid=valid, end=cache.end + length)


def write_kv(layer_kv: tuple[jax.Array, jax.Array], k: jax.Array, v: jax.Array,
             end: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Write k, v [B, T, kv_heads, h] into one layer's cache [B, S, kv_heads, h] at slot `end`."""
    ck, cv = layer_kv
    start = (0, end, 0, 0)
    return (jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), start),
            jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), start))


def attend(q: jax.Array, k: jax.Array, v: jax.Array, ctx: AttentionContext,
           layer_kv: tuple[jax.Array, jax.Array] | None, *, scale: float | None,
           implementation: str | None):
    """Causal attention of q [B, T, heads, h] over k, v [B, T, kv_heads, h] (GQA when
    kv_heads < heads), through the layer's cache slice when given.

    Returns ([B, T, heads, h], updated layer cache or None).
    """
    if layer_kv is not None:
        layer_kv = write_kv(layer_kv, k, v, ctx.end)
        k, v = (t.astype(q.dtype) for t in layer_kv)
    if ctx.mask is None:
        out = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True,
                                           implementation=implementation)
    else:
        # cuDNN takes causal/length masks, not arbitrary boolean ones; masked calls (padding,
        # decoding) use the XLA kernel, which is what such small or ragged calls want anyway.
        impl = None if implementation == "cudnn" else implementation
        out = jax.nn.dot_product_attention(q, k, v, mask=ctx.mask, scale=scale,
                                           implementation=impl)
    return out, layer_kv


def parallel_attend(parallel, q: jax.Array, k: jax.Array, v: jax.Array, ctx: AttentionContext,
                    layer_kv: tuple[jax.Array, jax.Array] | None, *, scale: float | None,
                    implementation: str | None):
    """`attend`, or the parallelism's own attention when it has one (`attention`, same
    arguments and result): context parallelism computes it as a ring over sequence chunks
    (`sharding.context`). Models call this and stay unaware of how the sequence is split.
    """
    own = getattr(parallel, "attention", None)
    if own is None:
        return attend(q, k, v, ctx, layer_kv, scale=scale, implementation=implementation)
    return own(q, k, v, ctx, layer_kv, scale=scale, implementation=implementation)


# The primitive names `jax.nn.dot_product_attention(implementation="cudnn")` binds for its
# forward (jax 0.10/0.11: "dot_product_attention_fwd_wrapper" around "dot_product_attention_fwd").
_FLASH_FORWARD_PREFIX = "dot_product_attention_fwd"


def saves_flash_attention(prim, *_, **__) -> bool:
    """A `jax.checkpoint` policy: keep cuDNN flash attention's forward outputs (the attention
    output and its float32 softmax statistics, 1/head_dim of the output's size).

    A "dots" policy does not see the fused kernel as a matmul, so the backward pass would run
    the whole attention forward again only to recover those statistics (~2% of an 8B step).
    Should a jax version rename the primitive, this matches nothing and attention is simply
    recomputed, as before."""
    return prim.name.startswith(_FLASH_FORWARD_PREFIX)
