"""Shared test setup: 8 simulated CPU devices (set before JAX starts) and float32 matmuls."""
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

import jax  # noqa: E402

# Parity tests compare against float32 references; default TPU/GPU-style bf16 passes would not.
jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def fast_compiles():
    """Every XLA compile of the module's tests at low optimisation: eager ops included, which a
    test cannot jit itself (NNX module construction, eager forward passes, library code). A
    module opts in with `pytestmark = pytest.mark.usefixtures("fast_compiles")`.

    `jax_disable_most_optimizations` sets LLVM's level 0 (as tests/sharding_common.FAST does
    per compile) and skips LLVM's expensive passes: ~2.5x faster compiles of these tiny
    programs. XLA CPU uses no fast-math at any level, so the float32 math is the same; only
    fused multiply-adds may differ, in the last bit. The flag is process-wide and not part of
    jit's cache key: it is restored after the module, and programs compiled meanwhile stay
    cached as they were compiled."""
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)
