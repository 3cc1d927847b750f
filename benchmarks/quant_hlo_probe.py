"""Compiled GPU HLO of one quantised projection's forward + input gradient: is the kernel
dequantised into a bf16 [in, out] buffer, or read as codes inside the GEMM fusion?

    python benchmarks/quant_hlo_probe.py OUTDIR [xla|pallas]   # pallas: models.quant_pallas
"""
import re, sys, json
import jax, jax.numpy as jnp
from models.quant import random_quantized, quantized_matmul
IN, OUT_, T = 4096, 14336, 4096
IMPL = sys.argv[2] if len(sys.argv) > 2 else "xla"  # quantized_matmul's impl
x = jax.random.normal(jax.random.key(0), (T, IN), jnp.bfloat16)
for fmt in ("nf4", "int8", "fp8"):
    q = random_quantized(jax.random.key(1), (IN, OUT_), fmt)
    f = jax.jit(jax.value_and_grad(lambda x, q: quantized_matmul(x, q, jnp.bfloat16, IMPL).astype(jnp.float32).sum()))
    text = f.lower(x, q).compile().as_text()
    kernel_bufs = len(re.findall(rf"bf16\[{IN},{OUT_}\]|bf16\[{OUT_},{IN}\]", text))
    calls = re.findall(r'custom_call_target="([^"]+)"', text)
    fusions = sorted(set(re.findall(r'"kind":"([^"]+)"', text)))
    print(json.dumps({"fmt": fmt, "impl": IMPL, "bf16_kernel_shaped_buffers": kernel_bufs,
                      "custom_calls": sorted(set(calls)), "fusion_kinds": fusions,
                      "triton_gemm_fusions": len(re.findall(r"__triton_gemm", text))}))
    open(f"{sys.argv[1]}/{fmt}{'' if IMPL == 'xla' else '_' + IMPL}.hlo.txt", "w").write(text)
