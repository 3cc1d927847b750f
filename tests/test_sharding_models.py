"""Tiny GPT-2 and Llama with adapters on all linear layers: every sharded layout trains exactly
like one device (loss, every adapter gradient, adapters after 5 Adam steps), and replicated
adapters are bit-identical on every device after init and after training.

GPT-2 runs unscanned (one module per layer), Llama scanned (stacked leaves with a leading layer
axis); both with `init_lora_weights=False` (random B), so that every adapter gradient is non-zero
from the first step. Tolerance: float32, 1e-5 absolute and relative (tests/sharding_common.py).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import lora_jax as lj
from models.gpt2 import GPT2, GPT2Config
from models.llama import Llama, LlamaConfig
from models.loss import cross_entropy
from sharding import (BATCH_AXES, TensorParallelism, check_config_fits, param_shardings,
                      shard_params)
from tests.sharding_common import (TOL, assert_trees_close, compile_fast, max_abs_diff, mesh_of,
                                   run_fast)

B, S, STEPS = 8, 16, 5
# Adam's update lr * m / (sqrt(v) + eps) has slope up to lr / eps in the gradient (for entries
# near zero, which exist). With the default eps=1e-8 an update is +-lr for any entry whose sign is
# float32 rounding noise, so five steps would compare noise. lr = eps = 1e-3 bounds the slope by
# 1: a ~1e-6 gradient difference moves an adapter by <= 1e-6 per step, while a real error (a
# missing or doubled reduction) moves it by ~lr = 1e-3. mu and nu, sharded like the adapters,
# are exercised all the same.
ADAM = dict(learning_rate=1e-3, eps=1e-3)
LORA = lj.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)

# Heads, kv heads, intermediate and vocab divisible by 8, so tp=8 splits them all.
CONFIGS = {
    "gpt2": (GPT2, GPT2Config.tiny(n_head=8, n_positions=S,
                                   embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)),
    "llama": (Llama, LlamaConfig.tiny(num_attention_heads=16,
                                      num_key_value_heads=8, scan_layers=True)),
}

LAYOUTS = {  # name: (dp, fsdp, tp, sequence_parallel)
    "dp8": (8, 1, 1, False),
    "tp2": (1, 1, 2, False),
    "tp4": (1, 1, 4, False),
    "tp8": (1, 1, 8, False),
    "tp4_sp": (1, 1, 4, True),
    "dp2_tp4_sp": (2, 1, 4, True),
    "fsdp4_tp2": (1, 4, 2, False),
}


def loss_fn(model, adapters, base, ids):
    logits = lj.apply(model, {"params": lj.combine(base, adapters)}, ids)
    return cross_entropy(logits, ids, shift=True)


def train(model, tx, adapters, base, batches):
    """STEPS Adam steps in one program (one compile per layout): (losses [STEPS], gradients of
    step 0, adapters after the last step)."""
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, model))

    def step(carry, ids):
        adapters, opt_state = carry
        loss, grads = grad_fn(adapters, base, ids)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return (optax.apply_updates(adapters, updates), opt_state), (loss, grads)

    (adapters, _), (losses, grads) = jax.lax.scan(step, (adapters, tx.init(adapters)), batches)
    return losses, jax.tree.map(lambda g: g[0], grads), adapters


@functools.lru_cache(maxsize=None)
def reference(name):
    """Single-device run: base params, adapters, batches, and `train`'s outputs."""
    cls, config = CONFIGS[name]
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (STEPS, B, S), np.int32)
    params = run_fast(lambda k: cls(config).init(k, ids[0])["params"], jax.random.key(0))
    base, adapters = lj.split(run_fast(lambda p: lj.inject(p, LORA, jax.random.key(1)), params))
    tx = lj.optimizer(optax.adam(**ADAM), adapters)
    out = run_fast(functools.partial(train, cls(config), tx), adapters, base, ids)
    return base, adapters, ids, tx, out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", CONFIGS)
def test_sharded_training_matches_single_device(name, layout):
    base, adapters, ids, tx, (losses_ref, grads_ref, final_ref) = reference(name)
    dp, fsdp, tp, sp = LAYOUTS[layout]
    mesh = mesh_of(dp, fsdp, tp)
    cls, config = CONFIGS[name]
    check_config_fits(mesh, config)
    model = cls(config, TensorParallelism(mesh=mesh, sequence_parallel=sp))
    batches = jax.device_put(ids, NamedSharding(mesh, P(None, BATCH_AXES)))
    losses, grads, final = run_fast(functools.partial(train, model, tx),
                                    shard_params(adapters, mesh), shard_params(base, mesh),
                                    batches)
    errors = {"loss": max_abs_diff(losses, losses_ref), "grad": max_abs_diff(grads, grads_ref),
              "adapters": max_abs_diff(final, final_ref)}
    print(f"{name} {layout} max abs errors: {errors}")
    np.testing.assert_allclose(losses, losses_ref, **TOL)
    assert_trees_close(grads, grads_ref, **TOL)
    assert_trees_close(final, final_ref, **TOL)
    assert_replicas_identical(final)


def test_rematerialised_fsdp_tp_training_matches_single_device():
    """Training scripts remat the blocks (`dots_saveable`); the FSDP gather's own checkpoint
    nests inside it. Same numbers as the plain single-device run."""
    base, adapters, ids, tx, (losses_ref, grads_ref, final_ref) = reference("llama")
    cls, config = CONFIGS["llama"]
    mesh = mesh_of(fsdp=4, tp=2)
    model = cls(dataclasses.replace(config, remat_policy="dots_saveable"),
                TensorParallelism(mesh=mesh))
    batches = jax.device_put(ids, NamedSharding(mesh, P(None, BATCH_AXES)))
    losses, grads, final = run_fast(functools.partial(train, model, tx),
                                    shard_params(adapters, mesh), shard_params(base, mesh),
                                    batches)
    np.testing.assert_allclose(losses, losses_ref, **TOL)
    assert_trees_close(grads, grads_ref, **TOL)
    assert_trees_close(final, final_ref, **TOL)


def assert_replicas_identical(tree):
    """Every device holding the same slice of a leaf holds the same bits."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        by_slice = {}
        for shard in leaf.addressable_shards:
            key = tuple((s.start, s.stop) for s in shard.index)
            by_slice.setdefault(key, []).append(np.asarray(shard.data))
        for key, copies in by_slice.items():
            for copy in copies[1:]:
                assert np.array_equal(copy, copies[0]), (jax.tree_util.keystr(path), key)


def test_adapters_initialised_sharded_are_identical_on_every_replica():
    """The seed's C++ bug: replicas drew different adapters. Here `inject` (and the optimizer
    init) run under jit with the rules' output shardings, as `init_sharded` does: every replica
    computes the same bits, equal to one device's; and they stay identical through real
    (donated, explicitly sharded) training steps."""
    base_ref, adapters_ref, ids, tx, _ = reference("llama")
    cls, config = CONFIGS["llama"]
    mesh = mesh_of(dp=2, tp=4)
    base = shard_params(base_ref, mesh)

    def init(base):
        adapters = lj.lora_params(lj.inject(base, LORA, jax.random.key(1)))
        return adapters, tx.init(adapters)

    shardings = param_shardings(jax.eval_shape(init, base), mesh)
    adapters, opt_state = compile_fast(init, base, out_shardings=shardings)(base)
    assert_replicas_identical(adapters)
    assert_trees_close(adapters, adapters_ref, **TOL)
    a_q = adapters["model"]["layers"]["self_attn"]["q_proj"]
    assert a_q["lora_a"].sharding.spec == P(None, None, None)       # [L, d, r]: replicated
    assert a_q["lora_b"].sharding.spec == P(None, None, "tp")       # [L, r, out]: out over tp

    model = cls(config, TensorParallelism(mesh=mesh, sequence_parallel=True))
    rows = NamedSharding(mesh, P(BATCH_AXES))
    batch = jax.device_put(ids[0], rows)
    step = compile_fast(_step(model, tx), adapters, opt_state, base, batch, donate_argnums=(0, 1),
                        out_shardings=(*shardings, NamedSharding(mesh, P())))
    for i in range(3):
        adapters, opt_state, loss = step(adapters, opt_state, base, jax.device_put(ids[i], rows))
        assert_replicas_identical((adapters, opt_state, loss))


def _step(model, tx):
    def step(adapters, opt_state, base, ids):
        loss, grads = jax.value_and_grad(functools.partial(loss_fn, model))(adapters, base, ids)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss
    return step


def test_no_parallelism_and_tensor_parallelism_have_the_same_parameter_tree():
    """Checkpoints and adapters do not depend on the layout."""
    for cls, config in CONFIGS.values():
        model = cls(config, TensorParallelism(mesh=mesh_of(dp=2, tp=4), sequence_parallel=True))
        ids = jnp.zeros((B, S), jnp.int32)
        plain = jax.eval_shape(cls(config).init, jax.random.key(0), ids)
        parallel = jax.eval_shape(model.init, jax.random.key(0), ids)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), plain) == \
            jax.tree.map(lambda x: (x.shape, x.dtype), parallel)
