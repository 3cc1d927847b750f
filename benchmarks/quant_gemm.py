"""The quantised GEMM alone: `quantized_matmul` with impl "xla" (dequantise, then a GEMM) against
"pallas" (dequantised inside the GEMM, `models.quant_pallas`), for NF4 and int8, and a plain
bf16 GEMM as the bar, forward (`x @ W`) and backward (`dy @ W^T`, the input gradient).

Llama-3-8B's projection shapes (K, N) = (4096, 4096) q/o, (4096, 1024) k/v, (4096, 14336)
gate/up, (14336, 4096) down, at M = 8192 tokens (batch 4 x seq 2048), bf16 compute. Before
timing, each pallas result is checked against the xla one (max |a - b| / max |b|: both
accumulate in float32 and round to bf16, so a few 1e-3; a wrong tile is O(1)). One JSON line per
(shape, format, impl, direction): median milliseconds over `--iters` calls, TFLOP/s of the
2 M K N flops, the check.

    python -m benchmarks.quant_gemm --out benchmarks/results/quant_gemm_h200.jsonl  # one H200
    python -m benchmarks.quant_gemm --sweep --shapes 4096x14336   # kernels over SWEEP, checked
    python -m benchmarks.quant_gemm --smoke        # CPU: tiny shapes, interpret mode
"""
from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp

from benchmarks.probes import emit, median_ms
from models import quant_pallas as qp
from models.quant import quantized_matmul, random_quantized

SHAPES_8B = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]
TOKENS_8B = 8192
SMOKE_SHAPES, SMOKE_TOKENS = [(256, 128)], 48
FORMATS = ("nf4", "int8")
IMPLS = ("xla", "pallas")
# Candidates for --sweep (forward kwargs, backward kwargs). The first is the NF4 default
# (select-tree decode, bm=256, 8 warps); then the table decode (measured slower on the H200), two NF4 blocks per K step
# (bk), grouped launch order (group), the swapped product (swap_ab: dequantised tile as the
# dot's first operand), contiguous x loads (split_x), scales on the accumulator, and bm=128
# tiles. Keys the int8 kernels lack (decode, scale_acc, split_x) make a candidate NF4-only.
_F, _B = dict(bm=256, bn=128, num_warps=8), dict(bm=256, bk=128, bn=64, num_warps=8)
SWEEP = [
    (_F, _B),
    (dict(_F, decode="lut"), dict(_B, decode="lut")),
    (dict(_F, bk=128), dict(_B, bk=256)),
    (dict(_F, group=8), dict(_B, group=8)),
    (dict(_F, swap_ab=True), dict(_B, swap_ab=True)),
    (dict(_F, split_x=True), dict(_B, bn=128)),
    (dict(_F, bk=128, group=8, swap_ab=True), dict(_B, bk=256, group=8, swap_ab=True)),
    (dict(_F, bk=128, group=8, swap_ab=True, split_x=True), dict(_B, bn=128, group=8,
                                                                  swap_ab=True)),
    (dict(_F, group=8, scale_acc=True, swap_ab=True), dict(_B, bn=128, group=8)),
    (dict(bm=128, bn=128, bk=128, num_warps=4, group=8),
     dict(bm=128, bk=128, bn=64, num_warps=4, group=8)),
]
NF4_ONLY = ("decode", "scale_acc", "split_x")


def max_rel(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def impl_fns(impl: str, dtype) -> tuple:
    """(forward, backward) of `quantized_matmul` under `impl`, jitted; the backward is the VJP
    for x only (the forward's output is unused there, so XLA drops it)."""
    fwd = jax.jit(lambda x, q: quantized_matmul(x, q, dtype, impl))

    @jax.jit
    def bwd(x, dy, q):
        return jax.vjp(lambda x: quantized_matmul(x, q, dtype, impl), x)[1](dy)[0]

    return fwd, bwd


def row(**fields) -> dict:
    ms = fields["ms"]
    flops = 2 * fields["m"] * fields["k"] * fields["n"]
    return {**fields, "tflops": flops / (ms * 1e-3) / 1e12,
            "device": jax.devices()[0].device_kind}


def run(shapes, m: int, iters: int, dtype, sweep: list, emit) -> list[dict]:
    rows = []
    key = jax.random.key(0)
    for k, n in shapes:
        kx, kd, kw = jax.random.split(jax.random.fold_in(key, k * 100003 + n), 3)
        x = jax.random.normal(kx, (m, k), dtype)
        dy = jax.random.normal(kd, (m, n), dtype)
        w = (0.02 * jax.random.normal(kw, (k, n), jnp.float32)).astype(dtype)
        base = dict(m=m, k=k, n=n)
        gemm = jax.jit(lambda x, w: x @ w)
        gemm_t = jax.jit(lambda dy, w: dy @ w.T)
        for direction, fn, args in (("forward", gemm, (x, w)), ("backward", gemm_t, (dy, w))):
            rows.append(emit(row(**base, format="bf16", impl="dense", direction=direction,
                                 ms=median_ms(fn, *args, iters=iters))))
        del w
        for fmt in FORMATS:
            q = jax.jit(functools.partial(random_quantized, shape=(k, n), fmt=fmt,
                                          dtype=dtype))(kw)
            fns = {impl: impl_fns(impl, dtype) for impl in IMPLS}
            ref = (fns["xla"][0](x, q), fns["xla"][1](x, dy, q))
            got = (fns["pallas"][0](x, q), fns["pallas"][1](x, dy, q))
            check = {"forward": max_rel(got[0], ref[0]), "backward": max_rel(got[1], ref[1])}
            del got
            for impl, (fwd, bwd) in fns.items():
                for direction, fn, args in (("forward", fwd, (x, q)),
                                            ("backward", bwd, (x, dy, q))):
                    rows.append(emit(row(**base, format=fmt, impl=impl, direction=direction,
                                         ms=median_ms(fn, *args, iters=iters),
                                         fits=qp.fits(q),
                                         **({"max_rel_vs_xla": check[direction]}
                                            if impl == "pallas" else {}))))
            if sweep:
                rows += sweep_tiles(fmt, q, x, dy, base, iters, emit, sweep, ref)
            del ref
    return rows


def sweep_tiles(fmt: str, q, x, dy, base: dict, iters: int, emit, sweep, ref) -> list[dict]:
    """The kernels called directly over `SWEEP`'s candidates (to choose their defaults), each
    result checked against the xla one (`ref`: forward, backward) as the default's is."""
    rows = []
    scales = q.block_scales() if fmt == "nf4" else None
    for fwd_tiles, bwd_tiles in sweep:
        if fmt != "nf4" and any(key in t for t in (fwd_tiles, bwd_tiles) for key in NF4_ONLY):
            continue
        # Codes and scales are arguments: closed over, a 4096 x 14336 kernel would be embedded
        # in the program as a constant.
        if fmt == "nf4":
            fwd = jax.jit(lambda x, c, s, t=fwd_tiles: qp.nf4_matmul(x, c, s, x.dtype, **t))
            bwd = jax.jit(lambda dy, c, s, t=bwd_tiles: qp.nf4_matmul_t(dy, c, s, dy.dtype, **t))
            operands = (q.codes, scales)
        else:
            fwd = jax.jit(lambda x, c, t=fwd_tiles: qp.int8_matmul(x, c, x.dtype, q.scale, **t))
            bwd = jax.jit(lambda dy, c, t=bwd_tiles: qp.int8_matmul_t(dy, c, dy.dtype, **t))
            operands = (q.codes,)
        # The int8 backward kernel takes dy already scaled per channel (its caller's job, not
        # timed here); the check scales it as the xla path does.
        dy_checked = (dy if fmt == "nf4" else
                      (dy.astype(jnp.float32) * q.scale).astype(dy.dtype))
        for direction, fn, arg, tiles in (("forward", fwd, x, fwd_tiles),
                                          ("backward", bwd, dy, bwd_tiles)):
            try:
                got = fn(dy_checked if direction == "backward" else arg, *operands)
                check = max_rel(got, ref[direction == "backward"])
                del got
                ms = median_ms(fn, arg, *operands, iters=iters)
            except Exception as e:  # a tile size the GPU cannot compile: report it, go on
                rows.append(emit({**base, "format": fmt, "impl": "pallas-sweep",
                                  "direction": direction, "tiles": tiles,
                                  "error": f"{type(e).__name__}: {str(e)[:300]}"}))
                continue
            rows.append(emit(row(**base, format=fmt, impl="pallas-sweep", direction=direction,
                                 tiles=tiles, ms=ms, max_rel_vs_xla=check)))
    return rows


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true",
                    help="CPU smoke test: tiny shapes, float32, kernels in interpret mode")
    ap.add_argument("--tokens", type=int, default=None, help=f"M (default {TOKENS_8B})")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="also time the kernels over SWEEP")
    ap.add_argument("--shapes", default="", help="only these K x N, e.g. 4096x14336,14336x4096 "
                    "(a --sweep over all four 8B shapes compiles 80 kernels)")
    ap.add_argument("--out", default="", help="append the JSON lines to this file too")
    args = ap.parse_args(argv)
    chosen = [tuple(int(d) for d in item.split("x")) for item in args.shapes.split(",") if item]
    if args.smoke:
        shapes, m, iters, dtype = SMOKE_SHAPES, args.tokens or SMOKE_TOKENS, 1, jnp.float32
        sweep = SWEEP[:1] if args.sweep else []  # the code path, not a search
    else:
        shapes, m, iters, dtype = SHAPES_8B, args.tokens or TOKENS_8B, args.iters, jnp.bfloat16
        sweep = SWEEP if args.sweep else []
        if jax.default_backend() != "gpu":
            print("warning: no GPU: the pallas kernels run in interpret mode (slow, and not "
                  "what this benchmark measures); use --smoke on CPU", file=sys.stderr)

    def emit_row(r: dict) -> dict:
        emit(r, args.out)
        return r

    return run(chosen or shapes, m, iters, dtype, sweep, emit_row)


if __name__ == "__main__":
    main()
