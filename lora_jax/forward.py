"""Running an unmodified Linen model with its adapters: `apply` and the `LoraModel` wrapper.

Linen ignores parameters a module never reads, so a plain `model.apply` on an injected tree
silently runs the *base* model. `apply` instead installs a `flax.linen.intercept_methods`
interceptor: every `nn.Dense` / `nn.DenseGeneral` call whose parameter scope holds `lora_a` and
`lora_b` returns `base(x) + scale * dropout(x) @ A @ B`. The model code is untouched, and inside
`nn.scan` the interceptor sees one layer's slice of the stacked leaves. The adapter math itself
is `lora_jax.adapter_op`'s, shared with the layers that add their adapters themselves.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np

from lora_jax.adapter_op import (adapt, compute_dtype, dropout_context, is_stacked,
                                 mixed_context, read_adapter)
from lora_jax.config import LoraConfig
from lora_jax.errors import LoraError
from lora_jax.inject import inject
from lora_jax.layout import dense_input_axes, kernel_layouts
from lora_jax.tree import TRAINABLE_LEAVES, map_leaves, unwrap_variables


def _intercept(next_fun, args, kwargs, context):
    """Adds the adapter in an `nn.Dense` / `nn.DenseGeneral` call's scope to its output."""
    module = context.module
    if (context.method_name != "__call__"
            or not isinstance(module, (nn.Dense, nn.DenseGeneral))
            or (adapter := read_adapter(module)) is None):
        return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    x = args[0]
    in_axes = dense_input_axes(module, x.ndim)
    if is_stacked(adapter, len(in_axes)):  # N adapters on axis 0 (stack_adapters): check one
        _check_fit(module, x, adapter.a[0], adapter.b[0], in_axes)
    else:
        _check_fit(module, x, adapter.a, adapter.b, in_axes)
    dtype = compute_dtype(module.dtype, x, module.get_variable("params", "kernel"))
    return adapt(module, x, y, adapter, in_axes=in_axes, dtype=dtype)


def _check_fit(module, x, a, b, in_axes) -> None:
    in_shape = tuple(x.shape[i] for i in in_axes)
    if tuple(a.shape[:-1]) != in_shape or np.ndim(b) < 2 or b.shape[0] != a.shape[-1]:
        path = ".".join(module.path)
        raise LoraError(
            f"adapter of {path!r} does not fit the layer: input features {in_shape}, lora_a "
            f"{tuple(a.shape)}, lora_b {tuple(b.shape)}. If this is a DenseGeneral or nested "
            "scan, inject with layouts=lora_jax.kernel_layouts(model, variables, *args).")


def apply(model: nn.Module, variables: Mapping, *args, rngs: Any = None,
          deterministic: bool = True, lora_dropout: float = 0.0, method: Any = None,
          freeze_base: bool = True, adapter_index: Any = None, mixed_method: str = "auto",
          **kwargs) -> Any:
    """`model.apply(variables, *args, **kwargs)` with every adapter in `variables` honoured.

    Args:
      model: any Flax Linen module; its code is not changed.
      variables: `{"params": injected_params, ...}`.
      rngs: Linen rngs; LoRA dropout draws from `"dropout"`.
      deterministic: no LoRA dropout when True. Also forwarded to the model if its `__call__`
        takes a `deterministic` argument.
      lora_dropout: the dropout rate on the adapters' input (a `LoraConfig.lora_dropout`), for
        every adapter the model runs: the intercepted Dense layers' and those of layers that
        add their own (`sharding.TensorParallelism`'s), read from one context
        (`lora_jax.adapter_op.dropout_context`).
      freeze_base: treat every leaf but `lora_a`/`lora_b` as a constant (`stop_gradient`), so
        even a gradient taken over the whole tree is zero off the adapters and XLA forms no
        weight gradient for the frozen base.
      adapter_index: int32 `[batch]` for a mixed batch: row i runs adapter `adapter_index[i]`
        of a tree from `lora_jax.stack_adapters` (-1: the base only). With a single-adapter
        tree, 0 runs its adapter and -1 the base. None: every row runs the tree's one adapter.
      mixed_method: how a mixed batch applies its adapters: "auto", "gather", "ragged" or
        "dense" (same values; see `lora_jax.adapter_op.MixedBatch`).

    Example:
      >>> logits = apply(model, {"params": params}, tokens)
      >>> logits = apply(model, {"params": stacked}, tokens, adapter_index=jnp.array([0, -1]))
    """
    if "deterministic" in _call_parameters(model, method):
        kwargs["deterministic"] = deterministic
    if lora_dropout > 0.0 and not deterministic and (rngs is None or "dropout" not in rngs):
        raise LoraError("lora_dropout > 0 with deterministic=False needs rngs={'dropout': key}.")
    if freeze_base:
        variables = freeze_non_adapters(variables)
    # The rate is read by the adapter op wherever an adapter runs: in the interceptor and in
    # layers that add their own (the tensor-parallel ones), by one rule.
    with contextlib.ExitStack() as stack:
        stack.enter_context(nn.intercept_methods(_intercept))
        stack.enter_context(dropout_context(lora_dropout, deterministic))
        if adapter_index is not None:  # read by the adapter op like the dropout rate
            stack.enter_context(mixed_context(adapter_index, mixed_method))
        return model.apply(variables, *args, rngs=rngs, method=method, **kwargs)


def freeze_non_adapters(variables: Mapping) -> dict:
    """`stop_gradient` on every params leaf except `lora_a` / `lora_b`."""
    params, rewrap = unwrap_variables(variables)
    return rewrap(map_leaves(params, lambda key, leaf: leaf if key in TRAINABLE_LEAVES
                             else jax.lax.stop_gradient(leaf)))


def _call_parameters(model: nn.Module, method: Any) -> Mapping[str, Any]:
    fn = method if callable(method) else getattr(type(model), method or "__call__")
    try:
        return inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}


@dataclasses.dataclass(frozen=True)
class LoraModel:
    """A Linen model paired with a `LoraConfig`, with `init`/`apply` that create and honour
    adapters: drop it in where a Linen module's `init`/`apply` are called.

    Example:
      >>> lm = LoraModel(model, LoraConfig(r=8, target_modules="all-linear"))
      >>> variables = lm.init(jax.random.key(0), tokens)       # base init + adapters
      >>> logits = lm.apply(variables, tokens)                 # adapters honoured
    """

    model: nn.Module
    config: LoraConfig

    def init(self, rngs: Any, *args, **kwargs) -> dict:
        key = rngs["params"] if isinstance(rngs, Mapping) else rngs
        variables = self.model.init(rngs, *args, **kwargs)
        # It holds the model and its inputs, so it knows every kernel's layout (DenseGeneral,
        # nested scans) that the tree alone cannot tell. The rngs serve a model that draws.
        trace_rngs = rngs if isinstance(rngs, Mapping) else {"params": rngs, "dropout": rngs}
        layouts = kernel_layouts(self.model, variables, *args, rngs=trace_rngs, **kwargs)
        return inject(variables, self.config, jax.random.fold_in(key, 1), layouts=layouts)

    def apply(self, variables: Mapping, *args, rngs: Any = None, deterministic: bool = True,
              **kwargs) -> Any:
        return apply(self.model, variables, *args, rngs=rngs, deterministic=deterministic,
                     lora_dropout=self.config.lora_dropout, **kwargs)
