"""The one adapter op: what a LoRA adapter adds to a linear map, for every layer that runs one.

    y = base(x) + (scale * dropout(x) @ A) @ B

`lora_jax.apply`'s interceptor (`nn.Dense` / `nn.DenseGeneral`) and the tensor-parallel
shard_map layers (`sharding.layers`) both build the adapter term from the pieces below, so the
math, the dropout draw, the dtype rule and the remat names exist once. The pieces are cut where
a sharded layer puts its collectives between them:

    read_adapter(module)           the layer's adapter leaves (`Adapter`), or None
    compute_dtype(dtype, x, k)     the dtype the adapter runs in: the layer's compute dtype
    dropout(module, x)             LoRA dropout of the adapter input, as `lora_jax.apply` set it
    adapter_in(x, a, scale)        input half: x @ A (gathered), scaled at rank r, named
    adapter_out(h, b)              output half: h @ B
    add_delta(y, delta)            y + delta in y's dtype (a row-parallel layer adds it to its
                                   partial product, before its one reduction)
    name_output(y)                 the adapted output, named for remat
    adapt(module, x, y, adapter)   all of it, for a layer that is not split
    mixed_context(index)           mixed batches: row i runs stacked adapter index[i] (-1: base);
    mixed_delta(x, adapter, mixed) `adapt` uses it while a context is set (see the end of file)

A variant (DoRA's magnitude, a per-row adapter index, a quantised base) is a change to
`Adapter`, `read_adapter` and these functions, and to their tests; the callers stay as they are.

The dropout rate lives in one place: `lora_jax.apply` sets it (with the `deterministic` flag) in
a context for the duration of the model call (`dropout_context`), and `dropout` reads it, so the
interceptor and the sharded layers switch it on by the same rule.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lora_jax.errors import LoraError
from lora_jax.tree import LORA_A, LORA_B, LORA_SCALE

ADAPTED_OUTPUT = "lora_adapted_output"  # base(x) + delta, the layer's output
ADAPTER_HIDDEN = "lora_hidden"  # scale * x @ A, [..., r]
SAVED_NAMES = (ADAPTED_OUTPUT, ADAPTER_HIDDEN)


class Adapter(NamedTuple):
    """One layer's adapter leaves (a pytree, so it passes through `shard_map` as is).

    Attributes:
      a: `lora_a` [*in, r].
      b: `lora_b` [r, *out].
      scale: `lora_scale` [], frozen (alpha / r, or alpha / sqrt(r) with rsLoRA).
    """

    a: jax.Array
    b: jax.Array
    scale: jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dropout:
    """LoRA dropout as `lora_jax.apply` was asked for it.

    Attributes:
      rate: the probability of dropping an adapter-input entry (`LoraConfig.lora_dropout`).
      deterministic: no dropout when True (evaluation).
    """

    rate: float = 0.0
    deterministic: bool = True

    @property
    def active(self) -> bool:
        return self.rate > 0.0 and not self.deterministic


_DROPOUT: contextvars.ContextVar[Dropout] = contextvars.ContextVar("lora_dropout",
                                                                   default=Dropout())


@contextlib.contextmanager
def dropout_context(rate: float, deterministic: bool) -> Iterator[Dropout]:
    """Set the LoRA dropout every adapted layer traced inside the block draws (none outside).

    Args:
      rate: the dropout rate on the adapters' input.
      deterministic: no dropout when True.

    Returns:
      A context manager yielding the `Dropout` in force.

    Example:
      >>> with dropout_context(0.1, deterministic=False):
      ...     y = model.apply(variables, x, rngs={"dropout": key})
    """
    token = _DROPOUT.set(Dropout(rate=rate, deterministic=deterministic))
    try:
        yield _DROPOUT.get()
    finally:
        _DROPOUT.reset(token)


def current_dropout() -> Dropout:
    """The `Dropout` set by the innermost `dropout_context` (inactive outside any)."""
    return _DROPOUT.get()


def read_adapter(module: Any) -> Adapter | None:
    """The adapter leaves in a Linen module's own parameter scope, or None if it has none."""
    if not module.has_variable("params", LORA_A):
        return None
    return Adapter(*(module.get_variable("params", n) for n in (LORA_A, LORA_B, LORA_SCALE)))


def compute_dtype(dtype: Any, x: jax.Array, kernel: jax.Array) -> Any:
    """The dtype an adapter runs in: the layer's compute dtype (`dtype`, else the promotion of its
    input and kernel, as `nn.Dense` chooses). Adapters stored in float32 are cast down like the
    kernel is, so a bf16 model stays bf16."""
    return dtype or jnp.result_type(x, kernel)


def dropout(module: Any, x: jax.Array) -> jax.Array | None:
    """LoRA dropout of the adapter input `x`, or None when the current `Dropout` is inactive.

    One `make_rng("dropout")` in the layer's scope and a mask over the whole (global) `x`: the
    same entries are dropped whether the layer then runs on one device or split by shard_map.

    Args:
      module: the adapted Linen layer (its scope supplies the rng).
      x: the layer input, global shape.

    Returns:
      `x` with entries zeroed with probability `rate` and the rest scaled by `1 / (1 - rate)`.

    Example:
      >>> x_in = dropout(self, x)
      >>> x_in = x if x_in is None else x_in
    """
    config = current_dropout()
    if not config.active:
        return None
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - config.rate, x.shape)
    return jnp.where(keep, x / (1.0 - config.rate), jnp.zeros_like(x))


def adapter_in(x: jax.Array, a: jax.Array, scale: jax.Array, *, dtype: Any,
               in_axes: tuple[int, ...] | None = None,
               gather: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
    """Input half: `scale * (x @ A)`, the rank-r activation, named for remat.

    Args:
      x: `[..., *in]` (the in axes anywhere).
      a: `[*in, r]`.
      scale: `[]`, a constant (no gradient).
      dtype: the compute dtype (`compute_dtype`).
      in_axes: x's axes contracted with A's leading axes; default the last.
      gather: applied to `x @ A` before the scale (a sharded layer's all-gather of the rank-r
        product), so the value named and saved is the gathered one and remat does not gather
        again.

    Returns:
      h `[..., r]` in `dtype`.

    Example:
      >>> h = adapter_in(x, a, scale, dtype=jnp.bfloat16)
    """
    in_axes = (x.ndim - 1,) if in_axes is None else tuple(in_axes)
    h = jnp.tensordot(x.astype(dtype), a.astype(dtype),
                      axes=(in_axes, tuple(range(len(in_axes)))))
    if gather is not None:
        h = gather(h)
    # Scale the rank-r intermediate, not the [..., out] result: r/out of the elementwise work.
    return name_hidden(h * jax.lax.stop_gradient(jnp.asarray(scale, dtype)))


def adapter_out(h: jax.Array, b: jax.Array, dtype: Any) -> jax.Array:
    """Output half: `h [..., r] @ B [r, *out] -> [..., *out]` in `dtype`."""
    return jnp.tensordot(h, b.astype(dtype), axes=((h.ndim - 1,), (0,)))


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array,
               in_axes: tuple[int, ...], dtype: Any) -> jax.Array:
    """`scale * (x @ A) @ B` contracting `x`'s `in_axes` with A's leading axes: both halves.

    Shapes: x `[..., *in]` (in_axes anywhere), A `[*in, r]`, B `[r, *out]` -> `[..., *out]`,
    in `dtype` (the layer's compute dtype, see `compute_dtype`).

    Example:
      >>> delta = lora_delta(x, a, b, jnp.float32(2.0), (x.ndim - 1,), jnp.float32)
    """
    return adapter_out(adapter_in(x, a, scale, dtype=dtype, in_axes=in_axes), b, dtype)


def add_delta(y: jax.Array, delta: jax.Array) -> jax.Array:
    """The base output plus the adapter's term, in the base output's dtype."""
    return y + delta.astype(y.dtype)


def name_output(y: jax.Array) -> jax.Array:
    """Mark an adapted layer's output (identity outside `jax.checkpoint`): with
    `lora_jax.remat_policy` the sum is saved, not `x @ W` and `(x @ A) @ B` apart."""
    return checkpoint_name(y, ADAPTED_OUTPUT)


def name_hidden(h: jax.Array) -> jax.Array:
    """Mark the rank-r adapter activation (identity outside `jax.checkpoint`)."""
    return checkpoint_name(h, ADAPTER_HIDDEN)


def adapt(module: Any, x: jax.Array, y: jax.Array, adapter: Adapter, *,
          in_axes: tuple[int, ...], dtype: Any) -> jax.Array:
    """The whole op for a layer that is not split: `y + scale * (dropout(x) @ A) @ B`, named.

    Args:
      module: the adapted Linen layer (its scope supplies the dropout rng).
      x: the layer input; y: its base output.
      adapter: the layer's `Adapter`.
      in_axes: x's axes the layer contracts.
      dtype: the compute dtype (`compute_dtype`).

    Returns:
      The adapted output, in y's dtype.

    Example:
      >>> y = adapt(self, x, x @ kernel, read_adapter(self), in_axes=(x.ndim - 1,),
      ...           dtype=jnp.float32)
    """
    dropped = dropout(module, x)
    x_in = x if dropped is None else dropped
    return name_output(add_delta(y, _rows_delta(x_in, adapter, in_axes, dtype)))


# ---------------------------------------------------------------------------------------------
# Mixed batches: each batch row runs its own adapter (`lora_jax.mixed` builds the stacked tree).
#
# A stacked layer holds N adapters on an adapter axis: `lora_a [N, *in, r]`, `lora_b [N, r, *out]`,
# `lora_scale [N]` (inside `nn.scan` the layer axis is sliced off before the op sees them). The op
# recognises that form by A's extra axis (`is_stacked`: A has the layer's input axes, the rank
# and one more), not by the scale: several named adapters concatenated on the rank axis also
# carry a scale vector (`concat_adapters`, one scale per rank). The per-row index rides in a context, set by `lora_jax.apply(...,
# adapter_index=)` like the dropout rate, because Linen gives a Dense layer no other way to see
# it; index -1 (or any index outside [0, N)) runs the base only for that row.

MIXED_METHODS = ("auto", "gather", "ragged", "dense")
# "auto" runs "dense" where a row has few tokens (decoding) and "gather" elsewhere. Gathering a
# row's A and B moves r*(in+out) weights per row, whatever its length; "dense" instead multiplies
# each of the row's T tokens by all N adapters, (N-1)*r*(in+out) extra multiply-adds per token.
# On a GPU with ~165 bf16 FLOP per byte of bandwidth (H200: 790 TFLOP/s, 4.8 TB/s) a gathered
# weight (2 bytes, written then read: 4 bytes) costs as much as 660 FLOP = 330 multiply-adds,
# so below T*(N-1) = 330 the dense form is cheaper. The benchmark checks the rule.
AUTO_DENSE_BELOW = 330


@dataclasses.dataclass(frozen=True)
class MixedBatch:
    """The per-row adapter choice of a mixed batch.

    Attributes:
      index: int32 `[batch]`: row i runs adapter `index[i]`; -1 runs the base only.
      method: how the rows' adapters are applied: "auto" ("dense" for rows of few tokens, as
        in decoding, else "gather", by the cost rule at `AUTO_DENSE_BELOW`), "gather" (each
        row gathers its own A and B:
        one batched matmul, FLOPs of one adapter), "ragged" (rows sorted by adapter, one grouped
        `jax.lax.ragged_dot` per half) or "dense" (every adapter on every row, masked: N times
        the adapter FLOPs, but each adapter's weights read once). All give the same values.
    """

    index: jax.Array
    method: str = "auto"


_MIXED: contextvars.ContextVar[MixedBatch | None] = contextvars.ContextVar("lora_mixed",
                                                                           default=None)


@contextlib.contextmanager
def mixed_context(index: jax.Array, method: str = "auto") -> Iterator[MixedBatch]:
    """Give every adapted layer traced inside the block a per-row adapter index.

    Args:
      index: int32 `[batch]`, -1 for base-only rows.
      method: one of `MIXED_METHODS` (see `MixedBatch`).

    Example:
      >>> with mixed_context(jnp.array([0, 2, -1])):
      ...     y = model.apply(variables, x)
    """
    if method not in MIXED_METHODS:
        raise LoraError(f"mixed batch method {method!r} is not one of {MIXED_METHODS}.")
    index = jnp.asarray(index)
    if index.ndim != 1 or not jnp.issubdtype(index.dtype, jnp.integer):
        raise LoraError(f"adapter_index must be an integer vector [batch], one adapter per row "
                        f"(-1 = base only); got {index.dtype}{list(index.shape)}.")
    token = _MIXED.set(MixedBatch(index=index.astype(jnp.int32), method=method))
    try:
        yield _MIXED.get()
    finally:
        _MIXED.reset(token)


def current_mixed() -> MixedBatch | None:
    """The `MixedBatch` of the innermost `mixed_context`, or None (every row, one adapter)."""
    return _MIXED.get()


def is_stacked(adapter: Adapter, n_in: int) -> bool:
    """Whether a layer's adapter holds N adapters on a leading adapter axis: `lora_a [N, *in, r]`
    has one axis more than the layer's `n_in` input axes and the rank."""
    return jnp.ndim(adapter.a) == n_in + 2


def as_stacked(adapter: Adapter, n_in: int) -> Adapter:
    """The adapter with an adapter axis: itself if stacked, else a stack of one (so index 0
    selects it and -1 the base, as PEFT's "__base__" rows). A per-rank scale vector (named
    adapters concatenated) is folded into A: `(s * A)` as a function of A has the same values
    and gradients as scaling `x @ A`."""
    if is_stacked(adapter, n_in):
        return adapter
    a, scale = adapter.a, jax.lax.stop_gradient(jnp.asarray(adapter.scale))
    if jnp.ndim(scale) == 1:
        a, scale = a * scale.astype(a.dtype), jnp.ones((), scale.dtype)
    return Adapter(a[None], adapter.b[None], jnp.reshape(scale, (1,)))


def row_scales(scale: jax.Array, index: jax.Array, dtype: Any) -> jax.Array:
    """Each row's adapter scale `[batch]`: `scale[index]`, 0 where the index names no adapter
    (that row's adapter term vanishes, and so do its gradients). Constant (no gradient)."""
    n = scale.shape[0]
    valid = (index >= 0) & (index < n)
    picked = jnp.take(scale, jnp.clip(index, 0, n - 1), axis=0)
    return jax.lax.stop_gradient(jnp.where(valid, picked, 0).astype(dtype))


def _check_rows(x: jax.Array, index: jax.Array) -> None:
    if index.shape != (x.shape[0],):
        raise LoraError(f"adapter_index has shape {tuple(index.shape)} but the layer's input "
                        f"has {x.shape[0]} rows ({tuple(x.shape)}): pass one index per batch "
                        "row.")


def _in_axes_last(x: jax.Array, in_axes: tuple[int, ...]) -> jax.Array:
    """x with its contracted axes moved last, in A's order (row axis 0 must not be one)."""
    if 0 in in_axes:
        raise LoraError("a mixed batch needs the batch rows on the input's axis 0, but the "
                        f"layer contracts axis 0 (in_axes={in_axes}).")
    return jnp.moveaxis(x, in_axes, tuple(range(x.ndim - len(in_axes), x.ndim)))


def _gather_delta(x, a, b, scales, index):
    """Each row gathers its own A `[B, in, r]` and B `[B, r, out]`: batched matmuls.
    x `[B, ..., in]`, a `[N, in, r]`, b `[N, r, out]` (flattened), scales `[B]`."""
    rows = jnp.clip(index, 0, a.shape[0] - 1)
    h = jnp.einsum("b...i,bir->b...r", x, jnp.take(a, rows, axis=0))
    h = name_hidden(h * scales.reshape((-1,) + (1,) * (h.ndim - 1)))
    return jnp.einsum("b...r,bro->b...o", h, jnp.take(b, rows, axis=0))


def _ragged_delta(x, a, b, scales, index):
    """Rows sorted by adapter, then one grouped matmul per half (`jax.lax.ragged_dot`): each
    adapter multiplies only its rows' tokens. Base-only rows ride in group 0 with scale 0."""
    n, rows = a.shape[0], jnp.clip(index, 0, a.shape[0] - 1)
    order = jnp.argsort(rows, stable=True)
    tokens_per_row = math.prod(x.shape[1:-1])
    sizes = jnp.bincount(rows, length=n).astype(jnp.int32) * tokens_per_row
    xs = jnp.take(x, order, axis=0).reshape(-1, x.shape[-1])
    h = jax.lax.ragged_dot(xs, a, sizes)
    h = name_hidden(h * jnp.repeat(jnp.take(scales, order), tokens_per_row,
                                   total_repeat_length=xs.shape[0])[:, None])
    y = jax.lax.ragged_dot(h, b, sizes).reshape(x.shape[:-1] + (b.shape[-1],))
    return jnp.take(y, jnp.argsort(order), axis=0)


def _dense_delta(x, a, b, scales, index):
    """Every adapter on every row, masked by a one-hot of the index: the N adapters side by
    side are one rank-(N*r) adapter, whose weights are read once whatever the batch."""
    n, d, r = a.shape
    onehot = jax.nn.one_hot(index, n, dtype=x.dtype) * scales[:, None]        # [B, N], -1 -> 0
    h = jnp.tensordot(x, jnp.moveaxis(a, 0, 1).reshape(d, n * r), axes=1)
    h = h.reshape(h.shape[:-1] + (n, r)) * onehot.reshape(
        (x.shape[0],) + (1,) * (x.ndim - 2) + (n, 1))
    h = name_hidden(h.reshape(h.shape[:-2] + (n * r,)))
    return jnp.tensordot(h, b.reshape(n * r, -1), axes=1)


_MIXED_DELTAS = {"gather": _gather_delta, "ragged": _ragged_delta, "dense": _dense_delta}


def resolve_method(method: str, tokens_per_row: int, n: int) -> str:
    """The method "auto" stands for at this layer's static shapes (others are themselves).

    Example:
      >>> resolve_method("auto", tokens_per_row=1, n=8)     # one decode step
      'dense'
    """
    if method != "auto":
        return method
    return "dense" if tokens_per_row * (n - 1) < AUTO_DENSE_BELOW else "gather"


def mixed_delta(x: jax.Array, adapter: Adapter, mixed: MixedBatch, *,
                in_axes: tuple[int, ...], dtype: Any) -> jax.Array:
    """Row i's `scale[k] * (x[i] @ A[k]) @ B[k]` with `k = index[i]` (zero where k = -1).

    Args:
      x: `[B, ..., *in]` (the rows on axis 0, the in axes anywhere after).
      adapter: stacked (`a [N, *in, r]`, `b [N, r, *out]`, `scale [N]`) or single (taken as N=1).
      mixed: the index `[B]` and the method (`MixedBatch`).
      in_axes: x's axes contracted with A's `*in` axes.
      dtype: the compute dtype (`compute_dtype`).

    Returns:
      `[B, ..., *out]` in `dtype`, like `lora_delta`'s.

    Example:
      >>> d = mixed_delta(x, read_adapter(self), MixedBatch(jnp.array([1, -1, 0])),
      ...                 in_axes=(x.ndim - 1,), dtype=jnp.float32)
    """
    _check_rows(x, mixed.index)
    a, b, scale = as_stacked(adapter, len(tuple(in_axes)))
    n, r, in_shape = a.shape[0], a.shape[-1], a.shape[1:-1]
    out_shape = b.shape[2:]
    xf = _in_axes_last(x.astype(dtype), tuple(in_axes))
    xf = xf.reshape(xf.shape[:xf.ndim - len(in_shape)] + (-1,))
    af = a.astype(dtype).reshape(n, -1, r)
    bf = b.astype(dtype).reshape(n, r, -1)
    method = resolve_method(mixed.method, math.prod(xf.shape[1:-1]), n)
    delta = _MIXED_DELTAS[method](xf, af, bf, row_scales(scale, mixed.index, dtype), mixed.index)
    return delta.reshape(delta.shape[:-1] + tuple(out_shape))


def _rows_delta(x_in, adapter, in_axes, dtype):
    """The adapter term for the rows of the current batch: one adapter for all rows, or each
    row its own when a mixed batch is in force (or the tree holds stacked adapters)."""
    mixed = current_mixed()
    if mixed is None and is_stacked(adapter, len(tuple(in_axes))):
        raise LoraError(f"this layer holds {adapter.scale.shape[0]} stacked adapters "
                        "(lora_jax.stack_adapters); say which each row runs with "
                        "lora_jax.apply(..., adapter_index=[...]).")
    if mixed is None:
        return lora_delta(x_in, *adapter, in_axes, dtype)
    return mixed_delta(x_in, adapter, mixed, in_axes=in_axes, dtype=dtype)


def refuse_mixed(where: str) -> None:
    """Raise a `LoraError` in a layer that runs one adapter for every row (`where` names it:
    the NNX layers) when a mixed-batch index is in force, instead of ignoring it."""
    if current_mixed() is not None:
        raise LoraError(f"mixed batches (stacked adapters, adapter_index=) are not supported "
                        f"in {where}: run a Linen model through lora_jax.apply(..., "
                        "adapter_index=), or one adapter per batch.")
