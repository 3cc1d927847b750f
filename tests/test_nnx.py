"""LoRA on Flax NNX models (`lora_jax.nnx`): the same adapters, outputs, files and training as
the Linen path for a model with the same module names and weights.

Tolerances: the NNX and Linen layers run the same float32 ops in the same order, so outputs
agree to 1e-6 relative (reassociation-free; the bound leaves room for XLA fusing differently);
files are compared byte for byte; 5 AdamW steps to 1e-6 relative."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lora_jax as lj

RTOL = 1e-6
CONFIG = lj.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                       rank_pattern={"o_proj": 2}, alpha_pattern={"v_proj": 3})


class NnxBlock(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q_proj = nnx.Linear(8, 16, rngs=rngs)
        self.v_proj = nnx.LinearGeneral(16, (2, 8), axis=-1, rngs=rngs)
        self.o_proj = nnx.LinearGeneral((2, 8), 8, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
        return x + self.o_proj(self.v_proj(jnp.tanh(self.q_proj(x))))


class NnxNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List([NnxBlock(rngs) for _ in range(2)])
        self.lm_head = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.DenseGeneral((2, 8), axis=-1, name="v_proj")(jnp.tanh(nn.Dense(16, name="q_proj")(x)))
        return x + nn.DenseGeneral(8, axis=(-2, -1), name="o_proj")(h)


class LinenLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = LinenBlock(name=str(i))(x)
        return x


class LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="lm_head")(LinenLayers(name="layers")(x))


X = jax.random.normal(jax.random.key(9), (3, 6, 8))


def pair():
    """An NNX model with adapters, and the Linen model's params with the same weights and
    adapters (injected independently, from the same key)."""
    model = NnxNet(nnx.Rngs(0))
    base = lj.nnx.params(model)
    layouts = lj.kernel_layouts(LinenNet(), {"params": base}, X)
    linen = lj.inject(base, CONFIG, jax.random.key(1), layouts=layouts)
    return lj.nnx.inject(model, CONFIG, jax.random.key(1)), linen


def linen_out(params):
    return lj.apply(LinenNet(), {"params": params}, X)


def assert_close(a, b, rtol=RTOL):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


def test_same_adapters_and_outputs_as_linen():
    model, linen = pair()
    jax.tree.map(np.testing.assert_array_equal, lj.nnx.params(model), linen)
    assert_close(model(X), linen_out(linen))
    assert not np.allclose(model(X), NnxNet(nnx.Rngs(0))(X))  # the adapters act
    assert_close(lj.nnx.merge(model)(X), model(X), 1e-5)
    jax.tree.map(assert_close, lj.nnx.params(lj.nnx.merge(model)), lj.merge(linen))
    assert type(lj.nnx.merge(model).layers[0].q_proj) is nnx.Linear
    assert type(model.layers[0].q_proj) is lj.nnx.LoraLinear  # merge copies


def test_state_filter_gives_exactly_the_adapters():
    model, _ = pair()
    state = nnx.to_pure_dict(nnx.state(model, lj.nnx.LoraParam))
    leaves = jax.tree_util.tree_leaves_with_path(state)
    names = {str(path[-1].key) for path, _ in leaves}
    assert names == {"lora_a", "lora_b"} and len(leaves) == 2 * 6  # 2 blocks x 3 projections; all-linear skips lm_head


def test_files_are_the_linen_files(tmp_path):
    model, linen = pair()
    lj.export_peft(tmp_path / "nnx", lj.nnx.params(model), CONFIG)
    lj.export_peft(tmp_path / "linen", linen, CONFIG)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "nnx" / name).read_bytes() == (tmp_path / "linen" / name).read_bytes()
    # an adapter saved from NNX loads into Linen, and a PEFT one from Linen into NNX
    lj.save_adapter(tmp_path / "ad", lj.nnx.params(model), CONFIG)
    plain = lj.split(linen)[0]
    assert_close(linen_out(lj.load_adapter(tmp_path / "ad", plain)), model(X))
    fresh = NnxNet(nnx.Rngs(0))
    lj.nnx.load(fresh, lj.import_peft(tmp_path / "linen", lj.nnx.params(fresh),
                                      layouts=lj.nnx.layouts(fresh)))
    assert_close(fresh(X), model(X))


def test_five_adamw_steps_equal_the_linen_path():
    model, linen = pair()
    y = jax.random.normal(jax.random.key(3), (3, 6, 5))
    tx = optax.adamw(1e-2)
    opt = nnx.Optimizer(model, tx, wrt=lj.nnx.LoraParam)
    nnx_step = nnx.jit(lambda m, o: _nnx_step(m, o, y))
    base, adapters = lj.split(linen)
    ltx = lj.optimizer(tx, adapters)
    state = ltx.init(adapters)

    @jax.jit
    def linen_step(adapters, state):
        loss, g = jax.value_and_grad(lambda a: jnp.mean((linen_out(lj.combine(base, a)) - y)
                                                        ** 2))(adapters)
        updates, state = ltx.update(g, state, adapters)
        return optax.apply_updates(adapters, updates), state, loss

    for _ in range(5):
        nnx_loss = nnx_step(model, opt)
        adapters, state, linen_loss = linen_step(adapters, state)
        assert_close(nnx_loss, linen_loss)
    jax.tree.map(assert_close, lj.nnx.adapters(model), adapters)


def _nnx_step(model, opt, y):
    def loss_fn(m):
        return jnp.mean((m(X) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lj.nnx.LoraParam))(model)
    opt.update(model, grads)
    return loss


def test_stacked_layers_get_stacked_adapters():
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return nnx.Linear(8, 8, rngs=nnx.Rngs(key))

    class Stack(nnx.Module):
        def __init__(self):
            self.layers = make(jax.random.split(jax.random.key(0), 3))

        def __call__(self, x):
            @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
            def body(x, layer):
                return jnp.tanh(layer(x))
            return body(x, self.layers)

    model = lj.nnx.inject(Stack(), lj.LoraConfig(r=2, target_modules=["layers"],
                                                 init_lora_weights=False), jax.random.key(1))
    assert model.layers.lora_a[...].shape == (3, 8, 2)
    assert model.layers.lora_scale[...].shape == (3,)
    assert_close(lj.nnx.merge(model)(X), model(X), 1e-5)
    assert not np.allclose(model(X), Stack()(X))


def test_errors():
    class WithEinsum(nnx.Module):
        def __init__(self):
            self.q_proj = nnx.Einsum("btd,hd->bth", (4, 8), rngs=nnx.Rngs(0))  # [out, in]

    with pytest.raises(lj.LoraError, match="q_proj: nnx.Einsum 'btd,hd->bth'"):
        lj.nnx.inject(WithEinsum(), lj.LoraConfig(target_modules=["q_proj"]), jax.random.key(0))
    with pytest.raises(lj.LoraError, match="rngs=nnx.Rngs"):
        lj.nnx.inject(NnxNet(nnx.Rngs(0)), lj.LoraConfig(target_modules=["q_proj"],
                                                         lora_dropout=0.1), jax.random.key(0))
    model, _ = pair()
    with pytest.raises(lj.LoraError, match="already carry LoRA"):
        lj.nnx.inject(model, CONFIG, jax.random.key(0))


def test_dropout_is_switched_by_train_and_eval():
    config = lj.LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5,
                           init_lora_weights=False)
    model = lj.nnx.inject(NnxNet(nnx.Rngs(0)), config, jax.random.key(1),
                          rngs=nnx.Rngs(dropout=2))
    model.eval()
    assert_close(model(X), model(X))
    model.train()
    assert not np.allclose(model(X), model(X))
