"""Column/row-parallel layers with LoRA: the shard_map math against single-device references.

A toy transformer-like model written against the `models/parallel.py` seam (so the same code runs
with `NoParallelism` and `TensorParallelism`) checks loss and every adapter gradient in several
layouts, LoRA dropout, a scanned stack, and the "replicated" role.

Tolerance: float32, 1e-5 absolute and relative (see tests/sharding_common.py).
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import lora_jax as lj
from models.parallel import NoParallelism
from sharding import (BATCH_AXES, ColumnParallelDense, ReplicatedDense, RowParallelDense,
                      TensorParallelism, column_parallel, row_parallel, shard_params)
from tests.sharding_common import TOL, assert_trees_close, mesh_of, run_fast

D, F, V, B, S, R = 32, 64, 48, 8, 16, 4
DROPOUT = 0.25


def _dense_factory(parallel):
    def dense(features, role, name, bias=True):
        return parallel.dense(features, role=role, name=name, use_bias=bias, dtype=None,
                              param_dtype=jnp.float32,
                              kernel_init=nn.initializers.lecun_normal(),
                              bias_init=nn.initializers.normal(0.1))
    return dense


class ToyBlock(nn.Module):
    """Pre-norm attention-like mixer (a causal cumsum needs the whole sequence) and an MLP."""

    parallel: Any

    @nn.compact
    def __call__(self, x, _):
        dense = _dense_factory(self.parallel)
        h = nn.RMSNorm(name="norm1")(x)
        q, v = dense(D, "column", "q_proj")(h), dense(D, "column", "v_proj", bias=False)(h)
        x = x + dense(D, "row", "o_proj")(jnp.cumsum(jnp.tanh(q) * v, axis=1) / S)
        up = dense(F, "column", "up_proj")(nn.RMSNorm(name="norm2")(x))
        x = x + dense(D, "row", "down_proj", bias=False)(jax.nn.silu(up))
        return self.parallel.constrain(x, "residual"), None


class Toy(nn.Module):
    """Two scanned ToyBlocks, a column-parallel head and a small replicated one."""

    parallel: Any = NoParallelism()

    @nn.compact
    def __call__(self, x):
        x = self.parallel.constrain(x, "residual")
        stack = nn.scan(ToyBlock, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True}, length=2)
        x, _ = stack(self.parallel, name="layers")(x, None)
        h = nn.RMSNorm(name="norm")(x)
        logits = _dense_factory(self.parallel)(V, "column", "lm_head")(h)
        extra = _dense_factory(self.parallel)(V, "replicated", "aux_head")(h)
        return self.parallel.constrain(logits + extra, "logits")


@pytest.fixture(scope="module")
def toy_setup():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, S, D), np.float32)
    labels = rng.integers(0, V, (B, S)).astype(np.int32)
    # Random B as well as A (init_lora_weights=False), so every adapter gradient is non-zero;
    # ".*" targets the heads too, so the replicated role is covered.
    config = lj.LoraConfig(r=R, lora_alpha=8, target_modules=".*", init_lora_weights=False)
    params = run_fast(lambda k: lj.inject(Toy().init(k, x)["params"], config,
                                          jax.random.fold_in(k, 1)), jax.random.key(0))
    base, adapters = lj.split(params)
    return x, labels, base, adapters


def toy_loss(model, adapters, base, x, labels, rngs=None, lora_dropout=0.0):
    logits = lj.apply(model, {"params": lj.combine(base, adapters)}, x, rngs=rngs,
                      deterministic=rngs is None, lora_dropout=lora_dropout)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def loss_and_grads(model, setup, mesh=None, rngs=None, lora_dropout=0.0):
    """(loss, adapter gradients); sharded over `mesh` (params by the rules, rows over dp x fsdp)
    when given, else on one device."""
    x, labels, base, adapters = setup
    args = (adapters, base, x, labels, rngs)
    if mesh is not None:
        rows = NamedSharding(mesh, P(BATCH_AXES))
        args = (shard_params(adapters, mesh), shard_params(base, mesh), jax.device_put(x, rows),
                jax.device_put(labels, rows), rngs)
    fn = functools.partial(toy_loss, model, lora_dropout=lora_dropout)
    return run_fast(jax.value_and_grad(fn), *args)


@pytest.fixture(scope="module")
def toy_reference(toy_setup):
    return loss_and_grads(Toy(), toy_setup)


@pytest.fixture(scope="module")
def dropout_reference(toy_setup):
    return loss_and_grads(Toy(), toy_setup, rngs={"dropout": jax.random.key(7)},
                          lora_dropout=DROPOUT)


# The models' test covers the issue's layouts; here, the one the toy adds: all three axes at
# once, with a scanned stack, biases, a replicated-role head and adapters on every layer.
LAYOUTS = {  # name: (dp, fsdp, tp, sequence_parallel)
    "dp2_fsdp2_tp2_sp": (2, 2, 2, True),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_toy_model_loss_and_adapter_grads_match_single_device(toy_setup, toy_reference, layout):
    dp, fsdp, tp, sp = LAYOUTS[layout]
    mesh = mesh_of(dp, fsdp, tp)
    model = Toy(TensorParallelism(mesh=mesh, sequence_parallel=sp))
    loss, grads = loss_and_grads(model, toy_setup, mesh)
    np.testing.assert_allclose(loss, toy_reference[0], **TOL)
    assert_trees_close(grads, toy_reference[1], **TOL)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_lora_dropout_matches_lora_jax_apply(toy_setup, toy_reference, dropout_reference,
                                             sequence_parallel):
    """Same keys (one make_rng per layer scope) and layout-independent random bits: the sharded
    layers drop exactly the entries `lora_jax.apply` drops on one device."""
    assert abs(float(dropout_reference[0]) - float(toy_reference[0])) > 1e-4  # dropout acted
    mesh = mesh_of(tp=4)
    model = Toy(TensorParallelism(mesh=mesh, sequence_parallel=sequence_parallel))
    loss, grads = loss_and_grads(model, toy_setup, mesh, rngs={"dropout": jax.random.key(7)},
                                 lora_dropout=DROPOUT)
    np.testing.assert_allclose(loss, dropout_reference[0], **TOL)
    assert_trees_close(grads, dropout_reference[1], **TOL)


def test_parallel_layers_are_not_dense():
    """`lora_jax.apply` adds adapters to nn.Dense calls; these layers add their own."""
    for cls in (ColumnParallelDense, RowParallelDense, ReplicatedDense):
        assert not issubclass(cls, (nn.Dense, nn.DenseGeneral))


@pytest.mark.parametrize("role", ["column", "row"])
@pytest.mark.parametrize("layout", [(1, 1, 4, False), (1, 1, 4, True), (2, 2, 2, True)])
def test_functions_match_formula_with_gradients(role, layout):
    """y = x K + bias + s (x A) B and its gradients in x, A, B, against plain jnp on one device."""
    dp, fsdp, tp, sp = layout
    mesh = mesh_of(dp, fsdp, tp)
    rng = np.random.default_rng(1)
    fan_in, fan_out = (D, F) if role == "column" else (F, D)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    # Weights scaled by 1/sqrt(fan-in), as initialisers do, so activations stay O(1).
    x, bias = normal(B, S, fan_in), normal(fan_out)
    kernel = normal(fan_in, fan_out) / np.sqrt(fan_in)
    a, b = normal(fan_in, R) / np.sqrt(fan_in), normal(R, fan_out) / np.sqrt(R)
    fn = column_parallel if role == "column" else row_parallel

    def sharded(x, a, b):
        return jnp.sum(jnp.sin(fn(x, kernel, bias, (a, b, 0.5), mesh=mesh, sequence_parallel=sp)))

    def plain(x, a, b):
        return jnp.sum(jnp.sin(x @ kernel + bias + 0.5 * (x @ a) @ b))

    got = run_fast(jax.value_and_grad(sharded, argnums=(0, 1, 2)), x, a, b)
    want = jax.jit(jax.value_and_grad(plain, argnums=(0, 1, 2)))(x, a, b)
    assert_trees_close(got, want, **TOL)


@pytest.mark.parametrize("role", ["column", "row"])
def test_bfloat16_layers_are_as_accurate_as_single_device_bfloat16(role):
    """bf16 compute: tp partial sums round differently from one big dot, so compare errors
    against a float32 reference: the sharded layer may be at most 2x the plain bf16 layer's."""
    mesh = mesh_of(tp=4)
    rng = np.random.default_rng(2)
    fan_in, fan_out = (D, F) if role == "column" else (F, D)
    x = jnp.asarray(rng.standard_normal((B, S, fan_in)), jnp.bfloat16)
    kernel = jnp.asarray(rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in), jnp.bfloat16)
    a = rng.standard_normal((fan_in, R)).astype(np.float32)
    b = rng.standard_normal((R, fan_out)).astype(np.float32)
    fn = column_parallel if role == "column" else row_parallel
    got = run_fast(lambda x: fn(x, kernel, None, (a, b, jnp.float32(0.5)), mesh=mesh,
                                lora_dtype=jnp.bfloat16), x)
    assert got.dtype == jnp.bfloat16

    def dense(dtype):
        return (x.astype(dtype) @ kernel.astype(dtype)
                + 0.5 * (x.astype(dtype) @ a.astype(dtype)) @ b.astype(dtype))

    exact = np.asarray(dense(jnp.float32))
    err_plain = np.max(np.abs(np.asarray(dense(jnp.bfloat16), np.float32) - exact))
    err_sharded = np.max(np.abs(np.asarray(got, np.float32) - exact))
    assert err_sharded <= 2 * err_plain, (err_sharded, err_plain)
