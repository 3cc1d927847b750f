"""Mixed batches: each batch row runs its own adapter (`lj.stack_adapters`, `adapter_index=`).

Checked against a hand computation (the op), against the real PEFT library's mixed batch
(`model(ids, adapter_names=[...])`, tiny Llama and GPT-2, torch CPU float32), against each row
run alone with its own adapter (logits, gradients, greedy KV-cache generation), and data-parallel
sharded against one device.

Tolerances (float32): PEFT parity 1e-5 relative (max |diff| / max |ref|), as tests/test_peft.py
argues: the same math in another order; our mixed batch against the same rows run alone 1e-6
relative: the same XLA math, the adapter matmuls batched/grouped differently (measured <= 5e-7);
gradients 1e-5 of each leaf's largest entry: the mixed batch sums the rows' contributions to an
adapter inside one matmul, the reference adds per-row gradients afterwards.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
import models
from lora_jax.adapter_op import Adapter, MixedBatch, mixed_context, mixed_delta
from tests.sharding_common import compile_fast, jit_fast, run_fast
from tests.test_models_fixtures import random_ids, rel_err
from tests.test_peft import checkpoints, random_adapters_of  # noqa: F401  (tiny HF checkpoints)

METHODS = ("gather", "ragged", "dense")  # "auto" picks one of these (tested below)
ROW_RTOL = 1e-6
INDEX = [2, -1, 0, 1, 2]  # every adapter, a base row, one adapter on two rows


def random_adapter_trees(base, configs, seed=0):
    """One injected tree per config, with random non-zero A and B (host draws from one
    generator, so the trees differ; `random_adapters_of`: no eager compiles)."""
    rng = np.random.default_rng(seed)
    return [random_adapters_of(functools.partial(lj.inject, config=config, rng=jax.random.key(k)),
                               base, rng)
            for k, config in enumerate(configs)]


# ---------------------------------------------------------------------------------------------
# The op against a hand computation


@pytest.mark.parametrize("method", METHODS)
def test_op_matches_a_per_row_hand_computation(method):
    """DenseGeneral-shaped: x [B, T, heads, hd] contracted on (2, 3), B's output [o1, o2]."""
    r = np.random.default_rng(0)
    x = r.standard_normal((5, 3, 2, 4)).astype(np.float32)
    a = r.standard_normal((3, 2, 4, 6)).astype(np.float32)  # [N, *in, r]
    b = r.standard_normal((3, 6, 5, 2)).astype(np.float32)  # [N, r, *out]
    scale = np.array([0.5, 2.0, -1.5], np.float32)
    index = np.array([2, -1, 0, 0, 7])  # 7: outside [0, N): the base only, like -1
    delta = lambda x, a, b, scale, index: mixed_delta(
        x, Adapter(a, b, scale), MixedBatch(index, method), in_axes=(2, 3), dtype=jnp.float32)
    # jitted (level 0): eager, each of its ops would compile on its own
    got = jit_fast(delta)(x, a, b, scale, jnp.asarray(index, jnp.int32))
    want = np.zeros((5, 3, 5, 2), np.float32)
    for row, k in enumerate(index):
        if 0 <= k < 3:
            want[row] = scale[k] * np.einsum("tij,ijr,rpq->tpq", x[row], a[k], b[k])
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("method", METHODS)
def test_op_gradients_reach_each_adapter_from_its_rows_only(method):
    """d/d(A, B) of a weighted sum of the mixed delta equals the sum over rows of
    `lora_delta` run with the row's own adapter (a row with index -1 contributes nothing)."""
    r = np.random.default_rng(1)
    x, w = jnp.asarray(r.standard_normal((4, 3, 5)), jnp.float32), jnp.asarray(
        r.standard_normal((4, 3, 6)), jnp.float32)
    a, b = (jnp.asarray(r.standard_normal(s), jnp.float32) for s in ((3, 5, 2), (3, 2, 6)))
    scale, index = jnp.asarray([0.5, 2.0, -1.0]), jnp.asarray([1, -1, 1, 0], jnp.int32)

    def mixed(a, b):
        d = mixed_delta(x, Adapter(a, b, scale), MixedBatch(index, method), in_axes=(2,),
                        dtype=jnp.float32)
        return jnp.sum(d * w)

    def per_row(a, b):
        return sum(jnp.sum(lj.lora_delta(x[i], a[k], b[k], scale[k], (1,), jnp.float32) * w[i])
                   for i, k in enumerate(INDEX_OP) if k >= 0)

    got, want = (jit_fast(jax.grad(f, (0, 1)))(a, b) for f in (mixed, per_row))
    for g, e in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(got[0][2]))  # adapter 2 has no row: exactly zero gradient


INDEX_OP = [1, -1, 1, 0]


def test_auto_picks_dense_for_decoding_and_gather_for_long_rows():
    from lora_jax.adapter_op import resolve_method
    assert resolve_method("auto", tokens_per_row=1, n=8) == "dense"    # a decode step
    assert resolve_method("auto", tokens_per_row=512, n=8) == "gather"  # training, prefill
    assert resolve_method("ragged", tokens_per_row=1, n=8) == "ragged"


def test_bad_input_is_named():
    model, base, _ = tiny_llama(scan=False)
    q = lj.LoraConfig(r=2, target_modules=["q_proj"])
    qv = lj.LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    with pytest.raises(lj.LoraError, match="other modules"):
        lj.stack_adapters(base, [lj.inject(base, q, jax.random.key(0)),
                                 lj.inject(base, qv, jax.random.key(1))])
    stacked = lj.stack_adapters(base, [lj.inject(base, q, jax.random.key(0))] * 2)
    ids = jnp.ones((2, 4), jnp.int32)
    with pytest.raises(lj.LoraError, match="adapter_index="):
        jax.eval_shape(lambda: lj.apply(model, {"params": stacked}, ids))
    with pytest.raises(lj.LoraError, match="2 rows"):
        jax.eval_shape(lambda: lj.apply(model, {"params": stacked}, ids,
                                        adapter_index=jnp.array([0, 1, 0])))
    with pytest.raises(lj.LoraError, match="not one of"):
        lj.apply(model, {"params": stacked}, ids, adapter_index=jnp.array([0, 1]),
                 mixed_method="loop")
    with pytest.raises(lj.LoraError, match=r"unknown adapters \['c'\]"):
        lj.adapter_index(["a", "b"], ["a", "c", None])
    np.testing.assert_array_equal(lj.adapter_index(["a", "b"], ["b", "__base__", None, "a"]),
                                  [1, -1, -1, 0])
    with pytest.raises(lj.LoraError, match="no adapter 2"):
        lj.unstack_adapter(stacked, 2)
    with pytest.raises(lj.LoraError, match="stacked adapters"):
        lj.merge(stacked)


# ---------------------------------------------------------------------------------------------
# Against the real PEFT library's mixed batch


PEFT_TARGETS = {"gpt2": ["c_attn", "attn.c_proj", "c_fc"],
                "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj"]}


def peft_configs(family):
    """Three adapters on the same targets: other ranks, alphas, a rank pattern and rsLoRA, so
    the stack pads ranks and keeps a scale per adapter and module."""
    targets = PEFT_TARGETS[family]
    return [lj.LoraConfig(r=4, lora_alpha=8, target_modules=targets),
            lj.LoraConfig(r=2, lora_alpha=3, target_modules=targets,
                          rank_pattern={targets[0]: 3}),
            lj.LoraConfig(r=3, lora_alpha=5, target_modules=targets, use_rslora=True)]


@pytest.mark.parametrize("family,scan", [("llama", True), ("gpt2", False)])
def test_mixed_batch_equals_peft_adapter_names(checkpoints, tmp_path, family, scan):
    import peft
    import torch
    import transformers

    model, base = models.load_hf(checkpoints / family, scan_layers=scan)
    configs = peft_configs(family)
    trees = random_adapter_trees(base, configs)
    names = ["a0", "a1", "a2"]
    for name, tree, config in zip(names, trees, configs):
        lj.export_peft(tmp_path / name, tree, config, **models.peft_naming(model))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoints / family, torch_dtype=torch.float32, attn_implementation="eager").eval()
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "a0", adapter_name="a0").eval()
    for name in names[1:]:
        pm.load_adapter(tmp_path / name, adapter_name=name)
    ids = random_ids(len(INDEX), 10, seed=3)
    rows = [names[k] if k >= 0 else "__base__" for k in INDEX]
    with torch.no_grad():
        theirs = pm(torch.tensor(ids, dtype=torch.long), adapter_names=rows).logits.numpy()

    # Also stacked from the exported files, as a user holding PEFT directories would.
    imported = [lj.import_peft(tmp_path / name, base) for name in names]
    # (under jit the mapping is rebuilt with sorted keys: the names' own order here)
    stacked = stack(base, {name: lj.lora_params(t) for name, t in zip(names, imported)})
    index = lj.adapter_index(names, rows)
    # Each row alone with its adapter (unstacked at the stacked rank: one compile for all three;
    # that the zero padding is exact is what the PEFT comparison above shows).
    alone = [np.asarray(_apply(model, lj.unstack_adapter(stacked, k) if k >= 0 else base,
                               ids[i:i + 1]))[0] for i, k in enumerate(INDEX)]
    for method in METHODS:
        ours = np.asarray(_apply(model, stacked, ids, index, method))
        err = rel_err(ours, theirs)
        print(f"{family} scan={scan} {method}: rel err vs PEFT adapter_names {err:.2e}")
        assert err < 1e-5
        for i, k in enumerate(INDEX):
            assert rel_err(ours[i], alone[i]) < ROW_RTOL, (method, i, k)
    # the adapters matter: every adapted row is far from the base row's output
    with torch.no_grad():
        base_out = pm(torch.tensor(ids, dtype=torch.long),
                      adapter_names=["__base__"] * len(INDEX)).logits.numpy()
    for i, k in enumerate(INDEX):
        assert (rel_err(theirs[i], base_out[i]) > 1e-2) == (k >= 0)


_COMPILED = {}


def fast(name, fn, *args):
    """`jax.jit(fn)(*args)` compiled at optimisation level 0 (see tests/sharding_common.py: ~2.5x
    faster to compile, same float32 math), once per `name` and argument shapes."""
    key = (name, str(jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), args)))
    if key not in _COMPILED:
        _COMPILED[key] = compile_fast(fn, *args)
    return _COMPILED[key](*args)


# Stacking jitted (level 0): eager, its pads and stacks compile one by one at every leaf shape.
stack = jit_fast(lj.stack_adapters)


def _apply(model, params, ids, index=None, method="gather"):
    fn = lambda p, x, i: lj.apply(model, {"params": p}, x, adapter_index=i, mixed_method=method)
    return fast((model, method), fn, params, ids, index)


# ---------------------------------------------------------------------------------------------
# Training: each adapter learns only from its rows


def tiny_llama(scan=True, **kw):
    """The tiny Llama (`kw`: run-time options, which do not change the tree), its base params
    and three random adapters of ranks 4, 2 (alpha 2) and 3 (rsLoRA)."""
    return (models.Llama(models.LlamaConfig.tiny(scan_layers=scan, **kw)),) + _tiny_trees(scan)


@functools.cache
def _tiny_trees(scan):
    model = models.Llama(models.LlamaConfig.tiny(scan_layers=scan))
    base = run_fast(model.init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
    configs = [lj.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
               lj.LoraConfig(r=2, lora_alpha=2, target_modules="all-linear"),
               lj.LoraConfig(r=3, lora_alpha=6, target_modules="all-linear", use_rslora=True)]
    return base, random_adapter_trees(base, configs, seed=1)


def row_losses(model, params, ids, index=None, method="gather"):
    logits = lj.apply(model, {"params": params}, ids[:, :-1], adapter_index=index,
                      mixed_method=method)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0].mean(-1)  # [B]


def _single_grad(model, adapters, frozen, ids):
    fn = lambda ad, fz, x: jax.grad(lambda a: row_losses(model, lj.combine(fz, a), x).sum())(ad)
    return fast(("single grad", model), fn, adapters, frozen, ids)


@pytest.mark.parametrize("method", ["gather"])  # the op tests cover every method's gradients
def test_gradients_are_the_sum_of_each_rows_own(method):
    """Inside nn.scan with remat: d(sum of row losses)/d(stacked adapters) equals, adapter by
    adapter, the sum of the gradients of its rows run alone with it (padding slots: zero)."""
    model, base, trees = tiny_llama(remat_policy="full")
    stacked = stack(base, trees)
    frozen, adapters = lj.split(stacked)
    ids = jnp.asarray(random_ids(len(INDEX), 9, seed=4))
    index = jnp.asarray(INDEX, jnp.int32)
    loss = lambda ad: row_losses(model, lj.combine(frozen, ad), ids, index, method).sum()
    got = fast(("grad", model, method), jax.grad(loss), adapters)

    for k in range(len(trees)):
        # adapter k alone, at the stacked rank (the same function, so one compile for all k)
        fz, ad = lj.split(lj.unstack_adapter(stacked, k))
        want = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), ad)  # summed on the host
        for i in (i for i, j in enumerate(INDEX) if j == k):
            want = jax.tree.map(np.add, want, _single_grad(model, ad, fz, ids[i:i + 1]))
        mine = lj.lora_params(lj.unstack_adapter(lj.combine(frozen, got), k))
        for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(mine),
                                jax.tree.leaves(want)):
            scale = float(np.max(np.abs(w))) or 1.0
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-5 * scale,
                                       err_msg=f"adapter {k} {jax.tree_util.keystr(path)}")
    # rank padding (adapters 1 and 2 are padded to rank 4) gets exactly zero gradient
    q = got["model"]["layers"]["self_attn"]["q_proj"]
    assert not np.any(np.asarray(q["lora_a"])[:, 1, :, 2:])
    assert not np.any(np.asarray(q["lora_b"])[:, 2, 3:, :])


# ---------------------------------------------------------------------------------------------
# KV-cache generation: the index rides through prefill and every decode step


def test_mixed_generation_equals_each_row_alone():
    """Scanned tiny Llama, left-padded prompts, greedy: the mixed batch's tokens equal each
    row's tokens when the whole batch runs that row's adapter alone (at the stacked rank: one
    compile for the three), cached and uncached."""
    model, base, trees = tiny_llama()
    stacked = stack(base, [lj.lora_params(t) for t in trees])
    prompt = jnp.asarray(random_ids(len(INDEX), 6, seed=5))
    mask = jnp.ones_like(prompt).at[1, :2].set(0).at[3, :1].set(0)  # left padding on two rows
    gen = functools.partial(models.generate, model, max_new_tokens=6,
                            apply_fn=functools.partial(lj.apply, model))
    index = jnp.asarray(INDEX, jnp.int32)
    mixed = gen(stacked, prompt, prompt_mask=mask, apply_kwargs={"adapter_index": index})
    uncached = gen(stacked, prompt, prompt_mask=mask, use_cache=False,
                   apply_kwargs={"adapter_index": index})
    np.testing.assert_array_equal(mixed, uncached)
    alone = {k: gen(lj.unstack_adapter(stacked, k), prompt, prompt_mask=mask)
             for k in range(len(trees))}
    alone[-1] = gen(base, prompt, prompt_mask=mask)
    for i, k in enumerate(INDEX):
        np.testing.assert_array_equal(mixed[i], alone[k][i], err_msg=f"row {i} (adapter {k})")
    # not vacuous: some adapted row generates other tokens than the base would
    assert any(not np.array_equal(mixed[i], alone[-1][i]) for i, k in enumerate(INDEX) if k >= 0)


# ---------------------------------------------------------------------------------------------
# Data-parallel sharding; the layers that refuse


def test_sharded_mixed_batch_equals_one_device():
    """GSPMD (plain Dense layers, Auto axes) on dp=2 x fsdp=2 x tp=2: the batch and its index
    split over (dp, fsdp), the base and the stacked adapters placed by the partition rules
    (`param_shardings`: the adapter axis is replicated like a layer axis). Loss and gradients
    equal the one-device run (1e-5 of each leaf's largest entry: reductions reordered)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sharding import make_mesh, param_shardings
    model, base, trees = tiny_llama()
    stacked = stack(base, trees)
    frozen, adapters = lj.split(stacked)
    ids = jnp.asarray(random_ids(8, 9, seed=6))
    index = jnp.asarray([2, -1, 0, 1, 1, 0, -1, 2], jnp.int32)

    def step(ad, fz, ids, index):
        fn = lambda ad: row_losses(model, lj.combine(fz, ad), ids, index).mean()
        return jax.value_and_grad(fn)(ad)

    want = run_fast(step, adapters, frozen, ids, index)
    mesh = make_mesh(dp=2, fsdp=2, tp=2)
    rows = NamedSharding(mesh, P(("dp", "fsdp")))
    placed = [param_shardings(t, mesh) for t in (adapters, frozen)]
    q = placed[0]["model"]["layers"]["self_attn"]["q_proj"]
    assert q["lora_a"].spec == P(None, None, None, None) and q["lora_b"].spec[-1] == "tp"
    args = [jax.device_put(t, sh) for t, sh in zip((adapters, frozen, ids, index),
                                                   placed + [rows, rows])]
    got = run_fast(step, *args, in_shardings=(*placed, rows, rows))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5,
                                   atol=1e-5 * float(np.max(np.abs(w))))


@pytest.mark.parametrize("layout", [(2, 2, 2, True), (4, 1, 2, False)])
def test_tensor_parallel_mixed_batch_equals_one_device(layout):
    """The shard_map column/row layers (`sharding.TensorParallelism`), with LoRA dropout on (the
    adapters' own input path): the index rides into shard_map split like the rows, each device
    adds its rows' partial before the one reduction. Loss and gradients equal plain Dense on
    one device (1e-5 of each leaf's largest entry: psum / reduce-scatter reorder sums)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sharding import TensorParallelism, make_mesh, param_shardings
    dp, fsdp, tp, sp = layout
    model, base, trees = tiny_llama()
    frozen, adapters = lj.split(stack(base, trees))
    ids = jnp.asarray(random_ids(8, 9, seed=6))
    index = jnp.asarray([2, -1, 0, 1, 1, 0, -1, 2], jnp.int32)
    step = _loss_and_grads_with_dropout
    # the one-device reference is the same program for every layout: compiled once
    want = fast(("dropout step", model), functools.partial(step, model), adapters, frozen, ids,
                index)
    mesh = make_mesh(dp=dp, fsdp=fsdp, tp=tp)
    tp_model = models.Llama(model.config, TensorParallelism(mesh=mesh, sequence_parallel=sp))
    rows = NamedSharding(mesh, P(("dp", "fsdp")))
    placed = [param_shardings(t, mesh) for t in (adapters, frozen)]
    args = [jax.device_put(t, sh) for t, sh in zip((adapters, frozen, ids, index),
                                                   placed + [rows, rows])]
    got = run_fast(functools.partial(step, tp_model), *args,
                   in_shardings=(*placed, rows, rows))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5,
                                   atol=1e-5 * float(np.max(np.abs(w))))


def _loss_and_grads_with_dropout(model, ad, fz, ids, index):
    def fn(ad):
        logits = lj.apply(model, {"params": lj.combine(fz, ad)}, ids[:, :-1],
                          adapter_index=index, lora_dropout=0.2, deterministic=False,
                          rngs={"dropout": jax.random.key(3)})
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()
    return jax.value_and_grad(fn)(ad)


def test_nnx_refuses_clearly():
    from flax import nnx
    layer = lj.nnx.inject(nnx.Linear(4, 3, rngs=nnx.Rngs(0)),
                          lj.LoraConfig(r=2, target_modules="all-linear"), jax.random.key(0))
    with pytest.raises(lj.LoraError, match="NNX"), mixed_context(jnp.zeros((2,), jnp.int32)):
        layer(jnp.ones((2, 4)))


def test_unstack_gives_back_each_adapter_bit_for_bit():
    model, base, trees = tiny_llama()
    stacked = stack(base, trees)
    for k, tree in enumerate(trees):
        back = lj.unstack_adapter(stacked, k, template=tree)
        assert jax.tree.structure(back) == jax.tree.structure(tree)
        for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_index_over_a_single_adapter_tree_mixes_it_with_the_base():
    """A one-adapter tree is a stack of one: index 0 runs the adapter, -1 the base (PEFT's
    "__base__" rows), without stacking."""
    model, base, trees = tiny_llama(scan=False)
    ids = jnp.asarray(random_ids(2, 7, seed=8))
    mixed = np.asarray(_apply(model, trees[0], ids, jnp.asarray([-1, 0], jnp.int32)))
    with_adapter, without = (np.asarray(_apply(model, p, ids)) for p in (trees[0], base))
    assert rel_err(mixed[1], with_adapter[1]) < ROW_RTOL
    assert rel_err(mixed[0], without[0]) < ROW_RTOL
    assert rel_err(with_adapter[0], without[0]) > 1e-2  # the adapter matters


def test_a_per_rank_scale_vector_is_one_adapter_not_a_stack():
    """Named adapters concatenated on the rank axis carry a scale per rank (`[R]`); with an
    index they are one adapter (index 0), told from a stack by A's axes, not by the scale."""
    r = np.random.default_rng(2)
    x = jnp.asarray(r.standard_normal((2, 3, 5)), jnp.float32)
    a, b = (jnp.asarray(r.standard_normal(s), jnp.float32) for s in ((5, 4), (4, 6)))
    scale = jnp.asarray([0.5, 0.5, 3.0, 3.0])  # two rank-2 adapters, scales 0.5 and 3
    delta = lambda x, a, b, scale, index: mixed_delta(x, Adapter(a, b, scale), MixedBatch(index),
                                                      in_axes=(2,), dtype=jnp.float32)
    got = jit_fast(delta)(x, a, b, scale, jnp.asarray([-1, 0], jnp.int32))
    want = ((x[1] @ a) * scale) @ b
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(got[0]))
