"""`quant_impl="pallas"` in the tensor-parallel shard_map layers: each device runs the fused
NF4 / int8 kernel (`models.quant_pallas`, interpret mode on this CPU) on its LOCAL shard.

Checked: column, row and row + sequence-parallel layers with a LoRA adapter, on tp2 (nf4 and
int8) and dp2 x tp2 (nf4), against the same layer math on one device at quant_impl="xla"
(value, input gradient, both adapter gradients); the pallas_call sits inside the layer's
shard_map on the local shard's shapes (and is absent under "xla"); a local shard that does
not tile falls back to XLA although the global kernel tiles; a tiny tp=2 NF4 Llama's logits;
the model config / CLI flag reaching the layers; bad impls refused; and the GPU program
(exported for CUDA from this machine): two Triton calls per layer, the same collectives as the
XLA impl's, no float copy of the local kernel.

Tolerance: 1e-5 of each leaf's largest magnitude (`assert_close_to_max`). The kernels multiply
the very values the XLA path dequantises and accumulate in float32, only in another order
(64-row steps, even and odd rows apart: 2e-6 relative in norm, tests/test_quant_pallas.py);
tp adds the float32 reordering of its partial sums (1e-5, tests/sharding_common.py). A wrong
shard, nibble, scale or a missing psum moves results by >= 1e-2.
"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from models import quant_pallas as qp
from models.llama import Llama, LlamaConfig
from models.quant import quantize, quantized_matmul
from sharding import BATCH_AXES, TensorParallelism, shard_params
from sharding.layers import ColumnParallelDense, column_parallel, row_parallel
from tests.sharding_common import mesh_of, run_fast
from tests.test_quant_tp import assert_close_to_max

RTOL = 1e-5  # of each leaf's max: see the module docstring
B, S, K, N, R = 4, 8, 256, 128, 4  # column: local out N/2=64; row: local in K/2=128 (2 blocks)
quantize_jit = jax.jit(quantize, static_argnums=1, static_argnames="dtype")  # eager is slow


def gaussian(shape, seed, std=1.0):
    return jnp.asarray(std * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def operands(fmt):
    """x [B, S, K], the quantised kernel [K, N] (float32 compute), adapter (A, B, scale)."""
    q = quantize_jit(gaussian((K, N), seed=1, std=0.02), fmt, dtype=jnp.float32)
    lora = (gaussian((K, R), seed=2, std=0.1), gaussian((R, N), seed=3, std=0.1),
            jnp.float32(2.0))
    return gaussian((B, S, K), seed=4), q, lora


LAYERS = {"column": functools.partial(column_parallel),
          "row": functools.partial(row_parallel),
          "row_sp": functools.partial(row_parallel, sequence_parallel=True)}


def grads_of(layer, x, lora):
    """(y, dx, dA, dB) of `sum(sin(layer(x, (A, B, s))))`: nonlinear, so dx depends on x."""
    def loss(x, a, b):
        y = layer(x, (a, b, lora[2]))
        return jnp.sum(jnp.sin(y)), y
    (_, y), (dx, da, db) = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        x, *lora[:2])
    return y, dx, da, db


def one_device(x, q, lora):
    """The layer on one device at quant_impl="xla": x @ W + s (x @ A) @ B."""
    def layer(x, adapter):
        a, b, s = adapter
        return quantized_matmul(x, q, jnp.float32) + (s * (x @ a)) @ b
    return grads_of(layer, x, lora)


def tensor_parallel(x, q, lora, *, mesh, impl):
    return {name: grads_of(lambda x, ad, f=f: f(x, q, None, ad, mesh=mesh, quant_impl=impl),
                           x, lora)
            for name, f in LAYERS.items()}


@pytest.mark.parametrize("fmt,dp", [("nf4", 1), ("int8", 1), ("nf4", 2)])
def test_tp_layers_with_pallas_equal_one_device(fmt, dp):
    x, q, lora = operands(fmt)
    mesh = mesh_of(dp=dp, tp=2)
    ref = run_fast(one_device, x, q, lora)
    got = run_fast(functools.partial(tensor_parallel, mesh=mesh, impl="pallas"),
                   jax.device_put(x, NamedSharding(mesh, P(BATCH_AXES))),
                   shard_params({"k": {"kernel": q}}, mesh)["k"]["kernel"], lora)
    for name, out in got.items():
        assert_close_to_max(out, ref, RTOL)


def _shard_map_bodies(jaxpr) -> list[str]:
    return [str(e.params["jaxpr"]) for e in jaxpr.eqns if e.primitive.name == "shard_map"]


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_pallas_call_runs_inside_the_shard_map_on_the_local_shard(fmt):
    """The column layer's forward and backward: pallas_calls inside the shard_map, reading the
    local codes (column: out N/2 = 64), none under "xla"."""
    x, q, lora = operands(fmt)
    mesh = mesh_of(tp=2)
    local_codes = {"nf4": f"u8[{K // 2},{N // 2}]", "int8": f"i8[{K},{N // 2}]"}[fmt]

    def traced(impl):
        f = lambda x: jnp.sum(jnp.sin(column_parallel(x, q, mesh=mesh, quant_impl=impl)))  # noqa
        return jax.make_jaxpr(jax.grad(f))(x).jaxpr

    bodies = _shard_map_bodies(traced("pallas"))
    assert bodies and all("pallas_call" in body for body in bodies)
    calls = [line for body in bodies for line in body.splitlines() if "pallas_call[" in line]
    assert len(calls) == 2, calls  # forward and backward
    assert all(local_codes in body for body in bodies)
    assert "pallas_call" not in str(traced("xla"))


def test_a_local_shard_that_does_not_tile_takes_the_xla_path():
    """int8 [128, 48]: the global kernel tiles (48 = 3 x 16) but a tp=2 column shard [128, 24]
    does not (no power-of-two divisor >= 16), so each device runs the XLA rules: no
    pallas_call, the values of quant_impl="xla" exactly."""
    q = quantize_jit(gaussian((128, 48), seed=5, std=0.02), "int8", dtype=jnp.float32)
    assert qp.fits(q)
    mesh = mesh_of(tp=2)
    x = gaussian((2, 4, 128), seed=6)
    f = {impl: functools.partial(column_parallel, kernel=q, mesh=mesh, quant_impl=impl)
         for impl in ("xla", "pallas")}
    assert "pallas_call" not in str(jax.make_jaxpr(f["pallas"])(x))
    np.testing.assert_array_equal(run_fast(f["pallas"], x), run_fast(f["xla"], x))


CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1)


def test_tiny_llama_tp2_pallas_logits_equal_one_device_xla():
    """Same params; `LlamaConfig.quant_impl` reaches every tp layer (a pallas_call per block
    projection in the forward: q, k, v, o, gate, up, down)."""
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 500, (4, 8)), jnp.int32)
    xla = Llama(LlamaConfig.tiny(quantize="nf4", **CONFIG))
    params = jax.jit(xla.init)(jax.random.key(0), ids)
    mesh = mesh_of(tp=2)
    tp = Llama(LlamaConfig.tiny(quantize="nf4", quant_impl="pallas", **CONFIG),
               TensorParallelism(mesh=mesh))
    assert str(jax.make_jaxpr(tp.apply)(params, ids)).count("pallas_call[") == 7
    logits = run_fast(tp.apply, shard_params(params, mesh), ids)
    assert_close_to_max(logits, run_fast(xla.apply, params, ids), RTOL)


def test_cli_quant_impl_reaches_the_tp_layers():
    """`--quantize nf4 --quant-impl pallas --tp 2` is accepted and the model the training
    script builds (its config, TensorParallelism) runs the kernels; "xla" runs none."""
    from examples import modeling
    from examples.cli import parse_args
    mesh = mesh_of(tp=2)
    counts = {}
    for impl in ("xla", "pallas"):
        cfg = parse_args(["--model", "llama3", "--quantize", "nf4", "--quant-impl", impl,
                          "--tp", "2"])
        config, _ = modeling.model_config(cfg)
        assert config.quant_impl == impl
        ids = jax.ShapeDtypeStruct((2, 8), jnp.int32)
        params = jax.eval_shape(Llama(config).init, jax.random.key(0), ids)
        model = Llama(config, TensorParallelism(mesh=mesh))
        counts[impl] = str(jax.make_jaxpr(model.apply)(params, ids)).count("pallas_call[")
    assert counts["xla"] == 0 and counts["pallas"] > 0, counts


def test_bad_impl_is_refused_by_the_tp_layers():
    x, q, _ = operands("int8")
    mesh = mesh_of(tp=2)
    with pytest.raises(ValueError, match=r"quant_impl='triton'.*'xla', 'pallas'"):
        column_parallel(x, q, mesh=mesh, quant_impl="triton")
    with pytest.raises(ValueError, match=r"quant_impl='cuda'"):
        row_parallel(x, q, mesh=mesh, quant_impl="cuda")
    layer = ColumnParallelDense(64, mesh=mesh, quant="nf4", quant_impl="Pallas")
    with pytest.raises(ValueError, match=r"quant_impl='Pallas'"):
        jax.eval_shape(layer.init, jax.random.key(0), jnp.ones((2, 4, 128)))


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_gpu_program_has_triton_calls_and_the_xla_collectives(fmt, monkeypatch):
    """The tp=2 column and row layers' value_and_grad in bf16, exported for CUDA as the GPU
    compiles them (interpret off, so the shard_map keeps its type check): two Triton calls
    each, the same all-reduce / all-gather / reduce-scatter counts as the XLA impl's program,
    and no float tensor shaped like the local kernel (which the XLA impl dequantises: the check
    can fail)."""
    from tests.test_quant_pallas import _export_for_cuda, _require_triton
    _require_triton()
    monkeypatch.setattr(qp, "_interpret", lambda interpret: False)
    mesh = mesh_of(tp=2)
    q = jax.eval_shape(lambda: quantize(jnp.zeros((K, N)), fmt, dtype=jnp.bfloat16))
    x = jax.ShapeDtypeStruct((B, S, K), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    local = {"column": (K, N // 2), "row": (K // 2, N)}
    for role, layer in (("column", column_parallel), ("row", row_parallel)):
        def exported(impl, layer=layer):
            loss = lambda x, q: jnp.sum(jnp.sin(  # noqa: E731
                layer(x, q, mesh=mesh, quant_impl=impl).astype(jnp.float32)))
            return _export_for_cuda(jax.value_and_grad(loss), x, q)

        text, ref = exported("pallas"), exported("xla")
        assert text.count("@__gpu$xla.gpu.triton(") == 2, role
        for op in ("all_reduce", "all_gather", "reduce_scatter"):
            assert text.count(op) == ref.count(op), (role, op)
        k, n = local[role]
        kernel_shaped = re.compile(rf"tensor<(?:{k}x{n}|{n}x{k})x(?:f32|bf16|f16)>")
        assert not kernel_shaped.search(text), role
        assert kernel_shaped.search(ref), role
