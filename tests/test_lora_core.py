"""The LoRA core on toy Linen models: init parity, merge parity, masks, optimizer, targets,
dropout and errors. Tolerances: 1e-5 relative in float32 covers the reassociation of
`x@W + s*(x@A)@B` versus `x@(W + s*A@B)` (a few ulps on sums of ~16 terms)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from tests.toy_models import DenseNet, GeneralNet, NestedScanNet, ScanNet

KEY = jax.random.key(0)
RTOL, ATOL = 1e-5, 1e-6


def _init(model, x):
    return model.init(KEY, x)


def _x(shape=(4, 16)):
    return jax.random.normal(jax.random.key(1), shape)


def _random_b(model, variables, x, targets, **cfg):
    """Inject with init_lora_weights=False: B random, so the adapter changes the output."""
    config = lj.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                           **cfg)
    layouts = lj.kernel_layouts(model, variables, x)
    return lj.inject(variables, config, jax.random.key(7), layouts=layouts)


@pytest.mark.parametrize("model,shape,targets", [
    (DenseNet(), (4, 16), "all-linear"),
    (GeneralNet(), (4, 6), ["qkv", "out"]),
    (ScanNet(), (4, 16), ["q_proj", "v_proj", "o_proj"]),
])
def test_init_apply_equals_base_exactly(model, shape, targets):
    x = _x(shape)
    variables = _init(model, x)
    injected = lj.inject(variables, lj.LoraConfig(r=2, target_modules=targets), KEY,
                         layouts=lj.kernel_layouts(model, variables, x))
    out, base = lj.apply(model, injected, x), model.apply(variables, x)
    if jax.default_backend() == "cpu":  # where the suite runs: bit for bit
        np.testing.assert_array_equal(out, base)
    else:
        # B = 0 adds exact zeros, but on a GPU XLA compiles the program with the adapter into
        # other GEMM kernels than the base's, so the base product itself may round differently
        # in the last bits (H200, jax 0.11.2: 9.5e-7 at most, on values of order 1). Float32
        # sums of <= 16 terms in another order stay within ~16 ulp: 1e-5 relative and absolute.
        np.testing.assert_allclose(out, base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model,shape,targets", [
    (DenseNet(), (4, 16), "all-linear"),
    (GeneralNet(), (4, 6), ["qkv", "out"]),
    (ScanNet(), (4, 16), ["q_proj", "v_proj", "o_proj"]),
])
def test_merge_equals_apply(model, shape, targets):
    x = _x(shape)
    variables = _init(model, x)
    injected = _random_b(model, variables, x, targets)
    with_adapters = lj.apply(model, injected, x)
    merged = model.apply(lj.merge(injected), x)
    np.testing.assert_allclose(merged, with_adapters, rtol=RTOL, atol=ATOL)
    assert not np.allclose(with_adapters, model.apply(variables, x), atol=1e-3)
    assert "lora_a" not in str(jax.tree_util.tree_structure(lj.merge(injected)))


def test_hand_reference_dense():
    """y = x W + b + (alpha/r) (x A) B, computed in float64 numpy, agrees with both paths."""
    model, x = DenseNet(), _x()
    injected = _random_b(model, _init(model, x), x, ["q_proj"])
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), injected["params"])
    q = p["block"]["q_proj"]
    ref_q = x @ q["kernel"] + q["bias"] + (8 / 4) * (x @ q["lora_a"]) @ q["lora_b"]

    def layer(v, name, h):
        return h @ v[name]["kernel"] + v[name].get("bias", 0)
    h = layer(p["block"], "v_proj", np.tanh(ref_q))
    ref = layer(p, "lm_head", np.asarray(x, np.float64) + h @ p["block"]["o_proj"]["kernel"])
    np.testing.assert_allclose(lj.apply(model, injected, x), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.apply(lj.merge(injected), x), ref, rtol=1e-5, atol=1e-5)


def test_hand_reference_scanned_layer_slices():
    """Each scanned layer uses its own slice of the stacked adapters and scale."""
    model, x = ScanNet(n_layers=2), _x()
    injected = _random_b(model, _init(model, x), x, ["q_proj"])
    q = injected["params"]["layers"]["q_proj"]
    assert q["lora_a"].shape == (2, 16, 4) and q["lora_b"].shape == (2, 4, 16)
    assert q["lora_scale"].shape == (2,)
    merged = lj.merge(injected)["params"]["layers"]["q_proj"]["kernel"]
    for layer in range(2):
        want = q["kernel"][layer] + 2.0 * q["lora_a"][layer] @ q["lora_b"][layer]
        np.testing.assert_allclose(merged[layer], want, rtol=RTOL, atol=ATOL)


def _loss(model, params, x):
    return jnp.mean(lj.apply(model, {"params": params}, x) ** 2)


def test_gradient_only_on_adapter_leaves():
    model, x = ScanNet(), _x()
    injected = _random_b(model, _init(model, x), x, "all-linear")["params"]
    grads = jax.grad(lambda p: _loss(model, p, x))(injected)
    mask = lj.trainable_mask(injected)
    for g, trainable in zip(jax.tree.leaves(grads), jax.tree.leaves(mask)):
        assert bool(jnp.any(g != 0)) == trainable


def test_optimizer_state_only_for_adapters_and_base_unchanged():
    model, x = ScanNet(), _x()
    params = _random_b(model, _init(model, x), x, ["q_proj", "v_proj"])["params"]
    tx = lj.optimizer(optax.adam(1e-2), params)
    state = tx.init(params)
    ab = [v for k, v in _items(params) if k in ("lora_a", "lora_b")]
    state_arrays = [s for s in jax.tree.leaves(state) if np.ndim(s) > 0]
    # adam: mu and nu for each of the A/B leaves, nothing for 15 base leaves or the scales
    assert len(state_arrays) == 2 * len(ab)
    assert sum(s.nbytes for s in state_arrays) == 2 * sum(a.nbytes for a in ab)

    @jax.jit
    def step(p, s):
        loss, g = jax.value_and_grad(lambda q: _loss(model, q, x))(p)
        updates, s = tx.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    new, s, losses = params, state, []
    for _ in range(5):
        new, s, loss = step(new, s)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    for (k, before), (_, after) in zip(_items(params), _items(new)):
        if k in ("lora_a", "lora_b"):
            assert not np.array_equal(before, after)
        else:
            np.testing.assert_array_equal(before, after)


def test_split_combine_roundtrip_and_grad_over_adapters_only():
    model, x = DenseNet(), _x()
    params = _random_b(model, _init(model, x), x, "all-linear")["params"]
    base, adapters = lj.split(params)
    assert "lora_a" not in str(jax.tree_util.tree_structure(base))
    assert {k for k, _ in _items(adapters)} == {"lora_a", "lora_b", "lora_scale"}
    assert jax.tree_util.tree_structure(lj.combine(base, adapters)) == \
        jax.tree_util.tree_structure(params)
    grads = jax.grad(lambda a: _loss(model, lj.combine(base, a), x))(adapters)
    full = jax.grad(lambda p: _loss(model, p, x))(params)
    np.testing.assert_allclose(grads["block"]["q_proj"]["lora_a"],
                               full["block"]["q_proj"]["lora_a"], rtol=1e-6)
    assert lj.lora_params(params).keys() == adapters.keys()


def _items(tree, prefix=""):
    for k, v in sorted(tree.items()):
        if isinstance(v, dict):
            yield from _items(v, f"{prefix}{k}.")
        else:
            yield k, v


# ---- targets and scales ------------------------------------------------------------------

def _targets(config, model=DenseNet(), x=None):
    x = _x() if x is None else x
    injected = lj.inject(_init(model, x), config, KEY)["params"]
    return {p: m for p, m in lj.tree.iter_modules(injected) if "lora_a" in m}


def test_suffix_list_regex_all_linear_and_exclude():
    assert set(_targets(lj.LoraConfig(target_modules=["q_proj", "v_proj"], r=2))) == \
        {"block.q_proj", "block.v_proj"}
    assert set(_targets(lj.LoraConfig(target_modules=r".*\.(q|o)_proj", r=2))) == \
        {"block.q_proj", "block.o_proj"}
    assert set(_targets(lj.LoraConfig(target_modules="all-linear", r=2))) == \
        {"block.q_proj", "block.v_proj", "block.o_proj"}   # lm_head skipped
    assert set(_targets(lj.LoraConfig(target_modules="all-linear", r=2,
                                      exclude_modules=["v_proj"]))) == \
        {"block.q_proj", "block.o_proj"}
    # a suffix must be a whole dotted component: "proj" matches nothing
    with pytest.raises(lj.LoraError, match="matched no Dense kernel"):
        _targets(lj.LoraConfig(target_modules=["proj"], r=2))


def test_rank_alpha_patterns_and_rslora():
    config = lj.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                           rank_pattern={"q_proj": 2}, alpha_pattern={r"block\.v_proj": 3})
    t = _targets(config)
    assert t["block.q_proj"]["lora_a"].shape == (16, 2)
    assert t["block.q_proj"]["lora_b"].shape == (2, 16)
    assert t["block.v_proj"]["lora_a"].shape == (16, 4)
    assert float(t["block.q_proj"]["lora_scale"]) == 8 / 2
    assert float(t["block.v_proj"]["lora_scale"]) == 3 / 4
    assert float(t["block.o_proj"]["lora_scale"]) == 8 / 4
    rs = _targets(lj.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True))
    assert float(rs["block.q_proj"]["lora_scale"]) == pytest.approx(8 / math.sqrt(4))


def test_init_schemes_and_determinism():
    kaiming = _targets(lj.LoraConfig(r=4, target_modules=["q_proj"]))["block.q_proj"]
    assert float(jnp.abs(kaiming["lora_a"]).max()) <= 1 / math.sqrt(16)
    assert not jnp.any(kaiming["lora_b"])
    gauss = _targets(lj.LoraConfig(r=4, target_modules=["q_proj"],
                                   init_lora_weights="gaussian"))["block.q_proj"]
    assert float(jnp.abs(gauss["lora_a"]).max()) > 1 / math.sqrt(16)   # std 1/r = 0.25
    again = _targets(lj.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))["block.q_proj"]
    np.testing.assert_array_equal(kaiming["lora_a"], again["lora_a"])  # same rng, more targets
    assert _targets(lj.LoraConfig(r=4, target_modules=["q_proj"],
                                  adapter_dtype="bfloat16"))["block.q_proj"]["lora_a"].dtype \
        == jnp.bfloat16


def test_summary_counts():
    model, x = DenseNet(), _x()
    params = lj.inject(_init(model, x), lj.LoraConfig(r=2, target_modules=["q_proj"]), KEY)
    s = lj.summary(params)
    assert s.trainable == 16 * 2 + 2 * 16
    base_total = sum(v.size for v in jax.tree.leaves(_init(model, x)))
    assert s.total == base_total + s.trainable
    assert s.per_target == {"q_proj": 64}
    assert "trainable%" in str(s)


# ---- dropout -------------------------------------------------------------------------------

def test_dropout():
    model, x = DenseNet(), _x()
    params = _random_b(model, _init(model, x), x, "all-linear")
    base = lj.apply(model, params, x)
    again = lj.apply(model, params, x, deterministic=True, lora_dropout=0.5)
    np.testing.assert_array_equal(base, again)
    train = [lj.apply(model, params, x, deterministic=False, lora_dropout=0.5,
                      rngs={"dropout": jax.random.key(i)}) for i in (1, 1, 2)]
    np.testing.assert_array_equal(train[0], train[1])
    assert not np.allclose(train[0], train[2])
    assert not np.allclose(train[0], base)
    zero = lj.apply(model, params, x, deterministic=False, lora_dropout=0.0,
                    rngs={"dropout": jax.random.key(3)})
    np.testing.assert_array_equal(zero, base)
    lm = lj.LoraModel(model, lj.LoraConfig(r=2, target_modules="all-linear", lora_dropout=0.5))
    v = lm.init(KEY, x)
    np.testing.assert_array_equal(lm.apply(v, x), model.apply(v, x))


# ---- errors ----------------------------------------------------------------------------------

def test_bad_inputs():
    model, x = DenseNet(), _x()
    variables = _init(model, x)
    with pytest.raises(lj.LoraError, match="block.q_proj"):      # lists available paths
        lj.inject(variables, lj.LoraConfig(target_modules=["nope"]), KEY)
    with pytest.raises(lj.LoraError, match="positive integer"):
        lj.LoraConfig(r=0, target_modules=["q_proj"])
    with pytest.raises(lj.LoraError, match="exceeds the kernel's smaller dimension"):
        lj.inject(variables, lj.LoraConfig(r=17, target_modules=["q_proj"]), KEY)
    injected = lj.inject(variables, lj.LoraConfig(r=2, target_modules=["q_proj"]), KEY)
    with pytest.raises(lj.LoraError, match="already carry LoRA"):
        lj.inject(injected, lj.LoraConfig(r=2, target_modules=["q_proj"]), KEY)
    with pytest.raises(lj.LoraError, match="init_lora_weights"):
        lj.LoraConfig(target_modules=["q_proj"], init_lora_weights="loftq")
    with pytest.raises(lj.LoraError, match="rank_pattern key 'k_proj'"):
        lj.inject(variables, lj.LoraConfig(target_modules=["q_proj"], rank_pattern={"k_proj": 2}),
                  KEY)
    with pytest.raises(lj.LoraError, match="target_modules is empty"):
        lj.LoraConfig(target_modules=[])
    with pytest.raises(lj.LoraError, match="needs rngs"):
        lj.apply(model, injected, x, deterministic=False, lora_dropout=0.1)


def test_merge_nan_is_reported_and_nothing_changed():
    model, x = DenseNet(), _x()
    params = lj.inject(_init(model, x), lj.LoraConfig(r=2, target_modules=["q_proj"]), KEY)
    q = params["params"]["block"]["q_proj"]
    q["lora_b"] = q["lora_b"].at[0, 0].set(jnp.nan)
    with pytest.raises(lj.LoraError, match="block.q_proj.*NaN"):
        lj.merge(params)
    assert "lora_a" in params["params"]["block"]["q_proj"]


def test_general_layout_misfit_is_a_clear_error():
    """A 3-D DenseGeneral kernel read with the default (scanned-Dense) layout fails at apply
    with a message pointing at kernel_layouts."""
    model, x = GeneralNet(), _x((4, 6))
    variables = _init(model, x)
    injected = lj.inject(variables, lj.LoraConfig(r=2, target_modules=["qkv"]), KEY)
    with pytest.raises(lj.LoraError, match="kernel_layouts"):
        lj.apply(model, injected, x)


@pytest.mark.parametrize("model,shape", [(GeneralNet(), (4, 6)), (NestedScanNet(), (4, 16))])
def test_lora_model_init_reads_the_layouts_itself(model, shape):
    """LoraModel holds the model and its inputs, so DenseGeneral kernels and nested scans need
    no layouts from the caller: it equals inject with kernel_layouts, and applies."""
    x = _x(shape)
    config = lj.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
    variables = lj.LoraModel(model, config).init(KEY, x)
    base = _init(model, x)
    want = lj.inject(base, config, jax.random.fold_in(KEY, 1),
                     layouts=lj.kernel_layouts(model, base, x))
    assert jax.tree.structure(variables) == jax.tree.structure(want)
    for got, expected in zip(jax.tree.leaves(variables), jax.tree.leaves(want)):
        np.testing.assert_array_equal(got, expected)
    adapted = lj.LoraModel(model, config).apply(variables, x)
    assert not np.allclose(adapted, model.apply(base, x))  # B is random: the adapters act


def test_layout_hint_gives_the_real_signature():
    """A kernel the tree cannot read points at kernel_layouts with its actual arguments."""
    model, x = NestedScanNet(), _x()
    variables = _init(model, x)
    with pytest.raises(lj.LoraError, match=r"kernel_layouts\(model, variables, \*example_args\)"):
        lj.inject(variables, lj.LoraConfig(r=2, target_modules=["q_proj"]), KEY)
    layouts = lj.kernel_layouts(model, variables, x)  # ... which works as the hint says
    assert layouts["outer.inner.q_proj"] == lj.KernelLayout(2, 1, 1)
