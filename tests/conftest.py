"""Shared test setup: 8 simulated CPU devices (set before JAX starts) and float32 matmuls."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# A persistent XLA compilation cache for this run and the CLI / multi-process subprocesses it
# starts (they inherit the environment): many tests compile the same tiny programs (the same
# train step in several CLI runs, the same model in several parity tests), and a cache keyed by
# the program compiles each once. Measured on the 2-core CI shape: tests/test_safety.py +
# tests/test_examples_train.py 136 s -> 115 s from an empty cache. A fresh directory per run
# (removed at exit) unless the caller chose one, so a stale entry can never be read.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="lora-jax-test-xla-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

# Parity tests compare against float32 references; default TPU/GPU-style bf16 passes would not.
jax.config.update("jax_default_matmul_precision", "highest")
