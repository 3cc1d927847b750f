"""Frozen kernels STORED quantised (QLoRA's base): NF4, int8 and FP8, and their matmul.

A quantised kernel is a small pytree (a `flax.struct` dataclass) that sits in the params tree
where the `kernel` leaf was, so `split` / `combine`, the optimizer mask, checkpoints, sharding
rules and `merge` see an ordinary tree whose leaves are arrays. Each class has the duck-typed
face `lora_jax` relies on without importing `models`: `.shape` / `.ndim` (the logical
`[*S, in, out]` kernel's), `.dtype` (the compute dtype it dequantises to) and `.dequantize()`.

Formats (`FORMATS`):
  nf4   `Nf4Kernel`  bitsandbytes' NF4 code book, blocks of 64 consecutive input features of
        one output column; codes uint8 `[*S, in/2, out]` (two consecutive input rows per byte,
        high nibble first: bitsandbytes packs consecutive elements of the torch `[out, in]`
        weight, i.e. consecutive inputs); block absmax `[*S, in/64, out]`, with double
        quantisation (the default, bnb's `compress_statistics=True`) as uint8 codes of bnb's
        signed dynamic 8-bit map, minus the mean (`offset [*S]`), in groups of 256 blocks taken
        in bnb's order (the flat `[out, in/64]` order), whose float32 absmax is `absmax2 [*S, G]`.
  int8  `Int8Kernel` symmetric per output channel: codes int8 `[*S, in, out]`, `scale [*S, out]`
        = amax / 127, applied after the GEMM (the GEMM needs only a convert of the codes).
  fp8   `Fp8Kernel`  e4m3 `codes_t [*S, out, in]`: stored transposed, the contraction axis last,
        the layout the H200's FP8 GEMM runs at full rate; `scale [*S, out]` per output channel
        (or one value repeated: per tensor). The activations are scaled per call as in
        `models.fp8` (e4m3 forward, e5m2 input gradient), so both GEMMs run in FP8. Inside a
        shard_map `amax_axes` reduces that per-tensor amax over the devices (`sharding.quantized`).
        With `fp8_scaling="row"` the amax is per row of the last axis instead (one scale per
        token, `[..., 1]`, applied to the GEMM's output), reduced only over the mesh axes that
        split that last axis (`row_amax_axes`).

Leaves keep the kernel's 2-D layout (`codes`, `absmax` like `kernel`; `codes_t` transposed;
`scale` like the output axis), so `sharding.rules` splits them as it splits the kernel.

The matmul (`quantized_matmul`) is a `jax.custom_vjp` whose residuals are the quantised leaves
only (parameters: no new memory): the backward dequantises again for `dx = dy @ W^T`, so no
full-precision copy of a kernel lives from a layer's forward to its backward, and the kernel's
cotangent is zero (the base is frozen; gradients flow only to the adapters beside it).

`impl="pallas"` (`RuntimeOptions.quant_impl`) runs NF4 and int8 through `models.quant_pallas`,
whose kernels dequantise tile by tile inside the GEMM (forward and `dy @ W^T`), so no
compute-dtype copy of the kernel is written; the default "xla" dequantises, then multiplies.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from models import fp8 as fp8_recipe
from models.options import QUANT_IMPLS  # how NF4 / int8 multiply (`quantized_matmul`'s impl)
from models.options import FP8_SCALINGS  # how FP8 scales x and dy (`fp8_scaling`)

FORMATS = ("nf4", "int8", "fp8")
NF4_BLOCK = 64
DQ_BLOCK = 256  # bitsandbytes' block for the double quantisation of the NF4 absmax
QUANT_OUTPUT_NAME = "quant_base_dot"  # the matmul's output, for remat policies (see fp8.py)

# bitsandbytes' NF4 code book (QLoRA, Dettmers et al. 2023): 16 quantiles of N(0, 1) scaled to
# [-1, 1], exactly zero included. Values are facts of the format, in bnb's index order.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map()`), 256 sorted float32 values:
    a decimal exponent 10^-6..10^0 and a linear fraction whose bits shrink as the exponent grows.

    Example:
      >>> m = dynamic_map(); m[0], m[-1]
      (-1.0, 1.0)
    """
    data = []
    for i in range(7):
        edges = _torch_linspace(0.1, 1.0, 2 ** i + 1)
        means = (edges[:-1] + edges[1:]) / np.float32(2.0)
        level = np.float32(10.0 ** (-6 + i))
        data += [float(v) for v in level * means] + [float(v) for v in -level * means]
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return np.array(sorted(data), np.float32)


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """float32 `torch.linspace` bit for bit (bnb builds its map with it): the first half counted
    up from `start`, the second down from `end`, each a fused multiply-add of a float32 step."""
    a, b = np.float32(start), np.float32(end)
    step = np.float64((b - a) / np.float32(steps - 1))
    i = np.arange(steps, dtype=np.float64)
    up = (np.float64(a) + step * i).astype(np.float32)
    down = (np.float64(b) - step * (steps - 1 - i)).astype(np.float32)
    return np.where(i < steps // 2, up, down)


DYNAMIC_MAP = dynamic_map()


def _midpoints(code: np.ndarray) -> np.ndarray:
    return ((code[:-1] + code[1:]) / np.float32(2.0)).astype(np.float32)


def _nearest(scaled: jax.Array, code: np.ndarray) -> jax.Array:
    """Index of the nearest code value, ties to the lower one (torch.bucketize on midpoints, as
    bitsandbytes does): the count of midpoints strictly below the value."""
    bounds = jnp.asarray(_midpoints(code))
    return jnp.sum(scaled[..., None] > bounds, axis=-1).astype(jnp.uint8)


def _absmax_scaled(blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Blockwise absmax over the last axis and the values scaled into [-1, 1] by multiplying with
    its reciprocal (bnb's arithmetic, so the codes agree at the bin edges too)."""
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    inv = 1.0 / jnp.maximum(absmax, 1e-38)
    return absmax, jnp.clip(blocks * inv[..., None], -1.0, 1.0)


# ----------------------------------------------------------------------------- the pytrees


class _Quantized:
    """The duck-typed kernel face shared by the formats."""

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def astype(self, dtype) -> jax.Array:
        """The dequantised kernel in `dtype` (what code written for a plain kernel expects)."""
        return self.dequantize(dtype)


@flax.struct.dataclass
class Nf4Kernel(_Quantized):
    """An NF4 kernel (see the module docstring for the layout).

    Example:
      >>> q = quantize(w, "nf4"); q.shape == w.shape; q.dequantize().dtype == w.dtype
      (True, True)
    """

    codes: jax.Array  # uint8 [*S, in/2, out]
    absmax: jax.Array  # uint8 [*S, in/64, out] (double quant) or float32
    absmax2: jax.Array | None  # float32 [*S, G] (double quant) or None
    offset: jax.Array | None  # float32 [*S] (double quant) or None
    dtype: Any = flax.struct.field(pytree_node=False, default=jnp.bfloat16)
    format = "nf4"

    @property
    def shape(self) -> tuple[int, ...]:
        *stack, half, out = self.codes.shape
        return (*stack, 2 * half, out)

    def block_scales(self) -> jax.Array:
        """The float32 block absmax `[*S, in/64, out]` (double quantisation undone as bnb does:
        code * absmax2 + offset, in float32)."""
        if self.absmax2 is None:
            return self.absmax.astype(jnp.float32)
        *stack, nb, out = self.absmax.shape
        per_block = jnp.repeat(self.absmax2, DQ_BLOCK, axis=-1)[..., :nb * out]
        per_block = jnp.swapaxes(per_block.reshape(*stack, out, nb), -1, -2)  # bnb's flat order
        values = jnp.asarray(DYNAMIC_MAP)[self.absmax.astype(jnp.int32)] * per_block
        return values + self.offset.reshape(*stack, 1, 1)

    def unit_values(self) -> jax.Array:
        """The code book values `[*S, in, out]` in float32, before the block scale."""
        *stack, half, out = self.codes.shape
        nibbles = jnp.stack([self.codes >> 4, self.codes & 15], axis=-2)  # [*S, in/2, 2, out]
        idx = nibbles.reshape(*stack, 2 * half, out).astype(jnp.int32)
        return jnp.asarray(NF4_CODE)[idx]

    def dequantize(self, dtype=None) -> jax.Array:
        *stack, n_in, out = self.shape
        scales = self.block_scales()[..., :, None, :]  # [*S, nb, 1, out]
        values = self.unit_values().reshape(*stack, n_in // NF4_BLOCK, NF4_BLOCK, out) * scales
        return values.reshape(*stack, n_in, out).astype(dtype or self.dtype)


@flax.struct.dataclass
class Int8Kernel(_Quantized):
    """An int8 kernel, symmetric per output channel: `W = codes * scale`."""

    codes: jax.Array  # int8 [*S, in, out]
    scale: jax.Array  # float32 [*S, out]
    dtype: Any = flax.struct.field(pytree_node=False, default=jnp.bfloat16)
    format = "int8"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype=None) -> jax.Array:
        w = self.codes.astype(jnp.float32) * self.scale[..., None, :]
        return w.astype(dtype or self.dtype)


@flax.struct.dataclass
class Fp8Kernel(_Quantized):
    """An e4m3 kernel stored transposed: `W^T = codes_t * scale[:, None]`."""

    codes_t: jax.Array  # float8_e4m3fn [*S, out, in]
    scale: jax.Array  # float32 [*S, out]
    dtype: Any = flax.struct.field(pytree_node=False, default=jnp.bfloat16)
    # Set only inside a shard_map (sharding.quantized): the mesh axes the activation and its
    # gradient are split over, whose per-tensor amax is reduced over them (pmax) so a shard is
    # scaled as the whole tensor is on one device. () in a params tree.
    amax_axes: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())
    # The same for fp8_scaling="row": (the axes splitting x's LAST axis, those splitting dy's).
    # A row's amax needs only the devices holding other parts of that row; token axes (dp,
    # fsdp, sp) hold whole rows and must not be reduced over. ((), ()) in a params tree.
    row_amax_axes: tuple[tuple[str, ...], tuple[str, ...]] = flax.struct.field(
        pytree_node=False, default=((), ()))
    format = "fp8"

    @property
    def shape(self) -> tuple[int, ...]:
        *stack, out, n_in = self.codes_t.shape
        return (*stack, n_in, out)

    def dequantize(self, dtype=None) -> jax.Array:
        wt = self.codes_t.astype(jnp.float32) * self.scale[..., :, None]
        return jnp.swapaxes(wt, -1, -2).astype(dtype or self.dtype)


QUANTIZED_TYPES = (Nf4Kernel, Int8Kernel, Fp8Kernel)


def is_quantized(x: Any) -> bool:
    """True for a quantised kernel pytree of this module."""
    return isinstance(x, QUANTIZED_TYPES)


# ----------------------------------------------------------------------------- quantising


def check_format(fmt: str | None) -> None:
    """Raise ValueError unless `fmt` is None or one of `FORMATS`."""
    if fmt is not None and fmt not in FORMATS:
        raise ValueError(f"quantize={fmt!r}: use one of {FORMATS} (or None for a plain kernel)")


def quantize_nf4(w: jax.Array, *, double_quant: bool = True, dtype: Any = None) -> Nf4Kernel:
    """NF4-quantise a kernel `[*S, in, out]` (in divisible by 64) as bitsandbytes does
    `quantize_4bit(W^T, blocksize=64, quant_type="nf4", compress_statistics=double_quant)` on
    the torch `[out, in]` weight: identical codes, absmax and (double quant) absmax codes.

    Example:
      >>> q = quantize_nf4(jnp.ones((128, 8), jnp.bfloat16))
    """
    *stack, n_in, out = w.shape
    if n_in % NF4_BLOCK:
        raise ValueError(f"nf4 needs the input dimension divisible by {NF4_BLOCK}; this kernel "
                         f"is {tuple(w.shape)} ([*stack, in, out]). Keep it unquantised or pad it.")
    wt = jnp.swapaxes(jnp.asarray(w, jnp.float32), -1, -2)  # [*S, out, in]: bnb's weight
    absmax, scaled = _absmax_scaled(wt.reshape(*stack, out, n_in // NF4_BLOCK, NF4_BLOCK))
    q = _nearest(scaled.reshape(*stack, out, n_in), NF4_CODE)
    packed = (q[..., 0::2] << 4) | q[..., 1::2]  # [*S, out, in/2]
    codes = jnp.swapaxes(packed, -1, -2)
    dtype = jnp.dtype(dtype or w.dtype)
    if not double_quant:
        return Nf4Kernel(codes, jnp.swapaxes(absmax, -1, -2), None, None, dtype=dtype)
    qabs, absmax2, offset = _double_quant(absmax)  # absmax [*S, out, nb]: bnb's flat order
    return Nf4Kernel(codes, jnp.swapaxes(qabs, -1, -2), absmax2, offset, dtype=dtype)


def _double_quant(absmax: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """bnb's `quantize_blockwise(absmax - mean, blocksize=256)` over the flat `[out, nb]` order:
    uint8 codes of the dynamic map `[*S, out, nb]`, float32 group absmax `[*S, G]`, offset."""
    *stack, out, nb = absmax.shape
    n = out * nb
    flat = absmax.reshape(*stack, n)
    offset = jnp.mean(flat, axis=-1)
    centred = flat - offset[..., None]
    groups = -(-n // DQ_BLOCK)
    # Zero padding leaves each group's absmax as bnb's (its last group has only the remainder).
    padded = jnp.pad(centred, [(0, 0)] * len(stack) + [(0, groups * DQ_BLOCK - n)])
    absmax2, scaled = _absmax_scaled(padded.reshape(*stack, groups, DQ_BLOCK))
    q = _nearest(scaled.reshape(*stack, groups * DQ_BLOCK)[..., :n], DYNAMIC_MAP)
    return q.reshape(*stack, out, nb), absmax2, offset


def quantize_int8(w: jax.Array, *, dtype: Any = None) -> Int8Kernel:
    """Symmetric int8 per output channel: `scale = amax over in / 127`, codes rounded to nearest.

    Example:
      >>> q = quantize_int8(w); q.codes.dtype
      dtype('int8')
    """
    w32 = jnp.asarray(w, jnp.float32)
    scale = jnp.maximum(jnp.max(jnp.abs(w32), axis=-2), 1e-12) / 127.0
    codes = jnp.clip(jnp.round(w32 / scale[..., None, :]), -127, 127).astype(jnp.int8)
    return Int8Kernel(codes, scale, dtype=jnp.dtype(dtype or w.dtype))


def quantize_fp8(w: jax.Array, *, per_channel: bool = True, dtype: Any = None) -> Fp8Kernel:
    """e4m3 stored `[*S, out, in]`, scaled so each output channel's (or the tensor's) amax maps
    to e4m3's maximum (448).

    Example:
      >>> q = quantize_fp8(w); q.codes_t.shape == w.shape[::-1]
      True
    """
    wt = jnp.swapaxes(jnp.asarray(w, jnp.float32), -1, -2)
    amax = jnp.max(jnp.abs(wt), axis=-1)  # [*S, out]
    if not per_channel:
        amax = jnp.broadcast_to(jnp.max(amax, axis=-1, keepdims=True), amax.shape)
    scale = jnp.maximum(amax, 1e-12) / float(jnp.finfo(jnp.float8_e4m3fn).max)
    codes_t = (wt / scale[..., None]).astype(jnp.float8_e4m3fn)
    return Fp8Kernel(codes_t, scale, dtype=jnp.dtype(dtype or w.dtype))


def quantize(w: jax.Array, fmt: str, *, dtype: Any = None) -> Any:
    """Quantise a kernel `[*S, in, out]` into format `fmt` (one of `FORMATS`).

    Args:
      w: the kernel (any float dtype; the math runs in float32).
      fmt: "nf4" (double-quantised scales), "int8" or "fp8" (per-channel scale).
      dtype: the dtype it dequantises to (default: w's).

    Example:
      >>> q = quantize(params["model"]["layers"]["0"]["mlp"]["up_proj"]["kernel"], "nf4")
    """
    check_format(fmt)
    return _JITTED_QUANTIZERS[fmt](w, dtype=None if dtype is None else jnp.dtype(dtype))


# Jitted once per format: called eagerly (`quantize_params`, NNX module surgery) the quantisers'
# dozens of small ops would each dispatch on their own, which on a CPU took seconds per model.
# Inside a trace a jitted call simply inlines.
_JITTED_QUANTIZERS = {fmt: jax.jit(fn, static_argnames="dtype") for fmt, fn in
                      (("nf4", quantize_nf4), ("int8", quantize_int8), ("fp8", quantize_fp8))}


def random_quantized(key: jax.Array, shape: tuple[int, ...], fmt: str, *, std: float = 0.02,
                     dtype: Any = jnp.bfloat16) -> Any:
    """A quantised kernel of `shape` with the statistics of `normal(std)` weights, for benchmarks
    of large shapes without a checkpoint (drawn in float32 and quantised: under `jax.jit` the
    float draw is a per-kernel transient).

    Example:
      >>> q = random_quantized(jax.random.key(0), (4096, 4096), "nf4")
    """
    return quantize(std * jax.random.normal(key, shape, jnp.float32), fmt, dtype=dtype)


# ----------------------------------------------------------------------------- the matmul


def _dot_last(x: jax.Array, w: jax.Array, out_dtype) -> jax.Array:
    """x [..., K] . w [K, N] -> [..., N] accumulated in float32."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (w.ndim - 2,)), ((), ())),
                               preferred_element_type=out_dtype)


def _nf4_forward(x, q, dtype):
    return _dot_last(x, q.dequantize(dtype), jnp.float32)


def _nf4_backward(dy, q, dtype):
    w = q.dequantize(dtype)
    return jax.lax.dot_general(dy, w, (((dy.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _int8_forward(x, q, dtype):
    # The per-channel scale commutes with the contraction: apply it to the [.., out] result.
    return _dot_last(x, q.codes.astype(dtype), jnp.float32) * q.scale


def _int8_backward(dy, q, dtype):
    dys = (dy.astype(jnp.float32) * q.scale).astype(dtype)
    return jax.lax.dot_general(dys, q.codes.astype(dtype), (((dy.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _fp8_forward(x, q, dtype, scaling="tensor"):
    # Row mode: sx is [..., 1], one scale per row of x, so it commutes with the contraction
    # over x's last axis and is applied to the [..., out] result like the channel scale.
    rowwise = scaling == "row"
    x8, sx = fp8_recipe.quantize(x, fp8_recipe.FORWARD_DTYPE, rowwise=rowwise,
                                 axes=q.row_amax_axes[0] if rowwise else q.amax_axes)
    y = fp8_recipe._last_axis_dot(x8, q.codes_t, dtype)  # W^T [out, in]: contraction last
    return y.astype(jnp.float32) * (sx * q.scale)


def _fp8_backward(dy, q, dtype, scaling="tensor"):
    # dx = (dy * scale) @ W8^T-as-stored^T: the gradient carries the channel scale, so the
    # GEMM sees the stored codes; transposed to [in, out] for the fast last-axis layout.
    # Row mode: one scale per row of dy * scale ([..., 1]), applied to the [..., in] result.
    rowwise = scaling == "row"
    dy8, sdy = fp8_recipe.quantize(dy.astype(jnp.float32) * q.scale,
                                   fp8_recipe.GRADIENT_DTYPE, rowwise=rowwise,
                                   axes=q.row_amax_axes[1] if rowwise else q.amax_axes)
    w8 = jnp.swapaxes(q.codes_t, -1, -2)  # [in, out]
    return fp8_recipe._last_axis_dot(dy8, w8, dtype).astype(jnp.float32) * sdy


_RULES: dict[type, tuple[Callable, Callable]] = {
    Nf4Kernel: (_nf4_forward, _nf4_backward),
    Int8Kernel: (_int8_forward, _int8_backward),
    Fp8Kernel: (_fp8_forward, _fp8_backward),
}


def _zero_cotangent(tree: Any) -> Any:
    """Zero cotangents for a frozen quantised kernel (float0 for its integer leaves)."""
    def zero(a):
        if jnp.issubdtype(a.dtype, jnp.inexact):
            return jnp.zeros_like(a)
        return np.zeros(a.shape, jax.dtypes.float0)
    return jax.tree.map(zero, tree)


def _rules(q: Any, impl: str, fp8_scaling: str = "tensor") -> tuple[Callable, Callable]:
    """The (forward, backward) pair for kernel `q`: the fused Pallas kernels
    (`models.quant_pallas`) under impl="pallas" when they take `q` (2-D NF4 / int8 whose shape
    tiles), else the XLA rules above (FP8, stacked kernels and odd shapes, explicitly); FP8's
    with its activation scaling `fp8_scaling` ("tensor" or "row")."""
    if isinstance(q, Fp8Kernel):
        return (functools.partial(_fp8_forward, scaling=fp8_scaling),
                functools.partial(_fp8_backward, scaling=fp8_scaling))
    if impl == "pallas":
        # Imported here: quant_pallas imports this module's code book.
        from models import quant_pallas
        if quant_pallas.fits(q):
            return quant_pallas.RULES[q.format]
    return _RULES[type(q)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _qmatmul(x: jax.Array, q: Any, dtype: Any, impl: str, fp8_scaling: str) -> jax.Array:
    return _rules(q, impl, fp8_scaling)[0](x, q, dtype).astype(dtype)


def _qmatmul_fwd(x, q, dtype, impl, fp8_scaling):
    # Residuals: the quantised leaves only (parameters already resident), never a dequantised
    # kernel, so a layer keeps no full-precision weight alive until its backward.
    return _qmatmul(x, q, dtype, impl, fp8_scaling), q


def _qmatmul_bwd(dtype, impl, fp8_scaling, q, dy):
    dx = _rules(q, impl, fp8_scaling)[1](dy, q, dtype).astype(dtype)
    return dx, _zero_cotangent(q)


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def check_impl(impl: str) -> None:
    """Raise ValueError unless `impl` is one of `QUANT_IMPLS`."""
    if impl not in QUANT_IMPLS:
        raise ValueError(f"quant_impl={impl!r}: use one of {QUANT_IMPLS} ('pallas' dequantises "
                         "NF4 / int8 inside the GEMM, models.quant_pallas)")


def check_fp8_scaling(fp8_scaling: str) -> None:
    """Raise ValueError unless `fp8_scaling` is one of `FP8_SCALINGS`."""
    if fp8_scaling not in FP8_SCALINGS:
        raise ValueError(f"fp8_scaling={fp8_scaling!r}: use one of {FP8_SCALINGS} ('tensor': "
                         "one FP8 scale per activation tensor, 'row': one per token row)")


def quantized_matmul(x: jax.Array, q: Any, dtype: Any = None, impl: str = "xla", *,
                     fp8_scaling: str = "tensor") -> jax.Array:
    """`x [..., in] @ W [in, out]` for a quantised `W`, in `dtype` (default: the kernel's).

    Gradients flow to `x` only; the kernel is frozen. The output is named
    `QUANT_OUTPUT_NAME` for remat policies (a "dots" policy cannot see into a custom_vjp).

    Args:
      x: activations [..., in].
      q: a quantised kernel (`Nf4Kernel`, `Int8Kernel`, `Fp8Kernel`).
      dtype: the compute dtype (default: the kernel's).
      impl: "xla" (dequantise, then a GEMM) or "pallas" (NF4 / int8 dequantised inside the
        GEMM, forward and backward, `models.quant_pallas`; FP8, stacked kernels and shapes the
        kernels do not tile take the XLA path).
      fp8_scaling: for an `Fp8Kernel`, how x (forward) and `dy * scale` (backward) are scaled
        into FP8: "tensor" (one amax per call) or "row" (one per row of the last axis, applied
        to the GEMM's output in float32). Other formats ignore it.

    Example:
      >>> y = quantized_matmul(x, quantize(w, "int8"), jnp.bfloat16)
      >>> y = quantized_matmul(x, quantize(w, "nf4"), jnp.bfloat16, impl="pallas")
      >>> y = quantized_matmul(x, quantize(w, "fp8"), jnp.bfloat16, fp8_scaling="row")
    """
    check_impl(impl)
    check_fp8_scaling(fp8_scaling)
    dtype = jnp.dtype(dtype or q.dtype)
    if x.shape[-1] != q.shape[-2]:
        raise ValueError(f"quantized_matmul: input features {x.shape[-1]} do not match the "
                         f"kernel's {q.shape[-2]} (kernel shape {q.shape})")
    return checkpoint_name(_qmatmul(x.astype(dtype), q, dtype, impl, fp8_scaling),
                           QUANT_OUTPUT_NAME)


# ----------------------------------------------------------------------------- the layer


class QuantDense(nn.Dense):
    """`nn.Dense` over a kernel stored quantised in format `quant` (a subclass, so
    `lora_jax.apply`'s interceptor adapts it like any Dense). Its `kernel` param is the
    quantised pytree; `init` quantises the usual `kernel_init` draw.

    Example:
      >>> layer = QuantDense(64, quant="nf4", dtype=jnp.bfloat16)
      >>> variables = layer.init(key, jnp.ones((1, 128)))
    """

    quant: str = "nf4"
    quant_impl: str = "xla"  # "pallas": the fused kernels of models.quant_pallas
    fp8_scaling: str = "tensor"  # "row": per-token FP8 scales of x and dy (quant="fp8" only)

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        check_format(self.quant)
        n_in = inputs.shape[-1]

        def init(key):
            w = self.kernel_init(key, (n_in, self.features), jnp.float32)
            return quantize(w, self.quant, dtype=self.param_dtype)

        kernel = self.param("kernel", init)
        dtype = self.dtype or kernel.dtype
        y = quantized_matmul(inputs, kernel, dtype, self.quant_impl,
                             fp8_scaling=self.fp8_scaling)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(dtype)
        return y


def quantize_params(params: Any, fmt: str, *, select: Callable[[str], bool] | None = None,
                    dtype: Any = None) -> Any:
    """Replace every selected `kernel` leaf of a plain params tree by its quantised pytree.

    Args:
      params: a Linen params tree (nested dicts).
      fmt: one of `FORMATS`.
      select: `fn(dotted module path) -> bool`; default every kernel whose module a quantised
        model builds quantised (`quantizable`).
      dtype: the dequantised dtype (default each kernel's own).

    Example:
      >>> qparams = quantize_params(params, "nf4")
    """
    select = select or quantizable

    def walk(tree, prefix):
        out = {}
        for key, value in tree.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, dict) or hasattr(value, "items"):
                out[key] = walk(value, path)
            elif key == "kernel" and select(prefix) and not is_quantized(value):
                out[key] = quantize(value, fmt, dtype=dtype)
            else:
                out[key] = value
        return out

    return walk(params, "")


# The projections a quantised model builds quantised: every block projection (the models'
# "column" / "row" roles); the output head stays in the compute dtype, as for base_fp8.
BLOCK_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj", "c_attn", "c_proj", "c_fc")


def quantizable(module_path: str) -> bool:
    """True for a block projection's module path (not the output head, not an embedding)."""
    return module_path.rsplit(".", 1)[-1] in BLOCK_PROJECTIONS
