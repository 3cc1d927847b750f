"""The partition rules for Flax NNX models: `lora_jax.nnx` models placed by the one rule.

An NNX model's parameters are Variables on the module graph, not a nested dict; the rules are
written for the Linen-form dotted paths that `lora_jax.nnx.params(model)` gives (the same paths
a Linen model with the same names has, adapters included). `nnx_shardings` takes the shardings
of that tree (`param_shardings`, so adapters get their kernel-derived specs) and puts each on the
matching leaf of `nnx.state(model, (nnx.Param, LoraScale))`; `shard_nnx` places the model's
state so, in place. A step jitted over the placed model (`nnx.jit`, or `nnx.split` + `jax.jit`)
then runs split as the rules say, with the batch split by `shard_batch`.
"""
from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

import lora_jax
from sharding.rules import DEFAULT_RULES, Rules, param_shardings

# the state the rules cover: what lora_jax.nnx.params(model) holds
RULED_STATE = (nnx.Param, lora_jax.nnx.LoraScale)


def nnx_shardings(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """`NamedSharding`s for `nnx.state(model, (nnx.Param, lora_jax.nnx.LoraScale))`, shaped like
    that state: the rules' shardings of `lora_jax.nnx.params(model)`, leaf by leaf. Raises
    `MeshError` naming any leaf the mesh does not divide.

    Example:
      >>> shardings = nnx_shardings(model, mesh)
      >>> state = jax.device_put(nnx.state(model, RULED_STATE), shardings)
    """
    by_path = param_shardings(lora_jax.nnx.params(model), mesh, rules)

    def pick(key_path, _leaf):
        # Dict keys walk the Linen-form tree; attribute keys walk into a quantised kernel's
        # pytree (`models.quant`: codes, scales), whose shardings `param_shardings` gives per
        # field. Other keys (a Variable's own wrapping) add no level to `by_path`.
        node = by_path
        for key in key_path:
            if isinstance(key, jax.tree_util.DictKey):
                node = node[str(key.key)]
            elif isinstance(key, jax.tree_util.GetAttrKey) and hasattr(node, key.name):
                node = getattr(node, key.name)
        return node

    return jax.tree_util.tree_map_with_path(pick, nnx.state(model, RULED_STATE))


def shard_nnx(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Place the model's parameters and adapters (`lora_scale` too) on `mesh` by the rules, in
    place (and return the model). Other state (rng counters, batch statistics) is untouched.
    Make the optimizer after this, so its state is made from the placed parameters.

    Example:
      >>> model = shard_nnx(lora_jax.nnx.inject(model, config, key), mesh)
      >>> opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=lora_jax.nnx.LoraParam)
    """
    state = nnx.state(model, RULED_STATE)
    nnx.update(model, jax.device_put(state, nnx_shardings(model, mesh, rules)))
    return model


__all__ = ["RULED_STATE", "nnx_shardings", "shard_nnx"]
