"""lora_jax.nnx beyond Linear: `nnx.Einsum` targets (LoraEinsum), a sharded NNX training step
equal to one device, and train-state checkpoints of an NNX model and optimizer.

Tolerances: the Einsum adapter term is checked against the same math written as one explicit
einsum (float32, different contraction order: 1e-5 relative); merge vs unmerged differ by the
rounding of `kernel + scale * A @ B` (1e-5 as in test_nnx)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lora_jax as lj

RTOL = 1e-5


def assert_close(a, b, rtol=RTOL):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


class EinsumNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.q_proj = nnx.Einsum("btd,dnh->btnh", (8, 2, 4), (2, 4), rngs=rngs)
        self.o_proj = nnx.Einsum("btnh,nhd->btd", (2, 4, 8), rngs=rngs)
        self.up_proj = nnx.Einsum("btd,dh->bth", (8, 6), rngs=rngs)
        self.down_proj = nnx.Einsum("bth,hd->btd", (6, 8), rngs=rngs)
        # input contracted axis not last, output reordered: x 'bdt', out 'bnth'
        self.v_proj = nnx.Einsum("bdt,dnh->bnth", (8, 2, 4), rngs=rngs)

    def __call__(self, x):
        h = x + self.o_proj(jnp.tanh(self.q_proj(x)))
        h = h + self.down_proj(jnp.tanh(self.up_proj(h)))
        v = self.v_proj(jnp.swapaxes(h, 1, 2))  # [b, n, t, h]
        return h + jnp.swapaxes(v, 1, 2).reshape(h.shape)


X = jax.random.normal(jax.random.key(9), (3, 5, 8))
CONFIG = lj.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", init_lora_weights=False)


def adapted():
    model = EinsumNet(nnx.Rngs(0))
    return lj.nnx.inject(model, CONFIG, jax.random.key(1))


def explicit_delta(layer, x, spec):
    """scale * x A B written as one einsum with the rank letter 'r' inserted."""
    roles = lj.nnx.einsum_roles(spec)
    a_spec = roles.in_letters + "r"
    b_spec = "r" + roles.out_letters
    return layer.lora_scale[...] * jnp.einsum(f"{roles.x},{a_spec},{b_spec}->{roles.out}", x,
                                              layer.lora_a[...], layer.lora_b[...])


@pytest.mark.parametrize("name,spec,x", [
    ("q_proj", "btd,dnh->btnh", X),
    ("up_proj", "btd,dh->bth", X),
    ("o_proj", "btnh,nhd->btd", X.reshape(3, 5, 2, 4)),
    ("v_proj", "bdt,dnh->bnth", jnp.swapaxes(X, 1, 2)),
])
def test_einsum_delta_lands_in_the_output_order(name, spec, x):
    model = adapted()
    layer = getattr(model, name)
    assert type(layer) is lj.nnx.LoraEinsum
    base = nnx.Einsum.__call__(layer, x)
    out = layer(x)
    assert out.shape == base.shape
    assert_close(out - base, explicit_delta(layer, x, spec))
    assert float(jnp.abs(out - base).max()) > 1e-3  # the adapter acts


def test_einsum_adapter_shapes_layouts_and_merge():
    model = adapted()
    assert model.q_proj.lora_a[...].shape == (8, 2) and model.q_proj.lora_b[...].shape == (2, 2, 4)
    assert model.o_proj.lora_a[...].shape == (2, 4, 2) and model.o_proj.lora_b[...].shape == (2, 8)
    assert lj.nnx.layouts(model)["q_proj"] == lj.KernelLayout(0, 1, 2)
    assert lj.nnx.layouts(model)["o_proj"] == lj.KernelLayout(0, 2, 1)
    merged = lj.nnx.merge(model)
    assert type(merged.q_proj) is nnx.Einsum and not hasattr(merged.q_proj, "lora_a")
    assert_close(merged(X), model(X))
    assert not np.allclose(model(X), EinsumNet(nnx.Rngs(0))(X))


def test_einsum_files_round_trip(tmp_path):
    model = adapted()
    lj.export_peft(tmp_path / "peft", lj.nnx.params(model), CONFIG)
    fresh = EinsumNet(nnx.Rngs(0))
    lj.nnx.load(fresh, lj.import_peft(tmp_path / "peft", lj.nnx.params(fresh),
                                      layouts=lj.nnx.layouts(fresh)))
    assert_close(fresh(X), model(X), 1e-6)


def test_einsum_stacked_under_vmap():
    @nnx.vmap(in_axes=0, out_axes=0)
    def make(key):
        return nnx.Einsum("btd,dh->bth", (8, 8), rngs=nnx.Rngs(key))

    class Stack(nnx.Module):
        def __init__(self):
            self.layers = make(jax.random.split(jax.random.key(0), 3))

        def __call__(self, x):
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            def body(layer, h):
                return jnp.tanh(layer(h))
            return body(self.layers, x)

    model = Stack()
    base_out = model(X)
    lj.nnx.inject(model, lj.LoraConfig(r=2, target_modules=["layers"], init_lora_weights=False),
                  jax.random.key(1))
    assert model.layers.lora_a[...].shape == (3, 8, 2)
    assert lj.nnx.layouts(model)["layers"] == lj.KernelLayout(1, 1, 1)
    out = model(X)
    assert not np.allclose(out, base_out)
    assert_close(lj.nnx.merge(model)(X), out)


@pytest.mark.parametrize("spec,shape,why", [
    ("btd,hd->bth", (6, 8), "ordered [*in, *out]"),
    ("bnd,ndh->bnh", (2, 8, 4), "batch axes"),
    ("btd,dhk->bth", (8, 6, 2), "summed"),
    ("...d,...dh->...h", (8, 6), "'...' in the kernel"),
])
def test_einsum_refused_with_the_module_and_string(spec, shape, why):
    class Net(nnx.Module):
        def __init__(self):
            self.q_proj = nnx.Einsum(spec, shape, rngs=nnx.Rngs(0))

    with pytest.raises(lj.LoraError) as err:
        lj.nnx.inject(Net(), lj.LoraConfig(r=2, target_modules=["q_proj"]), jax.random.key(1))
    assert "q_proj" in str(err.value) and spec in str(err.value) and why in str(err.value)


def test_einsum_ellipsis_in_the_input():
    class Net(nnx.Module):
        def __init__(self):
            self.q_proj = nnx.Einsum("...d,dh->...h", (8, 6), rngs=nnx.Rngs(0))

    model = lj.nnx.inject(Net(), lj.LoraConfig(r=2, target_modules=["q_proj"],
                                               init_lora_weights=False), jax.random.key(1))
    base = nnx.Einsum.__call__(model.q_proj, X)
    assert_close(model.q_proj(X) - base, explicit_delta(model.q_proj, X, "btd,dh->bth"))


# --- train-state checkpoints of an NNX model and optimizer ------------------------------------

def _ckpt_model():
    return lj.nnx.inject(EinsumNet(nnx.Rngs(0)), CONFIG, jax.random.key(1))


_Y = jax.random.normal(jax.random.key(3), X.shape)


@nnx.jit
def _train_step(model, opt, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2),
                                     argnums=nnx.DiffState(0, lj.nnx.LoraParam))(model)
    opt.update(model, grads)
    return loss


def test_train_checkpoint_resume_gives_the_uninterrupted_losses(tmp_path):
    """Save adapters (`lj.nnx.adapters`) and `nnx.state(optimizer)` after 3 of 6 steps; restore
    them into a fresh model and optimizer (`lj.nnx.load`, `nnx.update`); the last 3 losses are
    the uninterrupted run's bit for bit (same compiled step, same inputs, same state)."""
    tx = optax.adamw(1e-2)
    batches = [(X * (1 + 0.1 * i), _Y) for i in range(6)]

    model = _ckpt_model()
    opt = nnx.Optimizer(model, tx, wrt=lj.nnx.LoraParam)
    straight = [float(_train_step(model, opt, *b)) for b in batches]

    model = _ckpt_model()
    opt = nnx.Optimizer(model, tx, wrt=lj.nnx.LoraParam)
    first = [float(_train_step(model, opt, *b)) for b in batches[:3]]
    ckpt = lj.TrainCheckpointer(tmp_path / "ckpt", config=CONFIG)
    ckpt.save(3, adapters=lj.nnx.adapters(model), opt_state=nnx.state(opt), data_position=3)
    ckpt.close()

    fresh = _ckpt_model()  # adapters from inject: different from the trained ones
    fresh_opt = nnx.Optimizer(fresh, tx, wrt=lj.nnx.LoraParam)
    found = lj.TrainCheckpointer(tmp_path / "ckpt").restore(
        adapters=lj.nnx.adapters(fresh), opt_state=nnx.state(fresh_opt))
    assert found.step == 3 and found.data_position == 3
    lj.nnx.load(fresh, found.adapters)
    nnx.update(fresh_opt, found.opt_state)
    jax.tree.map(np.testing.assert_array_equal, lj.nnx.adapters(fresh), lj.nnx.adapters(model))
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(fresh_opt)),
                 nnx.to_pure_dict(nnx.state(opt)))
    assert int(fresh_opt.step[...]) == 3
    resumed = [float(_train_step(fresh, fresh_opt, *b)) for b in batches[3:]]
    assert first + resumed == straight


def test_adapters_is_the_adapter_subtree_of_params():
    model = _ckpt_model()
    tree = lj.nnx.adapters(model)
    leaves = {lj.tree.dotted(k) for k, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}
    assert leaves == {f"{m}.{leaf}" for m in ("q_proj", "o_proj", "up_proj", "down_proj", "v_proj")
                      for leaf in ("lora_a", "lora_b", "lora_scale")}
    params = lj.nnx.params(model)
    for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
        np.testing.assert_array_equal(v, params[k[0].key][k[1].key])
