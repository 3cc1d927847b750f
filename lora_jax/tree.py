"""Walking a Linen parameter tree by module: dotted paths, kernels and the adapter leaves.

A *module* here is a dict that holds a `kernel` leaf (what `nn.Dense` and `nn.DenseGeneral`
create). Its dotted path joins the dict keys from the root, e.g. `model.layers.0.self_attn.q_proj`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping

LORA_A, LORA_B, LORA_SCALE = "lora_a", "lora_b", "lora_scale"
ADAPTER_LEAVES = (LORA_A, LORA_B, LORA_SCALE)
TRAINABLE_LEAVES = (LORA_A, LORA_B)

Params = dict[str, Any]


def as_dict(params: Mapping) -> Params:
    """A plain, mutable nested dict copy of a (possibly frozen) tree; leaves are shared."""
    return {k: as_dict(v) if isinstance(v, Mapping) else v for k, v in params.items()}


def unwrap_variables(tree: Mapping) -> tuple[Params, Callable[[Params], Params]]:
    """Accept either `params` or Linen `variables` (`{"params": ..., ...}`); return the params and
    a function that puts new params back where they came from."""
    tree = as_dict(tree)
    if "params" in tree and isinstance(tree["params"], Mapping):
        rest = {k: v for k, v in tree.items() if k != "params"}
        return tree["params"], lambda new: {**rest, "params": new}
    return tree, lambda new: new


def iter_modules(params: Mapping, prefix: str = "") -> Iterator[tuple[str, Mapping]]:
    """Yield `(dotted_path, module_dict)` for every dict holding a `kernel` leaf, depth first."""
    for key, value in params.items():
        if not isinstance(value, Mapping):
            continue
        path = f"{prefix}.{key}" if prefix else str(key)
        if "kernel" in value and not isinstance(value["kernel"], Mapping):
            yield path, value
        yield from iter_modules(value, path)


def map_modules(params: Mapping, fn: Callable[[str, Params], Params], prefix: str = "") -> Params:
    """Rebuild the tree, replacing each kernel-holding module dict by `fn(path, module)`."""
    out = {}
    for key, value in params.items():
        if not isinstance(value, Mapping):
            out[key] = value
            continue
        path = f"{prefix}.{key}" if prefix else str(key)
        value = map_modules(value, fn, path)
        if "kernel" in value and not isinstance(value["kernel"], Mapping):
            value = fn(path, value)
        out[key] = value
    return out


def has_adapter(module: Mapping) -> bool:
    return LORA_A in module and LORA_B in module


def filter_leaves(params: Mapping, keep: Callable[[str], bool]) -> Params:
    """The sub-tree of leaves whose own key satisfies `keep`; empty dicts are pruned."""
    out = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            sub = filter_leaves(value, keep)
            if sub:
                out[key] = sub
        elif keep(key):
            out[key] = value
    return out


def deep_merge(a: Mapping, b: Mapping) -> Params:
    """Union of two trees with disjoint leaves; a leaf present in both is an error."""
    out = dict(a)
    for key, value in b.items():
        if key in out and isinstance(out[key], Mapping) and isinstance(value, Mapping):
            out[key] = deep_merge(out[key], value)
        elif key in out:
            raise ValueError(f"combine: leaf {key!r} is in both trees; pass a base without "
                             "adapters and an adapter tree from lora_params/split.")
        else:
            out[key] = value
    return out


def key_path_str(path: Any, sep: str = "/") -> str:
    """A `jax.tree_util` key path as text: `("a", 0, "kernel")` -> `"a/0/kernel"`."""
    return sep.join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p))))
                    for p in path)
