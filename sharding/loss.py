"""Vocabulary-parallel cross-entropy: the LM head's logits never exist whole on any device.

With the head kernel split on the vocabulary over tp (the rules' layout for `lm_head` and tied
embeddings), each device scores every token against its own V/tp words, chunk by chunk with a
running log-sum-exp, and three per-token numbers (max, sum of exponentials, the label's logit)
are combined over tp. Neither the [tokens, V] logits nor the whole [D, V] kernel is formed, and
the sequence-parallel hidden states are gathered once, inside.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from models.loss import IGNORE_INDEX  # one label-masking convention for both losses
from sharding.compat import all_gather, shard_map
from sharding.layers import activation_spec
from sharding.mesh import (CP, DP, FSDP, TP, MeshError, axis_sizes, check_context_fits,
                           drop_trivial_axes)
from sharding.rules import KERNEL_SPECS


def shift_labels(labels: jax.Array, fill: int = IGNORE_INDEX) -> jax.Array:
    """Next-token targets aligned with the inputs: `labels[:, 1:]` and one `fill` position, so
    the sequence keeps its length (and stays divisible for sequence parallelism). Shift a mask
    the same way with `fill=0`."""
    return jnp.pad(labels[:, 1:], ((0, 0), (0, 1)), constant_values=fill)


def vocab_parallel_cross_entropy(hidden: jax.Array, head_kernel: jax.Array, labels: jax.Array,
                                 mask: jax.Array | None = None, *, mesh: Mesh,
                                 sequence_parallel: bool = False, chunk_size: int = 8192,
                                 ignore_index: int = IGNORE_INDEX, dtype: Any = None) -> jax.Array:
    """Mean token cross-entropy of `hidden @ head_kernel` against `labels`, float32 scalar.

    Args:
      hidden: [B, S, D] final hidden states (`model.apply(..., return_hidden=True)`), split on S
        over tp when `sequence_parallel`, and over cp when the mesh has a cp axis (context
        parallelism: labels and mask split the same way, token sums added over cp).
      head_kernel: [D, V] (`models.llama.head_kernel(config, params)`), split (fsdp, tp).
      labels: [B, S] targets aligned with `hidden` (see `shift_labels`); `ignore_index` and
        `mask == 0` do not count.
      chunk_size: vocabulary columns scored at once per device (must divide V / tp).

    Local shapes under shard_map (bd = dp*fsdp, N = B/bd * S tokens):
      hidden [B/bd, S(/tp), D] -> all-gather over tp (SP) -> [N, D];  labels, mask [B/bd, S]
      kernel [D/fsdp, V/tp] -> all-gather over fsdp -> [D, V/tp], scanned in [D, chunk] slices
      per token: running max, sum of exp, label logit over the local V/tp -> combined over tp

    Example:
      >>> hidden = lj.apply(model, variables, ids, return_hidden=True)
      >>> loss = vocab_parallel_cross_entropy(hidden, head_kernel(config, params),
      ...                                     shift_labels(ids), mesh=mesh)
    """
    sizes = axis_sizes(mesh)
    vocab_local = head_kernel.shape[1] // sizes[TP]
    chunk = min(chunk_size, vocab_local)
    if vocab_local % chunk:
        raise ValueError(f"chunk_size {chunk} does not divide the {vocab_local} vocabulary "
                         f"columns each of tp={sizes[TP]} devices holds")
    mask = jnp.ones(labels.shape, bool) if mask is None else mask.astype(bool)
    hidden_spec = activation_spec(mesh, hidden.shape, seq_split=sequence_parallel)
    label_spec = P(hidden_spec[0], None)
    if sizes.get(CP, 1) > 1:  # context parallelism: each device scores its own sequence chunk
        if sequence_parallel:
            raise MeshError("sequence_parallel splits the sequence over tp, and the mesh's cp "
                            "axis splits it too: use one of them (context parallelism runs "
                            "with tp=1)")
        check_context_fits(mesh, hidden.shape[1])
        hidden_spec, label_spec = P(hidden_spec[0], CP, None), P(hidden_spec[0], CP)
    body = functools.partial(_local_loss, sizes=sizes, sequence_parallel=sequence_parallel,
                             chunk=chunk, ignore_index=ignore_index,
                             dtype=dtype or hidden.dtype)
    specs = (hidden_spec, KERNEL_SPECS["column"], label_spec, label_spec)
    prune = functools.partial(drop_trivial_axes, mesh=mesh)
    fn = shard_map(body, mesh=mesh, in_specs=tuple(prune(s) for s in specs), out_specs=P())
    return fn(hidden, head_kernel, labels, mask)


def _local_loss(hidden, kernel, labels, mask, *, sizes, sequence_parallel, chunk, ignore_index,
                dtype):
    tp = sizes[TP] > 1
    if sequence_parallel and tp:
        hidden = all_gather(hidden, TP, axis=1)
    if sizes[FSDP] > 1:
        kernel = all_gather(kernel, FSDP, axis=0)
    h = hidden.reshape(-1, hidden.shape[-1]).astype(dtype)
    valid = (labels != ignore_index) & mask
    y = jnp.where(valid, labels, 0).reshape(-1)
    offset = jax.lax.axis_index(TP) * kernel.shape[1] if tp else 0
    top, total, picked = _scan_vocab(h, kernel, y - offset, chunk)
    if tp:  # combine the per-device partial log-sum-exps
        best = jax.lax.stop_gradient(jax.lax.pmax(top, TP))
        total = jax.lax.psum(total * jnp.exp(top - best), TP)
        picked, top = jax.lax.psum(picked, TP), best
    nll = jnp.where(valid.reshape(-1), top + jnp.log(total) - picked, 0.0)
    batch_axes = tuple(a for a in (DP, FSDP, CP) if sizes.get(a, 1) > 1)  # token-split axes
    count = jnp.sum(valid).astype(jnp.float32)
    if batch_axes:
        nll_sum, count = jax.lax.psum((jnp.sum(nll), count), batch_axes)
    else:
        nll_sum = jnp.sum(nll)
    return nll_sum / jnp.maximum(count, 1.0)


def _scan_vocab(h, kernel, y, chunk):
    """(max, sum exp, label logit) per token over this device's vocabulary, `chunk` columns at
    a time, each chunk recomputed in the backward pass. y: labels relative to the local columns
    (outside [0, V_local) means another device holds the label). The first chunk starts the
    running values, so the loop carry has the logits' type from the start."""
    stats = jax.checkpoint(functools.partial(_chunk_stats, h, kernel, y, chunk))

    def body(carry, start):
        return _merge(carry, stats(start)), None

    starts = jnp.arange(1, kernel.shape[1] // chunk) * chunk
    carry, _ = jax.lax.scan(body, stats(0), starts)
    return carry


def _chunk_stats(h, kernel, y, chunk, start):
    w = jax.lax.dynamic_slice_in_dim(kernel, start, chunk, axis=1).astype(h.dtype)
    z = jnp.dot(h, w, preferred_element_type=jnp.float32)                      # [N, chunk]
    # The max only keeps exp() in range; log-sum-exp does not depend on it: no gradient.
    top = jax.lax.stop_gradient(jnp.max(z, axis=-1))
    total = jnp.sum(jnp.exp(z - top[:, None]), axis=-1)
    inside = (y >= start) & (y < start + chunk)
    picked = jnp.take_along_axis(z, jnp.clip(y - start, 0, chunk - 1)[:, None], 1)[:, 0]
    return top, total, jnp.where(inside, picked, 0.0)


def _merge(a, b):
    top = jnp.maximum(a[0], b[0])
    return top, a[1] * jnp.exp(a[0] - top) + b[1] * jnp.exp(b[0] - top), a[2] + b[2]
