"""Cross-entropy through a *frozen* output head, fused: logits never stored, two matmuls.

For LoRA the head `W [D, V]` is frozen, so the only gradient the loss sends back is
`dL/dh = (softmax(hW) - onehot(y)) W^T`. This computes it in the forward pass, one chunk of
tokens at a time (`[chunk, V]` float32 logits live only inside the chunk), and keeps just `dL/dh`
(`[N, D]`, the size of the hidden states) for the backward pass. Against a rematerialised vocab-
chunked loss this saves one head matmul and all the bookkeeping of an online log-sum-exp (the
measured gain is in docs/PERFORMANCE.md).

The head kernel's cotangent is defined as zero: use `cross_entropy` when the head trains.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from models.loss import IGNORE_INDEX, _align


def frozen_head_cross_entropy(hidden: jax.Array, head_kernel: jax.Array, labels: jax.Array,
                              mask: jax.Array | None = None, *, chunk_size: int = 4096,
                              shift: bool = False, ignore_index: int = IGNORE_INDEX) -> jax.Array:
    """Mean token NLL of `hidden @ head_kernel` against `labels`; float32 scalar.

    Args:
      hidden: [B, T, D] final hidden states (`model.apply(..., return_hidden=True)`).
      head_kernel: [D, V], treated as a constant (zero cotangent).
      labels, mask, shift, ignore_index: as in `models.loss.cross_entropy`.
      chunk_size: tokens per chunk; peak extra memory is about `chunk_size * V * 8` bytes.

    Example:
      >>> h = model.apply({"params": p}, ids, return_hidden=True)
      >>> loss = frozen_head_cross_entropy(h, head_kernel(cfg, p), ids, shift=True)
    """
    if shift:
        hidden = hidden[:, :-1]
    labels, valid = _align(labels, mask, shift, ignore_index)
    dim = hidden.shape[-1]
    weights = valid.reshape(-1).astype(jnp.float32)
    weights = weights / jnp.maximum(weights.sum(), 1.0)
    targets = jnp.where(valid, labels, 0).reshape(-1)
    h = hidden.reshape(-1, dim)
    n = h.shape[0]
    chunk = min(chunk_size, n)
    pad = (-n) % chunk
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        targets, weights = jnp.pad(targets, (0, pad)), jnp.pad(weights, (0, pad))
    loss = _weighted_nll(h, jax.lax.stop_gradient(head_kernel), targets, weights, chunk)
    return loss


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    return x.reshape(x.shape[0] // chunk, chunk, *x.shape[1:])


def _chunk_terms(h, w, y, wt, with_grad: bool):
    """One chunk: weighted NLL sum and (optionally) its gradient with respect to `h`."""
    z = jnp.dot(h, w.astype(h.dtype), preferred_element_type=jnp.float32)       # [c, V]
    lse = jax.nn.logsumexp(z, axis=-1)
    picked = jnp.take_along_axis(z, y[:, None], axis=1)[:, 0]
    nll = jnp.sum((lse - picked) * wt)
    if not with_grad:
        return nll, None
    onehot = jax.lax.broadcasted_iota(jnp.int32, z.shape, 1) == y[:, None]
    dz = (jnp.exp(z - lse[:, None]) - onehot) * wt[:, None]
    dh = jax.lax.dot_general(dz.astype(h.dtype), w.astype(h.dtype), (((1,), (1,)), ((), ())),
                             preferred_element_type=jnp.float32)
    return nll, dh.astype(h.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _weighted_nll(h, w, y, wt, chunk):
    def body(total, xs):
        return total + _chunk_terms(*xs[:1], w, *xs[1:], with_grad=False)[0], None
    total, _ = jax.lax.scan(body, jnp.float32(0), (_chunks(h, chunk), _chunks(y, chunk),
                                                    _chunks(wt, chunk)))
    return total


def _fwd(h, w, y, wt, chunk):
    def body(total, xs):
        nll, dh = _chunk_terms(xs[0], w, xs[1], xs[2], with_grad=True)
        return total + nll, dh
    total, dh = jax.lax.scan(body, jnp.float32(0), (_chunks(h, chunk), _chunks(y, chunk),
                                                     _chunks(wt, chunk)))
    return total, (dh.reshape(h.shape), w)


def _bwd(chunk, res, g):
    dh, w = res
    return (dh * g.astype(dh.dtype), jnp.zeros_like(w), None, None)


_weighted_nll.defvjp(_fwd, _bwd)
