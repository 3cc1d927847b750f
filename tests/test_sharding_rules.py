"""Partition rules for GPT-2 and Llama (scanned and not), adapter specs derived from their kernels,
and parameters born sharded."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import lora_jax as lj
from models.gpt2 import GPT2, GPT2Config
from models.llama import Llama, LlamaConfig
from sharding import (TensorParallelism, init_sharded, param_shardings, param_specs,
                      shard_params, spec_for)
from sharding.layers import ColumnParallelDense, RowParallelDense
from sharding.rules import KERNEL_SPECS, dotted
from tests.sharding_common import mesh_of

LORA = lj.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
COL, ROW, REP = ("fsdp", "tp"), ("tp", "fsdp"), (None, None)


def _specs(cls, config):
    """{dotted path: spec as a tuple padded to the leaf's rank} of an injected abstract tree."""
    params = jax.eval_shape(cls(config).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    tree = jax.eval_shape(lambda p: lj.inject(p, LORA, jax.random.key(1)), params["params"])
    specs = param_specs(tree)
    return {dotted(path): tuple(spec) + (None,) * (leaf.ndim - len(spec))
            for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(tree),
                                          jax.tree.leaves(specs, is_leaf=lambda x: isinstance(
                                              x, P)))}


def test_llama_rules_megatron_layout_and_derived_adapter_specs():
    got = _specs(Llama, LlamaConfig.tiny())
    layer = "model.layers.0."
    want = {
        "model.embed_tokens.embedding": ("tp", "fsdp"),
        "lm_head.kernel": COL,
        "model.norm.scale": (None,),
        layer + "input_layernorm.scale": (None,),
        layer + "self_attn.q_proj.kernel": COL, layer + "self_attn.k_proj.kernel": COL,
        layer + "self_attn.v_proj.kernel": COL, layer + "self_attn.o_proj.kernel": ROW,
        layer + "mlp.gate_proj.kernel": COL, layer + "mlp.up_proj.kernel": COL,
        layer + "mlp.down_proj.kernel": ROW,
        # column: A replicated, B split like the kernel's output; fsdp is dropped for adapters
        layer + "self_attn.q_proj.lora_a": REP, layer + "self_attn.q_proj.lora_b": (None, "tp"),
        # row: A split like the kernel's input, B replicated
        layer + "self_attn.o_proj.lora_a": ("tp", None), layer + "self_attn.o_proj.lora_b": REP,
        layer + "mlp.down_proj.lora_a": ("tp", None), layer + "self_attn.o_proj.lora_scale": (),
    }
    assert {k: got[k] for k in want} == want


def test_scanned_stacks_keep_the_layer_axis_whole():
    got = _specs(Llama, LlamaConfig.tiny(scan_layers=True))
    stack = "model.layers."
    assert got[stack + "self_attn.q_proj.kernel"] == (None, *COL)          # [L, d, out]
    assert got[stack + "self_attn.q_proj.lora_a"] == (None, None, None)    # [L, d, r]
    assert got[stack + "self_attn.q_proj.lora_b"] == (None, None, "tp")    # [L, r, out]
    assert got[stack + "mlp.down_proj.lora_a"] == (None, "tp", None)
    assert got[stack + "mlp.down_proj.lora_scale"] == (None,)              # [L]
    assert got[stack + "input_layernorm.scale"] == (None, None)


def test_gpt2_rules():
    got = _specs(GPT2, GPT2Config.tiny())
    layer = "transformer.h.0."
    want = {
        "transformer.wte.embedding": ("tp", "fsdp"), "transformer.wpe.embedding": (None, None),
        layer + "attn.c_attn.kernel": COL, layer + "attn.c_attn.bias": ("tp",),
        layer + "attn.c_proj.kernel": ROW, layer + "attn.c_proj.bias": (None,),
        layer + "mlp.c_fc.kernel": COL, layer + "mlp.c_fc.bias": ("tp",),
        layer + "mlp.c_proj.kernel": ROW, layer + "ln_1.scale": (None,),
        layer + "attn.c_attn.lora_b": (None, "tp"), layer + "mlp.c_proj.lora_a": ("tp", None),
    }
    assert {k: got[k] for k in want} == want


@pytest.mark.parametrize("cls,config", [(Llama, LlamaConfig.tiny(scan_layers=True)),
                                        (GPT2, GPT2Config.tiny())], ids=["llama", "gpt2"])
def test_rules_agree_with_the_roles_the_models_ask_for(cls, config):
    """The regex table and the layers' shard_map specs are two statements of one layout: every
    column/row layer the model builds must find its kernel stored as its role expects."""
    mesh = mesh_of(tp=2)
    roles = {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, (ColumnParallelDense, RowParallelDense)):
            role = "column" if isinstance(module, ColumnParallelDense) else "row"
            roles[".".join(module.path)] = role
        return next_fun(*args, **kwargs)

    model = cls(config, TensorParallelism(mesh=mesh))
    with nn.intercept_methods(record):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 8), jnp.int32))
    assert len(roles) >= 4
    for path, role in roles.items():
        ndim = 3 if config.scan_layers and ".layers." in f".{path}." else 2
        assert tuple(spec_for(path + ".kernel", ndim))[-2:] == tuple(KERNEL_SPECS[role]), path


def test_params_are_born_sharded_and_equal_the_single_device_init():
    mesh = mesh_of(dp=2, fsdp=2, tp=2)
    model, ids = Llama(LlamaConfig.tiny(scan_layers=True)), jnp.zeros((2, 8), jnp.int32)
    params = init_sharded(model.init, jax.random.key(0), ids, mesh=mesh)["params"]
    q = params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]      # [2, 64, 64]
    assert q.sharding.spec == P(None, "fsdp", "tp")
    assert {s.data.shape for s in q.addressable_shards} == {(2, 32, 32)}
    specs = param_specs(params)
    jax.tree.map(lambda x, spec: _assert_spec(x, spec), params, specs)
    # Same random bits (threefry is partitionable); the normal transform may round its last
    # bit differently where the compiler fuses a multiply-add for one layout and not another.
    reference = jax.jit(model.init)(jax.random.key(0), ids)["params"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-6, atol=0), params, reference)


def _assert_spec(x, spec):
    assert x.sharding.spec == spec


def test_shard_params_places_host_arrays_by_the_rules():
    mesh = mesh_of(fsdp=2, tp=4)
    host = {"model": {"layers": {"0": {"mlp": {"down_proj": {
        "kernel": np.arange(16 * 8, dtype=np.float32).reshape(16, 8)}}}}}}
    placed = shard_params(host, mesh)
    kernel = placed["model"]["layers"]["0"]["mlp"]["down_proj"]["kernel"]
    assert kernel.sharding.spec == P("tp", "fsdp")
    assert {s.data.shape for s in kernel.addressable_shards} == {(4, 4)}
    np.testing.assert_array_equal(np.asarray(kernel), host["model"]["layers"]["0"]["mlp"][
        "down_proj"]["kernel"])


def test_optimizer_state_follows_its_adapters():
    """Paths of optax state end with the parameter's path, so the rules shard mu and nu like the
    adapters (and put the step count on every device)."""
    mesh = mesh_of(dp=2, tp=4)
    adapters = {"model": {"layers": {"self_attn": {"o_proj": {
        "lora_a": jax.ShapeDtypeStruct((2, 64, 4), jnp.float32),
        "lora_b": jax.ShapeDtypeStruct((2, 4, 64), jnp.float32),
        "lora_scale": jax.ShapeDtypeStruct((2,), jnp.float32)}}}}}
    state = jax.eval_shape(lj.optimizer(optax.adam(1e-3), adapters).init, adapters)
    specs = {dotted(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(
        param_shardings(state, mesh))}
    mu_a = [s for p, s in specs.items() if p.endswith("mu.model.layers.self_attn.o_proj.lora_a")]
    assert mu_a == [P(None, "tp", None)]
    assert all(s == P() for p, s in specs.items() if p.endswith("count"))


def test_custom_rules_replace_the_defaults():
    replicate_all = ((r".*", P()),)
    assert spec_for("model.layers.0.self_attn.q_proj.kernel", 2, replicate_all) == P(None, None)
    assert spec_for("model.layers.0.self_attn.q_proj.lora_b", 2, replicate_all) == P(None, None)
