"""What the GPU micro-probes (`fp8_rescale_probe`, `fp8_levers_probe`, `quant_gemm`) share: the
median time of a jitted call, and one JSON line per measured row, printed and appended to a file."""
from __future__ import annotations

import json
import statistics
import time

import jax


def median_ms(fn, *args, iters: int) -> float:
    """Median wall time of `fn(*args)` in ms, after one call that compiles and warms it up."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def emit(row: dict, out: str = "") -> None:
    """Print `row` as one JSON line and, when `out` names a file, append the line to it."""
    line = json.dumps(row)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")
