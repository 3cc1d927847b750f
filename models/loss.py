"""Token cross-entropy in float32, plain and chunked over the vocabulary.

Label alignment: by default `labels[b, t]` is the target of `logits[b, t]` (already shifted).
With `shift=True`, `labels` are the input ids themselves (the Hugging Face `labels=` convention):
`logits[:, :-1]` are scored against `labels[:, 1:]`. Labels equal to `ignore_index` (-100, as in
HF) and positions where `mask` is 0 do not count; `mask` is aligned with `labels`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def _align(labels, mask, shift: bool, ignore_index: int):
    """(labels [N...], valid bool [N...]) after the optional shift."""
    if shift:
        labels = labels[:, 1:]
        mask = None if mask is None else mask[:, 1:]
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & mask.astype(bool)
    return jnp.where(valid, labels, 0), valid


def _masked_mean(nll: jax.Array, valid: jax.Array) -> jax.Array:
    count = jnp.sum(valid)
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(count, 1).astype(jnp.float32)


def cross_entropy(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None, *,
                  shift: bool = False, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Mean negative log-likelihood over the counted tokens, float32 scalar (0 if none count).

    Args:
      logits: [B, T, V] in any dtype (upcast to float32 here).
      labels: [B, T] int token ids; see the module docstring for alignment.
      mask: optional [B, T], 1 where the label counts.

    Example:
      >>> loss = cross_entropy(model.apply({"params": p}, ids), ids, shift=True)
    """
    if shift:
        logits = logits[:, :-1]
    labels, valid = _align(labels, mask, shift, ignore_index)
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return _masked_mean(log_z - picked, valid)


def chunked_cross_entropy(hidden: jax.Array, head_kernel: jax.Array, labels: jax.Array,
                          mask: jax.Array | None = None, *, chunk_size: int = 8192,
                          shift: bool = False, ignore_index: int = IGNORE_INDEX,
                          dtype: Any = None) -> jax.Array:
    """`cross_entropy(hidden @ head_kernel, labels, mask)` without the [B, T, V] logits.

    The vocabulary is walked in chunks of `chunk_size` columns with a running (online)
    log-sum-exp; each chunk is rematerialised in the backward pass, so peak memory holds one
    [B*T, chunk] block. Matmuls run in `dtype` (default: hidden's) with float32 accumulation.

    Args:
      hidden: [B, T, D] final hidden states (`model.apply(..., return_hidden=True)`).
      head_kernel: [D, V] (`models.head_kernel(config, params)`).
      labels, mask, shift, ignore_index: as in `cross_entropy`.
    """
    if shift:
        hidden = hidden[:, :-1]
    labels, valid = _align(labels, mask, shift, ignore_index)
    dim, vocab = head_kernel.shape
    h = hidden.reshape(-1, dim).astype(dtype or hidden.dtype)
    y = labels.reshape(-1)
    chunk = min(chunk_size, vocab)
    n_full = vocab // chunk

    def update(carry, w, start):
        top, total, picked = carry
        z = jnp.dot(h, w.astype(h.dtype), preferred_element_type=jnp.float32)   # [N, c]
        new_top = jnp.maximum(top, jnp.max(z, axis=-1))
        total = total * jnp.exp(top - new_top) + jnp.sum(jnp.exp(z - new_top[:, None]), -1)
        inside = (y >= start) & (y < start + w.shape[1])
        idx = jnp.clip(y - start, 0, w.shape[1] - 1)
        picked = picked + jnp.where(inside, jnp.take_along_axis(z, idx[:, None], 1)[:, 0], 0.0)
        return new_top, total, picked

    @jax.checkpoint
    def body(carry, start):
        w = jax.lax.dynamic_slice_in_dim(head_kernel, start, chunk, axis=1)
        return update(carry, w, start), None

    n = h.shape[0]
    carry = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32),
             jnp.zeros((n,), jnp.float32))
    carry, _ = jax.lax.scan(body, carry, jnp.arange(n_full) * chunk)
    if vocab > n_full * chunk:  # the remainder, when chunk does not divide the vocabulary
        carry = jax.checkpoint(update, static_argnums=(2,))(
            carry, head_kernel[:, n_full * chunk:], n_full * chunk)
    top, total, picked = carry
    nll = (top + jnp.log(total) - picked).reshape(labels.shape)
    return _masked_mean(nll, valid)
