"""Shared test setup (set before JAX starts): 8 simulated CPU devices, a compilation cache, fast
compiles, and float32 matmuls."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# A persistent XLA compilation cache for this run and the CLI / multi-process subprocesses it
# starts (they inherit the environment): many tests compile the same programs (the same train
# step in several CLI runs, the same model in several parity tests), and a cache keyed by the
# program compiles each once. Only compiles of >= 1 s are kept (JAX's own threshold): writing
# every tiny program too cost more than it saved. Measured on this 2-core machine from an empty
# cache: tests/test_safety.py + tests/test_examples_train.py 136 s -> 91 s (all compiles kept:
# 115 s); test_lora_core + test_peft + test_named_adapters 90 s -> 82 s. A fresh directory per
# run (removed at exit) unless the caller chose one, so a stale entry is never read.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="lora-jax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

# Every XLA compile of the suite (and of the subprocesses it starts) at LLVM optimisation level 0
# without LLVM's expensive passes: the HLO passes (fusion, SPMD partitioning, collectives) that
# the HLO tests read are unchanged, XLA CPU uses no fast-math at any level, so float32 results
# match to the last bit up to fused multiply-adds, and the test programs are tiny, so the time
# goes to compiling them, not running them. Measured on this 2-core machine: tests/test_quant.py
# 108 s -> 83 s back to back; whole suite 1182 s -> 1037 s (one run each, while whole runs
# here vary by +-10%), every test passing both ways. JAX_DISABLE_MOST_OPTIMIZATIONS=0 turns it off.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402

# Parity tests compare against float32 references; default TPU/GPU-style bf16 passes would not.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_report_header(config):
    """Say which backend runs the suite. It is written for 8 devices (the simulated CPUs above);
    run with JAX_PLATFORMS=cuda on fewer GPUs, the sharded tests fail with the mesh's own error
    ("mesh dp=2 x fsdp=2 x tp=2 has 8 devices but there are 1")."""
    try:
        devices = jax.devices()
    except RuntimeError as e:  # e.g. JAX_PLATFORMS=cuda on a machine without a GPU
        return f"lora-jax tests: jax {jax.__version__}, no devices: {e}"
    line = f"lora-jax tests: jax {jax.__version__}, {len(devices)} {devices[0].platform} devices"
    if len(devices) < 8:
        line += (" (the sharded tests need 8: leave XLA_FLAGS and JAX_PLATFORMS unset for 8"
                 " simulated CPUs, or use 8 GPUs)")
    return line
