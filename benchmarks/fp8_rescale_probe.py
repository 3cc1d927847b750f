"""Where the FP8-stored base loses its time outside the GEMMs: one attention input block (x
feeding q/k/v, 8B shapes, M = 8192 tokens), forward and input gradient, in three forms.

  bf16     plain bf16 dots (the bar).
  current  `models.quant.quantized_matmul` on `Fp8Kernel`s (per-output-channel weight scale,
           per-tensor activation scale): the FP8 GEMM returns bf16 and the scales multiply its
           output in float32 afterwards, a separate pass per projection that the three input
           gradients must each take before they are summed.
  qdq      per-tensor weight scale, written as dequantise-then-dot (`dot(convert(x8) * sx,
           convert(w8) * sw)`): the pattern XLA's GPU GEMM rewriter folds into one cuBLASLt FP8
           call with the scales as its operands, so no rescaling pass is left.
  qdq32    the same with the codes converted to float32 and the dot accumulated in float32
           (the form of XLA's own FP8 rewriter tests), cast to bf16 afterwards.
  direct32 / directbf
           FP8 codes straight into the dot as `current`, but with a per-tensor weight scale: the
           output is multiplied by one scalar (in float32 / bf16), which XLA may fold into the
           GEMM, and the three input gradients may then accumulate in the GEMMs' epilogues.

For each: the median time of `jax.value_and_grad` over x, how many `__cublas$lt$matmul$f8` calls
the compiled program has, and how many other kernels (fusions). One JSON line per form.

    python -m benchmarks.fp8_rescale_probe            # one H200
    python -m benchmarks.fp8_rescale_probe --smoke    # CPU: tiny shapes, counts only
"""
from __future__ import annotations

import argparse
import functools
import os
import re

import jax
import jax.numpy as jnp

from benchmarks.probes import emit, median_ms
from models import fp8 as recipe
from models.quant import quantize, quantized_matmul

FORMS = ("bf16", "current", "qdq", "qdq32", "direct32", "directbf")
SHAPES = ((4096, 4096), (4096, 1024), (4096, 1024))  # q, k, v: [in, out]
TOKENS = 8192


def _dequant_dot(a8, sa, b8, sb, dtype, wide=None):
    """a8 [..., K] . b8 [N, K] as dequantise-then-dot with scalar scales (the rewriter's form):
    the codes converted to `wide` (default: `dtype`) and multiplied by their broadcast scale
    there, the dot accumulated into `wide`, its result cast to `dtype`."""
    wide = wide or dtype
    a = a8.astype(wide) * sa.astype(wide)
    b = b8.astype(wide) * sb.astype(wide)
    return jax.lax.dot_general(a, b, (((a.ndim - 1,), (1,)), ((), ())),
                               preferred_element_type=wide).astype(dtype)


def _direct_dot(a8, sa, b8, sb, dtype, wide):
    """a8 [..., K] . b8 [N, K] in FP8, then times the scalar sa * sb in `wide`."""
    y = jax.lax.dot_general(a8, b8, (((a8.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=dtype)
    return (y.astype(wide) * (sa * sb).astype(wide)).astype(dtype)


def _scaled_matmul(dot):
    """x [M, K] @ W, W^T = w8t [N, K] * sw (a scalar), as a frozen-kernel custom VJP: x scaled
    to e4m3 for the forward, dy to e5m2 for the input gradient, each product formed by
    `dot(a8, sa, b8, sb, dtype)` (`_dequant_dot` or `_direct_dot`)."""
    @jax.custom_vjp
    def matmul(x, w8t, sw):
        x8, sx = recipe.quantize(x, recipe.FORWARD_DTYPE)
        return dot(x8, sx, w8t, sw, x.dtype)

    def fwd(x, w8t, sw):
        return matmul(x, w8t, sw), (w8t, sw)

    def bwd(res, dy):
        w8t, sw = res
        dy8, sdy = recipe.quantize(dy, recipe.GRADIENT_DTYPE)
        # W as [K, N]: the gradient GEMM contracts N, the last axis of both operands.
        dx = dot(dy8, sdy, w8t.T, sw, dy.dtype)
        return dx, jnp.zeros_like(w8t), jnp.zeros_like(sw)

    matmul.defvjp(fwd, bwd)
    return matmul


MATMULS = {
    "qdq": _scaled_matmul(_dequant_dot),
    "qdq32": _scaled_matmul(functools.partial(_dequant_dot, wide=jnp.float32)),
    # FP8 codes straight into the dot (as `current`) with a per-tensor weight scale.
    "direct32": _scaled_matmul(functools.partial(_direct_dot, wide=jnp.float32)),
    "directbf": _scaled_matmul(functools.partial(_direct_dot, wide=jnp.bfloat16)),
}


def _per_tensor(w):
    """W^T as e4m3 codes [N, K] and one float32 scale (amax -> e4m3 max)."""
    wt8, sw = recipe.quantize(w.T, recipe.FORWARD_DTYPE)
    return wt8, sw


def loss_fn(form, x, kernels):
    """Sum over q/k/v of a cheap consumer of each projection (a square, as attention's inputs
    are used nonlinearly), so each gradient is a full tensor that depends on the output."""
    total = 0.0
    for k in kernels:
        if form == "bf16":
            y = x @ k
        elif form == "current":
            y = quantized_matmul(x, k, jnp.bfloat16)
        else:
            y = MATMULS[form](x, *k)
        total = total + jnp.sum(jnp.square(y.astype(jnp.float32)))
    return total


def build(form, key, shapes):
    keys = jax.random.split(key, len(shapes))
    ws = [0.02 * jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes)]
    if form == "bf16":
        return [w.astype(jnp.bfloat16) for w in ws]
    if form == "current":
        return [quantize(w, "fp8", dtype=jnp.bfloat16) for w in ws]
    return [_per_tensor(w) for w in ws]


def counts(hlo: str) -> dict:
    entry = hlo[hlo.index("ENTRY"):]
    return {"fp8_gemms": len(re.findall(r"__cublas\$lt\$matmul\$f8", entry)),
            "gemms": len(re.findall(r"custom_call_target=\"__cublas", entry)),
            "triton_gemms": len(re.findall(r"__triton_gemm", hlo)),
            "fusions": len(re.findall(r"= \S+ fusion\(", entry))}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="")
    ap.add_argument("--forms", nargs="+", default=list(FORMS), choices=FORMS)
    ap.add_argument("--hlo-dir", default="", help="write each form's optimised HLO here")
    args = ap.parse_args(argv)
    tokens, shapes = (64, ((128, 128), (128, 32), (128, 32))) if args.smoke else (TOKENS, SHAPES)
    x = jax.random.normal(jax.random.key(0), (tokens, shapes[0][0]), jnp.float32)
    x = x.astype(jnp.bfloat16)
    for form in args.forms:
        kernels = build(form, jax.random.key(1), shapes)
        step = jax.jit(jax.value_and_grad(lambda x_, ks, f=form: loss_fn(f, x_, ks)))
        compiled = step.lower(x, kernels).compile()
        hlo = compiled.as_text()
        row = {"form": form, "tokens": tokens, **counts(hlo), "backend": jax.default_backend(),
               "xla_flags": os.environ.get("XLA_FLAGS", "")}
        if args.hlo_dir:
            flag = "notriton" if "triton_gemm=false" in row["xla_flags"] else "default"
            with open(os.path.join(args.hlo_dir, f"probe_{form}_{flag}.hlo.txt"), "w") as f:
                f.write(hlo)
        row["loss"] = float(step(x, kernels)[0])  # the three forms agree to FP8 rounding
        if not args.smoke:
            row["ms"] = median_ms(step, x, kernels, iters=args.iters)
        emit(row, args.out)


if __name__ == "__main__":
    main()
