"""The tree utilities of lora_jax (and of `sharding` and the examples, which sit above it).

A *module* here is a dict that holds a `kernel` leaf (what `nn.Dense` and `nn.DenseGeneral`
create). Its dotted path joins the dict keys from the root, e.g. `model.layers.0.self_attn.q_proj`.

    modules     iter_modules, modules_of, map_modules, has_adapter
    leaves      map_leaves, filter_leaves, count, deep_merge, nest, as_dict, unwrap_variables
    paths       dotted (a jax key path as `a.b.0`)
    arrays      abstract (restore targets), host_array (gathered across processes)

`models` cannot import these (it knows nothing of lora_jax) and uses `flax.traverse_util`.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np

LORA_A, LORA_B, LORA_SCALE = "lora_a", "lora_b", "lora_scale"
# DoRA's trained magnitude `[*S, *out]` (only with LoraConfig(use_dora=True); optional: code that
# walks ADAPTER_LEAVES must skip a leaf a module does not hold).
LORA_MAGNITUDE = "lora_magnitude"
# Several named adapters (lora_jax.named): the "default" adapter's leaves sit beside the kernel
# as above; any other adapter's leaves sit in `module[NAMED][name]` under the same leaf names.
NAMED, DEFAULT_ADAPTER = "lora_named", "default"
EMBEDDING = "embedding"  # an `nn.Embed` table [num, dim]; LoRA on it keeps the leaf names above
# `modules_to_save`: a trained copy of a module's leaf `x` sits beside it as `saved_x`.
SAVED_PREFIX = "saved_"


def is_saved_leaf(key: Any) -> bool:
    """True for a `modules_to_save` copy (`saved_kernel`, `saved_embedding`, `saved_bias`...)."""
    return isinstance(key, str) and key.startswith(SAVED_PREFIX)


class LeafNames(tuple):
    """The adapter / trainable leaf names, whose `in` also holds every `saved_*` copy: a
    `modules_to_save` copy is trained, split, checkpointed and stripped like `lora_a`, so the
    `key in ADAPTER_LEAVES` tests everywhere carry it; iterating gives the named leaves only."""

    def __contains__(self, key: object) -> bool:
        return tuple.__contains__(self, key) or is_saved_leaf(key)


ADAPTER_LEAVES = LeafNames((LORA_A, LORA_B, LORA_SCALE, LORA_MAGNITUDE))
TRAINABLE_LEAVES = LeafNames((LORA_A, LORA_B, LORA_MAGNITUDE))

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


def iter_modules(params: Mapping, prefix: str = "", *,
                 leaves: Sequence[str] = ("kernel",)) -> Iterator[tuple[str, Mapping]]:
    """Yield `(dotted_path, module_dict)` for every dict holding a leaf named in `leaves`
    (default: a `kernel`), parents before children.

    Example:
      >>> [path for path, _ in iter_modules(params)]
      ['model.layers.0.self_attn.q_proj', ...]
    """
    for key, value in params.items():
        if not isinstance(value, Mapping):
            continue
        path = f"{prefix}.{key}" if prefix else str(key)
        if any(k in value and not isinstance(value[k], Mapping) for k in leaves):
            yield path, value
        yield from iter_modules(value, path, leaves=leaves)


def modules_of(tree: Mapping) -> dict[str, Mapping]:
    """`{dotted_path: module_dict}` for dicts holding a `kernel` or an adapter leaf (an adapter
    tree from `lora_params` has no kernels)."""
    return dict(iter_modules(tree, leaves=("kernel", *ADAPTER_LEAVES)))


def adapter_modules(tree: Mapping) -> dict[str, Mapping]:
    """`{dotted_path: module_dict}` for every module a checkpoint may concern: dicts holding a
    kernel, an embedding table, a norm scale or bias, or any adapter leaf (`saved_*` copies
    included)."""
    def holds(module: Mapping) -> bool:
        return any(not isinstance(v, Mapping) and (k in ADAPTER_LEAVES or k in (
            "kernel", EMBEDDING, "scale", "bias")) for k, v in module.items())

    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            sub = {f"{key}.{p}": m for p, m in adapter_modules(value).items()}
            out.update({str(key): value} if holds(value) else {})
            out.update(sub)
    return out


def map_modules(params: Mapping, fn: Callable[[str, Params], Params], prefix: str = "", *,
                leaves: Sequence[str] = ("kernel",)) -> Params:
    """Rebuild the tree, replacing each module dict holding a leaf named in `leaves` (default: a
    `kernel`) by `fn(path, module)`."""
    out = {}
    for key, value in params.items():
        if not isinstance(value, Mapping):
            out[key] = value
            continue
        path = f"{prefix}.{key}" if prefix else str(key)
        value = map_modules(value, fn, path, leaves=leaves)
        if any(k in value and not isinstance(value[k], Mapping) for k in leaves):
            value = fn(path, value)
        out[key] = value
    return out


def has_adapter(module: Mapping) -> bool:
    return LORA_A in module and LORA_B in module


def is_embedding(module: Mapping) -> bool:
    """An `nn.Embed` module dict: an `embedding` table and no `kernel`."""
    return EMBEDDING in module and "kernel" not in module


def saved_leaves(module: Mapping) -> dict[str, Any]:
    """`{leaf name: trained copy}` of a module's `modules_to_save` copies (`saved_x` -> `x`)."""
    return {k[len(SAVED_PREFIX):]: v for k, v in module.items() if is_saved_leaf(k)}


def use_saved(params: Mapping, keep: Sequence[str] = ()) -> Params:
    """The tree with every `modules_to_save` copy in place of its original (`saved_kernel`
    becomes `kernel`, and so on): what the model runs and what `merge` keeps. Differentiable:
    gradients reach the copies. Copies of the leaves named in `keep` stay beside their
    originals (`lora_jax.apply` keeps `saved_embedding`: a tied head may read the original).

    Example:
      >>> use_saved({"lm_head": {"kernel": k0, "saved_kernel": k1}})
      {'lm_head': {'kernel': k1}}
    """
    out = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            value = use_saved(value, keep)
            saved = {k: v for k, v in saved_leaves(value).items() if k not in keep}
            if saved:
                value = {**{k: v for k, v in value.items()
                            if not is_saved_leaf(k) or k[len(SAVED_PREFIX):] in keep}, **saved}
        out[key] = value
    return out


def map_leaves(tree: Mapping, fn: Callable[[str, Any], Any]) -> Params:
    """The nested dict `tree` with each leaf replaced by `fn(its own key, leaf)`.

    Example:
      >>> map_leaves(params, lambda key, _: key in TRAINABLE_LEAVES)   # a mask
    """
    return {k: map_leaves(v, fn) if isinstance(v, Mapping) else fn(k, v) for k, v in tree.items()}


def count(tree: Any) -> int:
    """Number of scalars in a tree. A quantised kernel (a pytree with `dequantize`, from
    `models.quant`) counts as the kernel it stands for (`prod(shape)`), not as its packed codes
    and scales: an NF4 kernel's codes hold two weights per byte, so the leaf sizes would count
    half of it (PEFT counts a 4-bit layer's weights the same way)."""
    is_quantized = lambda x: hasattr(x, "dequantize")  # noqa: E731
    return sum(int(np.prod(x.shape)) if is_quantized(x) else int(np.size(x))
               for x in jax.tree_util.tree_leaves(tree, is_leaf=is_quantized))


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


def nest(modules: Mapping[str, Mapping]) -> Params:
    """`{dotted module path: {leaf: value}}` -> the nested tree holding those modules.

    Example:
      >>> nest({"a.q": {"lora_a": x}})
      {'a': {'q': {'lora_a': x}}}
    """
    out: Params = {}
    for path, module in modules.items():
        node = out
        for key in path.split("."):
            node = node.setdefault(key, {})
        node.update(module)
    return out


def dotted(key_path: Sequence[Any], separator: str = ".") -> str:
    """`model.layers.0.kernel` from a jax key path (dict keys, attribute names, indices)."""
    return jax.tree_util.keystr(tuple(key_path), simple=True, separator=separator)


def abstract(tree: Any) -> Any:
    """`jax.ShapeDtypeStruct`s of a tree's leaves with their shardings: an orbax restore target.
    A leaf without a sharding (a host array) goes to the first local device; structs pass."""
    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)

    return jax.tree.map(leaf, tree)


def host_array(x: Any) -> np.ndarray:
    """A host copy of an array; one split over several processes is all-gathered first (every
    process must call it)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils  # only multi-process runs need it
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
