"""Partition rules: which mesh axes each parameter is split over, and placing parameters so.

A rule is `(regex, PartitionSpec)`, searched in order against a leaf's dotted path
(`model.layers.3.self_attn.q_proj.kernel`); the first match wins. The spec is written for one
layer's leaf; a stacked leaf of `nn.scan` (`[L, in, out]`) gets it padded with unsharded leading
axes. Adapter leaves have no rules of their own: their spec is *derived* from their kernel's
(`lora_a` keeps the input-dim spec, `lora_b` the output-dim spec, the rank dim and `lora_scale`
are replicated, and fsdp is dropped: see `derive_adapter_spec`), so a new target module needs no
new entry. This is the one adapter rule: lora_jax derives no specs, its loaders take these
shardings as `shardings=` (`param_shardings` of a tree, or `leaf_sharding`).

The layout is Megatron's, with FSDP on the other feature dim of every large matrix:
  column-parallel kernel [in, out]  -> (fsdp, tp)   q/k/v, gate/up, c_attn, c_fc, lm_head
  row-parallel kernel    [in, out]  -> (tp, fsdp)   o, down, c_proj
  vocabulary embedding   [V, d]     -> (tp, fsdp)   embed_tokens, wte
  everything else (norms, biases of row layers, positions) replicated.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from lora_jax.tree import ADAPTER_LEAVES, LORA_A, LORA_B, LORA_SCALE, NAMED, dotted
from lora_jax.tree import EMBEDDING, SAVED_PREFIX, is_saved_leaf
from lora_jax.tree import LORA_MAGNITUDE
from sharding.mesh import FSDP, TP, MeshError, axis_size


Rules = Sequence[tuple[str, P]]

# The layout of each role of `models/parallel.py`; the layers use these same specs for their
# shard_map operands, so a tree sharded by the rules enters them without resharding.
KERNEL_SPECS = {"column": P(FSDP, TP), "row": P(TP, FSDP), "replicated": P()}
BIAS_SPECS = {"column": P(TP), "row": P(), "replicated": P()}
# A quantised kernel's leaves (models/quant.py), split as the kernel is: codes and NF4 block
# scales keep its [in, out] layout, FP8's codes_t is [out, in] (the transposed spec), the
# per-channel scale follows the out axis. The shard_map layers use these for their operands.
QUANT_SPECS = {
    role: {"codes": KERNEL_SPECS[role], "absmax": KERNEL_SPECS[role],
           "codes_t": P(*reversed(KERNEL_SPECS[role])), "scale": P(KERNEL_SPECS[role][1])}
    for role in ("column", "row")}
EMBED_SPEC = P(TP, FSDP)

_COLUMN = r"(q_proj|k_proj|v_proj|gate_proj|up_proj|c_attn|c_fc|lm_head)"
_ROW = r"(o_proj|down_proj|c_proj)"

DEFAULT_RULES: Rules = (
    (rf"(^|\.){_COLUMN}\.kernel$", KERNEL_SPECS["column"]),
    (rf"(^|\.){_COLUMN}\.bias$", BIAS_SPECS["column"]),
    (rf"(^|\.){_ROW}\.kernel$", KERNEL_SPECS["row"]),
    # Quantised kernels (models/quant.py): codes and block scales keep the kernel's [in, out]
    # layout, FP8's codes_t is [out, in], per-channel scales follow the out axis; the double
    # quantisation's group scales and offset (a few floats per kernel) are replicated (.*).
    (rf"(^|\.){_COLUMN}\.kernel\.(codes|absmax)$", QUANT_SPECS["column"]["codes"]),
    (rf"(^|\.){_ROW}\.kernel\.(codes|absmax)$", QUANT_SPECS["row"]["codes"]),
    (rf"(^|\.){_COLUMN}\.kernel\.codes_t$", QUANT_SPECS["column"]["codes_t"]),
    (rf"(^|\.){_ROW}\.kernel\.codes_t$", QUANT_SPECS["row"]["codes_t"]),
    (rf"(^|\.){_COLUMN}\.kernel\.scale$", QUANT_SPECS["column"]["scale"]),
    (rf"(^|\.){_ROW}\.kernel\.scale$", QUANT_SPECS["row"]["scale"]),
    (r"(^|\.)(embed_tokens|wte)\.embedding$", EMBED_SPEC),
    (r".*", P()),
)


def spec_for(path: str, ndim: int, rules: Rules = DEFAULT_RULES) -> P:
    """The PartitionSpec of the leaf at dotted `path` with `ndim` axes.

    Example:
      >>> spec_for("model.layers.q_proj.lora_b", 3)   # stacked [L, r, out]
      PartitionSpec(None, None, 'tp')
    """
    module, _, leaf = path.rpartition(".")
    if is_saved_leaf(leaf):  # a modules_to_save copy sits where its original does
        return _match(f"{module}.{leaf[len(SAVED_PREFIX):]}" if module else leaf, ndim, rules)
    if leaf not in ADAPTER_LEAVES:
        return _match(path, ndim, rules)
    if leaf == LORA_SCALE:
        return P()
    # A named adapter (lora_jax.named) sits at `<module>.lora_named.<name>.<leaf>`: its kernel
    # is the module's, so it is placed exactly like the default adapter.
    module = re.sub(rf"(^|\.){NAMED}\.[^.]+$", "", module)
    if leaf == LORA_MAGNITUDE:  # [*S, out]: its kernel has one more axis
        kernel = _match(f"{module}.kernel" if module else "kernel", ndim + 1, rules)
        return derive_adapter_spec(kernel, leaf)
    kernel = _match(f"{module}.kernel" if module else "kernel", ndim, rules)
    if all(s is None for s in kernel):  # an embedding table [V, D] is a kernel [in, out] too
        kernel = _match(f"{module}.{EMBEDDING}" if module else EMBEDDING, ndim, rules)
    return derive_adapter_spec(kernel, leaf)


def derive_adapter_spec(kernel_spec: P, leaf: str) -> P:
    """`lora_a` [*S, in, r] from kernel [*S, in, out]: keep in's spec; `lora_b` [*S, r, out]: keep
    out's spec; the rank axis is never split (each device needs the whole rank).

    The fsdp axis is dropped: FSDP exists for the frozen base, which dominates memory; adapters
    are ~0.1-1% of it, and splitting them would add an all-gather to every layer's forward and a
    reduce-scatter to its backward. Over fsdp they are replicated, like over dp.
    """
    *stack, s_in, s_out = tuple(kernel_spec)
    if leaf == LORA_A:
        return P(*stack, _without(s_in, FSDP), None)
    if leaf == LORA_B:
        return P(*stack, None, _without(s_out, FSDP))
    if leaf == LORA_MAGNITUDE:  # DoRA's [*S, out]: one value per output feature, like B's out
        return P(*stack, _without(s_out, FSDP))
    raise ValueError(f"{leaf!r} is not an adapter leaf with a kernel-derived spec")


def _without(entry: Any, axis: str) -> Any:
    """A spec entry (None, an axis name, or a tuple of names) with `axis` removed."""
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    kept = tuple(n for n in names if n != axis)
    return None if not kept else kept[0] if len(kept) == 1 else kept


def _match(path: str, ndim: int, rules: Rules) -> P:
    for pattern, spec in rules:
        if re.search(pattern, path):
            if len(spec) > ndim:
                raise MeshError(f"rule {pattern!r} gives {spec} ({len(spec)} axes) to {path!r}, "
                                f"which has {ndim}: fix the rule's regex or spec")
            # Rules describe one layer; scanned stacks add leading layer axes, kept whole so
            # every device holds its slice of every layer.
            return P(*([None] * (ndim - len(spec))), *spec)
    raise MeshError(f"no partition rule matches {path!r}: end the rules with ('.*', P())")


def param_specs(tree: Any, rules: Rules = DEFAULT_RULES) -> Any:
    """A tree of PartitionSpecs shaped like `tree` (arrays, `jax.ShapeDtypeStruct`s, or any
    leaves with `.shape`), e.g. params, Linen variables, or an optimizer state."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: spec_for(dotted(kp), len(_shape(x)), rules), tree)


def param_shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """`NamedSharding`s for `tree`; raises `MeshError` naming any leaf the mesh does not divide.

    Example:
      >>> abstract = jax.eval_shape(model.init, key, tokens)
      >>> shardings = param_shardings(abstract, mesh)
    """
    one = leaf_sharding(mesh, rules)
    return jax.tree_util.tree_map_with_path(lambda kp, x: one(dotted(kp), _shape(x)), tree)


def leaf_sharding(mesh: Mesh,
                  rules: Rules = DEFAULT_RULES) -> Callable[[str, tuple], NamedSharding]:
    """`param_shardings` one leaf at a time: `fn(dotted_path, shape) -> NamedSharding`, for
    loaders that place each leaf as they read it when no tree of the leaves is at hand
    (`models.load_hf`, `lora_jax.load_adapter` and `import_peft` take it as `shardings=`).

    Example:
      >>> params = lora_jax.load_adapter("ckpt/adapter", base, shardings=leaf_sharding(mesh))
    """
    def one(path: str, shape: tuple[int, ...]) -> NamedSharding:
        spec = spec_for(path, len(shape), rules)
        check_divisible(path, tuple(shape), spec, mesh)
        return NamedSharding(mesh, spec)

    return one


def check_divisible(path: str, shape: tuple[int, ...], spec: P, mesh: Mesh) -> None:
    """Raise `MeshError` if an axis of `shape` does not split evenly as `spec` asks."""
    for dim, (size, axes) in enumerate(zip(shape, tuple(spec))):
        parts = 1 if axes is None else axis_size(mesh, axes)
        if size % parts and path.endswith(".kernel.absmax") and dim == len(shape) - 2:
            raise MeshError(f"{path} has shape {shape}: NF4 keeps one scale per 64 input "
                            f"features, and axis {dim} ({size} blocks) is split over {axes} = "
                            f"{parts} devices, so each device needs in / {parts} to be a multiple "
                            f"of 64: choose a {axes} size dividing {size}, or quantize='int8' / "
                            "'fp8'")
        if size % parts:
            raise MeshError(f"{path} has shape {shape}; axis {dim} ({size}) is split over {axes} "
                            f"= {parts} devices but is not divisible by {parts}: choose mesh sizes "
                            f"that divide {size}, or pad that dimension (e.g. the vocabulary) to a "
                            f"multiple of {parts}")


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def shard_params(params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Place a tree (numpy arrays from a checkpoint, or jax arrays) on `mesh` by the rules.

    Host arrays go through `jax.make_array_from_callback`, so each device receives only its own
    slice (no full copy on any one device) and it works with several processes, each holding the
    host tree. Jax arrays are resharded with `jax.device_put`.

    Example:
      >>> params = shard_params(load_safetensors(path), mesh)
    """
    def place(x, sharding):
        if isinstance(x, jax.Array):
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, params, param_shardings(params, mesh, rules))


def init_sharded(fn: Callable[..., Any], *args: Any, mesh: Mesh,
                 rules: Rules = DEFAULT_RULES) -> Any:
    """Run a parameter-producing `fn(*args)` (e.g. `model.init`, or `inject`) under `jax.jit`
    with output shardings from the rules, so every leaf is born split: `jax.eval_shape` gives the
    shapes, the rules the shardings, and XLA computes each device's shard only.

    Example:
      >>> variables = init_sharded(model.init, jax.random.key(0), tokens, mesh=mesh)
    """
    abstract = jax.eval_shape(fn, *args)
    return jax.jit(fn, out_shardings=param_shardings(abstract, mesh, rules))(*args)
