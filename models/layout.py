"""Model families and how parameter paths map to Hugging Face tensor names.

Unscanned trees: the dict keys joined with "." are the HF module name, and the leaf maps to the
HF tensor suffix (`kernel`, `embedding`, `scale` -> `weight`; `bias` -> `bias`).
Scanned trees: the layer stack sits at the HF container path (`model.layers`, `transformer.h`)
without an index, every leaf under it with a leading layer axis [L, ...]; layer i's HF module
name is `<container>.<i>.<rest>`.

Example:
  >>> layer_container(params)                      # "model.layers"
  >>> hf_tensor_name(("model", "layers", "3", "self_attn", "q_proj", "kernel"))
  'model.layers.3.self_attn.q_proj.weight'
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from models.errors import CheckpointError
from models.gpt2 import GPT2, GPT2Config
from models.llama import Llama, LlamaConfig

# Linen leaf name -> HF tensor suffix.
HF_LEAF = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


@dataclasses.dataclass(frozen=True)
class Family:
    """What differs between model families when reading and writing HF checkpoints.

    container: dotted path of the layer stack.
    base_prefix: the trunk's name; checkpoints of the bare trunk (`GPT2Model`) omit it.
    conv1d_prefix: kernels under it are HF `Conv1D` weights, stored [in, out] (no transpose).
    benign_extras: regexes of tensors some checkpoints carry that are buffers, not parameters.
    """

    model_type: str
    config_cls: type
    model_cls: type
    container: str
    base_prefix: str
    conv1d_prefix: str | None = None
    benign_extras: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {
    "gpt2": Family("gpt2", GPT2Config, GPT2, container="transformer.h",
                   base_prefix="transformer", conv1d_prefix="transformer.h.",
                   benign_extras=(r".*\.attn\.bias", r".*\.attn\.masked_bias")),
    "llama": Family("llama", LlamaConfig, Llama, container="model.layers", base_prefix="model",
                    benign_extras=(r".*\.rotary_emb\.inv_freq",)),
}


def family(obj: Any) -> Family:
    """The family of a model_type string, a config, or a model."""
    model_type = obj if isinstance(obj, str) else _config_of(obj).MODEL_TYPE
    if model_type not in FAMILIES:
        raise CheckpointError(f"model_type {model_type!r} is not supported; supported: "
                              f"{sorted(FAMILIES)}")
    return FAMILIES[model_type]


def _config_of(obj: Any) -> Any:
    return getattr(obj, "config", obj)


def layer_container(obj: Any) -> str:
    """Dotted path of the layer stack ("model.layers" or "transformer.h").

    Args:
      obj: a model, a config, a model_type string, or a params tree (plain or `{"params": ...}`).
    """
    if isinstance(obj, Mapping):
        tree = obj.get("params", obj)
        for fam in FAMILIES.values():
            node: Any = tree
            for key in fam.container.split("."):
                node = node.get(key) if isinstance(node, Mapping) else None
            if isinstance(node, Mapping):
                return fam.container
        raise ValueError(f"no known layer container ({[f.container for f in FAMILIES.values()]})"
                         f" in a tree with top-level keys {sorted(tree)}")
    return family(obj).container


def peft_naming(obj: Any) -> dict:
    """What an adapter exporter needs to know of a model family to name its modules as Hugging
    Face does: the layer stack's path (scanned trees have one module per stack) and whether its
    HF modules are `Conv1D` (GPT-2: PEFT records `fan_in_fan_out`).

    Args:
      obj: a model, a config or a model_type string.

    Example:
      >>> lora_jax.export_peft("out/peft", params, config, **models.peft_naming(model))
    """
    fam = family(obj)
    return dict(layer_container=fam.container, fan_in_fan_out=fam.conv1d_prefix is not None)


def is_scanned(params: Mapping, container: str | None = None) -> bool:
    """True if the layer stack is scanned (no per-layer index keys under the container)."""
    tree = params.get("params", params)
    node = _container_node(tree, container or layer_container(tree))
    return not all(k.isdigit() for k in node)


def _container_node(tree: Mapping, container: str) -> Mapping:
    node = tree
    for key in container.split("."):
        node = node[key]
    return node


def _with_container(tree: Mapping, container: str, value: Any) -> dict:
    """A copy of `tree` whose node at `container` is `value` (the rest shared, not copied)."""
    head, *rest = container.split(".")
    return {**tree, head: value if not rest else _with_container(tree[head], ".".join(rest),
                                                                 value)}


def unstack_layers(params: Mapping, container: str | None = None) -> dict:
    """A scanned tree (every leaf under the container [L, ...]) -> the unscanned layout
    (children "0" .. "L-1"), for a model built with `scan_layers=False`.

    Why: an unrolled stack has no per-layer weight slicing inside a loop, which XLA on GPU
    materialises as a copy before every matmul (docs/PERFORMANCE.md); and a model initialised
    scanned compiles its init in seconds where an unrolled init takes minutes at 8B size.
    Works on a params tree, an adapter tree or any tree with the same container, plain or
    wrapped as `{"params": ...}`."""
    if "params" in params:
        return {**params, "params": unstack_layers(params["params"], container)}
    container = container or layer_container(params)
    if not is_scanned(params, container):
        raise ValueError(f"{container!r} is already unscanned (its keys are layer indices)")
    layers = _container_node(params, container)
    sizes = {leaf.shape[0] for leaf in jax.tree_util.tree_leaves(layers)}
    if len(sizes) != 1:
        raise ValueError(f"leaves under {container!r} disagree on the layer count: {sizes}")
    split = {str(i): jax.tree_util.tree_map(lambda x, i=i: x[i], layers)
             for i in range(sizes.pop())}
    return _with_container(params, container, split)


def stack_layers(params: Mapping, container: str | None = None) -> dict:
    """The inverse of `unstack_layers`: children "0" .. "L-1" -> one scanned subtree [L, ...]."""
    if "params" in params:
        return {**params, "params": stack_layers(params["params"], container)}
    container = container or layer_container(params)
    if is_scanned(params, container):
        raise ValueError(f"{container!r} is already scanned (no layer-index keys under it)")
    layers = _container_node(params, container)
    ordered = [layers[str(i)] for i in range(len(layers))]
    return _with_container(params, container,
                           jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *ordered))


def hf_tensor_name(path: tuple[str, ...]) -> str:
    """("model", "layers", "0", "self_attn", "q_proj", "kernel") ->
    "model.layers.0.self_attn.q_proj.weight"."""
    return ".".join((*path[:-1], HF_LEAF[path[-1]]))


def is_transposed(fam: Family, path: tuple[str, ...]) -> bool:
    """Whether HF stores this leaf transposed relative to ours (torch Linear [out, in])."""
    if path[-1] != "kernel":
        return False
    return not (fam.conv1d_prefix and ".".join(path).startswith(fam.conv1d_prefix))
