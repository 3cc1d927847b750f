"""Context parallelism: one long sequence split over a mesh axis, attention computed as a ring.

Every token-wise operation (projections, norms, the MLP, LoRA) needs only its own tokens, so a
sequence split into contiguous chunks over the `cp` axis runs them unchanged, GSPMD-partitioned.
Attention is the one operation that mixes tokens. `ring_attention` computes it without ever
holding the whole sequence's keys and values on a device:

  * device i keeps its query chunk Q_i; the key/value chunks travel around the ring of the axis
    (`jax.lax.ppermute` to the next device, n - 1 hops), so after t hops device i holds
    K_{i-t}, V_{i-t};
  * each chunk's scores are folded into a running (flash-style) softmax in float32: a running
    row maximum m, a running sum l of exp(score - m) and an accumulator of the weighted values,
    rescaled by exp(m_old - m_new) whenever the maximum grows. A chunk is folded `block_size`
    keys at a time (a `lax.scan`), so a device holds a [s, block] score block, not [s, s];
  * causal masking compares GLOBAL positions (chunk index x chunk length + offset). The first
    step is each device's own chunk, whose diagonal every query row sees, so m is finite from
    then on and a chunk that is wholly in the future (all -inf) adds exp(-inf) = 0: no NaN.
    With contiguous chunks such pairs are computed and zeroed, not skipped: the last device
    attends to every chunk anyway, so skipping would not shorten the slowest device.
  * layout="zigzag" balances causal attention: the sequence arrives in `zigzag_order`, device
    d holding half-chunks d and 2n - 1 - d. Against any other device's chunk exactly half of
    the pair is unmasked (all queries x the source's early half when the source is d' < d,
    the late queries x all keys when d' > d), so each step after the first computes that half
    only (`lax.cond` on the source index; the ppermutes stay outside it): every device does
    the same work, about half of the contiguous layout's last device.

The gradient is a `jax.custom_vjp` that does what flash attention's backward does, on the ring:
the forward keeps only its output and the row log-sum-exp; the backward sends k, v around again
together with their gradient accumulators dK, dV (float32), which add each device's
contribution and arrive back at their owner after n hops. Autodiff through the loop would
instead save every hop's k/v chunk and probability block, i.e. the whole sequence's k/v and an
[s, S] score block per device, which is what context parallelism exists to avoid.

Cost per attention layer (n = cp size, s = S / n): n - 1 ppermutes of one k/v chunk forward,
n - 1 of k/v plus n of dK/dV backward; XLA can overlap each hop with the attention of the chunk
already held (the next chunk's ppermute is issued before it). No all-gather of k or v.

`ContextParallelism` is the `models/parallel.py` seam's answer: plain `nn.Dense` projections
(GSPMD), the residual stream and logits pinned as [batch over dp x fsdp, sequence over cp, ...],
and attention through `ring_attention`.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from models.parallel import NoParallelism
from sharding.compat import shard_map
from sharding.layers import batch_axes
from sharding.mesh import (BATCH_AXES, CP, TP, MeshError, axis_size, check_context_fits,
                           drop_trivial_axes)

CONTIGUOUS, ZIGZAG = "contiguous", "zigzag"  # chunk layouts (see `ring_attention`)

# Keys per inner step: scores [B, Hq, S / n, 512] in float32 (32 heads x 16k rows: 1 GiB).
DEFAULT_BLOCK = 512


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh, axis: str = CP,
                   causal: bool = True, scale: float | None = None,
                   block_size: int | None = DEFAULT_BLOCK,
                   layout: str = CONTIGUOUS) -> jax.Array:
    """Self-attention of global q [B, S, Hq, D] over k, v [B, S, Hkv, D], the sequence split in
    contiguous chunks over the mesh axis `axis`, computed as a ring (module docstring).

    The layout is `models.attention`'s (and `jax.nn.dot_product_attention`'s): GQA when
    Hkv < Hq, query head h reading key/value head h // (Hq / Hkv). The batch is split over
    dp x fsdp when it divides, else kept whole on each device (e.g. a batch of one).

    Args:
      q, k, v: global arrays (any sharding; they are resharded to the split if needed).
      mesh: the mesh holding `axis` (`make_mesh(cp=...)`).
      axis: the mesh axis the sequence is split over ("cp"; any axis of the mesh works).
      causal: mask keys after each query by global position.
      scale: the scores' factor; default 1 / sqrt(D).
      block_size: keys per inner step within a chunk (the largest divisor of the chunk length
        up to it; None: the whole chunk). Bounds the float32 score block a device holds to
        [B, Hq, S / n, block_size] instead of [B, Hq, S / n, S / n].
      layout: "contiguous" (device d holds tokens d*S/n ...), or "zigzag": the sequence is
        given in `zigzag_order(S, n)` (device d holds half-chunks d and 2n - 1 - d), and each
        step after the first computes only the half of the chunk pair that is not masked,
        the same half on every device: causal attention balanced, about half the work.

    Returns:
      [B, S, Hq, D] in q's dtype, split like q.

    Raises:
      MeshError: S not divisible by the axis size, a batch axis as `axis`, or shapes that are
        not self-attention.
      ValueError: a block_size that is not a positive integer.

    Example:
      >>> mesh = make_mesh(cp=4)
      >>> out = ring_attention(q, k, v, mesh=mesh)        # q [2, 4096, 32, 64], k/v [.., 8, 64]
    """
    _check_shapes(q, k, v)
    if axis in BATCH_AXES:
        raise MeshError(f"axis={axis!r} already splits the batch: ring over another axis "
                        "(cp, or tp when it is free)")
    if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size={block_size!r}: give a positive number of keys, or None "
                         "for whole chunks")
    check_context_fits(mesh, q.shape[1], axis=axis)
    n = axis_size(mesh, axis)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    spec = drop_trivial_axes(P(batch_axes(mesh, q.shape[0]), axis, None, None), mesh)
    if layout not in (CONTIGUOUS, ZIGZAG):
        raise ValueError(f"layout={layout!r}: use {CONTIGUOUS!r} or {ZIGZAG!r}")
    if layout == ZIGZAG:
        zigzag_order(q.shape[1], n)  # checks the half-chunks divide
    local = _ring_fn(axis if n > 1 else None, n, causal, scale, block_size, layout)
    return shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)(q, k, v)


def _check_shapes(q, k, v) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise MeshError(f"ring_attention takes q [B, S, Hq, D] and k, v [B, S, Hkv, D]; got q "
                        f"{q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise MeshError(f"ring_attention is self-attention: q {q.shape} and k {k.shape} must "
                        "share batch, sequence and head size")
    if q.shape[2] % k.shape[2]:
        raise MeshError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} key/value "
                        "heads (GQA groups query heads over key/value heads)")


# ---------------------------------------------------------------------------------------------
# Per-device math (inside shard_map). Local shapes: q [b, s, K, G, D] (K key/value heads, G
# query heads per group), k/v [b, s, K, D], scores and probabilities [b, K, G, s_q, s_k], row
# statistics [b, K, G, s_q].


@functools.lru_cache(maxsize=None)
def _ring_fn(axis: str | None, n: int, causal: bool, scale: float, block: int | None,
             layout: str):
    """The per-device ring attention `(q, k, v) -> out` with its custom VJP (cached so each
    layer reuses one function, not a new one per trace)."""
    static = dict(axis=axis, n=n, causal=causal, scale=scale, block=block,
                  balanced=causal and layout == ZIGZAG and n > 1)

    @jax.custom_vjp
    def ring(q, k, v):
        return _forward(q, k, v, **static)[0]

    def ring_fwd(q, k, v):
        out, lse = _forward(q, k, v, **static)
        return out, (q, k, v, out, lse)

    def ring_bwd(res, d_out):
        return _backward(*res, d_out, **static)

    ring.defvjp(ring_fwd, ring_bwd)
    return ring


# A finite "minus infinity" for the running maximum's start: exp(start - m) is then 0 or 1,
# never exp(-inf - -inf) = NaN, before a row has seen its first key.
_START = -1e30


def _grouped(q, kv_heads):
    b, s, h, d = q.shape
    return q.reshape(b, s, kv_heads, h // kv_heads, d)


def _pass(x, axis, n):
    """Send to the next device of the ring (device i receives device i - 1's chunk)."""
    return jax.lax.ppermute(x, axis, [(j, (j + 1) % n) for j in range(n)])


def _block_size(chunk: int, block: int | None) -> int:
    """Keys per inner step: the largest divisor of the chunk up to `block` (all when None)."""
    if block is None or block >= chunk:
        return chunk
    return max(b for b in range(1, block + 1) if chunk % b == 0)


def _blocks(x, size):
    """[b, s, ...] -> [s / size, b, size, ...]: the scan's leading axis."""
    b, s = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, s // size, size, *x.shape[2:]), 1, 0)


def _unblocks(x):
    """`_blocks`'s inverse."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _positions(index, chunk: int, n: int, balanced_layout: bool):
    """Global positions [chunk] of device `index`'s chunk: contiguous, or zig-zag (half-chunks
    `index` and 2n - 1 - index of the natural order)."""
    if not balanced_layout:
        return index * chunk + jnp.arange(chunk)
    half = chunk // 2
    return jnp.concatenate([index * half + jnp.arange(half),
                            (2 * n - 1 - index) * half + jnp.arange(half)])


def _scores(q, k, q_pos, k_pos, causal, scale):
    """[b, K, G, s_q, s_k] float32 scores, -inf where a key follows its query (global
    positions q_pos [s_q], k_pos [s_k])."""
    s = jnp.einsum("bqkgd,bskd->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
    if not causal:
        return s
    return jnp.where(k_pos[None, :] <= q_pos[:, None], s, -jnp.inf)


def _scan_blocks(step, carry, k, v, k_pos, block):
    """`step(carry, (k_block, v_block, k_pos_block)) -> (carry, y)` over the keys' blocks (one
    call, no loop, when they are one block); ys stacked as `_blocks` lays them out."""
    size = _block_size(k.shape[1], block)
    pos = k_pos.reshape(-1, size)
    if pos.shape[0] == 1:
        carry, y = step(carry, (k, v, pos[0]))
        return carry, jax.tree.map(lambda t: t[None], y)
    return jax.lax.scan(step, carry, (_blocks(k, size), _blocks(v, size), pos))


def _late(x, axis):
    """The second half of `x` along `axis` (the late query rows of a zig-zag chunk)."""
    return jax.lax.slice_in_dim(x, x.shape[axis] // 2, x.shape[axis], axis=axis)


def _with_late(x, late, axis):
    """`x` with its second half along `axis` replaced by `late`."""
    return jnp.concatenate([jax.lax.slice_in_dim(x, 0, x.shape[axis] // 2, axis=axis), late],
                           axis=axis)


def _forward(q, k, v, *, axis, n, causal, scale, block, balanced):
    """(out [b, s, Hq, D] in q's dtype, lse [b, K, G, s_q] float32)."""
    qg = _grouped(q, k.shape[2])
    chunk = q.shape[1]
    me = jax.lax.axis_index(axis) if axis else 0
    q_pos = _positions(me, chunk, n, balanced)

    def folder(qg, q_pos):
        def fold(state, kv_block):
            """One key block into the running (max, sum, weighted values)."""
            m, l, acc = state
            k_b, v_b, k_pos = kv_block
            s = _scores(qg, k_b, q_pos, k_pos, causal, scale)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            alpha = jnp.exp(m - m_new)                 # 1 while a wholly masked block keeps m
            p = jnp.exp(s - m_new[..., None])          # 0 where masked
            pv = jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v_b.dtype), v_b,
                            preferred_element_type=jnp.float32)
            return (m_new, l * alpha + jnp.sum(p, axis=-1), acc * alpha[..., None] + pv), None
        return fold

    def chunk_step(state, k_t, v_t, k_pos, source):
        if not balanced or source is None:
            return _scan_blocks(folder(qg, q_pos), state, k_t, v_t, k_pos, block)[0]

        def early_keys(state):  # source < me: every query sees the source's early half only
            return _scan_blocks(folder(qg, q_pos), state, k_t[:, :chunk // 2],
                                v_t[:, :chunk // 2], k_pos[:chunk // 2], block)[0]

        def late_queries(state):  # source > me: only the late queries see it, all of it
            late = (_late(state[0], 3), _late(state[1], 3), _late(state[2], 3))
            late = _scan_blocks(folder(_late(qg, 1), _late(q_pos, 0)), late, k_t, v_t, k_pos,
                                block)[0]
            return tuple(_with_late(x, y, 3) for x, y in zip(state, late))

        return jax.lax.cond(source < me, early_keys, late_queries, state)

    stats = jnp.moveaxis(qg[..., 0], 1, -1).astype(jnp.float32)       # [b, K, G, s_q]
    state = (jnp.full_like(stats, _START), jnp.zeros_like(stats),
             jnp.zeros_like(jnp.moveaxis(qg, 1, 3), jnp.float32))
    k_t, v_t = k, v
    for t in range(n):  # step 0 is the own chunk, whose diagonal every row sees
        if t < n - 1:  # issued before this chunk's attention, so the two can overlap
            k_next, v_next = _pass(k_t, axis, n), _pass(v_t, axis, n)
        source = (me - t) % n
        state = chunk_step(state, k_t, v_t, _positions(source, chunk, n, balanced),
                           source if t else None)
        if t < n - 1:
            k_t, v_t = k_next, v_next
    m, l, acc = state
    out = jnp.moveaxis(acc / l[..., None], 3, 1)                     # [b, s, K, G, D]
    return out.reshape(q.shape).astype(q.dtype), m + jnp.log(l)


def _backward(q, k, v, out, lse, d_out, *, axis, n, causal, scale, block, balanced):
    """Flash attention's backward, k/v and their float32 gradients travelling the ring."""
    kv_heads = k.shape[2]
    qg = _grouped(q, kv_heads)
    chunk = q.shape[1]
    me = jax.lax.axis_index(axis) if axis else 0
    q_pos = _positions(me, chunk, n, balanced)
    do = jnp.moveaxis(_grouped(d_out, kv_heads), 1, 3)                # [b, K, G, s, D]
    og = jnp.moveaxis(_grouped(out, kv_heads), 1, 3)
    # D_i = sum_d dO * O: the softmax Jacobian's row term, the same for every key block.
    delta = jnp.sum(do.astype(jnp.float32) * og.astype(jnp.float32), axis=-1)
    do = do.astype(v.dtype)

    def gradder(qg, q_pos, do, delta, lse):
        def grads(dq, kv_block):
            """One key block: its (dk, dv) blocks, dq accumulated."""
            k_b, v_b, k_pos = kv_block
            s = _scores(qg, k_b, q_pos, k_pos, causal, scale)
            p = jnp.exp(s - lse[..., None])                           # 0 where masked
            dv = jnp.einsum("bkgqs,bkgqd->bskd", p.astype(v_b.dtype), do,
                            preferred_element_type=jnp.float32)
            dp = jnp.einsum("bkgqd,bskd->bkgqs", do, v_b, preferred_element_type=jnp.float32)
            ds = (p * (dp - delta[..., None]) * scale).astype(q.dtype)
            dq = dq + jnp.einsum("bkgqs,bskd->bqkgd", ds, k_b,
                                 preferred_element_type=jnp.float32)
            dk = jnp.einsum("bkgqs,bqkgd->bskd", ds, qg, preferred_element_type=jnp.float32)
            return dq, (dk, dv)
        return grads

    def chunk_step(dq, k_t, v_t, k_pos, source):
        """(dq, dk, dv of the chunk held) for one ring step."""
        if not balanced or source is None:
            dq, (dk, dv) = _scan_blocks(gradder(qg, q_pos, do, delta, lse), dq, k_t, v_t,
                                        k_pos, block)
            return dq, _unblocks(dk), _unblocks(dv)

        def early_keys(dq):
            half = chunk // 2
            dq, (dk, dv) = _scan_blocks(gradder(qg, q_pos, do, delta, lse), dq, k_t[:, :half],
                                        v_t[:, :half], k_pos[:half], block)
            dk, dv = _unblocks(dk), _unblocks(dv)
            return dq, (jnp.concatenate([dk, jnp.zeros_like(dk)], axis=1),
                        jnp.concatenate([dv, jnp.zeros_like(dv)], axis=1))

        def late_queries(dq):
            grads = gradder(_late(qg, 1), _late(q_pos, 0), _late(do, 3), _late(delta, 3),
                            _late(lse, 3))
            dq_late, (dk, dv) = _scan_blocks(grads, _late(dq, 1), k_t, v_t, k_pos, block)
            return _with_late(dq, dq_late, 1), (_unblocks(dk), _unblocks(dv))

        dq, (dk, dv) = jax.lax.cond(source < me, early_keys, late_queries, dq)
        return dq, dk, dv

    dq = jnp.zeros_like(qg, jnp.float32)
    k_t, v_t = k, v
    dk_t, dv_t = jnp.zeros_like(k, jnp.float32), jnp.zeros_like(v, jnp.float32)
    for t in range(n):
        if t < n - 1:
            k_next, v_next = _pass(k_t, axis, n), _pass(v_t, axis, n)
        source = (me - t) % n
        dq, dk, dv = chunk_step(dq, k_t, v_t, _positions(source, chunk, n, balanced),
                                source if t else None)
        dk_t, dv_t = dk_t + dk, dv_t + dv
        if n > 1:
            # The accumulators follow their chunk; after the n-th hop they are home again.
            dk_t, dv_t = _pass(dk_t, axis, n), _pass(dv_t, axis, n)
        if t < n - 1:
            k_t, v_t = k_next, v_next
    return dq.reshape(q.shape).astype(q.dtype), dk_t.astype(k.dtype), dv_t.astype(v.dtype)


def zigzag_order(seq: int, n: int) -> np.ndarray:
    """The natural positions [seq] in zig-zag order for `n` devices: device d's contiguous
    shard holds half-chunks d and 2n - 1 - d, so causal attention costs every device the same.
    Feed `x[:, order]` (tokens, targets, loss mask) and `positions=order` to a model with
    `ContextParallelism(layout="zigzag")`; `np.argsort(order)` restores the natural order.

    Example:
      >>> zigzag_order(8, 2)
      array([0, 1, 6, 7, 2, 3, 4, 5])
    """
    if seq % (2 * n):
        raise MeshError(f"the zig-zag layout splits the sequence into 2 x {n} half-chunks, but "
                        f"the sequence length {seq} is not divisible by {2 * n}: use a multiple "
                        f"of {2 * n}, or the contiguous layout")
    half = seq // (2 * n)
    return np.concatenate([np.arange(c * half, (c + 1) * half)
                           for d in range(n) for c in (d, 2 * n - 1 - d)])


# ---------------------------------------------------------------------------------------------
# The models seam.


@dataclasses.dataclass(frozen=True, kw_only=True)
class ContextParallelism(NoParallelism):
    """Context parallelism for the models: the sequence split over `axis` ("cp") between and
    inside blocks, attention by `ring_attention`, everything else GSPMD over the same mesh.
    The projections are `NoParallelism`'s (a subclass on purpose): plain `nn.Dense`, so
    `lora_jax.apply` adds adapters as on one device, or a quantised base's `QuantDense`; with
    fsdp the compiler gathers each frozen kernel where it is used.

    Positions are global: the model computes them (and RoPE's angles) for the whole sequence
    before the split, so chunk c's tokens rotate by c * S / cp + offset.

    Not combined with tensor parallelism: the tensor-parallel layers are `shard_map`s whose
    activation specs hold the sequence whole (or split over tp with sequence parallelism); they
    would gather the cp-split sequence in front of every projection. A mesh with tp > 1 is
    refused. Padding masks and KV caches (generation) are refused too: train on packed,
    full-length rows with a loss mask, and generate on a mesh without cp.

    Args:
      mesh: a mesh with a `cp` axis (`make_mesh(dp=..., fsdp=..., cp=...)`), tp = 1.
      axis: the mesh axis the sequence is split over.
      block_size: `ring_attention`'s keys per inner step.
      layout: "contiguous", or "zigzag" (load-balanced causal attention): then feed the model
        tokens in `zigzag_order(S, cp)` and `positions=` that order (loss targets and mask
        permuted alike; token-wise, the loss does not care about the order).

    Example:
      >>> mesh = make_mesh(dp=2, cp=4)
      >>> model = Llama(config, ContextParallelism(mesh=mesh))
      >>> logits = lora_jax.apply(model, params, shard_batch(tokens, mesh))   # [B, S] over dp, cp
    """

    mesh: Mesh
    axis: str = CP
    block_size: int | None = DEFAULT_BLOCK
    layout: str = CONTIGUOUS

    # A dataclass: equality and hash by mesh and axis (NoParallelism's are by type only).

    def __post_init__(self):
        if self.axis not in self.mesh.axis_names:
            raise MeshError(f"the mesh {dict(self.mesh.shape)} has no {self.axis!r} axis: build "
                            f"it with make_mesh({self.axis}=N)")
        if self.axis != TP and axis_size(self.mesh, TP) > 1:
            raise MeshError(
                f"context parallelism does not combine with tensor parallelism (tp="
                f"{axis_size(self.mesh, TP)}): the tensor-parallel shard_map layers take the "
                "sequence whole (or split over tp), so they would all-gather the "
                f"{self.axis}-split sequence before every projection. Use tp=1 with cp (and "
                "dp/fsdp), or tp (with sequence_parallel) without cp")

    def constrain(self, x: jax.Array, mark: str) -> jax.Array:
        """Pin "residual" [B, S, D] and "logits" [B, S, V]: batch over dp x fsdp, S over cp."""
        if mark not in ("residual", "logits"):
            raise ValueError(f"unknown activation mark {mark!r}: use 'residual' or 'logits'")
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.spec(x)))

    def spec(self, x: jax.Array) -> P:
        check_context_fits(self.mesh, x.shape[1], axis=self.axis)
        return P(batch_axes(self.mesh, x.shape[0]), self.axis, *([None] * (x.ndim - 2)))

    def attention(self, q, k, v, ctx, layer_kv, *, scale, implementation):
        """`models.attention.attend`'s contract (out, layer cache) by ring attention."""
        del implementation  # the ring computes its own blocks (no cuDNN kernel per chunk yet)
        if layer_kv is not None:
            raise MeshError("context parallelism has no KV cache: generate (decode) with a model "
                            "built without ContextParallelism")
        if ctx.mask is not None:
            raise MeshError("context parallelism supports no attention_mask (padding): train on "
                            "packed full-length rows and mask padding in the loss instead")
        return ring_attention(q, k, v, mesh=self.mesh, axis=self.axis, causal=True,
                              scale=scale, block_size=self.block_size,
                              layout=self.layout), None
