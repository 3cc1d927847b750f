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
import jax.numpy as jnp
import numpy as np

from lora_jax.adapter_op import (adapt, adapter_selection, compute_dtype, dropout_context,
                                 is_stacked, mixed_context, read_adapter)
from lora_jax.adapter_op import adapt_attend, adapt_embedding
from lora_jax.config import LoraConfig
from lora_jax.errors import LoraError
from lora_jax.inject import inject
from lora_jax.layout import dense_input_axes, kernel_layouts
from lora_jax.named import check_selection
from lora_jax.tree import TRAINABLE_LEAVES, map_leaves, unwrap_variables
from lora_jax.tree import EMBEDDING, SAVED_PREFIX, use_saved

SAVED_EMBEDDING = SAVED_PREFIX + EMBEDDING


def _intercept(next_fun, args, kwargs, context):
    """Adds the adapter in an `nn.Dense` / `nn.DenseGeneral` call's scope to its output."""
    module = context.module
    if isinstance(module, nn.Embed):
        return _intercept_embed(next_fun, args, kwargs, context, tie_head=False)
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


def _intercept_tied(next_fun, args, kwargs, context):
    """`_intercept`, and a tied head (`nn.Embed.attend`) runs its table's adapter too."""
    if isinstance(context.module, nn.Embed):
        return _intercept_embed(next_fun, args, kwargs, context, tie_head=True)
    return _intercept(next_fun, args, kwargs, context)


def _intercept_embed(next_fun, args, kwargs, context, *, tie_head: bool):
    """An `nn.Embed` lookup runs its `modules_to_save` copy and adds its adapter; `attend` (a
    tied head) only with `tie_head`: without it the head stays on the base table, as PEFT's
    tied `lm_head` does (it shares only the original weight)."""
    module, method = context.module, context.method_name
    if method not in ("__call__", "attend") or (method == "attend" and not tie_head):
        return next_fun(*args, **kwargs)
    if module.has_variable("params", SAVED_EMBEDDING):
        y = _embed_with(module, module.get_variable("params", SAVED_EMBEDDING), args[0], method)
    else:
        y = next_fun(*args, **kwargs)
    if (adapter := read_adapter(module)) is None:
        return y
    table = module.get_variable("params", EMBEDDING)
    if adapter.a.shape[0] != table.shape[0] or np.ndim(adapter.b) != 2 or (
            adapter.b.shape != (adapter.a.shape[-1], table.shape[-1])):
        raise LoraError(f"adapter of {'.'.join(module.path)!r} does not fit its embedding table "
                        f"{tuple(table.shape)}: lora_a {tuple(adapter.a.shape)}, lora_b "
                        f"{tuple(adapter.b.shape)} (expected [V, r] and [r, D]).")
    dtype = module.dtype or table.dtype
    if method == "attend":
        return adapt_attend(args[0], y, adapter, dtype=dtype)
    return adapt_embedding(args[0], y, adapter, dtype=dtype)


def _embed_with(module, table, x, method: str):
    """`nn.Embed`'s own lookup / attend (same dtype promotion), on another table: the trained
    copy of a `modules_to_save` embedding."""
    if method == "attend":
        dtype = module.dtype or jnp.result_type(x, table)
        return jnp.dot(x.astype(dtype), table.astype(dtype).T)
    return jnp.take(table.astype(module.dtype or table.dtype), x, axis=0)


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
          freeze_base: bool = True, adapters: Any = None, ensure_weight_tying: bool = False,
          adapter_index: Any = None, mixed_method: str = "auto",
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
      adapters: which named adapters run (`lora_jax.named`): None every adapter in the tree,
        a name or a tuple of names those (their terms summed, as PEFT's several active
        adapters), `()` none (the base model, as PEFT's `disable_adapter()`). An unknown name
        is a `LoraError`.
      ensure_weight_tying: a tied output head (`nn.Embed.attend`) runs its table's LoRA too
        (`LoraConfig.ensure_weight_tying`, PEFT's flag); by default it stays on the base table,
        as in PEFT. `modules_to_save` copies (`saved_*` leaves) always replace their originals.
      adapter_index: int32 `[batch]` for a mixed batch: row i runs adapter `adapter_index[i]`
        of a tree from `lora_jax.stack_adapters` (-1: the base only). With a single-adapter
        tree, 0 runs its adapter and -1 the base. None: every row runs the tree's one adapter.
      mixed_method: how a mixed batch applies its adapters: "auto", "gather", "ragged" or
        "dense" (same values; see `lora_jax.adapter_op.MixedBatch`).

    Example:
      >>> logits = apply(model, {"params": params}, tokens)
      >>> base_only = apply(model, {"params": params}, tokens, adapters=())
      >>> logits = apply(model, {"params": stacked}, tokens, adapter_index=jnp.array([0, -1]))
    """
    if "deterministic" in _call_parameters(model, method):
        kwargs["deterministic"] = deterministic
    if lora_dropout > 0.0 and not deterministic and (rngs is None or "dropout" not in rngs):
        raise LoraError("lora_dropout > 0 with deterministic=False needs rngs={'dropout': key}.")
    if freeze_base:
        variables = freeze_non_adapters(variables)
    params, rewrap = unwrap_variables(variables)
    # modules_to_save: the model runs the trained copies (an embedding's in the interceptor,
    # which knows whether a tied head reads the copy or the original)
    variables = rewrap(use_saved(params, keep=(EMBEDDING,)))
    interceptor = _intercept_tied if ensure_weight_tying else _intercept
    # The rate is read by the adapter op wherever an adapter runs: in the interceptor and in
    # layers that add their own (the tensor-parallel ones), by one rule.
    selection = None if adapters is None else check_selection(variables, adapters)
    with contextlib.ExitStack() as stack:
        stack.enter_context(nn.intercept_methods(interceptor))
        stack.enter_context(dropout_context(lora_dropout, deterministic))
        stack.enter_context(adapter_selection(selection))
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
                     lora_dropout=self.config.lora_dropout,
                     ensure_weight_tying=self.config.ensure_weight_tying, **kwargs)
