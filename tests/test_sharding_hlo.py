"""What the compiled programs do: LoRA adds no collective to the parallel layers' forward pass
(its backward adds only the adapter-gradient reductions), and no device materialises a whole
tensor-parallel kernel, nor keeps FSDP-gathered kernels of every layer alive for the backward."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import lora_jax as lj
from models.gpt2 import GPT2, GPT2Config
from models.llama import Llama, LlamaConfig
from models.loss import cross_entropy
from sharding import (BATCH_AXES, TP, TensorParallelism, collective_counts, collectives,
                      column_parallel, param_shardings, row_parallel, spec_for)
from sharding.hlo import array_shapes
from sharding.rules import dotted
from tests.sharding_common import compile_fast, mesh_of

B, S, R = 8, 16, 4


def _layer_programs(role, mesh, sp, with_lora):
    """Compiled text of the layer's forward and of its gradient in (x[, A, B])."""
    fan_in, fan_out = (48, 80) if role == "column" else (80, 48)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, S, fan_in), np.float32)
    k = rng.standard_normal((fan_in, fan_out), np.float32)
    a = rng.standard_normal((fan_in, R), np.float32)
    b = rng.standard_normal((R, fan_out), np.float32)
    fn = column_parallel if role == "column" else row_parallel

    def forward(x, a, b):
        return fn(x, k, None, (a, b, 0.5) if with_lora else None, mesh=mesh,
                  sequence_parallel=sp)

    def loss(x, a, b):
        return jnp.sum(jnp.sin(forward(x, a, b)))

    grad = jax.grad(loss, argnums=(0, 1, 2) if with_lora else 0)
    adapter_size = max(a.size, b.size)
    return (compile_fast(forward, x, a, b).as_text(), compile_fast(grad, x, a, b).as_text(),
            adapter_size)


@pytest.mark.parametrize("role", ["row", "column"])
@pytest.mark.parametrize("layout", [(1, 1, 4, False), (2, 1, 4, True), (1, 2, 4, False)])
def test_lora_adds_no_collective_to_parallel_layers(role, layout):
    dp, fsdp, tp, sp = layout
    mesh = mesh_of(dp, fsdp, tp)
    fwd_base, bwd_base, _ = _layer_programs(role, mesh, sp, with_lora=False)
    fwd_lora, bwd_lora, adapter_size = _layer_programs(role, mesh, sp, with_lora=True)
    print(role, layout, "forward", collective_counts(fwd_base), collective_counts(fwd_lora),
          "backward", collective_counts(bwd_base), collective_counts(bwd_lora))
    assert collective_counts(fwd_lora) == collective_counts(fwd_base)
    # A column layer without SP or FSDP communicates nothing forward; all others do.
    assert bool(collective_counts(fwd_base)) == (role == "row" or sp or fsdp > 1)
    # Backward: the activation-sized collectives are the base layer's; what LoRA adds is the
    # reduction of its own gradients over the devices that hold A or B replicated (the data-
    # parallel gradient sum every trained parameter needs), each no bigger than A or B.
    big = lambda ops: sorted(op.kind for op in ops if op.elements > adapter_size)  # noqa: E731
    assert big(collectives(bwd_lora)) == big(collectives(bwd_base))
    extra = [op for op in collectives(bwd_lora) if op.elements <= adapter_size]
    assert all(op.kind == "all-reduce" for op in extra), extra


# Dimensions chosen so that no device-local shard or activation ([tokens, features], tokens in
# {8, 16, 32, 64, 128}) has the shape of a whole kernel (q [96, 120], k/v [96, 40], o [120, 96],
# gate/up [96, 176], down [176, 96]): a match in the program text is then a real full copy.
LLAMA = LlamaConfig.tiny(hidden_size=96, num_attention_heads=12, num_key_value_heads=4,
                         head_dim=10, intermediate_size=176, scan_layers=True)
GPT2_CFG = GPT2Config.tiny(n_embd=96, n_head=12, n_inner=160, n_positions=S,
                           embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
LORA = lj.LoraConfig(r=R, lora_alpha=8, target_modules="all-linear")


def _abstract(cls, config, mesh):
    """Sharded abstract (base, adapters, plain params, ids): nothing is allocated."""
    params = jax.eval_shape(cls(config).init, jax.random.key(0), jnp.zeros((B, S), jnp.int32))
    params = params["params"]
    base, adapters = lj.split(jax.eval_shape(lambda p: lj.inject(p, LORA, jax.random.key(1)),
                                             params))
    place = lambda t: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), t,
        param_shardings(t, mesh))
    ids = jax.ShapeDtypeStruct((B, S), jnp.int32, sharding=NamedSharding(mesh, P(BATCH_AXES)))
    return place(base), place(adapters), place(params), ids


@pytest.mark.parametrize("cls,config", [(Llama, LLAMA), (GPT2, GPT2_CFG)], ids=["llama", "gpt2"])
def test_model_forward_has_the_same_collectives_with_and_without_adapters(cls, config):
    mesh = mesh_of(dp=2, tp=4)
    model = cls(config, TensorParallelism(mesh=mesh, sequence_parallel=True))
    base, adapters, plain, ids = _abstract(cls, config, mesh)
    with_lora = compile_fast(lambda a, b, ids: lj.apply(model, {"params": lj.combine(b, a)}, ids),
                             adapters, base, ids).as_text()
    without = compile_fast(lambda p, ids: model.apply({"params": p}, ids), plain, ids).as_text()
    print(cls.__name__, "forward collectives", collective_counts(without),
          collective_counts(with_lora))
    assert collective_counts(with_lora) == collective_counts(without)


@pytest.mark.parametrize("layout", [(1, 1, 4, True), (1, 4, 2, False)], ids=["tp4_sp",
                                                                              "fsdp4_tp2"])
def test_no_device_holds_a_whole_sharded_kernel(layout):
    """In the compiled training gradient, no array has the shape of a tp-split kernel (per layer
    [in, out] or stacked [L, in, out]); under FSDP the gathered tp-shards exist one layer at a
    time ([in, out/tp]), never stacked over layers ([L, in, out/tp])."""
    dp, fsdp, tp, sp = layout
    mesh = mesh_of(dp, fsdp, tp)
    model = Llama(LLAMA, TensorParallelism(mesh=mesh, sequence_parallel=sp))
    base, adapters, _, ids = _abstract(Llama, LLAMA, mesh)

    def loss(adapters, base, ids):
        logits = lj.apply(model, {"params": lj.combine(base, adapters)}, ids)
        return cross_entropy(logits, ids, shift=True)

    shapes = set(array_shapes(compile_fast(jax.grad(loss), adapters, base, ids).as_text()))
    checked = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(base):
        spec = tuple(spec_for(dotted(path), leaf.ndim))
        if TP not in spec:
            continue
        whole = tuple(leaf.shape)
        assert whole not in shapes and whole[-2:] not in shapes, dotted(path)
        if fsdp > 1 and len(whole) == 3:  # stacked [L, in, out]
            gathered = tuple(n // tp if s == TP else n for n, s in zip(whole, spec))
            assert gathered not in shapes, (dotted(path), gathered)
        checked += 1
    assert checked >= 7  # q, k, v, o, gate, up, down (+ embedding, lm_head)


def test_dots_remat_reruns_no_row_parallel_reduction():
    """Under tp=4 with sp and a "dots" remat policy, the gradient program has as many
    activation-sized reduce-scatters as without remat: the row-parallel outputs are saved by
    name after their reduction (`lora_jax.remat_policy`), so the backward does not reduce them
    again (it did before: one more per layer). The sequence all-gathers in front of the column
    layers are still re-run (+2: q/k/v and gate/up inputs, needed for the adapters' A gradient);
    keeping them would hold full-sequence activations, tp times the sharded ones."""
    mesh = mesh_of(1, 1, 4)

    def counts(remat_policy):
        cfg = dataclasses.replace(LLAMA, remat_policy=remat_policy)
        model = Llama(cfg, TensorParallelism(mesh=mesh, sequence_parallel=True))
        base, adapters, _, ids = _abstract(Llama, cfg, mesh)

        def loss(adapters, base, ids):
            logits = lj.apply(model, {"params": lj.combine(base, adapters)}, ids)
            return cross_entropy(logits, ids, shift=True)

        text = compile_fast(jax.grad(loss), adapters, base, ids).as_text()
        big = [op.kind for op in collectives(text) if op.elements >= B * S * 96 // 4]
        return {kind: big.count(kind) for kind in ("reduce-scatter", "all-gather")}

    plain, dots = counts("none"), counts("dots_saveable")
    assert dots["reduce-scatter"] == plain["reduce-scatter"], (plain, dots)
    assert dots["all-gather"] == plain["all-gather"] + 2, (plain, dots)
