"""Tensor- and sequence-parallel linear layers (Megatron), written with `shard_map`, LoRA-aware.

Each layer has `nn.Dense`'s parameter tree (`kernel` [in, out], `bias` [out]) and adds the LoRA
adapter it finds in its own scope (`lora_a` [in, r], `lora_b` [r, out], `lora_scale` []):
    y = x @ kernel + bias + lora_scale * (dropout(x) @ lora_a) @ lora_b
They are not `nn.Dense` subclasses on purpose: `lora_jax.apply` intercepts `nn.Dense` calls to add
adapters, and these layers add theirs inside the shard_map, where the row-parallel partial
product lives. The adapter math, dropout (rate and switch as `lora_jax.apply` set them), dtype
rule and remat names are `lora_jax.adapter_op`'s; this module only places its halves around the
collectives.

Column-parallel (kernel split on out over tp): x is whole on every tp device, the output stays
split on out. A is replicated, B split like the kernel: no collective in the forward pass.
Row-parallel (kernel split on in over tp): x arrives split on in; each device forms
`x_i @ K_i + s (x_i @ A_i) @ B`, and the one psum (or, with sequence parallelism, psum_scatter
over the sequence) sums base and adapter together: LoRA costs no extra communication.
Sequence parallelism: the layer input of a column layer arrives split on the sequence over tp
and is all-gathered inside; a row layer's output leaves reduce-scattered on the sequence.
FSDP: frozen kernels are stored split over fsdp on their other feature dim and all-gathered
inside, one layer at a time (again in the backward pass, rather than kept); they get no gradient,
so nothing is scattered back. Adapters are not split over fsdp (see
`sharding.rules.derive_adapter_spec`).
Quantised kernels (`quant=`, `models.quant`): the leaves enter split like the kernel and each
device runs `quantized_matmul` on its shard (`sharding.quantized`); the param tree is
`QuantDense`'s. `quant_impl="pallas"` runs the fused NF4 / int8 kernel on each local shard.
`fp8_scaling="row"`: an FP8 kernel scales x and dy per token row, the row amax reduced only over
the axes splitting the row (`sharding.quantized`).
Collective matmul (`collective_matmul=True`, sequence parallelism only): the column layer's
all-gather and the row layer's reduce-scatter become rings of ppermutes interleaved with the
base matmul's chunks (`sharding.collective_matmul`); taken only for a plain kernel without
FSDP (a quantised or fsdp-split kernel, or DoRA on a row layer, keeps the plain collectives).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax.sharding import Mesh, PartitionSpec as P

from lora_jax.adapter_op import (Adapter, adapt, adapter_in, adapter_out, add_delta,
                                 compute_dtype, dropout, name_output, read_adapter,
                                 MixedBatch, as_stacked, current_mixed, is_stacked, mixed_delta)
from lora_jax.errors import LoraError
from lora_jax.tree import LORA_A, LORA_B
from lora_jax import dora
from lora_jax.tree import LORA_MAGNITUDE
from models.quant import check_format, check_impl, is_quantized, quantize, quantized_matmul
from sharding import quantized
from sharding.collective_matmul import gather_and_matmul, matmul_reducescatter
from sharding.compat import all_gather, shard_map, to_varying
from sharding.mesh import (BATCH_AXES, FSDP, TP, MeshError, axis_size, axis_sizes,
                           check_sequence_fits, drop_trivial_axes)
from sharding.rules import BIAS_SPECS, KERNEL_SPECS, derive_adapter_spec

Lora = tuple[jax.Array, jax.Array, jax.Array]  # an Adapter: (lora_a [in, r], lora_b [r, out], s [])


def batch_axes(mesh: Mesh, batch: int) -> tuple[str, ...] | None:
    """The batch's mesh axes: dp x fsdp, or none when the batch does not split (e.g. the batch of
    one that `model.init` is often traced with), which is correct, only not parallel."""
    return BATCH_AXES if batch % axis_size(mesh, BATCH_AXES) == 0 else None


def activation_spec(mesh: Mesh, shape: tuple[int, ...], *, seq_split: bool = False,
                    feature_split: bool = False) -> P:
    """Spec of an activation `[batch, (seq,) ..., features]`: batch over dp x fsdp, the sequence
    (axis 1) over tp when `seq_split`, the last axis over tp when `feature_split`."""
    if seq_split:
        check_sequence_shape(mesh, shape)
    middle = [None] * (len(shape) - 2)
    if seq_split:
        middle[0] = TP
    return P(batch_axes(mesh, shape[0]), *middle, TP if feature_split else None)


def check_sequence_shape(mesh: Mesh, shape: tuple[int, ...]) -> None:
    """Sequence parallelism needs `[batch, seq, features]` with seq divisible by tp."""
    if len(shape) != 3:
        raise MeshError(f"sequence parallelism needs [batch, seq, features] activations, got "
                         f"shape {shape}")
    check_sequence_fits(mesh, shape[1])


# ---------------------------------------------------------------------------------------------
# Pure functions: global arrays in, global arrays out; shard_map inside.


def column_parallel(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
                    lora: Lora | None = None, *, mesh: Mesh, sequence_parallel: bool = False,
                    lora_x: jax.Array | None = None, lora_dtype: Any = None,
                    mixed: MixedBatch | None = None, name: str = "column_parallel",
                    collective_matmul: bool = False, quant_impl: str = "xla",
                    fp8_scaling: str = "tensor") -> jax.Array:
    """`x @ kernel + bias + s (lora_x @ A) @ B` with the kernel's output features split over tp.

    `kernel` may be stored quantised (`models.quant`: NF4, int8, FP8): each device multiplies
    its shard with `quantized_matmul(..., impl=quant_impl)` (see `sharding.quantized`: "pallas"
    runs the fused kernel on the local shard when it tiles); `name` labels its errors;
    `fp8_scaling` ("tensor" | "row") is how an FP8 kernel scales x and the output gradient.

    With `mixed` (a mixed batch), lora holds N stacked adapters (A [N, in, r], B [N, r, out],
    s [N]) and row i runs adapter `mixed.index[i]`; the index is split like x's rows.

    Global shapes: x [B, S, in] (any [B, ..., in] without sequence parallelism), kernel
    [in, out], bias [out], lora (A [in, r], B [r, out], s []); returns [B, S, out] split on out.
    `lora_x` is the adapter's input (x after LoRA dropout); None means x.

    Local shapes under shard_map (bd = dp*fsdp, with S/tp on input under sequence parallelism):
      x [B/bd, S(/tp), in] -> all-gather over tp (SP) -> [B/bd, S, in]
      kernel [in/fsdp, out/tp] -> all-gather over fsdp -> [in, out/tp] (just for the matmul)
      bias [out/tp]
      A [in, r];  B [r, out/tp];  s []
      y [B/bd, S, out/tp]

    `collective_matmul` (with `sequence_parallel`): the gather of x runs as a ring of ppermutes,
    each step's transfer overlapping the previous chunk's base matmul
    (`sharding.collective_matmul.allgather_matmul`); the adapter reads the x the ring gathered.
    Ignored (the plain gather) for a quantised kernel or under FSDP.
    """
    x_spec = activation_spec(mesh, x.shape, seq_split=sequence_parallel)
    out_spec = P(x_spec[0], *([None] * (x.ndim - 2)), TP)
    body = functools.partial(_column_local, sequence_parallel=sequence_parallel,
                             sizes=axis_sizes(mesh), lora_dtype=lora_dtype,
                             mixed_method=None if mixed is None else mixed.method,
                             collective_matmul=collective_matmul)
    return _run(body, mesh, "column", x, kernel, bias, lora, lora_x, x_spec, out_spec, mixed,
                name, quant_impl=quant_impl, fp8_scaling=fp8_scaling)


def row_parallel(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None,
                 lora: Lora | None = None, *, mesh: Mesh, sequence_parallel: bool = False,
                 lora_x: jax.Array | None = None, lora_dtype: Any = None,
                 mixed: MixedBatch | None = None, name: str = "row_parallel",
                 collective_matmul: bool = False, quant_impl: str = "xla",
                 fp8_scaling: str = "tensor") -> jax.Array:
    """`x @ kernel + bias + s (lora_x @ A) @ B` with the kernel's input features split over tp.

    `kernel` may be stored quantised, as `column_parallel` says (`quant_impl` and `fp8_scaling`
    likewise; the fused kernel's tiling is judged on the local [in/tp, out] shard).

    With `mixed`: N stacked adapters, one per row as `column_parallel` says; each device adds
    its rows' partial `s[k] (x_i A_i[k]) B[k]` before the one reduction, as for one adapter.

    Global shapes: x [B, S, in] split on in, kernel [in, out], bias [out], lora (A [in, r],
    B [r, out], s []); returns [B, S, out], split on S over tp under sequence parallelism.

    Local shapes under shard_map (bd = dp*fsdp):
      x [B/bd, S, in/tp];  kernel [in/tp, out/fsdp] -> all-gather over fsdp -> [in/tp, out]
      A [in/tp, r];  B [r, out];  s [];  bias [out]
      partial = x @ K + s (x @ A) @ B        [B/bd, S, out], one term per tp device
      y = psum(partial) + bias               [B/bd, S, out]
        or psum_scatter over S (SP) + bias   [B/bd, S/tp, out]

    `collective_matmul` (with `sequence_parallel`): the partial product is formed one sequence
    chunk at a time and summed while it travels the ring
    (`sharding.collective_matmul.matmul_reducescatter`), the adapter's partial added to each
    chunk before it leaves: still one reduction for base and LoRA. Ignored (the plain
    psum_scatter) for a quantised kernel, under FSDP, or with DoRA.
    """
    x_spec = activation_spec(mesh, x.shape, feature_split=True)
    middle = [None] * (x.ndim - 2)
    if sequence_parallel:
        check_sequence_shape(mesh, x.shape)
        middle[0] = TP  # the output leaves reduce-scattered on the sequence
    out_spec = P(x_spec[0], *middle, None)
    body = functools.partial(_row_local, sequence_parallel=sequence_parallel,
                             sizes=axis_sizes(mesh), lora_dtype=lora_dtype,
                             mixed_method=None if mixed is None else mixed.method,
                             collective_matmul=collective_matmul)
    return _run(body, mesh, "row", x, kernel, bias, lora, lora_x, x_spec, out_spec, mixed, name,
                quant_impl=quant_impl, fp8_scaling=fp8_scaling)


def _run(body, mesh, role, x, kernel, bias, lora, lora_x, x_spec, out_spec, mixed=None,
         name=None, quant_impl="xla", fp8_scaling="tensor"):
    """shard_map `body` over the operands that are present, with the role's specs (axes of size
    1 dropped: see `drop_trivial_axes`). A quantised kernel goes in as its leaves, with the
    `quant_impl` its shards multiply with (checked here whatever the kernel, so a typo is
    refused before it meets a quantised one)."""
    check_impl(quant_impl)
    prune = functools.partial(drop_trivial_axes, mesh=mesh)
    ops, specs = {"x": x, "kernel": kernel}, {"x": x_spec, "kernel": KERNEL_SPECS[role]}
    if is_quantized(kernel):
        if getattr(lora, "magnitude", None) is not None:
            raise LoraError(f"{name}: DoRA's weight norm over a quantised base is not "
                            "supported; use plain LoRA, or load the base unquantised.")
        # FP8's activation amax is reduced over every axis the input or the output (hence the
        # output gradient) is split on: see sharding.quantized.
        split_on = _mesh_axes_of(prune(x_spec), prune(out_spec))
        # Per-row amax: only the axes splitting x's / the output's (so dy's) last axis.
        rows_split_on = tuple(_mesh_axes_of(P(prune(s)[-1])) for s in (x_spec, out_spec))
        ops["kernel"], specs["kernel"], local = quantized.operand(
            kernel, role, mesh, layer=name or role, amax_axes=split_on,
            row_amax_axes=rows_split_on, fp8_scaling=fp8_scaling, impl=quant_impl)
        body = functools.partial(body, quant=local)
    if bias is not None:
        ops["bias"], specs["bias"] = bias, BIAS_SPECS[role]
    if lora is not None:
        ops["lora"] = tuple(lora)[:3]
        specs["lora"] = (derive_adapter_spec(KERNEL_SPECS[role], LORA_A),
                         derive_adapter_spec(KERNEL_SPECS[role], LORA_B), P())
        if getattr(lora, "magnitude", None) is not None:  # DoRA
            if mixed is not None:
                raise LoraError("DoRA adapters do not run in mixed batches (adapter_index=): "
                                "run each DoRA adapter on its own batch.")
            ops["magnitude"] = lora.magnitude
            specs["magnitude"] = derive_adapter_spec(KERNEL_SPECS[role], LORA_MAGNITUDE)
        if lora_x is not None:
            ops["lora_x"], specs["lora_x"] = lora_x, x_spec
        if mixed is not None:  # the adapter axis whole on every device; the index with the rows
            a_spec, b_spec, _ = specs["lora"]
            specs["lora"] = (P(None, *a_spec), P(None, *b_spec), P())
            ops["index"], specs["index"] = mixed.index, P(x_spec[0])
    specs = jax.tree.map(prune, specs, is_leaf=lambda s: isinstance(s, P))
    fn = shard_map(body, mesh=mesh, in_specs=(specs,), out_specs=prune(out_spec),
                   check_vma=not is_quantized(kernel) or quantized.checks_types(quant_impl))
    return fn(ops)


def _mesh_axes_of(*specs: P) -> tuple[str, ...]:
    """The mesh axis names the specs split on, each once, in order of appearance."""
    names: list[str] = []
    for spec in specs:
        for entry in spec:
            for axis in (() if entry is None else (entry,) if isinstance(entry, str) else entry):
                if axis not in names:
                    names.append(axis)
    return tuple(names)


def _column_local(ops, *, sequence_parallel, sizes, lora_dtype, mixed_method=None, quant=None,
                  collective_matmul=False):
    x, tp = ops["x"], sizes[TP] > 1
    ring = _use_ring(collective_matmul, sequence_parallel, sizes, quant)
    if ring:
        # The ring gathers x as it multiplies: the adapter below reads the gathered x it built.
        y, x = gather_and_matmul(x, ops["kernel"], TP)
    elif sequence_parallel and tp:
        x = all_gather(x, TP, axis=1)
    elif tp:
        # x is replicated over tp; cast it to varying once so that the base and the adapter
        # share one psum of the input gradient in the backward pass.
        x = to_varying(x, TP)
    if not ring:
        y = _base_matmul(x, ops["kernel"], 0, sizes, quant)
    if "bias" in ops:
        y = y + ops["bias"]
    if "index" in ops:  # a mixed batch: this device's rows, each with its own adapter
        x_in = x
        if "lora_x" in ops:  # dropout's input, gathered / cast like x
            x_in = (all_gather(ops["lora_x"], TP, axis=1) if sequence_parallel and tp
                    else to_varying(ops["lora_x"], TP) if tp else ops["lora_x"])
        delta = mixed_delta(x_in, Adapter(*ops["lora"]), MixedBatch(ops["index"], mixed_method),
                            in_axes=(x_in.ndim - 1,), dtype=lora_dtype)
        return name_output(add_delta(y, delta))
    if "lora" in ops:
        a, b, scale = ops["lora"]
        if "lora_x" in ops:  # dropout: gather the rank-r product, not a second activation
            gather = None if not tp else (
                functools.partial(all_gather, axis_name=TP, axis=1) if sequence_parallel
                else functools.partial(to_varying, axis=TP))
            h = adapter_in(ops["lora_x"], a, scale, dtype=lora_dtype, gather=gather)
        else:
            h = adapter_in(x, a, scale, dtype=lora_dtype)
        delta = adapter_out(h, b, lora_dtype)
        if "magnitude" in ops:
            delta = _dora_column(ops, y if "bias" not in ops else y - ops["bias"], delta,
                                 sequence_parallel=sequence_parallel, sizes=sizes,
                                 lora_dtype=lora_dtype)
        y = name_output(add_delta(y, delta))
    return y


def _dora_column(ops, base, delta, *, sequence_parallel, sizes, lora_dtype):
    """DoRA's term on a column-parallel layer's local output columns: the norm of each local
    column is local (the kernel gathered over fsdp, no gradient), no collective on the output.
    Local shapes: kernel [in/fsdp, out/tp] -> [in, out/tp]; magnitude, g [out/tp]."""
    a, b, scale = ops["lora"]
    kernel = _gathered_for_norm(ops["kernel"], 0, sizes)
    g = dora.factor(ops["magnitude"], dora.weight_norm_sq(kernel, a, b, scale))
    if "lora_x" in ops:  # under dropout PEFT's base is x_d @ W: gather x_d as the layer does x
        x_d = ops["lora_x"]
        if sizes[TP] > 1:
            x_d = all_gather(x_d, TP, axis=1) if sequence_parallel else to_varying(x_d, TP)
        base = _base_matmul(x_d, ops["kernel"], 0, sizes)
    return dora.output_term(base, delta, g, lora_dtype)


def _dora_row(ops, partial, delta, x_d, *, sizes, lora_dtype):
    """DoRA's term on a row-parallel layer's partial product: each device holds rows `in/tp` of
    the kernel, so its squared column norms are a partial sum, completed by one psum of an [out]
    vector; the term, linear in `partial` and `delta`, then rides the layer's one reduction.
    Local shapes: kernel [in/tp, out/fsdp] -> [in/tp, out]; A [in/tp, r]; magnitude, g [out]."""
    a, b, scale = ops["lora"]
    kernel = _gathered_for_norm(ops["kernel"], 1, sizes)
    norm_sq = dora.weight_norm_sq(kernel, a, b, scale)
    if sizes[TP] > 1:
        norm_sq = jax.lax.psum(norm_sq, TP)
    g = dora.factor(ops["magnitude"], norm_sq)
    base = partial if x_d is None else _base_matmul(x_d, ops["kernel"], 1, sizes)
    return dora.output_term(base, delta, g, lora_dtype)


def _gathered_for_norm(kernel: jax.Array, fsdp_axis: int, sizes: dict[str, int]) -> jax.Array:
    """The kernel whole over fsdp for DoRA's norm (a constant: no gradient, nothing kept for the
    backward pass beyond the [out] norm)."""
    kernel = jax.lax.stop_gradient(kernel)
    return kernel if sizes[FSDP] == 1 else all_gather(kernel, FSDP, axis=fsdp_axis)


def _row_local(ops, *, sequence_parallel, sizes, lora_dtype, mixed_method=None, quant=None,
                collective_matmul=False):
    x = ops["x"]
    if _use_ring(collective_matmul, sequence_parallel, sizes, quant) and "magnitude" not in ops:
        return _row_ring(ops, lora_dtype=lora_dtype, mixed_method=mixed_method)
    y = _base_matmul(x, ops["kernel"], 1, sizes, quant)
    if "index" in ops:  # a mixed batch: linear in x's features, so its partial sums like one
        x_in = ops.get("lora_x", x)
        y = add_delta(y, mixed_delta(x_in, Adapter(*ops["lora"]),
                                     MixedBatch(ops["index"], mixed_method),
                                     in_axes=(x_in.ndim - 1,), dtype=lora_dtype))
    elif "lora" in ops:  # added to the partial product, before the one reduction below
        a, b, scale = ops["lora"]
        h = adapter_in(ops.get("lora_x", x), a, scale, dtype=lora_dtype)
        delta = adapter_out(h, b, lora_dtype)
        if "magnitude" in ops:
            delta = _dora_row(ops, y, delta, ops.get("lora_x"), sizes=sizes,
                              lora_dtype=lora_dtype)
        y = add_delta(y, delta)
    if sizes[TP] > 1:
        y = (jax.lax.psum_scatter(y, TP, scatter_dimension=1, tiled=True) if sequence_parallel
             else jax.lax.psum(y, TP))
    if "bias" in ops:
        y = y + ops["bias"]
    # The reduced sum is what the backward needs: saved, the reduction is not run again there.
    return name_output(y) if "lora" in ops else y


def _use_ring(collective_matmul, sequence_parallel, sizes, quant) -> bool:
    """Whether the base matmul runs as a collective-matmul ring: asked for, with sequence
    parallelism over tp > 1, on a plain kernel that is not split over fsdp. (A quantised kernel
    dequantises per device in `sharding.quantized`, and an fsdp-split one is gathered inside a
    checkpoint; both keep the plain collectives rather than a second code path.)"""
    return (collective_matmul and sequence_parallel and sizes[TP] > 1 and sizes[FSDP] == 1
            and quant is None)


def _row_ring(ops, *, lora_dtype, mixed_method):
    """The row layer under collective matmul: the adapter's partial (one adapter or a mixed
    batch's) is formed whole, as `_row_local` does, and each sequence chunk of it joins the base
    product's chunk before the ring's reduce-scatter, so base and LoRA still share one
    reduction. Local shapes as `row_parallel`'s; the result [B/bd, S/tp, out]."""
    x, delta = ops["x"], None
    if "index" in ops:
        x_in = ops.get("lora_x", x)
        delta = mixed_delta(x_in, Adapter(*ops["lora"]), MixedBatch(ops["index"], mixed_method),
                            in_axes=(x_in.ndim - 1,), dtype=lora_dtype)
    elif "lora" in ops:
        a, b, scale = ops["lora"]
        delta = adapter_out(adapter_in(ops.get("lora_x", x), a, scale, dtype=lora_dtype), b,
                            lora_dtype)
    y = matmul_reducescatter(x, ops["kernel"], TP, addend=delta)
    if "bias" in ops:
        y = y + ops["bias"]
    return name_output(y) if "lora" in ops else y


def _base_matmul(x: jax.Array, kernel: Any, fsdp_axis: int, sizes: dict[str, int],
                 quant: quantized.LocalQuant | None = None) -> jax.Array:
    """x @ kernel, the kernel first all-gathered over fsdp (on `fsdp_axis`) when FSDP is on.

    The gather sits inside `jax.checkpoint` so that the backward pass gathers again instead of
    keeping the gathered kernel as a residual: kept, every layer's gathered kernel would stay
    resident from its forward to its backward, which is the memory FSDP exists to free.
    With `quant`, `kernel` is a quantised kernel's leaves (`sharding.quantized.matmul`).
    """
    if quant is not None:
        return quantized.matmul(x, kernel, quant, sizes)
    if sizes[FSDP] == 1:
        return _matmul(x, kernel)
    gathered = lambda x, k: _matmul(x, all_gather(k, FSDP, axis=fsdp_axis))  # noqa: E731
    return jax.checkpoint(gathered, policy=jax.checkpoint_policies.nothing_saveable)(x, kernel)


def _matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    # The same dot_general nn.Dense issues (default precision), so results match it.
    return jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))


# ---------------------------------------------------------------------------------------------
# Linen modules: nn.Dense's parameters, the functions above.


class _ParallelDense(nn.Module):
    """Shared fields and parameter creation; subclasses choose the parallel matmul."""

    features: int
    mesh: Mesh | None = None
    sequence_parallel: bool = False
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.linear.default_kernel_init
    bias_init: Callable = nn.initializers.zeros_init()
    # Store the frozen kernel quantised in this format (`models.quant.FORMATS`), with
    # `QuantDense`'s param tree, so a checkpoint is the same at tp=1 and tp>1.
    quant: str | None = None
    # How a quantised kernel's shard multiplies (`models.quant.quantized_matmul`'s impl): "xla",
    # or "pallas", the fused NF4 / int8 kernel run by each device on its local shard.
    quant_impl: str = "xla"
    # Sequence parallelism's collective as a ppermute ring overlapped with the base matmul
    # (`sharding.collective_matmul`); see `column_parallel` / `row_parallel` for when it applies.
    collective_matmul: bool = False
    # How an FP8 `quant` kernel scales x and dy: "tensor" or "row" (`models.quant`).
    fp8_scaling: str = "tensor"

    def _params(self, x: jax.Array):
        """(kernel, bias or None) as stored, the adapter or None, the adapter's dtype."""
        shape = (jnp.shape(x)[-1], self.features)
        check_impl(self.quant_impl)
        if self.quant is None:
            kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        else:  # as QuantDense: the kernel_init draw in float32, quantised
            check_format(self.quant)
            kernel = self.param("kernel", lambda key: quantize(
                self.kernel_init(key, shape, jnp.float32), self.quant, dtype=self.param_dtype))
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        return kernel, bias, self._adapter(kernel.shape), compute_dtype(self.dtype, x, kernel)

    def _operands(self, x: jax.Array):
        """(x, kernel, bias) promoted like nn.Dense, the adapter or None, its input, its dtype."""
        kernel, bias, lora, lora_dtype = self._params(x)
        # Drawn here, on the global x, so the mask is the single-device one (see `dropout`).
        lora_x = dropout(self, x) if lora is not None else None
        x, kernel, bias = self._promote(x, kernel, bias)
        return x, kernel, bias, lora, lora_x, lora_dtype

    def _promote(self, x, kernel, bias):
        """nn.Dense's dtype promotion; for a quantised kernel `QuantDense`'s: everything in the
        layer's dtype, else the kernel's dequantised dtype (the kernel itself stays stored)."""
        if not is_quantized(kernel):
            return promote_dtype(x, kernel, bias, dtype=self.dtype)
        dtype = self.dtype or kernel.dtype
        return x.astype(dtype), kernel, None if bias is None else bias.astype(dtype)

    def _adapter(self, kernel_shape: tuple[int, int]) -> Adapter | None:
        adapter = read_adapter(self)
        if adapter is None:
            return None
        if is_stacked(adapter, 1) or current_mixed() is not None:
            return self._stacked_adapter(adapter, kernel_shape)
        a, b = adapter.a, adapter.b
        if a.shape[0] != kernel_shape[0] or b.shape != (a.shape[-1], kernel_shape[1]):
            raise ValueError(f"adapter of {'.'.join(self.path)} does not fit its kernel "
                             f"{tuple(kernel_shape)}: lora_a {a.shape}, lora_b {b.shape}")
        if adapter.magnitude is not None:
            dora.check_magnitude(".".join(self.path), adapter.magnitude, (kernel_shape[1],))
        return adapter


    def _stacked_adapter(self, adapter: Adapter, kernel_shape: tuple[int, int]) -> Adapter:
        """A mixed batch's adapters with their adapter axis (a single one as a stack of one)."""
        if current_mixed() is None:
            raise LoraError(f"{'.'.join(self.path)} holds {adapter.scale.shape[0]} stacked "
                            "adapters (lora_jax.stack_adapters); say which each row runs with "
                            "lora_jax.apply(..., adapter_index=[...]).")
        adapter = as_stacked(adapter, 1)
        a, b = adapter.a, adapter.b
        if a.shape[1] != kernel_shape[0] or b.shape[1:] != (a.shape[-1], kernel_shape[1]):
            raise ValueError(f"stacked adapters of {'.'.join(self.path)} do not fit its kernel "
                             f"{tuple(kernel_shape)}: lora_a {a.shape}, lora_b {b.shape}")
        return adapter

    def _label(self) -> str:
        """The layer's dotted path for error messages (its name when it is the top module)."""
        return ".".join(self.path) or str(self.name)

    def _mixed(self, lora: Adapter | None) -> MixedBatch | None:
        return None if lora is None else current_mixed()


class ColumnParallelDense(_ParallelDense):
    """Dense layer with its output features split over tp (q/k/v, gate/up, c_attn, c_fc).

    Input [B, S, in] (split on S over tp under sequence parallelism), output [B, S, out/tp]
    per device. See `column_parallel` for local shapes.
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias, lora, lora_x, lora_dtype = self._operands(x)
        return column_parallel(x, kernel, bias, lora, mesh=self.mesh, lora_x=lora_x,
                               sequence_parallel=self.sequence_parallel, lora_dtype=lora_dtype,
                               mixed=self._mixed(lora), name=self._label(),
                               collective_matmul=self.collective_matmul,
                               quant_impl=self.quant_impl, fp8_scaling=self.fp8_scaling)


class RowParallelDense(_ParallelDense):
    """Dense layer with its input features split over tp (o, down, c_proj); one psum (or
    psum_scatter on the sequence, under sequence parallelism) sums base and LoRA partials.
    See `row_parallel` for local shapes."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x, kernel, bias, lora, lora_x, lora_dtype = self._operands(x)
        return row_parallel(x, kernel, bias, lora, mesh=self.mesh, lora_x=lora_x,
                            sequence_parallel=self.sequence_parallel, lora_dtype=lora_dtype,
                            mixed=self._mixed(lora), name=self._label(),
                            collective_matmul=self.collective_matmul,
                            quant_impl=self.quant_impl, fp8_scaling=self.fp8_scaling)


class ReplicatedDense(_ParallelDense):
    """Dense layer of the "replicated" role: no shard_map, so the compiler (GSPMD) lays the
    matmul out from the kernel's stored sharding, whatever the rules chose (Llama's untied
    `lm_head` is split on the vocabulary by `DEFAULT_RULES`). It adds its adapter itself, like the
    parallel layers, so every layer of a tensor-parallel model behaves the same."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias, lora, lora_dtype = self._params(x)
        x_in, kernel, bias = self._promote(x, kernel, bias)
        # A quantised kernel here is split by GSPMD, as QuantDense's is at tp=1 (a pallas impl
        # then runs on gathered operands: a pallas_call has no SPMD rule).
        y = (quantized_matmul(x_in, kernel, x_in.dtype, self.quant_impl,
                              fp8_scaling=self.fp8_scaling)
             if is_quantized(kernel) else _matmul(x_in, kernel))
        if bias is not None:
            y = y + bias
        if lora is None:
            return y
        return adapt(self, x, y, lora, in_axes=(x.ndim - 1,), dtype=lora_dtype)
