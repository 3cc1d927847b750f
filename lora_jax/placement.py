"""Where restored or imported adapter leaves go: the caller's shardings, else beside the kernel.

lora_jax derives no partition specs. The one rule for adapters (A keeps its kernel's input-dim
spec, B the output-dim spec, the rank axis whole, fsdp dropped) belongs to `sharding.rules`,
the package that knows the mesh axes; callers hand its shardings in as `shardings=`, e.g.
`sharding.param_shardings(abstract_adapters, mesh)`. Without them an adapter leaf keeps the
sharding it already has, else it is replicated over its kernel's devices, else it goes to the
first local device: correct anywhere, and resharded by the first jitted step that wants it split.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding

from lora_jax.errors import LoraError

# None | one Sharding for every leaf | (dotted_path, shape) -> Sharding | None | a tree of them
Shardings = Any


def adapter_sharding(module: Mapping, leaf: str, path: str, shape: tuple[int, ...],
                     shardings: Shardings = None) -> Sharding:
    """The sharding of adapter `leaf` of the module at dotted `path`.

    Args:
      module: the tree's module dict (its `kernel`, and the adapter leaves if it has them).
      leaf: `lora_a`, `lora_b` or `lora_scale`.
      path: the module's dotted path; `shardings` is looked up at `<path>.<leaf>`.
      shape: the leaf's shape (passed to a `shardings` function).
      shardings: the caller's choice (see `given_sharding`); None: `default_sharding`.

    Returns:
      A `jax.sharding.Sharding`.

    Example:
      >>> adapter_sharding(module, "lora_a", "model.layers.q_proj", (2, 64, 8))
    """
    given = given_sharding(shardings, f"{path}.{leaf}", shape)
    return given if given is not None else default_sharding(module, leaf)


def given_sharding(shardings: Shardings, leaf_path: str,
                   shape: tuple[int, ...]) -> Sharding | None:
    """The caller's sharding for one leaf: `shardings` itself if it is a `Sharding`, its value
    `shardings(leaf_path, shape)` if it is a function, its entry at `leaf_path` if it is a tree
    (of the adapters, of the whole params or of `{"params": ...}` variables), None if None."""
    if shardings is None or isinstance(shardings, Sharding):
        return shardings
    if callable(shardings):
        return shardings(leaf_path, tuple(shape))
    node = shardings
    if isinstance(node, Mapping) and "params" in node and leaf_path.split(".")[0] not in node:
        node = node["params"]
    for key in leaf_path.split("."):
        if not isinstance(node, Mapping) or key not in node:
            raise LoraError(f"shardings= has no entry for {leaf_path}: pass a tree shaped like the "
                            "adapters (e.g. sharding.param_shardings of an abstract adapter "
                            "tree), one Sharding, or a function (path, shape) -> Sharding.")
        node = node[key]
    return node


def default_sharding(module: Mapping, leaf: str) -> Sharding:
    """The leaf's own sharding if the module has the leaf already, else replicated over the
    devices of the module's kernel (`replicated_over`)."""
    existing = getattr(module.get(leaf), "sharding", None)
    if existing is not None:
        return existing
    return replicated_over(getattr(module.get("kernel"), "sharding", None))


def replicated_over(sharding: Sharding | None) -> Sharding:
    """Whole on every device of `sharding`: the same mesh with an empty spec, `sharding` itself
    if it already replicates, else (a host array, an unknown kind) the first local device."""
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    if sharding is not None and sharding.is_fully_replicated:
        return sharding
    return SingleDeviceSharding(jax.local_devices()[0])
