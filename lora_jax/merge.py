"""`merge`: fold every adapter into its kernel (PEFT's merge_and_unload) as a pure tree map."""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import dora, named
from lora_jax.errors import LoraError
from lora_jax.tree import (ADAPTER_LEAVES, LORA_A, LORA_B, LORA_SCALE, NAMED, Params,
                           has_adapter, map_modules, unwrap_variables)
from lora_jax.tree import EMBEDDING, is_embedding, use_saved
from lora_jax.embedding import merged_embedding
from lora_jax.tree import LORA_MAGNITUDE


def merge(params: Mapping, *, check_finite: bool = True,
          adapter_names: str | Sequence[str] | None = None) -> Params:
    """Return a plain tree: `kernel + scale * A @ B` (float32 math, the kernel's dtype kept),
    adapter leaves dropped. The result runs with the model's own `apply`. Embedding adapters
    fold into their table (`table + scale * A @ B`); `modules_to_save` copies replace their
    originals.

    Args:
      params: an injected params tree or variables dict.
      check_finite: raise `LoraError` naming the module if a merged kernel holds NaN/inf (only
        when called outside jit, on concrete arrays).
      adapter_names: which named adapters (`lora_jax.named`) to fold in: None every adapter in
        the tree, as `apply` runs them; a name or names those, and the others are dropped
        (PEFT's `merge_and_unload` of its active adapters).

    Example:
      >>> logits = model.apply({"params": merge(params)}, tokens)
      >>> only_b = merge(params, adapter_names=("b",))
    """
    tree, rewrap = unwrap_variables(params)
    if adapter_names is not None:
        tree = named.select(tree, adapter_names)
    tree = use_saved(tree)

    def fold(path: str, module: Params) -> Params:
        if not has_adapter(module) and NAMED not in module:
            return module
        if is_embedding(module):
            if NAMED in module:
                raise LoraError(f"{path!r}: merging named adapters of an embedding table is not "
                                "supported; merge one at a time (adapter_names=...).")
            table = merged_embedding(module)
            _check_merged(table, path, check_finite)
            return {**{k: v for k, v in module.items() if k not in ADAPTER_LEAVES},
                    EMBEDDING: table}
        if LORA_A in module:  # a stacked tree (lora_jax.stack_adapters) does not merge
            _check_single(path, module)
        kernel = merged_kernel(module) if NAMED not in module else merged_kernel_all(module)
        if check_finite and not isinstance(kernel, jax.core.Tracer):
            if not bool(jnp.isfinite(kernel).all()):
                raise LoraError(f"merging the adapter of {path!r} produced NaN/inf; the adapter "
                                "(or kernel) holds non-finite values; nothing was changed.")
        rest = {k: v for k, v in module.items() if k not in ADAPTER_LEAVES and k != NAMED}
        return {**rest, "kernel": kernel}

    return rewrap(map_modules(tree, fold, leaves=("kernel", EMBEDDING)))


def _check_merged(value: jax.Array, path: str, check_finite: bool) -> None:
    if check_finite and not isinstance(value, jax.core.Tracer):
        if not bool(jnp.isfinite(value).all()):
            raise LoraError(f"merging the adapter of {path!r} produced NaN/inf; the adapter "
                            "(or table) holds non-finite values; nothing was changed.")


def _check_single(path: str, module: Mapping) -> None:
    """One adapter per module: a stacked one (`lora_jax.stack_adapters`) has no single merged
    kernel. A and B give the stack depth plus 2 when stacked (`[*S, N, *in, r]`, `[*S, N, r,
    *out]`), else the depth S, which the scale `[*S]` (or `[*S, r]` per rank) cannot exceed."""
    a, b, kernel = module[LORA_A], module[LORA_B], module["kernel"]
    if np.ndim(a) + np.ndim(b) - 2 - np.ndim(kernel) > np.ndim(module[LORA_SCALE]):
        raise LoraError(f"{path!r} holds stacked adapters (lora_a {np.shape(a)}, lora_scale "
                        f"{np.shape(module[LORA_SCALE])}); merge one of them: "
                        "lj.merge(lj.unstack_adapter(params, i)).")


def delta(a: jax.Array, b: jax.Array, kernel_ndim: int) -> jax.Array:
    """`A @ B` reshaped like the kernel, in float32. The stack depth follows from the ranks:
    `A [*S, *in, r]`, `B [*S, r, *out]`, kernel `[*S, *in, *out]`."""
    n_stack = (a.ndim - 1) + (b.ndim - 1) - kernel_ndim
    stack, ins, outs = a.shape[:n_stack], a.shape[n_stack:-1], b.shape[n_stack + 1:]
    rank = a.shape[-1]
    a2 = a.reshape(*stack, int(np.prod(ins)), rank).astype(jnp.float32)
    b2 = b.reshape(*stack, rank, int(np.prod(outs))).astype(jnp.float32)
    return jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(*stack, *ins, *outs)


def merged_kernel(module: Mapping) -> jax.Array:
    """One module's `kernel + scale * A @ B`, cast back to the kernel's dtype (with DoRA's
    magnitude: `m / ||W + s A B|| * (W + s A B)`, as PEFT merges it)."""
    kernel = module["kernel"]
    if LORA_MAGNITUDE in module:
        return dora.merged_stack(module).astype(kernel.dtype)
    d = delta(module[LORA_A], module[LORA_B], kernel.ndim)
    scale = jnp.asarray(module[LORA_SCALE], jnp.float32)
    scale = scale.reshape(scale.shape + (1,) * (kernel.ndim - scale.ndim))
    return (kernel.astype(jnp.float32) + scale * d).astype(kernel.dtype)


def merged_kernel_all(module: Mapping) -> jax.Array:
    """`kernel + sum_i scale_i * A_i @ B_i` over every adapter of the module (named ones too),
    added one after the other in float32 (as PEFT merges several adapters), in the kernel's
    dtype."""
    kernel = module["kernel"].astype(jnp.float32)
    for leaves in named.module_adapters(module).values():
        kernel = merged_kernel({**leaves, "kernel": kernel})
    return kernel.astype(module["kernel"].dtype)
