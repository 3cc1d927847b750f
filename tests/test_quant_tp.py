"""Quantised frozen kernels (NF4 / int8 / FP8) in the tensor/sequence-parallel shard_map layers.

A tiny Llama with LoRA on every projection, under tp=2, tp=2 + sequence parallelism, fsdp=2 x
tp=2 and dp=2 x tp=2, gives the logits and adapter gradients of the single-device model with the
same quantised params; the TP layers' param tree is `QuantDense`'s; shapes a shard cannot hold
are refused naming the layer and the fix.

Tolerances (float32 compute):
- nf4, int8: sharding only reorders float32 sums (tp partial products, batch splits): 1e-5
  relative, as tests/sharding_common.py argues.
- fp8, one layer: each device scales its shard of the activation (and of the output gradient)
  by the amax reduced over the mesh, so it quantises exactly as one device does: the same
  1e-5. Without the reduction a device's scale is its own shard's amax and the e4m3 codes
  differ everywhere (errors ~1e-2).
- fp8, whole model: a float32 reordering upstream (~1e-7 relative) moves an activation that
  sits at an e4m3 rounding boundary to the neighbouring code, one step of e4m3 (2^-3 of its
  binade; near zero, the subnormal step 2^-9 of the scale). In this model 1 of 8192 inputs of
  down_proj flips under tp=2, which moves the logits by ~7e-5 of their maximum. We allow 1e-3
  of the maximum: 10x the observed flips, still 10x below what a per-device scale gives.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import lora_jax as lj
from models.llama import Llama, LlamaConfig
from models.quant import QuantDense, quantize, quantized_matmul
from sharding import BATCH_AXES, MeshError, TensorParallelism, leaf_sharding, shard_params
from sharding.layers import ColumnParallelDense, RowParallelDense, column_parallel, row_parallel
from tests.sharding_common import lora_logits_loss_grads, mesh_of, run_fast
from tests.test_quant import FORMATS, gaussian

# hidden 128 and ffn 256: every projection's input is a multiple of 64 per tp=2 / fsdp=2 shard
# (NF4 blocks are 64 inputs); 4 heads and 2 kv heads split over tp=2.
CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1)
LORA = lj.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
LAYOUTS = {  # name: (dp, fsdp, tp, sequence_parallel)
    "tp2": (1, 1, 2, False),
    "tp2_sp": (1, 1, 2, True),
    "fsdp2_tp2": (1, 2, 2, False),
    "dp2_tp2": (2, 1, 2, False),
}
MODEL_RTOL = {"nf4": 1e-5, "int8": 1e-5, "fp8": 1e-3}  # of each leaf's max (see the docstring)


@functools.lru_cache(maxsize=None)
def reference(fmt):
    """The single-device model: base (quantised), adapters, ids and its (logits, loss, grads)."""
    config = LlamaConfig.tiny(quantize=fmt, **CONFIG)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (4, 8)).astype(np.int32)
    params = run_fast(lambda k: Llama(config).init(k, ids)["params"], jax.random.key(0))
    base, adapters = lj.split(run_fast(lambda p: lj.inject(p, LORA, jax.random.key(1)), params))
    out = run_fast(functools.partial(lora_logits_loss_grads, Llama(config)), adapters, base, ids)
    return config, base, adapters, ids, out


def assert_close_to_max(actual, expected, rtol):
    """Each leaf within `rtol` of its largest magnitude (gradients of different leaves differ by
    orders of magnitude; entries near zero are judged against the leaf's scale)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        e = np.asarray(e)
        np.testing.assert_allclose(np.asarray(a), e, rtol=rtol, atol=rtol * np.abs(e).max())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_tensor_parallel_qlora_matches_single_device(fmt, layout):
    config, base, adapters, ids, (logits_ref, _, grads_ref) = reference(fmt)
    dp, fsdp, tp, sp = LAYOUTS[layout]
    mesh = mesh_of(dp, fsdp, tp)
    model = Llama(config, TensorParallelism(mesh=mesh, sequence_parallel=sp))
    logits, _, grads = run_fast(functools.partial(lora_logits_loss_grads, model),
                             shard_params(adapters, mesh), shard_params(base, mesh),
                             jax.device_put(ids, NamedSharding(mesh, P(BATCH_AXES))))
    assert_close_to_max(logits, logits_ref, MODEL_RTOL[fmt])
    assert_close_to_max(grads, grads_ref, MODEL_RTOL[fmt])


def test_fp8_layers_scale_as_one_device():
    """FP8 column and row layers (dp2 x fsdp2 x tp2, and the row layer with sequence
    parallelism: activation split on batch and features, gradient on batch, features and
    sequence): output and input gradient equal `quantized_matmul` on one device within 1e-5,
    the amax reduction at work (see the module docstring). nf4 and int8 need no reduction; the
    model test covers them on every layout."""
    mesh = mesh_of(dp=2, fsdp=2, tp=2)
    x = jnp.asarray(gaussian((4, 8, 256), seed=1, std=1.0))
    q = quantize(jnp.asarray(gaussian((256, 128), seed=2)), "fp8")

    def loss_and_grad(matmul):
        f = lambda x: jnp.sum(jnp.sin(matmul(x)))  # noqa: E731
        return jax.value_and_grad(lambda x: (f(x), matmul(x)), has_aux=True)

    ref = run_fast(loss_and_grad(lambda x: quantized_matmul(x, q, jnp.float32)), x)
    x_sharded = jax.device_put(x, NamedSharding(mesh, P(BATCH_AXES)))
    layers = {"column": functools.partial(column_parallel, mesh=mesh),
              "row": functools.partial(row_parallel, mesh=mesh),
              "row_sp": functools.partial(row_parallel, mesh=mesh, sequence_parallel=True)}
    for name, layer in layers.items():
        (_, y), dx = run_fast(loss_and_grad(lambda x: layer(x, q)), x_sharded)
        (_, y_ref), dx_ref = ref
        assert_close_to_max((y, dx), (y_ref, dx_ref), 1e-5)


class _Both(nn.Module):
    """A column and a row layer of one kind (QuantDense, or the TP layers), named alike."""

    make: object

    @nn.compact
    def __call__(self, x):
        return self.make("row", 128, "down")(self.make("column", 256, "up")(x))


def test_tp_layer_params_are_quant_dense_params():
    """Same tree, shapes and dtypes: a checkpoint does not depend on tp. Also for a whole
    quantised Llama with and without TensorParallelism (sequence-parallel)."""
    mesh = mesh_of(tp=2)
    shapes = lambda m, x: jax.tree.map(  # noqa: E731
        lambda a: (a.shape, a.dtype), jax.eval_shape(m.init, jax.random.key(0), x))
    tp_layers = {"column": ColumnParallelDense, "row": RowParallelDense}
    for fmt in FORMATS:
        tp = _Both(lambda role, n, name: tp_layers[role](n, mesh=mesh, quant=fmt, name=name))
        plain = _Both(lambda role, n, name: QuantDense(n, quant=fmt, name=name))
        x = jnp.ones((2, 4, 128))
        assert shapes(tp, x) == shapes(plain, x)
        config = LlamaConfig.tiny(quantize=fmt, **CONFIG)
        ids = jnp.zeros((2, 8), jnp.int32)
        parallel = Llama(config, TensorParallelism(mesh=mesh, sequence_parallel=True))
        assert shapes(parallel, ids) == shapes(Llama(config), ids)


def test_shapes_a_shard_cannot_hold_are_refused_clearly():
    x = jnp.ones((2, 4, 128))
    # NF4: in=128 is 2 blocks of 64; a row layer over tp=4 would split a block.
    row = RowParallelDense(64, mesh=mesh_of(tp=4), quant="nf4", name="down_proj")
    with pytest.raises(MeshError, match=r"down_proj.*nf4 kernel \[in=128, out=64\].*multiple "
                                        r"of 64.*dividing in / 64 = 2"):
        jax.eval_shape(row.init, jax.random.key(0), x)
    # Placing such a tree by the partition rules (what loaders do) says the same, earlier.
    with pytest.raises(MeshError, match=r"down_proj.kernel.absmax.*NF4 keeps one scale per 64"):
        leaf_sharding(mesh_of(tp=4))("model.layers.0.mlp.down_proj.kernel.absmax", (2, 64))
    # Any format: out=6 does not split over tp=4.
    column = ColumnParallelDense(6, mesh=mesh_of(tp=4), quant="int8", name="q_proj")
    with pytest.raises(MeshError, match=r"q_proj.*int8 kernel \[in=128, out=6\].*dividing 6"):
        jax.eval_shape(column.init, jax.random.key(0), x)


def test_fsdp_gathers_the_codes_not_a_dequantised_kernel():
    """NF4 column and row layers under fsdp2 x tp2, forward and backward: every fsdp all-gather
    of the compiled program moves uint8 codes or the float32 block scales (1/64 of the kernel's
    entries), none a float kernel; and the traced backward gathers again (the gathers sit in a
    `jax.checkpoint`, so none is kept from the forward)."""
    from sharding.hlo import collectives
    mesh = mesh_of(fsdp=2, tp=2)
    x = jax.device_put(jnp.asarray(gaussian((4, 8, 256), seed=1, std=1.0)),
                       NamedSharding(mesh, P(BATCH_AXES)))
    q = shard_params({"down_proj": {"kernel": quantize(
        jnp.asarray(gaussian((256, 256), seed=2)), "nf4")}}, mesh)["down_proj"]["kernel"]
    for layer in (column_parallel, row_parallel):
        forward = lambda x: layer(x, q, mesh=mesh)  # noqa: E731
        backward = jax.grad(lambda x: jnp.sum(jnp.sin(forward(x))))
        traced = [str(jax.make_jaxpr(f)(x)).count("all_gather[") for f in (forward, backward)]
        assert traced[1] == 2 * traced[0] > 0, traced
        text = jax.jit(backward).lower(x).compile().as_text()
        gathers = [op for op in collectives(text) if op.kind == "all-gather"]
        assert gathers
        for op in gathers:
            dtype = op.line.split("=", 1)[1].strip().lstrip("(").split("[")[0]
            assert dtype == "u8" or (dtype == "f32" and op.elements <= 256 * 256 // 64), op.line
