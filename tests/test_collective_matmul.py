"""Collective matmul (`sharding.collective_matmul`): the ppermute rings against the plain
collectives, the TP layers and a tiny Llama with LoRA under tp + sp against one device, the
compiled program's collectives, and the CLI switch.

Tolerance: float32, 1e-5 absolute and relative (tests/sharding_common.py). The all-gather ring
forms the very products of the gathered matmul, the reduce-scatter ring sums the same tp terms
per entry in another order; either moves a float32 result by a few ulps (~1e-6 at these
magnitudes), while a wrong chunk order or a lost partial moves it by O(1).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import lora_jax as lj
from lora_jax.adapter_op import Adapter, MixedBatch
from examples.cli import parse_args
from models.llama import Llama, LlamaConfig
from sharding import (BATCH_AXES, TensorParallelism, collective_counts, column_parallel,
                      row_parallel, shard_params)
from sharding.collective_matmul import allgather_matmul, matmul_reducescatter
from sharding.compat import all_gather, shard_map
from tests.sharding_common import (TOL, assert_trees_close, compile_fast, lora_logits_loss_grads,
                                   mesh_of, run_fast)

B, S, D, F, R = 2, 8, 16, 24, 4


def _data(*shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s, np.float32)) for s in shapes]


def _value_and_grads(fn, *args):
    """fn's value and the gradients of a nonlinear scalar of it (so that the cotangent differs
    per entry and a misplaced chunk shows) with respect to every argument."""
    loss = lambda *a: jnp.sum(jnp.sin(fn(*a)))  # noqa: E731
    return run_fast(lambda *a: (fn(*a), jax.grad(loss, argnums=tuple(range(len(a))))(*a)),
                    *args)


@pytest.mark.parametrize("tp", [2, 4])
def test_allgather_matmul_equals_gather_then_matmul(tp):
    mesh = mesh_of(tp=tp)
    x, w = _data((B, S, D), (D, F))
    specs = dict(mesh=mesh, in_specs=(P(None, "tp"), P(None, "tp")), out_specs=P(None, None, "tp"))
    ring = shard_map(lambda x, w: allgather_matmul(x, w, "tp"), **specs)
    plain = shard_map(lambda x, w: all_gather(x, "tp", axis=1) @ w, **specs)
    got, expected = _value_and_grads(ring, x, w), _value_and_grads(plain, x, w)
    assert_trees_close(got, expected, **TOL)
    np.testing.assert_allclose(got[0], x @ w, **TOL)


@pytest.mark.parametrize("tp", [2, 4])
def test_matmul_reducescatter_equals_matmul_then_psum_scatter(tp):
    mesh = mesh_of(tp=tp)
    x, w, extra = _data((B, S, D), (D, F), (B, S, F * tp))
    specs = dict(mesh=mesh, in_specs=(P(None, None, "tp"), P("tp"), P(None, None, "tp")),
                 out_specs=P(None, "tp"))
    # `extra` [B, S, F] per device: a partial term (the row layer's LoRA) summed over the ring.
    ring = shard_map(lambda x, w, e: matmul_reducescatter(x, w, "tp", addend=e), **specs)
    plain = shard_map(lambda x, w, e: jax.lax.psum_scatter(
        x @ w + e, "tp", scatter_dimension=1, tiled=True), **specs)
    got, expected = _value_and_grads(ring, x, w, extra), _value_and_grads(plain, x, w, extra)
    assert_trees_close(got, expected, **TOL)
    np.testing.assert_allclose(got[0], x @ w + extra.reshape(B, S, tp, F).sum(2), **TOL)


def test_layers_with_lora_dropout_and_bias_match_the_plain_collectives():
    """column_parallel / row_parallel with bias, an adapter and a dropout input (the column
    layer's rank-r gather, the row layer's adapter riding the ring): collective_matmul=True ==
    False, values and gradients, at tp=4."""
    mesh = mesh_of(tp=4)
    x, xd, k1, b1, a1, bb1, k2, b2, a2, bb2 = _data(
        (B, S, D), (B, S, D), (D, F), (F,), (D, R), (R, F), (F, D), (D,), (F, R), (R, D))

    def block(ring, x, xd, *params):
        k1, b1, a1, bb1, k2, b2, a2, bb2 = params
        s = jnp.float32(0.5)
        h = column_parallel(x, k1, b1, (a1, bb1, s), mesh=mesh, sequence_parallel=True,
                            lora_x=xd, collective_matmul=ring)
        h = jnp.tanh(h)
        return row_parallel(h, k2, b2, (a2, bb2, s), mesh=mesh, sequence_parallel=True,
                            lora_x=h * 0.9, collective_matmul=ring)

    args = (x, xd, k1, b1, a1, bb1, k2, b2, a2, bb2)
    got = _value_and_grads(functools.partial(block, True), *args)
    expected = _value_and_grads(functools.partial(block, False), *args)
    assert_trees_close(got, expected, **TOL)


@pytest.mark.parametrize("variant", ["dora", "mixed"])
def test_layers_with_dora_or_a_mixed_batch_match_the_plain_collectives(variant):
    """DoRA (the column layer rings, the row layer keeps its psum_scatter: its weight norm needs
    the whole partial product) and a mixed batch (N stacked adapters, each row's partial riding
    the row ring): collective_matmul=True == False, values and gradients, at tp=2."""
    mesh = mesh_of(tp=2)
    n = 3
    x, k1, k2 = _data((B, S, D), (D, F), (F, D))
    if variant == "dora":
        a1, b1, a2, b2, m1, m2 = _data((D, R), (R, F), (F, R), (R, D), (F,), (D,), seed=1)
        scale = jnp.float32(0.5)
        mixed = None
    else:
        a1, b1, a2, b2 = _data((n, D, R), (n, R, F), (n, F, R), (n, R, D), seed=1)
        m1 = m2 = None
        scale = jnp.full((n,), 0.5, jnp.float32)
        mixed = MixedBatch(jnp.array([2, 0], jnp.int32), "gather")

    def block(ring, x, k1, k2, a1, b1, a2, b2):
        h = column_parallel(x, k1, None, Adapter(a1, b1, scale, m1), mesh=mesh,
                            sequence_parallel=True, mixed=mixed, collective_matmul=ring)
        return row_parallel(jnp.tanh(h), k2, None, Adapter(a2, b2, scale, m2), mesh=mesh,
                            sequence_parallel=True, mixed=mixed, collective_matmul=ring)

    # Weights at the 1/sqrt(fan-in) scale of real layers, so activations stay O(1) and 1e-5
    # is ~10 ulps of them (unit-variance weights grow the outputs to ~10, where the summation
    # order of the fused programs alone moves them by 2e-5).
    args = (x, *(w / np.sqrt(w.shape[-2]) for w in (k1, k2, a1, b1, a2, b2)))
    got = _value_and_grads(functools.partial(block, True), *args)
    expected = _value_and_grads(functools.partial(block, False), *args)
    assert_trees_close(got, expected, **TOL)


def test_the_ring_column_layer_gathers_no_activation():
    """The compiled column layer (forward and backward, LoRA without dropout) runs
    collective-permutes and no all-gather: it fails if the switch silently gathers x. The plain
    layer, compiled alike, does all-gather (so the check can see one)."""
    mesh = mesh_of(tp=4)
    x, k, a, b = _data((B, S, D), (D, F), (D, R), (R, F))

    def text(ring):
        def loss(x, k, a, b):
            y = column_parallel(x, k, None, (a, b, jnp.float32(0.5)), mesh=mesh,
                                sequence_parallel=True, collective_matmul=ring)
            return jnp.sum(jnp.sin(y))
        return collective_counts(compile_fast(jax.grad(loss, argnums=(0, 2, 3)),
                                              x, k, a, b).as_text())

    ring, plain = text(True), text(False)
    assert ring.get("collective-permute", 0) >= 2 * 3, ring  # tp-1 each way
    assert "all-gather" not in ring, ring
    assert plain.get("all-gather", 0) >= 1, plain


def test_the_ring_row_layer_reduce_scatters_nothing():
    mesh = mesh_of(tp=4)
    x, k = _data((B, S, D), (D, F))
    fn = lambda x, k: row_parallel(x, k, mesh=mesh, sequence_parallel=True,  # noqa: E731
                                   collective_matmul=True)
    counts = collective_counts(compile_fast(fn, x, k).as_text())
    assert counts.get("collective-permute", 0) >= 3 and "reduce-scatter" not in counts, counts


# ---- a tiny Llama with LoRA: tp=2 + sp and dp=2 x tp=2 + sp, against one device ---------------

CONFIG = LlamaConfig.tiny(num_attention_heads=4, num_key_value_heads=2, scan_layers=True)
LORA = lj.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)


@functools.lru_cache(maxsize=None)
def _reference():
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, 16), np.int32)
    params = run_fast(lambda k: Llama(CONFIG).init(k, ids)["params"], jax.random.key(0))
    base, adapters = lj.split(run_fast(lambda p: lj.inject(p, LORA, jax.random.key(1)), params))
    return base, adapters, ids, run_fast(functools.partial(lora_logits_loss_grads, Llama(CONFIG)),
                                         adapters, base, ids)


@pytest.mark.parametrize("dp,tp", [(1, 2), (2, 2)])
def test_llama_with_lora_and_collective_matmul_matches_one_device(dp, tp):
    base, adapters, ids, (logits_ref, _, grads_ref) = _reference()
    mesh = mesh_of(dp=dp, tp=tp)
    model = Llama(CONFIG, TensorParallelism(mesh=mesh, sequence_parallel=True,
                                            collective_matmul=True))
    ids = jax.device_put(ids, NamedSharding(mesh, P(BATCH_AXES)))
    args = (shard_params(adapters, mesh), shard_params(base, mesh), ids)
    program = compile_fast(functools.partial(lora_logits_loss_grads, model), *args)
    logits, _, grads = program(*args)
    np.testing.assert_allclose(logits, logits_ref, **TOL)
    assert_trees_close(grads, grads_ref, **TOL)
    # The rings are taken in the model: no reduce-scatter is left (the plain program has one per
    # row layer forward and per column layer backward; the rest of its collectives are GSPMD's).
    assert "reduce-scatter" not in collective_counts(program.as_text())


def test_collective_matmul_needs_sequence_parallelism():
    with pytest.raises(ValueError, match="sequence_parallel=True"):
        TensorParallelism(mesh=mesh_of(tp=2), collective_matmul=True)


@pytest.mark.parametrize("flags", [["--collective-matmul", "--tp", "2"],
                                   ["--collective-matmul"]])
def test_cli_refuses_collective_matmul_without_tp_and_sp(flags):
    with pytest.raises(ValueError, match="--collective-matmul .* needs --tp > 1 and --sp"):
        parse_args(["--model", "llama3", *flags])


def test_cli_accepts_collective_matmul_with_tp_and_sp():
    cfg = parse_args(["--model", "llama3", "--tp", "2", "--sp", "--collective-matmul"])
    assert cfg.collective_matmul and cfg.sp and cfg.tp == 2
