"""Helpers shared by the tests/test_sharding_*.py files."""
import jax
import numpy as np

import lora_jax as lj
from models.loss import cross_entropy
from sharding import make_mesh

# float32 parity tolerance, absolute and relative. Sharding only reorders sums (psum of partial
# products, psum_scatter, batch splits), each of at most a few thousand terms; float32's epsilon
# is 1.2e-7, so reordering moves results by ~1e-6 at the magnitudes of these tests (losses ~5,
# gradients ~1e-2..1).
TOL = dict(atol=1e-5, rtol=1e-5)

# These programs are tiny: compiling them dominates the test time, and LLVM's optimisation passes
# dominate compiling. Level 0 compiles ~2.5x faster. XLA CPU uses no fast-math at any level; only
# fused multiply-adds may differ, in the last bit, far below the tolerances. tests/conftest.py now
# sets the same level for the whole suite (JAX_DISABLE_MOST_OPTIMIZATIONS=1), so under its default
# these helpers equal plain `jax.jit`; they keep the sharded tests fast with that variable at 0.
FAST = {"xla_backend_optimization_level": 0}


def run_fast(fn, *args, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)(*args)`, compiled at optimisation level 0."""
    return compile_fast(fn, *args, **jit_kwargs)(*args)


def compile_fast(fn, *args, **jit_kwargs):
    return jax.jit(fn, **jit_kwargs).lower(*args).compile(compiler_options=FAST)


def jit_fast(fn, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)` compiling at optimisation level 0: like any jit, it compiles
    once per argument shapes and reuses that for every later call."""
    return jax.jit(fn, compiler_options=FAST, **jit_kwargs)


def mesh_of(dp=1, fsdp=1, tp=1):
    """A mesh over the first dp*fsdp*tp of the 8 simulated devices."""
    return make_mesh(dp=dp, fsdp=fsdp, tp=tp, devices=jax.devices()[:dp * fsdp * tp])


def lora_logits_loss_grads(model, adapters, base, ids):
    """(logits, next-token loss, adapter gradients) of `model` over `base` + `adapters`: what the
    model-level parity tests compare between a sharded run and one device."""
    def loss(adapters):
        logits = lj.apply(model, {"params": lj.combine(base, adapters)}, ids)
        return cross_entropy(logits, ids, shift=True), logits

    (loss_value, logits), grads = jax.value_and_grad(loss, has_aux=True)(adapters)
    return logits, loss_value, grads


def assert_trees_close(actual, expected, **tol):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    jax.tree.map(lambda a, e: np.testing.assert_allclose(np.asarray(a), np.asarray(e), **tol),
                 actual, expected)


def max_abs_diff(actual, expected) -> float:
    diffs = jax.tree.map(lambda a, e: float(np.max(np.abs(np.asarray(a) - np.asarray(e)))),
                         actual, expected)
    return max(jax.tree.leaves(diffs))
