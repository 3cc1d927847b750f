"""Shared test setup: 8 simulated CPU devices (set before JAX starts) and float32 matmuls."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Parity tests compare against float32 references; default TPU/GPU-style bf16 passes would not.
jax.config.update("jax_default_matmul_precision", "highest")
