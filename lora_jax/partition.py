"""Selecting the adapter part of a tree: `lora_params`, `split`, `combine`, `trainable_mask`."""
from __future__ import annotations

from typing import Mapping

from lora_jax.named import (adapter_leaves_of, check_selection, filter_adapter_leaves,
                            map_adapter_leaves)
from lora_jax.tree import (ADAPTER_LEAVES, TRAINABLE_LEAVES, Params, deep_merge, filter_leaves,
                           map_leaves)


def lora_params(params: Mapping, *, adapter_name: str | None = None) -> Params:
    """The adapter sub-tree (`lora_a`, `lora_b`, `lora_scale` leaves with their paths): what the
    optimizer trains and what a checkpoint of the adapter holds.

    `adapter_name`: only that named adapter's leaves (`lora_jax.named`), where they sit; None:
    every adapter's.

    Example:
      >>> adapters = lora_params(params)   # megabytes, even for an 8B model
      >>> only_b = lora_params(params, adapter_name="b")
    """
    if adapter_name is not None:
        return adapter_leaves_of(params, adapter_name)
    return filter_leaves(params, lambda key: key in ADAPTER_LEAVES)


def split(params: Mapping, *, adapter_name: str | None = None) -> tuple[Params, Params]:
    """`(base, adapters)`: the frozen tree without adapter leaves, and `lora_params(params)`.

    With `adapter_name`, `adapters` is that adapter alone and `base` the rest, the other
    adapters included (frozen): train one adapter with the others fixed.

    Differentiate with respect to `adapters` only, so no gradient of the frozen base is formed:
      >>> base, adapters = split(params)
      >>> grads = jax.grad(lambda a: loss(combine(base, a)))(adapters)
      >>> rest, b = split(params, adapter_name="b")
    """
    if adapter_name is not None:
        check_selection(params, (adapter_name,))
        rest = filter_adapter_leaves(
            params, lambda owner, key: not (owner == adapter_name and key in ADAPTER_LEAVES))
        return rest, lora_params(params, adapter_name=adapter_name)
    return filter_leaves(params, lambda key: key not in ADAPTER_LEAVES), lora_params(params)


def combine(base: Mapping, adapters: Mapping) -> Params:
    """Inverse of `split`: the union of the two trees (a leaf present in both is an error)."""
    return deep_merge(base, adapters)


def trainable_mask(params: Mapping, *, adapter_name: str | None = None) -> Params:
    """A bool tree shaped like `params`: True exactly on `lora_a` / `lora_b` leaves (the scale and
    every base leaf are frozen); with `adapter_name`, only on that adapter's.

    Example:
      >>> mask = trainable_mask(params, adapter_name="b")   # "default" and the rest frozen
    """
    if adapter_name is not None:
        check_selection(params, (adapter_name,))
        return map_adapter_leaves(params, lambda owner, key, _: owner == adapter_name
                                  and key in TRAINABLE_LEAVES)
    return map_leaves(params, lambda key, _: key in TRAINABLE_LEAVES)
