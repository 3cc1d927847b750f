"""`benchmarks.trace_summary` on a hand-written Chrome trace: GPU stream kernels are grouped by
category and op, host events and the derived "XLA Ops" line are not counted."""
import gzip
import json

import pytest

from benchmarks.trace_summary import category, render, summarize_dir

META = [
    {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/host:CPU"}},
    {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0 (NVIDIA H200)"}},
    {"ph": "M", "pid": 2, "tid": 7, "name": "thread_name", "args": {"name": "Stream #13(Compute)"}},
    {"ph": "M", "pid": 2, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}},
]


def kernel(name, op, dur_us, tid=7, pid=2):
    return {"ph": "X", "pid": pid, "tid": tid, "ts": 0, "dur": dur_us, "name": name,
            "args": {"hlo_op": op}}


def write_trace(tmp_path, events):
    run = tmp_path / "plugins" / "profile" / "2026_11_29"
    run.mkdir(parents=True)
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": META + events}, f)
    return tmp_path


def test_groups_stream_kernels_per_step(tmp_path):
    events = [
        kernel("sm90_xmma_gemm_bf16bf16_bf16f32", "dot.1", 3000),
        kernel("sm90_xmma_gemm_bf16bf16_bf16f32", "dot.1", 3000),
        kernel("cudnn_generated_fort_native_sdpa_sm90", "custom-call.2", 1000),
        kernel("loop_multiply_fusion", "multiply_fusion.3", 500),
        kernel("dot.1", "dot.1", 9999, tid=8),   # derived XLA Ops line: not a kernel
        kernel("PjitFunction(step)", "", 9999, pid=1),  # host
    ]
    summary = summarize_dir(write_trace(tmp_path, events), steps=2)
    assert summary["kernel_ms_per_step"] == pytest.approx(3.75)
    assert summary["by_category_ms"] == pytest.approx(
        {"gemm": 3.0, "attention": 0.5, "elementwise fusion": 0.25})
    top = summary["top_ops"][0]
    assert (top["op"], top["kernels"], top["ms"]) == ("dot.1", 1, pytest.approx(3.0))
    assert "GPU kernel time per step: 3.8 ms" in render(summary)


def test_categories():
    assert category("nvjet_hsh_256x128", "fusion.4") == "gemm"
    assert category("triton_gemm_dot_3", "triton_gemm_dot.3") == "gemm"
    assert category("input_reduce_fusion", "reduce.9") == "reduction"
    assert category("some_kernel", "custom-call") == "other"
    flash_backward = "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16"
    assert category(flash_backward, "") == "attention"  # not "gemm", for all its "wgmma"


def test_missing_trace_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="jax.profiler.trace"):
        summarize_dir(tmp_path, steps=1)


def test_hlo_dump_annotates_ops_with_shape_and_source(tmp_path):
    hlo = tmp_path / "module.txt"
    hlo.write_text(
        'ENTRY %main {\n'
        '  %custom-call.8 = (bf16[8192,4096]{1,0}, s8[33554432]{0}) custom-call(%a, %b), '
        'custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/mlp/gate_proj/'
        'dot_general"}\n}\n')
    events = [kernel("nvjet_sm90_tst_128x160", "custom-call.8", 2000),
              kernel("Memset 3", "custom-call.8", 5)]  # cuBLAS's memset: not its category
    summary = summarize_dir(write_trace(tmp_path, events), steps=1, hlo=str(hlo))
    top = summary["top_ops"][0]
    assert top["shape"].startswith("(bf16[8192,4096]") and top["category"] == "gemm"
    assert top["source"].endswith("gate_proj/dot_general")
    assert "gate_proj/dot_general" in render(summary)
