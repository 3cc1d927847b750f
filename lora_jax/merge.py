"""`merge`: fold every adapter into its kernel (PEFT's merge_and_unload) as a pure tree map."""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors import LoraError
from lora_jax.tree import (ADAPTER_LEAVES, LORA_A, LORA_B, LORA_SCALE, Params, has_adapter,
                           map_modules, unwrap_variables)


def merge(params: Mapping, *, check_finite: bool = True) -> Params:
    """Return a plain tree: `kernel + scale * A @ B` (float32 math, the kernel's dtype kept),
    adapter leaves dropped. The result runs with the model's own `apply`.

    Args:
      params: an injected params tree or variables dict.
      check_finite: raise `LoraError` naming the module if a merged kernel holds NaN/inf (only
        when called outside jit, on concrete arrays).

    Example:
      >>> logits = model.apply({"params": merge(params)}, tokens)
    """
    tree, rewrap = unwrap_variables(params)

    def fold(path: str, module: Params) -> Params:
        if not has_adapter(module):
            return module
        _check_single(path, module)
        kernel = merged_kernel(module)
        if check_finite and not isinstance(kernel, jax.core.Tracer):
            if not bool(jnp.isfinite(kernel).all()):
                raise LoraError(f"merging the adapter of {path!r} produced NaN/inf; the adapter "
                                "(or kernel) holds non-finite values; nothing was changed.")
        rest = {k: v for k, v in module.items() if k not in ADAPTER_LEAVES}
        return {**rest, "kernel": kernel}

    return rewrap(map_modules(tree, fold))


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
    """One module's `kernel + scale * A @ B`, cast back to the kernel's dtype."""
    kernel = module["kernel"]
    d = delta(module[LORA_A], module[LORA_B], kernel.ndim)
    scale = jnp.asarray(module[LORA_SCALE], jnp.float32)
    scale = scale.reshape(scale.shape + (1,) * (kernel.ndim - scale.ndim))
    return (kernel.astype(jnp.float32) + scale * d).astype(kernel.dtype)
