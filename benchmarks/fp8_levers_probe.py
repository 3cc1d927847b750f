"""The two parts of the 8B FP8-stored step that still run in bf16, timed alone in bf16 and in FP8:
what an FP8 output head and an FP8 attention could take off the step (issue 15's 26k tok/s goal;
docs/PERFORMANCE.md, "FP8 with no activation amax at all").

  head       hidden [8192, 4096] @ head [4096, 128256] forward and its input gradient (the head
             is frozen: no kernel gradient). bf16, and `models.quant.quantized_matmul` on an
             `Fp8Kernel` (the library's FP8 projection: per-tensor current scaling of x and dy).
  attention  causal flash attention on 8B's shapes (batch 4, 2048 tokens, 32 query heads, 8 KV
             heads, head dim 128), forward and the gradients of q, k, v. bf16: cuDNN through
             `jax.nn.dot_product_attention`; FP8: cuDNN's FP8 flash attention through jax's
             private `jax._src.cudnn.fused_attention_stablehlo.dot_product_attention(use_fp8=True)`
             with every scale 1 (a speed bound: a real recipe adds its scaling). If cuDNN refuses
             grouped KV heads in FP8, the KV heads are repeated to 32 first (said in the row).

Each row: the median milliseconds of a jitted (forward, vjp) over `--iters` calls, and the
forward's relative error (Frobenius norm; head: against float32, attention: FP8 against bf16),
one JSON line per row.

    python -m benchmarks.fp8_levers_probe --out FILE        # one H200
    python -m benchmarks.fp8_levers_probe --smoke           # CPU: the head at tiny shapes only
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from benchmarks.probes import emit, median_ms
from models.quant import quantize, quantized_matmul

HEAD = dict(tokens=8192, hidden=4096, vocab=128256)
ATTENTION = dict(batch=4, seq=2048, q_heads=32, kv_heads=8, head_dim=128)
SMOKE_HEAD = dict(tokens=64, hidden=128, vocab=512)


def forward_and_input_gradient(f):
    """jit of (x, dy) -> (f(x), the vjp of f at x applied to dy): one forward and its backward."""
    def run(x, dy):
        y, vjp = jax.vjp(f, x)
        return y, vjp(dy)
    return jax.jit(run)


def head_rows(shape: dict, iters: int):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (shape["tokens"], shape["hidden"]), jnp.bfloat16)
    w = 0.02 * jax.random.normal(k2, (shape["hidden"], shape["vocab"]), jnp.float32)
    dy = jax.random.normal(k3, (shape["tokens"], shape["vocab"]), jnp.bfloat16)
    w16, w8 = w.astype(jnp.bfloat16), quantize(w, "fp8", dtype=jnp.bfloat16)
    forms = {"bf16": lambda x_: x_ @ w16, "fp8": lambda x_: quantized_matmul(x_, w8, jnp.bfloat16)}
    want = (x.astype(jnp.float32) @ w)
    for form, f in forms.items():
        got = jax.jit(f)(x).astype(jnp.float32)
        yield {"part": "head", "form": form, **shape,
               "ms": median_ms(forward_and_input_gradient(f), x, dy, iters=iters),
               "rel_err": float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))}


def _fp8_attention(q, k, v):
    """cuDNN FP8 flash attention (causal), every scale and descale 1; q, k, v cast to e4m3, the
    output back to q's dtype."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # private: FP8 is not public
    one = jnp.ones((1, 1, 1, 1), jnp.float32)
    params = {name: one for name in cudnn.fp8_params_keys}
    e4m3 = jnp.float8_e4m3fn
    out, _, _ = cudnn.dot_product_attention(
        q.astype(e4m3), k.astype(e4m3), v.astype(e4m3), fp8_params=params,
        scale=q.shape[-1] ** -0.5, mask_type=cudnn.MaskType.CAUSAL, use_fp8=True)
    return out.astype(q.dtype)


def attention_rows(shape: dict, iters: int):
    b, t, h = shape["batch"], shape["seq"], shape["head_dim"]
    keys = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(keys[0], (b, t, shape["q_heads"], h), jnp.bfloat16)
    kv = [jax.random.normal(k, (b, t, shape["kv_heads"], h), jnp.bfloat16) for k in keys[1:3]]
    do = jax.random.normal(keys[3], q.shape, jnp.bfloat16)

    def timed(form, attend, kv_heads_repeated=False):
        f = lambda qkv: attend(*qkv)
        run = forward_and_input_gradient(f)
        return {"part": "attention", "form": form, **shape,
                "kv_heads_repeated": kv_heads_repeated,
                "ms": median_ms(run, (q, *kv), do, iters=iters)}

    bf16 = lambda q_, k_, v_: jax.nn.dot_product_attention(
        q_, k_, v_, is_causal=True, implementation="cudnn")
    yield timed("bf16", bf16)
    try:
        row = timed("fp8", _fp8_attention)
        # the forward's relative error against bf16: shows the FP8 call computes attention
        got, want = (jax.jit(f)(q, *kv).astype(jnp.float32) for f in (_fp8_attention, bf16))
        yield {**row, "rel_err": float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))}
    except Exception as grouped_error:  # noqa: BLE001: the reason is recorded in the row
        repeat = shape["q_heads"] // shape["kv_heads"]
        expand = lambda q_, k_, v_: _fp8_attention(q_, jnp.repeat(k_, repeat, axis=2),
                                                    jnp.repeat(v_, repeat, axis=2))
        try:
            row = timed("fp8", expand, kv_heads_repeated=True)
        except Exception as error:  # noqa: BLE001
            row = {"part": "attention", "form": "fp8", **shape, "error": repr(error)[:400]}
        yield {**row, "grouped_error": repr(grouped_error)[:400]}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU: the head at tiny shapes only")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    rows = (head_rows(SMOKE_HEAD, 2) if args.smoke
            else [*head_rows(HEAD, args.iters), *attention_rows(ATTENTION, args.iters)])
    for row in rows:
        emit({**row, "backend": jax.default_backend(), "jax": jax.__version__}, args.out)


if __name__ == "__main__":
    main()
