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
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

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
    return name_output(add_delta(y, lora_delta(x_in, *adapter, in_axes, dtype)))
