"""Fused dequantise-in-the-GEMM Pallas kernels for NF4 and int8 kernels (issue 15).

XLA does not fuse the dequantisation of a stored NF4 / int8 kernel into the GEMM: it writes a
full compute-dtype copy `[K, N]` of every kernel that cuBLAS then reads (docs/PERFORMANCE.md,
"HLO on the H200"). These kernels read the codes tile by tile and dequantise in registers, so no
float kernel is ever written to memory. They run on the Triton backend on GPU
(`jax.experimental.pallas.triton`) and in interpret mode elsewhere (CPU tests).

Kernels (x, dy 2-D; the caller flattens leading axes and pads nothing itself):
  nf4_matmul(x [M, K], codes [K/2, N] u8, scales [K/64, N] f32) -> x @ W        [M, N]
  nf4_matmul_t(dy [M, N], codes, scales)                        -> dy @ W^T      [M, K]
  int8_matmul(x [M, K], codes [K, N] i8, scale [N])             -> (x @ codes) * scale
  int8_matmul_t(dy [M, N], codes)                               -> dy @ codes^T  [M, K]
The int8 per-channel scale commutes with the contraction: the forward applies it to the
float32 accumulator, the backward's caller to dy (as `models.quant` does). The NF4 block
scales (`Nf4Kernel.block_scales()`, 1/64 of the kernel's elements) are an input.

The NF4 layout is the stored one: byte row r of `codes` holds input rows 2r (high nibble) and
2r + 1 (low nibble). Rather than interleaving the two nibble planes into a [64, bn] tile (a
reshape that moves the minor axis, which Triton cannot do), each 64-row NF4 block contributes
`x[:, even] @ W_hi + x[:, odd] @ W_lo`, with the even / odd input columns read by stride-2
loads; the transposed kernel writes its even / odd output columns with stride-2 stores.

Issue 15 (the first H200 sweep: NF4 ~4x slower than dequantise-then-cuBLAS): the NF4 decode
can be a code book table load per value (`decode="lut"`) instead of the 15-select tree (the
default: the second sweep measured the table load slower, 11.4 against 7.4 ms); `bk`
sets how many NF4 blocks one K step dequantises (dots of depth bk / 2); `group` launches the
programs in grouped order for L2 reuse (`_grid`); `scale_acc` moves the NF4 block scale from
the weights onto the dot result; `swap_ab` computes the transposed product so the dequantised
tile is the dot's first operand (`_mm`); `split_x` reorders x's columns in XLA so the kernel
loads them contiguously (`split_even_odd`). `benchmarks/quant_gemm.py --sweep` times them.

Multi-device: a pallas_call has no SPMD partitioning rule, so under GSPMD (dp / FSDP meshes)
XLA gathers its operands and runs it whole on every device. Inside a `shard_map` (the
tensor-parallel layers, `sharding.quantized`) it runs per device on the local shard: the
output's type then names the mesh axes it varies over (`_out_struct`), as shard_map's type
check asks. impl="pallas" is for one device or the tensor-parallel layers.

Shapes that do not tile (an output or contraction dimension with no power-of-two divisor >= 16
in range) make `fits_*` return False; `models.quant` then takes its XLA path for that kernel.
M is padded up to the row block and sliced back.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from models.quant import NF4_BLOCK, NF4_CODE

MIN_TILE = 16  # Triton's smallest dot / block dimension
_HALF = NF4_BLOCK // 2  # byte rows per NF4 block (two input rows per byte)


def _triton_params(num_warps: int, num_stages: int) -> Any:
    """Triton compiler params; without them a GPU pallas_call lowers to Mosaic GPU, not Triton.

    The class moved across JAX versions (`pallas.triton.CompilerParams` now,
    `pallas.gpu.TritonCompilerParams` in older releases), so look it up where it exists."""
    try:
        from jax.experimental.pallas import triton as pltriton
        cls = pltriton.CompilerParams
    except (ImportError, AttributeError):  # older JAX
        try:
            from jax.experimental.pallas import gpu as plgpu
            cls = plgpu.TritonCompilerParams
        except (ImportError, AttributeError):
            raise NotImplementedError(
                f"jax {jax.__version__} has neither pallas.triton.CompilerParams nor "
                "pallas.gpu.TritonCompilerParams: the Pallas kernels cannot select Triton; "
                "use quant_impl='xla'") from None
    return cls(num_warps=num_warps, num_stages=num_stages)


def _dot(a: jax.Array, b: jax.Array, *, trans_b: bool = False) -> jax.Array:
    """A 2-D tile product accumulated in float32 (`lax.dot_general`, which the Triton lowering
    maps to `tt.dot`; `pl.dot` moved modules across JAX versions)."""
    dims = (((1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _mm(a: jax.Array, b: jax.Array, *, trans_b: bool = False, swap: bool = False) -> jax.Array:
    """`a @ b` (`a @ b^T` with trans_b) in float32, or with swap its transpose, computed as
    `b^T @ a^T`: the weight tile `b` becomes the dot's first operand. Hopper's wgmma reads its
    second operand from shared memory but can take the first from registers, where the
    dequantised tile already is (the "swap AB" of mixed-precision GEMMs); accumulators of a
    swapped kernel are [columns, rows] and transposed once in the epilogue (`_unswap`)."""
    if not swap:
        return _dot(a, b, trans_b=trans_b)
    dims = (((1 if trans_b else 0,), (1,)), ((), ()))
    return jax.lax.dot_general(b, a, dims, preferred_element_type=jnp.float32)


def _acc(rows: int, cols: int, swap: bool) -> jax.Array:
    """A zero float32 accumulator for a [rows, cols] result (stored transposed with swap)."""
    return jnp.zeros((cols, rows) if swap else (rows, cols), jnp.float32)


def _unswap(acc: jax.Array, swap: bool) -> jax.Array:
    return acc.T if swap else acc


def _out_struct(shape: tuple[int, ...], dtype: Any, *operands: jax.Array) -> Any:
    """The pallas_call output's `ShapeDtypeStruct`, varying over the mesh axes any operand
    varies over (what XLA infers for an ordinary op on them).

    Inside a `shard_map` with its type check on (`check_vma`, the tensor-parallel layers'),
    Pallas cannot infer that itself and refuses an output that does not say; outside one the
    annotation is empty and ignored. JAX 0.10 calls it `manual_axis_type`, older releases `vma`.
    """
    avals = [jax.typeof(a) for a in operands] if hasattr(jax, "typeof") else []
    mats = [getattr(a, "manual_axis_type", None) for a in avals]
    if avals and all(m is not None for m in mats):
        from jax.sharding import ManualAxisType
        varying = frozenset().union(*(m.varying for m in mats))
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=ManualAxisType(varying=varying))
    vmas = [getattr(a, "vma", None) for a in avals]
    if avals and all(v is not None for v in vmas):
        return jax.ShapeDtypeStruct(shape, dtype, vma=frozenset().union(*vmas))
    return jax.ShapeDtypeStruct(shape, dtype)


def interprets() -> bool:
    """True when the kernels run in Pallas interpret mode here by default (no GPU backend):
    exact but slow, and (JAX 0.10) not on operands typed as varying inside a type-checked
    `shard_map` (see `sharding.quantized.checks_types`)."""
    return _interpret(None)


def _interpret(interpret: bool | None) -> bool:
    """Interpret mode unless running on a GPU (None: decide from the default backend)."""
    return jax.default_backend() != "gpu" if interpret is None else bool(interpret)


def _pow2_divisor(n: int, most: int) -> int | None:
    """The largest power of two in [MIN_TILE, most] dividing n, or None."""
    p = 1 << (max(most, 1).bit_length() - 1)
    while p >= MIN_TILE:
        if n % p == 0:
            return p
        p //= 2
    return None


def _row_block(m: int, bm: int) -> int:
    """The row block: `bm`, or the next power of two >= m (at least MIN_TILE) when m is small."""
    return min(bm, max(MIN_TILE, 1 << max(m - 1, 0).bit_length()))


def _pad_rows(a: jax.Array, bm: int) -> jax.Array:
    pad = -a.shape[0] % bm
    return a if pad == 0 else jnp.pad(a, ((0, pad), (0, 0)))


def _check_2d(name: str, **arrays: jax.Array) -> None:
    for arg, a in arrays.items():
        if a.ndim != 2:
            raise ValueError(f"{name}: {arg} must be 2-D, got shape {a.shape}; flatten the "
                             "leading axes of the activations to [M, features] first")


def _nf4_values(idx: jax.Array) -> jax.Array:
    """The NF4 code book value of each 4-bit index (uint8), float32, by a select tree over the
    index bits. Only bits 0-3 are read, so an arithmetic shift of the byte would decode the
    high nibble as well as a logical one. 15 selects per value, redone by every row block: on
    the H200 the kernel is ~4x slower than XLA (issue 15). `decode="lut"` (one table load per
    value) was tried against it and measured slower still, so the tree is the default."""
    level = [float(v) for v in NF4_CODE]  # Python floats: kernels may not capture arrays
    for bit in range(4):
        on = (idx & (1 << bit)) != 0
        level = [jnp.where(on, level[2 * i + 1], level[2 * i]) for i in range(len(level) // 2)]
    return level[0]


DECODES = ("lut", "select")


def _code_book() -> jax.Array:
    """The 16 NF4 values as a float32 kernel input (for `decode="lut"`)."""
    return jnp.asarray(NF4_CODE, jnp.float32)


def _nf4_decode(codes: jax.Array, lut_ref: Any) -> tuple[jax.Array, jax.Array]:
    """Byte tile -> (high nibble values, low nibble values), float32, unscaled.

    With a code book ref, each value is a gather load `lut_ref[index]` (Triton lowers an
    integer-array indexer to per-element pointers into a 64-byte table that stays in L1), so
    the decode is a shift/mask and one load per value instead of 15 selects. The values are the
    float32 code book's, bit for bit, whichever way they are decoded."""
    hi, lo = codes >> 4, codes & 15
    if lut_ref is None:
        return _nf4_values(hi), _nf4_values(lo)
    return lut_ref[hi.astype(jnp.int32)], lut_ref[lo.astype(jnp.int32)]


def _nf4_tile(c_ref: Any, s_ref: Any, lut_ref: Any, byte_row: Any, byte_rows: int, cols: Any,
              dtype) -> tuple[jax.Array, jax.Array]:
    """Dequantise `byte_rows` byte rows of the codes (from `byte_row`, a multiple of 32) over
    columns `cols`: the even (high nibble) and odd (low nibble) input rows, each
    [byte_rows, cols] in `dtype`, with the XLA path's values (code value * block scale in
    float32, then cast). One NF4 block (32 byte rows) takes a single scale row, broadcast;
    with several, byte row r takes block r // 32's row, by a chain of (blocks - 1) selects
    between broadcast rows (cheaper per element than a gather load for the 2-4 blocks a step
    holds)."""
    codes = c_ref[pl.ds(byte_row, byte_rows), cols]
    first = byte_row // _HALF
    scale = s_ref[pl.ds(first, 1), cols]
    if byte_rows > _HALF:
        row = jax.lax.broadcasted_iota(jnp.int32, codes.shape, 0)
        for b in range(1, byte_rows // _HALF):
            scale = jnp.where(row >= b * _HALF, s_ref[pl.ds(first + b, 1), cols], scale)
    hi, lo = _nf4_decode(codes, lut_ref)
    return (hi * scale).astype(dtype), (lo * scale).astype(dtype)


def split_even_odd(x: jax.Array, group: int) -> jax.Array:
    """Permute the columns of x [M, K] within each run of `group` (even) columns: the even
    columns first, then the odd ones. `nf4_matmul(split_x=True)` reads x in this order, so a
    K step's even / odd input columns (high / low nibbles) are contiguous.

    Example:
      >>> split_even_odd(jnp.arange(8.)[None], 4)   # [[0, 2, 1, 3, 4, 6, 5, 7]]
    """
    m, k = x.shape
    if group % 2 or k % group:
        raise ValueError(f"split_even_odd: group={group} must be even and divide K={k}")
    return x.reshape(m, k // group, group // 2, 2).swapaxes(2, 3).reshape(m, k)


def _nf4_step_bytes(k: int, bk: int) -> int:
    """Byte rows per K step: `bk` input rows rounded down to a power-of-two number of NF4
    blocks (Triton tiles are powers of two) that divides K / 64; at least one block."""
    blocks = 1 << (max(1, bk // NF4_BLOCK).bit_length() - 1)
    while (k // NF4_BLOCK) % blocks:
        blocks //= 2
    return blocks * _HALF


def _grid(rows: int, cols: int, group: int | None):
    """(grid, program -> (row block, column block)) for a [rows, cols] grid of output tiles.

    group=None: the plain 2-D grid (CUDA launches axis 0 fastest, so consecutive programs walk
    down a column of tiles and re-read all of x, 64 MB at M=8192, K=4096, for every column
    block). group=g: a 1-D grid in grouped order, g row blocks by all column blocks with the
    row fastest (the last group has the rows left over), so the programs running at once share
    g row blocks of x and a few column blocks of the codes in L2."""
    if group is None:
        return (rows, cols), lambda i, j: (i, j)
    if group < 1:
        raise ValueError(f"group={group}: give a number of row blocks >= 1, or None")
    g = min(group, rows)

    def tile(p):
        first = (p // (g * cols)) * g
        size = jnp.minimum(rows - first, g)  # the last group may be short
        within = p % (g * cols)
        return first + within % size, within // size

    return (rows * cols,), tile


# ----------------------------------------------------------------------------- NF4


def fits_nf4(k: int, n: int, *, bn: int = 128, bn_t: int = 64) -> bool:
    """True when an NF4 kernel [k, n] tiles for `nf4_matmul` and `nf4_matmul_t`."""
    return k % NF4_BLOCK == 0 and _pow2_divisor(n, min(bn, bn_t)) is not None


def _check_decode(name: str, decode: str) -> None:
    if decode not in DECODES:
        raise ValueError(f"{name}: decode={decode!r}; use one of {DECODES}")


def nf4_matmul(x: jax.Array, codes: jax.Array, scales: jax.Array, out_dtype: Any = jnp.float32,
               *, bm: int = 256, bn: int = 128, bk: int = 64, group: int | None = None,
               decode: str = "select", scale_acc: bool = False, swap_ab: bool = False,
               split_x: bool = False, num_warps: int = 8, num_stages: int = 3,
               interpret: bool | None = None) -> jax.Array:
    """`x @ W` for an NF4 kernel W [K, N], dequantised tile by tile inside the GEMM.

    Each K step dequantises `bk` input rows (`bk / 64` NF4 blocks) and contributes
    `x[:, even] @ W_hi + x[:, odd] @ W_lo`: two dots of depth `bk / 2`.

    Args:
      x: activations [M, K] in the compute dtype (the dequantised tiles are cast to it).
      codes: uint8 [K/2, N], `Nf4Kernel.codes` (high nibble = even input row).
      scales: float32 [K/64, N], `Nf4Kernel.block_scales()`.
      out_dtype: the result's dtype (accumulation is float32).
      bm, bn: row / column block (powers of two; bm shrinks for small M, bn to a divisor of N).
        The defaults (and num_warps=8) were the fastest of the H200 sweep (issue 15).
      bk: input rows per K step, 64 times a power of two (shrinks to a block count dividing K).
      group: None for the plain 2-D grid, or row blocks per program group (grouped launch
        order for L2 reuse, see `_grid`; shrinks to a power of two dividing the row blocks).
      decode: "select" (the select tree, the default: fastest measured on the H200) or "lut"
        (a code book table load per value: 1.5x slower forward, 2.1x backward there).
      scale_acc: apply each block scale to the block's [bm, bn] dot result (it is constant
        over the block's 64 rows per column) instead of to every weight: the decode is then
        code -> compute dtype only, one NF4 block per dot (`bk` then only sets how many blocks
        one loop step unrolls). Exact in float32 up to summation order; in bf16 the code value
        is rounded before the scale multiplies it, not after, so results differ from the XLA
        path's by bf16 rounding (max-norm ~7e-3 on a [64, 256] x [256, 128] test), no further from
        the float32 product than the XLA path is (~4e-3 both).
      swap_ab: compute the transposed product `W^T x^T`, so the dequantised tile is the dot's
        first operand, which Hopper's wgmma can read from registers (see `_mm`).
      split_x: permute x's columns in XLA first (`split_even_odd`, one pass over x) so that
        each K step's even and odd input columns are two contiguous runs: the kernel's x loads
        become contiguous, vectorisable ones instead of stride-2 loads of 2-byte elements.
      num_warps, num_stages: Triton launch parameters.
      interpret: force interpret mode (None: on unless the backend is a GPU).

    Example:
      >>> y = nf4_matmul(x, q.codes, q.block_scales(), jnp.float32, bk=128, group=8)
    """
    _check_2d("nf4_matmul", x=x, codes=codes, scales=scales)
    _check_decode("nf4_matmul", decode)
    m, k = x.shape
    n = codes.shape[1]
    if k % NF4_BLOCK or codes.shape[0] * 2 != k or scales.shape != (k // NF4_BLOCK, n):
        raise ValueError(f"nf4_matmul: x {x.shape}, codes {codes.shape}, scales {scales.shape} "
                         f"do not form [M, K] @ NF4 [K, N] with K divisible by {NF4_BLOCK}")
    bn_ = _pow2_divisor(n, bn)
    if bn_ is None:
        raise ValueError(f"nf4_matmul: N={n} has no power-of-two divisor in [{MIN_TILE}, {bn}]; "
                         "use the XLA path (fits_nf4 says which shapes tile)")
    step = _nf4_step_bytes(k, bk)  # byte rows per K step; 2 * step input rows
    bm_ = _row_block(m, bm)
    xp = _pad_rows(split_even_odd(x, 2 * step) if split_x else x, bm_)
    dtype = x.dtype
    use_lut = decode == "lut"
    grid, tile = _grid(xp.shape[0] // bm_, n // bn_, group)

    def x_cols(x_ref, t, first, size, odd):
        """x's columns for input rows 2r + odd, r in [first, first + size) byte rows of step t
        (contiguous after `split_even_odd`, stride 2 in the stored order)."""
        if split_x:
            return x_ref[:, pl.ds(t * 2 * step + odd * step + first, size)]
        return x_ref[:, pl.ds(t * 2 * step + 2 * first + odd, size, stride=2)]

    def scaled_step(t, acc, x_ref, c_ref, s_ref, lut_ref):
        for b in range(step // _HALF):  # one NF4 block per dot, its scale on the result
            codes = c_ref[pl.ds(t * step + b * _HALF, _HALF), :]
            hi, lo = _nf4_decode(codes, lut_ref if use_lut else None)
            part = (_mm(x_cols(x_ref, t, b * _HALF, _HALF, 0), hi.astype(dtype), swap=swap_ab)
                    + _mm(x_cols(x_ref, t, b * _HALF, _HALF, 1), lo.astype(dtype),
                          swap=swap_ab))
            scale = s_ref[pl.ds(t * (step // _HALF) + b, 1), :]
            acc = acc + part * (scale.T if swap_ab else scale)
        return acc

    def kernel(x_ref, c_ref, s_ref, lut_ref, o_ref):
        def body(t, acc):
            if scale_acc:
                return scaled_step(t, acc, x_ref, c_ref, s_ref, lut_ref)
            x_even, x_odd = x_cols(x_ref, t, 0, step, 0), x_cols(x_ref, t, 0, step, 1)
            w_hi, w_lo = _nf4_tile(c_ref, s_ref, lut_ref if use_lut else None, t * step, step,
                                   slice(None), dtype)
            return acc + _mm(x_even, w_hi, swap=swap_ab) + _mm(x_odd, w_lo, swap=swap_ab)

        acc = jax.lax.fori_loop(0, k // (2 * step), body, _acc(bm_, bn_, swap_ab))
        o_ref[...] = _unswap(acc, swap_ab).astype(o_ref.dtype)

    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[pl.BlockSpec((bm_, k), lambda *p: (tile(*p)[0], 0)),
                  pl.BlockSpec((k // 2, bn_), lambda *p: (0, tile(*p)[1])),
                  pl.BlockSpec((k // NF4_BLOCK, bn_), lambda *p: (0, tile(*p)[1])),
                  pl.BlockSpec((16,), lambda *p: (0,))],
        out_specs=pl.BlockSpec((bm_, bn_), lambda *p: tile(*p)),
        out_shape=_out_struct((xp.shape[0], n), out_dtype, xp, codes, scales),
        compiler_params=_triton_params(num_warps, num_stages),
        interpret=_interpret(interpret),
        name="nf4_matmul",
    )(xp, codes, scales, _code_book())
    return out[:m]


def nf4_matmul_t(dy: jax.Array, codes: jax.Array, scales: jax.Array,
                 out_dtype: Any = jnp.float32, *, bm: int = 256, bk: int = 128, bn: int = 64,
                 group: int | None = None, decode: str = "select", swap_ab: bool = False,
                 num_warps: int = 8, num_stages: int = 3,
                 interpret: bool | None = None) -> jax.Array:
    """`dy @ W^T` for an NF4 kernel W [K, N] (the input gradient), dequantised in the GEMM.

    The grid runs over (row blocks, `bk`-row groups of K, a multiple of 64); each program loops
    over N in steps of `bn`, dequantising the group's [bk/2, bn] byte tile into its even and
    odd rows and accumulating `dy_tile @ W_hi^T`, `dy_tile @ W_lo^T` ([bm, bk/2] each); the two
    are stored to the even / odd output columns with stride-2 stores.

    Args:
      dy: [M, N] in the compute dtype.
      codes, scales: as for `nf4_matmul`.
      out_dtype: the result's dtype (accumulation is float32).
      bm, bk, bn: row block, K group (64 times a power of two; shrinks to one dividing K),
        N step (a power of two; shrinks to a divisor of N).
      group, decode, swap_ab, num_warps, num_stages, interpret: as for `nf4_matmul` (group
        counts row blocks per group of programs over the K groups).

    Example:
      >>> dx = nf4_matmul_t(dy, q.codes, q.block_scales(), jnp.float32)
    """
    _check_2d("nf4_matmul_t", dy=dy, codes=codes, scales=scales)
    _check_decode("nf4_matmul_t", decode)
    m, n = dy.shape
    k = codes.shape[0] * 2
    if codes.shape[1] != n or scales.shape != (k // NF4_BLOCK, n) or k % NF4_BLOCK:
        raise ValueError(f"nf4_matmul_t: dy {dy.shape}, codes {codes.shape}, scales "
                         f"{scales.shape} do not form [M, N] @ (NF4 [K, N])^T")
    bn_ = _pow2_divisor(n, bn)
    if bn_ is None:
        raise ValueError(f"nf4_matmul_t: N={n} has no power-of-two divisor in [{MIN_TILE}, "
                         f"{bn}]; use the XLA path (fits_nf4 says which shapes tile)")
    half = _nf4_step_bytes(k, bk)  # byte rows per program = output columns per nibble plane
    bk_ = 2 * half
    bm_ = _row_block(m, bm)
    dyp = _pad_rows(dy, bm_)
    dtype = dy.dtype
    use_lut = decode == "lut"
    grid, tile = _grid(dyp.shape[0] // bm_, k // bk_, group)

    def kernel(dy_ref, c_ref, s_ref, lut_ref, o_ref):
        def body(t, accs):
            cols = pl.ds(t * bn_, bn_)
            g = dy_ref[:, cols]
            w_hi, w_lo = _nf4_tile(c_ref, s_ref, lut_ref if use_lut else None, 0, half, cols,
                                   dtype)
            return (accs[0] + _mm(g, w_hi, trans_b=True, swap=swap_ab),
                    accs[1] + _mm(g, w_lo, trans_b=True, swap=swap_ab))

        zeros = _acc(bm_, half, swap_ab)
        acc_hi, acc_lo = jax.lax.fori_loop(0, n // bn_, body, (zeros, zeros))
        o_ref[:, pl.ds(0, half, stride=2)] = _unswap(acc_hi, swap_ab).astype(o_ref.dtype)
        o_ref[:, pl.ds(1, half, stride=2)] = _unswap(acc_lo, swap_ab).astype(o_ref.dtype)

    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[pl.BlockSpec((bm_, n), lambda *p: (tile(*p)[0], 0)),
                  pl.BlockSpec((half, n), lambda *p: (tile(*p)[1], 0)),
                  pl.BlockSpec((bk_ // NF4_BLOCK, n), lambda *p: (tile(*p)[1], 0)),
                  pl.BlockSpec((16,), lambda *p: (0,))],
        out_specs=pl.BlockSpec((bm_, bk_), lambda *p: tile(*p)),
        out_shape=_out_struct((dyp.shape[0], k), out_dtype, dyp, codes, scales),
        compiler_params=_triton_params(num_warps, num_stages),
        interpret=_interpret(interpret),
        name="nf4_matmul_t",
    )(dyp, codes, scales, _code_book())
    return out[:m]


# ----------------------------------------------------------------------------- int8


def fits_int8(k: int, n: int, *, bn: int = 128, bk: int = 64) -> bool:
    """True when an int8 kernel [k, n] tiles for `int8_matmul` and `int8_matmul_t`."""
    return _pow2_divisor(n, bn) is not None and _pow2_divisor(k, bk) is not None


def _int8_tiles(name: str, k: int, n: int, bk: int, bn: int) -> tuple[int, int]:
    bk_, bn_ = _pow2_divisor(k, bk), _pow2_divisor(n, bn)
    if bk_ is None or bn_ is None:
        raise ValueError(f"{name}: kernel [{k}, {n}] needs K and N with a power-of-two divisor "
                         f">= {MIN_TILE}; use the XLA path (fits_int8 says which shapes tile)")
    return bk_, bn_


def int8_matmul(x: jax.Array, codes: jax.Array, out_dtype: Any = jnp.float32,
                scale: jax.Array | None = None, *, bm: int = 128, bn: int = 128, bk: int = 64,
                group: int | None = None, swap_ab: bool = False, num_warps: int = 4,
                num_stages: int = 3, interpret: bool | None = None) -> jax.Array:
    """`(x @ codes) * scale` for int8 codes [K, N], converted to x's dtype tile by tile; the
    per-channel scale (optional) multiplies the float32 accumulator before the one rounding to
    `out_dtype`, so a bf16 result is rounded once, as the XLA path's is.

    Args:
      x: [M, K] in the compute dtype.
      codes: int8 [K, N], `Int8Kernel.codes`.
      out_dtype: the result's dtype (accumulation is float32).
      scale: float32 [N] (`Int8Kernel.scale`), or None for the bare codes product.
      bm, bn, bk: row block, column block, K step (powers of two; bn, bk shrink to divisors).
      group, swap_ab, num_warps, num_stages, interpret: as for `nf4_matmul`.

    Example:
      >>> y = int8_matmul(x, q.codes) * q.scale
    """
    _check_2d("int8_matmul", x=x, codes=codes)
    m, k = x.shape
    if codes.shape[0] != k:
        raise ValueError(f"int8_matmul: x {x.shape} and codes {codes.shape} do not contract")
    n = codes.shape[1]
    bk_, bn_ = _int8_tiles("int8_matmul", k, n, bk, bn)
    bm_ = _row_block(m, bm)
    xp = _pad_rows(x, bm_)
    dtype = x.dtype

    if scale is None:
        scale = jnp.ones((n,), jnp.float32)
    if scale.shape != (n,):
        raise ValueError(f"int8_matmul: scale {scale.shape} must be [N] = [{n}]")

    def kernel(x_ref, c_ref, s_ref, o_ref):
        def step(t, acc):
            rows = pl.ds(t * bk_, bk_)
            return acc + _mm(x_ref[:, rows], c_ref[rows, :].astype(dtype), swap=swap_ab)

        acc = jax.lax.fori_loop(0, k // bk_, step, _acc(bm_, bn_, swap_ab))
        o_ref[...] = (_unswap(acc, swap_ab) * s_ref[...]).astype(o_ref.dtype)

    grid, tile = _grid(xp.shape[0] // bm_, n // bn_, group)
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[pl.BlockSpec((bm_, k), lambda *p: (tile(*p)[0], 0)),
                  pl.BlockSpec((k, bn_), lambda *p: (0, tile(*p)[1])),
                  pl.BlockSpec((1, bn_), lambda *p: (0, tile(*p)[1]))],
        out_specs=pl.BlockSpec((bm_, bn_), lambda *p: tile(*p)),
        out_shape=_out_struct((xp.shape[0], n), out_dtype, xp, codes, scale),
        compiler_params=_triton_params(num_warps, num_stages),
        interpret=_interpret(interpret),
        name="int8_matmul",
    )(xp, codes, scale.astype(jnp.float32).reshape(1, n))
    return out[:m]


def int8_matmul_t(dy: jax.Array, codes: jax.Array, out_dtype: Any = jnp.float32, *,
                  bm: int = 128, bk: int = 128, bn: int = 64, group: int | None = None,
                  swap_ab: bool = False, num_warps: int = 4, num_stages: int = 3,
                  interpret: bool | None = None) -> jax.Array:
    """`dy @ codes^T` for int8 codes [K, N] (the input gradient; the caller scales dy by the
    per-channel scale first).

    Args:
      dy: [M, N] in the compute dtype.
      codes: int8 [K, N].
      out_dtype: the result's dtype (accumulation is float32).
      bm, bk, bn: row block, output column block over K, N step (powers of two).
      group, swap_ab, num_warps, num_stages, interpret: as for `nf4_matmul`.

    Example:
      >>> dx = int8_matmul_t((dy * q.scale).astype(dy.dtype), q.codes)
    """
    _check_2d("int8_matmul_t", dy=dy, codes=codes)
    m, n = dy.shape
    if codes.shape[1] != n:
        raise ValueError(f"int8_matmul_t: dy {dy.shape} and codes {codes.shape} do not contract")
    k = codes.shape[0]
    bk_, bn_ = _int8_tiles("int8_matmul_t", k, n, bk, bn)
    bm_ = _row_block(m, bm)
    dyp = _pad_rows(dy, bm_)
    dtype = dy.dtype

    def kernel(dy_ref, c_ref, o_ref):
        def step(t, acc):
            cols = pl.ds(t * bn_, bn_)
            return acc + _mm(dy_ref[:, cols], c_ref[:, cols].astype(dtype), trans_b=True,
                             swap=swap_ab)

        acc = jax.lax.fori_loop(0, n // bn_, step, _acc(bm_, bk_, swap_ab))
        o_ref[...] = _unswap(acc, swap_ab).astype(o_ref.dtype)

    grid, tile = _grid(dyp.shape[0] // bm_, k // bk_, group)
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[pl.BlockSpec((bm_, n), lambda *p: (tile(*p)[0], 0)),
                  pl.BlockSpec((bk_, n), lambda *p: (tile(*p)[1], 0))],
        out_specs=pl.BlockSpec((bm_, bk_), lambda *p: tile(*p)),
        out_shape=_out_struct((dyp.shape[0], k), out_dtype, dyp, codes),
        compiler_params=_triton_params(num_warps, num_stages),
        interpret=_interpret(interpret),
        name="int8_matmul_t",
    )(dyp, codes)
    return out[:m]


# ----------------------------------------------------------------------------- dispatch


def fits(q: Any) -> bool:
    """True when the kernels take quantised kernel `q` (a 2-D NF4 or int8 kernel whose shape
    tiles); `models.quant` runs every other kernel (FP8, stacked, odd shapes) on its XLA path."""
    if len(q.shape) != 2:
        return False
    k, n = q.shape
    if q.format == "nf4":
        return fits_nf4(k, n)
    if q.format == "int8":
        return fits_int8(k, n)
    return False


def _flat(a: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
    return a.reshape(math.prod(a.shape[:-1]), a.shape[-1]), a.shape[:-1]


# The rules below return the compute dtype directly (the kernels round their float32
# accumulator once, in the epilogue), rather than float32 for the caller to cast: a float32
# [M, K] result would be one more full pass over memory that XLA cannot fuse into a custom call.


def nf4_forward(x: jax.Array, q: Any, dtype: Any) -> jax.Array:
    """`models.quant._nf4_forward` on the kernels: x [..., K] -> [..., N] in `dtype`."""
    x2, lead = _flat(x.astype(dtype))
    return nf4_matmul(x2, q.codes, q.block_scales(), dtype).reshape(*lead, -1)


def nf4_backward(dy: jax.Array, q: Any, dtype: Any) -> jax.Array:
    """`models.quant._nf4_backward` on the kernels: dy [..., N] -> [..., K] in `dtype`."""
    g, lead = _flat(dy.astype(dtype))
    return nf4_matmul_t(g, q.codes, q.block_scales(), dtype).reshape(*lead, -1)


def int8_forward(x: jax.Array, q: Any, dtype: Any) -> jax.Array:
    """`models.quant._int8_forward` on the kernels (the scale applied in the epilogue)."""
    x2, lead = _flat(x.astype(dtype))
    return int8_matmul(x2, q.codes, dtype, q.scale).reshape(*lead, -1)


def int8_backward(dy: jax.Array, q: Any, dtype: Any) -> jax.Array:
    """`models.quant._int8_backward` on the kernels (the scale applied to dy first, as there)."""
    g, lead = _flat((dy.astype(jnp.float32) * q.scale).astype(dtype))
    return int8_matmul_t(g, q.codes, dtype).reshape(*lead, -1)


RULES = {"nf4": (nf4_forward, nf4_backward), "int8": (int8_forward, int8_backward)}
