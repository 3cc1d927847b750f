"""DoRA (weight-decomposed LoRA, Liu et al. 2024) as HF PEFT computes it: the norms and factors.

DoRA writes the adapted weight as a magnitude times a direction:

    W' = m * (W + s A B) / ||W + s A B||_col        (kernel [in, out]; the norm runs over `in`)

`m` (`lora_magnitude`, `[*S, *out]`) is a trained leaf beside `lora_a` / `lora_b`, initialised to
the column norm of the adapted weight (of `W` alone when B starts at zero). As in PEFT (and the
paper, section 4.3), the norm is a constant of the step: no gradient flows through it. A layer's
output then is

    y' = y + (g - 1) * base + g * s * (x_d A) B,      g = m / ||W + s A B||_col   ([*out])

with `base = y - bias` without LoRA dropout, and `base = x_d @ W` with it (`x_d` the dropped
input: PEFT's `lora_magnitude_vector` forward). Both terms are linear in the layer's partial
products, so a row-parallel layer adds them to its partial sum before its one reduction.

The norm is computed without forming the `[in, out]` matrix `W + s A B`:

    ||W_j + s (AB)_j||^2 = ||W_j||^2 + 2 s <A^T W, B>_j + s^2 <(A^T A) B, B>_j

needs `A^T W` (`[r, out]`) and the `r x r` Gram `A^T A`; each of the three terms is a sum over the
input rows, so under a split of `in` (row-parallel) the local terms add up by one `psum` of an
`[out]` vector (`weight_norm_sq` returns that partial).

    weight_norm_sq(kernel, a, b, scale)   ||W + s A B||^2 per output feature, factored, float32
    materialised_norm(kernel, a, b, s)    the same norm from the formed matrix (init, merge, tests)
    factor(magnitude, norm_sq)            g = m / sqrt(norm_sq), float32, no gradient to the norm
    output_term(base, delta, g, dtype)    (g - 1) * base + g * delta: what DoRA adds to y
    magnitude_leaf(kernel, leaves, n)     inject's initial `lora_magnitude` (PEFT's init)
    check_magnitude(path, magnitude, out) a clear error for a magnitude that does not fit
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from lora_jax.errors import LoraError
from lora_jax.tree import LORA_A, LORA_B, LORA_MAGNITUDE, LORA_SCALE

_HIGHEST = jax.lax.Precision.HIGHEST  # the norm is small work; keep it float32-exact on GPUs too


def _flat(kernel: jax.Array, a: jax.Array, b: jax.Array):
    """`kernel [*in, *out]`, `a [*in, r]`, `b [r, *out]` as float32 `[I, O]`, `[I, r]`, `[r, O]`."""
    rank = a.shape[-1]
    n_in = a.ndim - 1
    in_size, out_size = math.prod(a.shape[:-1]), math.prod(b.shape[1:])
    if tuple(kernel.shape) != (*a.shape[:n_in], *b.shape[1:]):
        raise LoraError(f"DoRA: kernel {tuple(kernel.shape)} does not fit lora_a "
                        f"{tuple(a.shape)} and lora_b {tuple(b.shape)}.")
    f32 = jnp.float32
    return (kernel.reshape(in_size, out_size).astype(f32), a.reshape(in_size, rank).astype(f32),
            b.reshape(rank, out_size).astype(f32))


def weight_norm_sq(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array, *,
                   gram: bool = True) -> jax.Array:
    """`||W + s A B||^2` per output feature, without forming `W + s A B`; float32, no gradient.

    Args:
      kernel: `[*in, *out]` (one layer; under shard_map the local rows of `in`).
      a: `[*in, r]` (the same rows); b: `[r, *out]`; scale: `[]`.
      gram: include the `s^2 ||(AB)_j||^2` term. A caller that splits `in` but also holds all of
        A may add it once itself; the default suits one device and a psum over the split of `in`
        (each shard's Gram term is its rows' share, so the shares add up too).

    Returns:
      `[*out]` float32: a sum over the given input rows (a partial sum under a split of `in`).

    Example:
      >>> n2 = weight_norm_sq(kernel, a, b, jnp.float32(2.0))     # [out]
    """
    w, a2, b2 = _flat(*jax.lax.stop_gradient((kernel, a, b)))
    s = jax.lax.stop_gradient(jnp.asarray(scale, jnp.float32))
    out = jnp.sum(w * w, axis=0)
    aw = jnp.matmul(a2.T, w, precision=_HIGHEST)  # [r, O]: the only O(in*out*r) product
    out = out + 2.0 * s * jnp.sum(aw * b2, axis=0)
    if gram:
        g = jnp.matmul(a2.T, a2, precision=_HIGHEST)  # [r, r]
        out = out + s * s * jnp.sum(jnp.matmul(g, b2, precision=_HIGHEST) * b2, axis=0)
    return out.reshape(b.shape[1:])


def materialised_norm(kernel: jax.Array, a: jax.Array, b: jax.Array,
                      scale: jax.Array) -> jax.Array:
    """`||W + s A B||` per output feature from the formed `[in, out]` matrix, float32: PEFT's
    `get_weight_norm` (used at init and merge, and as the reference for `weight_norm_sq`).

    Example:
      >>> m0 = materialised_norm(kernel, a, b, 2.0)    # [out]
    """
    w, a2, b2 = _flat(kernel, a, b)
    adapted = w + jnp.asarray(scale, jnp.float32) * jnp.matmul(a2, b2, precision=_HIGHEST)
    return jnp.sqrt(jnp.sum(adapted * adapted, axis=0)).reshape(b.shape[1:])


def factor(magnitude: jax.Array, norm_sq: jax.Array) -> jax.Array:
    """`g = m / ||W + s A B||` in float32; the norm is a constant (PEFT detaches it).

    Example:
      >>> g = factor(magnitude, weight_norm_sq(kernel, a, b, scale))
    """
    norm = jnp.sqrt(jax.lax.stop_gradient(norm_sq.astype(jnp.float32)))
    return magnitude.astype(jnp.float32) / norm


def output_term(base: jax.Array, delta: jax.Array, g: jax.Array, dtype: Any) -> jax.Array:
    """What DoRA adds to the base output: `(g - 1) * base + g * delta`, in `dtype`.

    Args:
      base: the base layer's output without its bias (`[..., *out]`), or `x_d @ W` under LoRA
        dropout; a row-parallel layer passes its partial product.
      delta: the LoRA term `s * (x_d A) B` (`[..., *out]`), partial likewise.
      g: `factor(...)`, `[*out]`.
      dtype: the compute dtype.

    Example:
      >>> y = y + output_term(y - bias, lora_delta(x, a, b, s, (1,), jnp.float32), g, jnp.float32)
    """
    # g - 1 in float32, then cast: g is near 1, where bfloat16's spacing (2^-7) would round the
    # small rescaling away (PEFT keeps this factor in float32 too)
    return (g - 1).astype(dtype) * base.astype(dtype) + g.astype(dtype) * delta.astype(dtype)


def magnitude_leaf(kernel: jax.Array, leaves: Mapping[str, jax.Array], n_stack: int,
                   dtype: Any) -> jax.Array:
    """The initial `lora_magnitude [*S, *out]`: `||W + s A B||` per output feature (PEFT's
    `DoraLinearLayer.update_layer`; with B at zero it is the norm of W's columns).

    Args:
      kernel: `[*S, *in, *out]`; leaves: the module's `lora_a`, `lora_b`, `lora_scale`.
      n_stack: the number of stacked (scanned-layer) axes `S`.
      dtype: the leaf's dtype (the adapters').

    Example:
      >>> m = magnitude_leaf(kernel, adapter_leaves(...), 0, jnp.float32)
    """
    return _stacked_norm(kernel, leaves[LORA_A], leaves[LORA_B], leaves[LORA_SCALE],
                         n_stack=n_stack).astype(dtype)


@functools.partial(jax.jit, static_argnames="n_stack")
def _stacked_norm(kernel, a, b, scale, *, n_stack: int) -> jax.Array:
    # one compiled program per shape: eager op-by-op dispatch made inject slow per module
    norm = materialised_norm
    for _ in range(n_stack):
        norm = jax.vmap(norm)
    return norm(kernel, a, b, scale)


def check_magnitude(path: str, magnitude: jax.Array, out_shape: tuple[int, ...]) -> None:
    """A `LoraError` if a layer's `lora_magnitude` is not one value per output feature."""
    if tuple(magnitude.shape) != tuple(out_shape):
        raise LoraError(f"{path}: lora_magnitude has shape {tuple(magnitude.shape)}, the layer "
                        f"has output features {tuple(out_shape)}; DoRA keeps one magnitude per "
                        "output feature. Inject with LoraConfig(use_dora=True) on this model.")


def merged(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array,
           magnitude: jax.Array) -> jax.Array:
    """One layer's merged kernel `m / ||W + s A B|| * (W + s A B)`, float32 (PEFT's merge)."""
    w, a2, b2 = _flat(kernel, a, b)
    adapted = w + jnp.asarray(scale, jnp.float32) * jnp.matmul(a2, b2, precision=_HIGHEST)
    norm = jnp.sqrt(jnp.sum(adapted * adapted, axis=0))
    g = magnitude.astype(jnp.float32).reshape(-1) / norm
    return (adapted * g).reshape(kernel.shape)


def merged_stack(module: Mapping) -> jax.Array:
    """`merged` over a module's stacked axes (`lora_scale [*S]`), float32."""
    fn = merged
    for _ in range(jnp.ndim(module[LORA_SCALE])):
        fn = jax.vmap(fn)
    return fn(module["kernel"], module[LORA_A], module[LORA_B], module[LORA_SCALE],
              module[LORA_MAGNITUDE])
