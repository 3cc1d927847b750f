"""The one adapter op: what a LoRA adapter adds to a linear map, for every layer that runs one.

    y = base(x) + (scale * dropout(x) @ A) @ B

`lora_jax.apply`'s interceptor (`nn.Dense` / `nn.DenseGeneral`) and the tensor-parallel
shard_map layers (`sharding.layers`) both build the adapter term from the pieces below, so the
math, the dropout draw, the dtype rule and the remat names exist once. The pieces are cut where
a sharded layer puts its collectives between them:

    read_adapter(module)           the layer's adapter leaves (`Adapter`), or None; several
                                   named adapters (`lora_jax.named`) as one, concatenated on
                                   the rank axis, filtered by `adapter_selection`
    compute_dtype(dtype, x, k)     the dtype the adapter runs in: the layer's compute dtype
    dropout(module, x)             LoRA dropout of the adapter input, as `lora_jax.apply` set it
    adapter_in(x, a, scale)        input half: x @ A (gathered), scaled at rank r, named
    adapter_out(h, b)              output half: h @ B
    add_delta(y, delta)            y + delta in y's dtype (a row-parallel layer adds it to its
                                   partial product, before its one reduction)
    name_output(y)                 the adapted output, named for remat
    adapt(module, x, y, adapter)   all of it, for a layer that is not split
    adapt_embedding / adapt_attend an `nn.Embed` table's adapter: the lookup, and a tied head
    dora_delta(module, y, ...)     DoRA's term instead of the plain delta, when the adapter has a
                                   magnitude (the norms and factors: `lora_jax.dora`)
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

from lora_jax import dora
from lora_jax.errors import LoraError
from lora_jax.tree import DEFAULT_ADAPTER, LORA_A, LORA_B, LORA_MAGNITUDE, LORA_SCALE, NAMED

ADAPTED_OUTPUT = "lora_adapted_output"  # base(x) + delta, the layer's output
ADAPTER_HIDDEN = "lora_hidden"  # scale * x @ A, [..., r]
SAVED_NAMES = (ADAPTED_OUTPUT, ADAPTER_HIDDEN)


class Adapter(NamedTuple):
    """One layer's adapter leaves (a pytree, so it passes through `shard_map` as is).

    Attributes:
      a: `lora_a` [*in, r].
      b: `lora_b` [r, *out].
      scale: `lora_scale` [], frozen (alpha / r, or alpha / sqrt(r) with rsLoRA).
      magnitude: DoRA's `lora_magnitude` [*out], or None for plain LoRA (`lora_jax.dora`).
    """

    a: jax.Array
    b: jax.Array
    scale: jax.Array
    magnitude: jax.Array | None = None


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


_SELECTION: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "lora_adapter_selection", default=None)


@contextlib.contextmanager
def adapter_selection(names: tuple[str, ...] | None) -> Iterator[tuple[str, ...] | None]:
    """Run only the named adapters in every adapted layer traced inside the block.

    Args:
      names: None runs every adapter a layer holds (the default); a tuple runs those (summed,
        as PEFT's several active adapters); `()` runs none (PEFT's `disable_adapter()`).

    Returns:
      A context manager yielding the selection in force.

    Example:
      >>> with adapter_selection(("default", "b")):
      ...     y = model.apply(variables, x)
    """
    token = _SELECTION.set(None if names is None else tuple(names))
    try:
        yield _SELECTION.get()
    finally:
        _SELECTION.reset(token)


def current_selection() -> tuple[str, ...] | None:
    """The adapter names set by the innermost `adapter_selection` (None: all)."""
    return _SELECTION.get()


def read_adapter(module: Any) -> Adapter | None:
    """The adapter leaves in a Linen module's own parameter scope, or None if it has none.

    With several named adapters selected (`adapter_selection`), they are returned as one
    `Adapter` concatenated on the rank axis (`concat_adapters`), which the op computes as the
    sum of their terms."""
    selection = current_selection()
    found = []
    if module.has_variable("params", LORA_A) and (selection is None
                                                  or DEFAULT_ADAPTER in selection):
        magnitude = (module.get_variable("params", LORA_MAGNITUDE)
                     if module.has_variable("params", LORA_MAGNITUDE) else None)
        found.append(Adapter(*(module.get_variable("params", n)
                               for n in (LORA_A, LORA_B, LORA_SCALE)), magnitude=magnitude))
    if module.has_variable("params", NAMED):
        named = module.get_variable("params", NAMED)
        found += [Adapter(*(named[name][n] for n in (LORA_A, LORA_B, LORA_SCALE)),
                          magnitude=named[name].get(LORA_MAGNITUDE))
                  for name in named if selection is None or name in selection]
    if not found:
        return None
    return found[0] if len(found) == 1 else concat_adapters(found)


def concat_adapters(adapters: list[Adapter]) -> Adapter:
    """Several adapters of one layer as one of rank `sum(r_i)`: A's and B's concatenated on the
    rank axis, the scale a `[sum(r_i)]` vector (each adapter's scale repeated r_i times), so
    `(scale * x @ A) @ B` is `sum_i scale_i * (x @ A_i) @ B_i`. One op, one pair of matmuls,
    whatever splits the layer's kernel (the rank axis is never split).

    Example:
      >>> both = concat_adapters([Adapter(a1, b1, s1), Adapter(a2, b2, s2)])
    """
    scales = [jnp.broadcast_to(jnp.asarray(ad.scale, jnp.float32)[..., None],
                               (*jnp.shape(ad.scale), ad.a.shape[-1])) for ad in adapters]
    if any(ad.magnitude is not None for ad in adapters):
        raise LoraError("several DoRA adapters of one layer cannot run as one (each has its own "
                        "weight norm): select one with lj.apply(..., adapters=(name,)).")
    return Adapter(jnp.concatenate([ad.a for ad in adapters], axis=-1),
                   jnp.concatenate([ad.b for ad in adapters], axis=b_rank_axis(adapters[0])),
                   jnp.concatenate(scales, axis=-1))


def b_rank_axis(adapter: Adapter) -> int:
    """B's rank axis: after the stacked axes, which the scale has (`lora_b [*S, r, *out]`)."""
    return jnp.ndim(adapter.scale)


def compute_dtype(dtype: Any, x: jax.Array, kernel: jax.Array) -> Any:
    """The dtype an adapter runs in: the layer's compute dtype (`dtype`, else the promotion of its
    input and kernel, as `nn.Dense` chooses). Adapters stored in float32 are cast down like the
    kernel is, so a bf16 model stays bf16."""
    if hasattr(kernel, "dequantize"):  # a quantised kernel (models.quant): its dequantised dtype
        kernel = jnp.zeros((), kernel.dtype)
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
    delta = _rows_delta(x_in, adapter, in_axes, dtype)
    if adapter.magnitude is not None:
        if current_mixed() is not None:
            raise LoraError("DoRA adapters do not run in mixed batches (adapter_index=): run "
                            "each DoRA adapter on its own batch.")
        delta = dora_delta(module, y, dropped, adapter, delta, in_axes=in_axes, dtype=dtype)
    return name_output(add_delta(y, delta))


def embedding_delta(ids: jax.Array, adapter: Adapter, dtype: Any) -> jax.Array:
    """An embedding adapter's term for token ids: `scale * lora_a[ids] @ lora_b`.

    Shapes: ids `[...]` (integers), `lora_a [V, r]`, `lora_b [r, D]` -> `[..., D]` in `dtype`.
    The row lookup is the one-hot `x @ A` of a Dense adapter; the rank-r rows are scaled and
    named like `adapter_in`'s output.

    Example:
      >>> delta = embedding_delta(ids, Adapter(a, b, jnp.float32(2.0)), jnp.float32)
    """
    h = jnp.take(adapter.a, ids, axis=0).astype(dtype)
    h = name_hidden(h * jax.lax.stop_gradient(jnp.asarray(adapter.scale, dtype)))
    return adapter_out(h, adapter.b, dtype)


def adapt_embedding(ids: jax.Array, y: jax.Array, adapter: Adapter, *, dtype: Any) -> jax.Array:
    """An adapted `nn.Embed` lookup: `y + scale * lora_a[ids] @ lora_b`, named. No dropout: PEFT
    applies none to embedding adapters.

    Example:
      >>> y = adapt_embedding(ids, table[ids], read_adapter(self), dtype=jnp.float32)
    """
    return name_output(add_delta(y, embedding_delta(ids, adapter, dtype)))


def adapt_attend(x: jax.Array, y: jax.Array, adapter: Adapter, *, dtype: Any) -> jax.Array:
    """An adapted tied head `nn.Embed.attend`: `y + scale * (x @ lora_b.T) @ lora_a.T`, the
    transposed table delta (PEFT's `ensure_weight_tying` head: lora_A = B_emb, lora_B = A_emb).

    Shapes: x `[..., D]`, `lora_a [V, r]`, `lora_b [r, D]` -> `[..., V]`.

    Example:
      >>> logits = adapt_attend(h, h @ table.T, read_adapter(self), dtype=jnp.float32)
    """
    h = jnp.tensordot(x.astype(dtype), adapter.b.astype(dtype), axes=((x.ndim - 1,), (1,)))
    h = name_hidden(h * jax.lax.stop_gradient(jnp.asarray(adapter.scale, dtype)))
    delta = jnp.tensordot(h, adapter.a.astype(dtype), axes=((h.ndim - 1,), (1,)))
    return name_output(add_delta(y, delta))


def dora_delta(module: Any, y: jax.Array, dropped: jax.Array | None, adapter: Adapter,
               delta: jax.Array, *, in_axes: tuple[int, ...], dtype: Any) -> jax.Array:
    """DoRA's whole addition to a Linen layer's output `y` (PEFT's `DoraLinearLayer.forward`):
    `(g - 1) * base + g * delta`, `g = m / ||W + s A B||` (`lora_jax.dora`).

    Args:
      module: the adapted Linen layer: its `kernel` (and `bias`) are read for the norm and base.
      y: the base output (bias included); dropped: the dropped adapter input, or None.
      adapter: the layer's `Adapter` (with `magnitude`); delta: `s * (x_d A) B`.
      in_axes: the input's contracted axes; dtype: the compute dtype.

    Returns:
      The term to add to `y`, in `dtype`.

    Example:
      >>> y = add_delta(y, dora_delta(self, y, None, adapter, delta, in_axes=(1,), dtype=f32))
    """
    kernel = module.get_variable("params", "kernel")
    out_shape = kernel.shape[len(in_axes):]
    dora.check_magnitude(".".join(module.path), adapter.magnitude, out_shape)
    g = dora.factor(adapter.magnitude,
                    dora.weight_norm_sq(kernel, adapter.a, adapter.b, adapter.scale))
    if dropped is None:  # y - bias is x @ W: no second matmul
        bias = (module.get_variable("params", "bias") if module.has_variable("params", "bias")
                else None)
        base = y if bias is None else y - bias.astype(y.dtype)
    else:  # PEFT runs the base matmul again on the dropped input
        base = jnp.tensordot(dropped.astype(dtype), kernel.astype(dtype),
                             axes=(in_axes, tuple(range(len(in_axes)))))
    return dora.output_term(base, delta, g, dtype)


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
    stacked = as_stacked(adapter, len(tuple(in_axes)))
    a, b, scale = stacked.a, stacked.b, stacked.scale
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
        return lora_delta(x_in, adapter.a, adapter.b, adapter.scale, in_axes, dtype)
    return mixed_delta(x_in, adapter, mixed, in_axes=in_axes, dtype=dtype)


def refuse_mixed(where: str) -> None:
    """Raise a `LoraError` in a layer that runs one adapter for every row (`where` names it:
    the NNX layers) when a mixed-batch index is in force, instead of ignoring it."""
    if current_mixed() is not None:
        raise LoraError(f"mixed batches (stacked adapters, adapter_index=) are not supported "
                        f"in {where}: run a Linen model through lora_jax.apply(..., "
                        "adapter_index=), or one adapter per batch.")
