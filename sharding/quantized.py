"""Quantised frozen kernels (`models.quant`) as operands of the tensor-parallel shard_map layers.

A quantised kernel enters `shard_map` as its leaves, each split as the kernel is
(`sharding.rules.QUANT_SPECS`): a column layer's codes split `out` over tp, a row layer's split
`in` over tp, and FSDP splits the other feature dim. Inside, each device multiplies its shard
with `models.quant.quantized_matmul` (the one quantised matmul, whatever kernel runs behind it).

Per format, what crosses the shard_map boundary (local shapes of a column layer; a row layer
swaps which axis tp and fsdp split):
  nf4   codes uint8 [in/2/fsdp, out/tp], block scales float32 [in/64/fsdp, out/tp]
  int8  codes int8 [in/fsdp, out/tp], scale [out/tp]
  fp8   codes_t e4m3 [out/tp, in/fsdp], scale [out/tp]

Why NF4's scales are decoded outside: its double quantisation groups 256 block scales in
bitsandbytes' flat `[out, in/64]` order, so a group straddles the shards of a split kernel and
one device cannot decode its own blocks' scales. `Nf4Kernel.block_scales()` runs before the
shard_map (GSPMD, a per-call float32 array 1/32 of a bf16 kernel's size) and the kernel goes in
as an `Nf4Kernel` whose `absmax` is those float32 scales (no `absmax2`, no `offset`).

FSDP: the leaves are all-gathered inside, one layer at a time, under
`jax.checkpoint(nothing_saveable)` as `sharding.layers._base_matmul` does for a plain kernel, so
the backward gathers again rather than keeping them. What is gathered is the codes (NF4: a
quarter of bf16's bytes), never a dequantised kernel.

FP8 scales its activations per call by a per-tensor amax (`models.fp8`). Inside shard_map a
device sees a shard of the activation (batch over dp/fsdp, row layer's `in` over tp) and of the
output gradient, so the kernel carries `amax_axes`, the mesh axes those are split over, and the
amax is reduced over them (`pmax`): every device then scales by the single-device amax.
With `fp8_scaling="row"` the amax is per row of the last (feature) axis: it is reduced only
over the axes that split that axis (`Fp8Kernel.row_amax_axes`: a row layer's input x [.., in/tp],
a column layer's output gradient [.., out/tp]); axes that split tokens (dp, fsdp, sp) hold whole
rows, so each device's row scales are already the single-device ones.

`impl` (`models.quant.quantized_matmul`'s, "xla" or "pallas") rides in `LocalQuant`: under
"pallas" each device runs the fused dequantise-in-the-GEMM kernel (`models.quant_pallas`) on its
LOCAL shard, so whether it tiles (`quant_pallas.fits`) is judged on the local shape (a column
layer's `out/tp`, a row layer's `in/tp`); a shard that does not tile takes the XLA rules, as one
device does. Inside shard_map the pallas_call needs no SPMD rule: it sees per-device arrays.
Where the kernels run in Pallas interpret mode (no GPU: the CPU tests), the layer's shard_map
runs without its type check (`checks_types`), which JAX 0.10's Pallas interpreter cannot pass.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh, PartitionSpec as P

from models.quant import NF4_BLOCK, Fp8Kernel, Nf4Kernel, check_impl, quantized_matmul
from sharding.compat import all_gather
from sharding.mesh import FSDP, MeshError, axis_size
from sharding.rules import QUANT_SPECS


@dataclasses.dataclass(frozen=True)
class LocalQuant:
    """What the shard_map body needs to rebuild and use a quantised kernel from its leaves
    (static, hashable): the pytree structure, per leaf the axis FSDP splits (or None), and the
    `quantized_matmul` impl each device multiplies its shard with."""

    treedef: Any
    fsdp_axes: tuple[int | None, ...]
    fp8_scaling: str = "tensor"  # `quantized_matmul`'s; "row": per-token FP8 scales
    impl: str = "xla"


def operand(kernel: Any, role: str, mesh: Mesh, *, layer: str,
            amax_axes: tuple[str, ...] = (),
            row_amax_axes: tuple[tuple[str, ...], tuple[str, ...]] = ((), ()),
            fp8_scaling: str = "tensor", impl: str = "xla"
            ) -> tuple[tuple[jax.Array, ...], tuple[P, ...], LocalQuant]:
    """A quantised kernel as shard_map operands: (leaves, their specs, how to rebuild it).

    Args:
      kernel: an `Nf4Kernel` / `Int8Kernel` / `Fp8Kernel` of shape [in, out] (global).
      role: "column" or "row" (`models.parallel`).
      mesh: the (dp, fsdp, tp) mesh.
      layer: the layer's name, for errors.
      amax_axes: mesh axes the activation or output gradient is split over (FP8's amax).
      row_amax_axes: (axes splitting the activation's last axis, axes splitting the output
        gradient's last axis): FP8's per-row amax under `fp8_scaling="row"`.
      fp8_scaling: "tensor" | "row", handed to `quantized_matmul` inside.
      impl: how each device multiplies its shard: "xla" or "pallas" (`quantized_matmul`).

    Raises:
      MeshError: a leaf does not split evenly over the mesh (the message names the fix).
      ValueError: an unknown role or impl, or a kernel that is not [in, out].

    Example:
      >>> leaves, specs, local = operand(q, "row", mesh, layer="mlp.down_proj")
    """
    check_impl(impl)
    if role not in QUANT_SPECS:
        raise ValueError(f"{layer}: a quantised kernel has no {role!r} layout; the shard_map "
                         f"layers take one as {sorted(QUANT_SPECS)}")
    if kernel.ndim != 2:
        raise ValueError(f"{layer}: the tensor-parallel layers take one [in, out] kernel, got a "
                         f"{kernel.format} kernel of shape {kernel.shape}")
    if isinstance(kernel, Nf4Kernel) and kernel.absmax2 is not None:
        kernel = Nf4Kernel(kernel.codes, kernel.block_scales(), None, None, dtype=kernel.dtype)
    if isinstance(kernel, Fp8Kernel):
        kernel = kernel.replace(amax_axes=tuple(amax_axes),
                                row_amax_axes=tuple(tuple(a) for a in row_amax_axes))
    named, treedef = jax.tree_util.tree_flatten_with_path(kernel)
    names = [path[-1].name for path, _ in named]
    specs = tuple(QUANT_SPECS[role][n] for n in names)
    leaves = tuple(leaf for _, leaf in named)
    for name, leaf, spec in zip(names, leaves, specs):
        _check_split(layer, kernel, name, leaf.shape, spec, mesh)
    fsdp_axes = tuple(_axis_of(spec, FSDP) for spec in specs)
    return leaves, specs, LocalQuant(treedef, fsdp_axes, fp8_scaling, impl)


def matmul(x: jax.Array, leaves: tuple[jax.Array, ...], local: LocalQuant,
           sizes: dict[str, int]) -> jax.Array:
    """Inside shard_map: `x @ W` for this device's shard of a quantised `W`, its leaves first
    all-gathered over fsdp (inside `jax.checkpoint`, so the backward gathers them again).

    Runs `local.impl`'s kernel on the local (gathered) shard. Returns the result in x's dtype
    (the layer's compute dtype)."""
    def run(x, leaves):
        if sizes[FSDP] > 1:
            leaves = [leaf if axis is None else all_gather(leaf, FSDP, axis=axis)
                      for leaf, axis in zip(leaves, local.fsdp_axes)]
        return quantized_matmul(x, jax.tree.unflatten(local.treedef, leaves), x.dtype,
                                local.impl, fp8_scaling=local.fp8_scaling)

    if sizes[FSDP] == 1:
        return run(x, leaves)
    return jax.checkpoint(run, policy=jax.checkpoint_policies.nothing_saveable)(x, list(leaves))


def checks_types(impl: str) -> bool:
    """Whether a tensor-parallel layer multiplying a quantised kernel with `impl` can run its
    shard_map with the varying-axes type check (`check_vma`) on.

    Not when the Pallas kernels will interpret (impl="pallas" on a backend without a GPU):
    JAX 0.10's Pallas HLO interpreter evaluates the kernel body, traced on untyped blocks, on
    operands typed as varying over the mesh axes, and its loops and ops then refuse the mixed
    types ("Scan carry input and output got mismatched varying manual axes"). Unchecked, the
    layer is still exact (shard_map's untyped transposes; tests/test_quant_tp_pallas.py checks
    values and gradients), it only issues more all-reduces in the backward (the row layer 3
    instead of 1). On a GPU the kernels lower to Triton, which takes the typed operands, so the
    check stays on and the program is the XLA impl's with the kernel swapped in.
    """
    if impl != "pallas":
        return True
    from models import quant_pallas  # imported here, as models.quant does: it is optional
    return not quant_pallas.interprets()


def _axis_of(spec: P, name: str) -> int | None:
    """The index of the dim of `spec` split over mesh axis `name`, or None."""
    for i, entry in enumerate(spec):
        if entry == name or (isinstance(entry, tuple) and name in entry):
            return i
    return None


def _check_split(layer: str, kernel: Any, leaf: str, shape: tuple[int, ...], spec: P,
                 mesh: Mesh) -> None:
    n_in, n_out = kernel.shape
    for dim, (size, axes) in enumerate(zip(shape, spec)):
        parts = 1 if axes is None else axis_size(mesh, axes)
        if size % parts == 0:
            continue
        where = (f"{layer}: its {kernel.format} kernel [in={n_in}, out={n_out}] does not split "
                 f"over the mesh ({dict(mesh.shape)}): the leaf {leaf} {tuple(shape)} has axis "
                 f"{dim} ({size}) split over {axes} = {parts} devices")
        if kernel.format == "nf4" and leaf in ("absmax", "codes") and size in (
                n_in // NF4_BLOCK, n_in // 2):
            raise MeshError(f"{where}. NF4 keeps one scale per {NF4_BLOCK} input features, so "
                            f"each device needs whole blocks: in / {parts} must be a multiple of "
                            f"{NF4_BLOCK}. Choose a {axes} size dividing in / {NF4_BLOCK} = "
                            f"{n_in // NF4_BLOCK}, or quantize='int8' / 'fp8'.")
        raise MeshError(f"{where}. Choose a {axes} size dividing {size}, or quantize=None.")
