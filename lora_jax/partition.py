"""Selecting the adapter part of a tree: `lora_params`, `split`, `combine`, `trainable_mask`."""
from __future__ import annotations

from typing import Mapping

from lora_jax.tree import (ADAPTER_LEAVES, TRAINABLE_LEAVES, Params, deep_merge, filter_leaves,
                           map_leaves)


def lora_params(params: Mapping) -> Params:
    """The adapter sub-tree (`lora_a`, `lora_b`, `lora_scale` leaves with their paths): what the
    optimizer trains and what a checkpoint of the adapter holds.

    Example:
      >>> adapters = lora_params(params)   # megabytes, even for an 8B model
    """
    return filter_leaves(params, lambda key: key in ADAPTER_LEAVES)


def split(params: Mapping) -> tuple[Params, Params]:
    """`(base, adapters)`: the frozen tree without adapter leaves, and `lora_params(params)`.

    Differentiate with respect to `adapters` only, so no gradient of the frozen base is formed:
      >>> base, adapters = split(params)
      >>> grads = jax.grad(lambda a: loss(combine(base, a)))(adapters)
    """
    return filter_leaves(params, lambda key: key not in ADAPTER_LEAVES), lora_params(params)


def combine(base: Mapping, adapters: Mapping) -> Params:
    """Inverse of `split`: the union of the two trees (a leaf present in both is an error)."""
    return deep_merge(base, adapters)


def trainable_mask(params: Mapping) -> Params:
    """A bool tree shaped like `params`: True exactly on `lora_a` / `lora_b` leaves (the scale and
    every base leaf are frozen)."""
    return map_leaves(params, lambda key, _: key in TRAINABLE_LEAVES)
