"""Where a jitted step's GPU time goes: a summary of a `jax.profiler.trace` dump.

The profiler writes `plugins/profile/<run>/<host>.trace.json.gz` (Chrome trace format) under its
log directory. Device events are the GPU kernels; each carries the XLA op that launched it
(`args.hlo_op`). This groups them into categories (GEMM, attention, elementwise fusions, copies)
and lists the costliest ops, per step, so a change can be aimed at what takes the time.

    python -m benchmarks.trace_summary /tmp/trace --steps 2 [--hlo dump/module.jit_step...txt]

With `--hlo` (an XLA "after_optimizations" text dump of the same program: XLA_FLAGS=
"--xla_dump_to=DIR --xla_dump_hlo_as_text"), each top op is annotated with its output shape and
the JAX source it came from. Run with CUDA-graph command buffers off (jax_worker's `cmdbuf=0`)
so that every kernel carries its own op name instead of the graph's.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re

# Kernel-name patterns, first match wins. cuBLAS(Lt) GEMMs are "sm90_xmma_*", "nvjet_*" or
# "cutlass*"; XLA's own Triton GEMMs are "triton_gemm*" fusions; cuDNN flash attention "cudnn*".
# Attention first: cuDNN's flash kernels have "wgmma" in their names too.
CATEGORIES = (
    ("attention", re.compile(r"cudnn|fmha|flash|sdpa|attention", re.I)),
    ("gemm", re.compile(r"gemm|xmma|nvjet|cutlass|cublas|gemv|wgmma", re.I)),
    ("copy/memset", re.compile(r"memcpy|memset|^copy|dynamic.update.slice|concatenate", re.I)),
    ("reduction", re.compile(r"reduc", re.I)),
    ("elementwise fusion", re.compile(r"fusion|loop_|input_|triton", re.I)),
)


def category(kernel: str, op: str) -> str:
    for name, pattern in CATEGORIES:
        if pattern.search(kernel) or (name != "elementwise fusion" and pattern.search(op)):
            return name
    return "other"


def find_trace(log_dir: str | pathlib.Path) -> pathlib.Path:
    traces = sorted(pathlib.Path(log_dir).glob("plugins/profile/*/*.trace.json.gz"),
                    key=lambda p: p.stat().st_mtime)
    if not traces:
        raise FileNotFoundError(f"no plugins/profile/*/*.trace.json.gz under {log_dir}: was "
                                "jax.profiler.trace given this directory?")
    return traces[-1]


def device_events(trace: dict) -> list[dict]:
    """Kernel events ("ph": "X") on the GPU processes ("/device:GPU:n"), from their CUDA stream
    lines only: the same process also has derived "XLA Ops"/"XLA Modules" lines that repeat the
    kernels' time."""
    events = trace.get("traceEvents", [])
    meta = [e for e in events if e.get("ph") == "M"]
    gpu_pids = {e["pid"] for e in meta if e.get("name") == "process_name"
                and "gpu" in str(e.get("args", {}).get("name", "")).lower()}
    streams = {(e["pid"], e.get("tid")) for e in meta
               if e.get("name") == "thread_name" and e["pid"] in gpu_pids
               and "stream" in str(e.get("args", {}).get("name", "")).lower()}
    on_gpu = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e]
    if streams:
        on_gpu = [e for e in on_gpu if (e["pid"], e.get("tid")) in streams]
    return on_gpu


_HLO_LINE = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*?) [a-z\-]+\(")


def hlo_ops(path: str | pathlib.Path) -> dict[str, dict]:
    """op name -> {"shape", "source"} from an XLA HLO text dump."""
    ops = {}
    for line in pathlib.Path(path).read_text().splitlines():
        m = _HLO_LINE.match(line)
        if m:
            source = re.search(r'op_name="([^"]*)"', line)
            ops[m.group(1)] = {"shape": m.group(2)[:60],
                               "source": source.group(1)[-90:] if source else ""}
    return ops


def summarize(events: list[dict], steps: int, top: int = 25,
              ops: dict[str, dict] | None = None) -> dict:
    """Totals in milliseconds per step: by category, and the `top` ops by time."""
    by_category = collections.Counter()
    by_op = collections.Counter()
    by_kernel = collections.Counter()
    op_kernels = collections.defaultdict(collections.Counter)  # op -> kernel -> ms
    op_calls = collections.Counter()
    for e in events:
        kernel = e.get("name", "")
        op = str(e.get("args", {}).get("hlo_op", "")) or kernel
        ms = e["dur"] / 1e3 / steps
        by_category[category(kernel, op)] += ms
        by_op[op] += ms
        by_kernel[kernel[:120]] += ms
        op_calls[op] += 1
        op_kernels[op][kernel] += ms
    # An op is named after its costliest kernel (a cuBLAS call also launches a small memset).
    op_kernel = {op: kernels.most_common(1)[0][0] for op, kernels in op_kernels.items()}
    return {
        "steps": steps,
        "kernel_ms_per_step": sum(by_category.values()),
        "by_category_ms": dict(by_category.most_common()),
        "top_ops": [{"op": op, "ms": ms, "kernels": op_calls[op] / steps,
                     "kernel": op_kernel[op][:120], "category": category(op_kernel[op], op),
                     **(ops or {}).get(op, {})}
                    for op, ms in by_op.most_common(top)],
        "top_kernels": [{"kernel": k, "ms": ms, "category": category(k, "")}
                        for k, ms in by_kernel.most_common(top)],
    }


def summarize_dir(log_dir, steps: int, top: int = 25, hlo: str | None = None) -> dict:
    with gzip.open(find_trace(log_dir), "rt") as f:
        return summarize(device_events(json.load(f)), steps, top, hlo_ops(hlo) if hlo else None)


def render(summary: dict) -> str:
    lines = [f"GPU kernel time per step: {summary['kernel_ms_per_step']:.1f} ms"]
    for name, ms in summary["by_category_ms"].items():
        lines.append(f"  {name:<20}{ms:9.1f} ms  {ms / summary['kernel_ms_per_step']:6.1%}")
    lines.append("top ops (ms per step, kernel launches per step):")
    for row in summary["top_ops"]:
        where = f"{row['shape']}  {row['source']}" if "shape" in row else row["kernel"][:60]
        lines.append(f"  {row['ms']:8.2f} {row['kernels']:6.0f}  {row['category']:<18} "
                     f"{row['op'][:40]:<40} {where}")
    lines.append("top kernels (ms per step):")
    for row in summary.get("top_kernels", []):
        lines.append(f"  {row['ms']:8.2f}  {row['category']:<18} {row['kernel'][:90]}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("log_dir")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--hlo", default=None, help="XLA after-optimizations HLO text of the step")
    args = ap.parse_args()
    print(render(summarize_dir(args.log_dir, args.steps, args.top, args.hlo)))


if __name__ == "__main__":
    main()
