"""A sharded NNX LoRA training step equals one device: the model's state placed by the one rule
(`sharding.shard_nnx`: the rules' shardings of `lora_jax.nnx.params(model)`), the batch split
over dp x fsdp, two AdamW steps under `nnx.jit`.

Tolerance 1e-5 relative (tests/sharding_common.TOL): sharding changes only the order of float32
sums (the batch mean over dp/fsdp shards, partial products of tp-split contractions summed across
devices), each of a few hundred terms; float32 epsilon is 1.2e-7, so results move by ~1e-6. A
reordered sum's error scales with its terms, not its result, so an array is compared to 1e-5 of
its largest entry (an entry that nearly cancels to 0 carries the error of its big terms)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import lora_jax as lj
import sharding
from sharding_common import TOL, mesh_of

D, HEADS, FF, V = 16, 4, 32, 8


class Attention(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)
        self.k_proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)
        self.v_proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)
        self.o_proj = nnx.Linear(D, D, use_bias=False, rngs=rngs)

    def __call__(self, x):
        b, t, _ = x.shape
        q, k, v = (p(x).reshape(b, t, HEADS, D // HEADS) for p in
                   (self.q_proj, self.k_proj, self.v_proj))
        w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D // HEADS), axis=-1)
        return self.o_proj(jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, t, D))


class Mlp(nnx.Module):
    def __init__(self, rngs):
        self.gate_proj = nnx.Linear(D, FF, use_bias=False, rngs=rngs)
        self.up_proj = nnx.Linear(D, FF, use_bias=False, rngs=rngs)
        self.down_proj = nnx.Linear(FF, D, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nnx.Module):
    def __init__(self, rngs):
        self.self_attn, self.mlp = Attention(rngs), Mlp(rngs)
        self.input_layernorm = nnx.RMSNorm(D, rngs=rngs)
        self.post_attention_layernorm = nnx.RMSNorm(D, rngs=rngs)

    def __call__(self, x):
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nnx.Module):
    def __init__(self, rngs):
        self.layers = nnx.List([Layer(rngs) for _ in range(2)])
        self.norm = nnx.RMSNorm(D, rngs=rngs)
        self.lm_head = nnx.Linear(D, V, use_bias=False, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


CONFIG = lj.LoraConfig(r=4, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)
X = np.asarray(jax.random.normal(jax.random.key(5), (8, 4, D)))
Y = np.asarray(jax.random.normal(jax.random.key(6), (8, 4, V)))


def model_and_opt(mesh=None):
    model = lj.nnx.inject(TinyLlama(nnx.Rngs(0)), CONFIG, jax.random.key(1))
    if mesh is not None:
        sharding.shard_nnx(model, mesh)
    return model, nnx.Optimizer(model, optax.adamw(1e-2), wrt=lj.nnx.LoraParam)


def assert_trees_close(actual, expected, rtol=TOL["rtol"]):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)

    def close(a, e):
        a, e = np.asarray(a), np.asarray(e)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * np.abs(e).max())
    jax.tree.map(close, actual, expected)


@nnx.jit
def step(model, opt, x, y):
    def loss_fn(m):
        return jnp.mean((m(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lj.nnx.LoraParam))(model)
    opt.update(model, grads)
    return loss, grads


def run(mesh=None, steps=2):
    model, opt = model_and_opt(mesh)
    x, y = (X, Y) if mesh is None else sharding.shard_batch((X, Y), mesh)
    out = [step(model, opt, x, y) for _ in range(steps)]
    losses = [float(loss) for loss, _ in out]
    grads = nnx.to_pure_dict(out[0][1])
    return model, losses, grads


@pytest.fixture(scope="module")
def single():
    return run()


@pytest.mark.parametrize("sizes", [dict(dp=2, fsdp=2, tp=2), dict(dp=2, tp=4)])
def test_sharded_step_equals_one_device(sizes, single):
    mesh = mesh_of(**sizes)
    model, losses, grads = run(mesh)
    ref_model, ref_losses, ref_grads = single
    np.testing.assert_allclose(losses, ref_losses, **TOL)
    assert_trees_close(grads, ref_grads)
    assert_trees_close(lj.nnx.adapters(model), lj.nnx.adapters(ref_model))
    # the placement is the rule's, kept through the steps: q_proj column-parallel, o_proj row,
    # adapters derived (fsdp dropped, rank whole)
    attn = model.layers[0].self_attn
    fsdp = "fsdp" if sizes.get("fsdp", 1) > 1 else None

    def placed(variable, *spec):
        return variable[...].sharding.is_equivalent_to(NamedSharding(mesh, P(*spec)), 2)
    assert placed(attn.q_proj.kernel, fsdp, "tp") and placed(attn.o_proj.kernel, "tp", fsdp)
    assert placed(attn.q_proj.lora_b, None, "tp") and placed(attn.o_proj.lora_a, "tp", None)
    assert placed(attn.q_proj.lora_a) and placed(attn.o_proj.lora_b)


def test_nnx_shardings_follow_param_shardings():
    mesh = mesh_of(dp=2, fsdp=2, tp=2)
    model, _ = model_and_opt()
    state_shardings = nnx.to_pure_dict(sharding.nnx_shardings(model, mesh))
    by_rule = sharding.param_shardings(lj.nnx.params(model), mesh)
    flat = lambda t: {lj.tree.dotted(k): v for k, v in
                      jax.tree_util.tree_flatten_with_path(
                          t, is_leaf=lambda s: isinstance(s, NamedSharding))[0]}
    assert flat(state_shardings) == flat(by_rule)


def test_shard_nnx_names_an_indivisible_leaf():
    class Odd(nnx.Module):
        def __init__(self):
            self.q_proj = nnx.Linear(8, 6, rngs=nnx.Rngs(0))

    with pytest.raises(sharding.MeshError, match=r"q_proj\.(kernel|bias) has shape"):
        sharding.shard_nnx(Odd(), mesh_of(tp=4))
