"""A quantised frozen base for Flax NNX models (`models.nnx_quant.quantize`) under `lora_jax.nnx`:
the NNX Llama over NF4 / int8 / FP8 kernels against the Linen quantised Llama, LoRA in either
order, training only the adapters, merge, the Linen-form tree, checkpoints, and refusals.

Tolerances: the NNX and Linen models quantise with the same `models.quant.quantize` (identical
codes, checked exactly) and multiply with the same `quantized_matmul`, in float32 with matmul
precision "highest" (conftest.py); their logits agree to 1e-5 relative (in practice exactly),
the room being XLA fusing a reduction differently between the eager NNX call and `lj.apply`, as
in tests/test_nnx_llama.py. Merged against unmerged (NF4, int8): 1e-5, since
`dequant(W) + s*A@B` then one matmul rounds differently from `x@dequant(W) + s*(x@A)@B` (int8
also applies its channel scale after the GEMM). FP8 multiplies e4m3-quantised *activations*
unmerged, and a merged plain kernel does not, so for FP8 the merged model is compared with the
Linen merge of the same tree (1e-5) instead. FP8 with `fp8_scaling="row"`: the same 1e-5
against the Linen row-scaled Llama (the same `quantized_matmul`, one amax per token row).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import lora_jax as lj
import models
from examples.nnx_llama import from_linen, to_linen
from models.nnx_quant import QuantLinear, quantize
from models.quant import FORMATS, QuantDense, is_quantized, quantize_params

CONFIG = models.LlamaConfig.tiny()
LORA = lj.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
IDS = jax.random.randint(jax.random.key(7), (2, 8), 0, 512)


def assert_close(a, b, rtol):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


def q_proj(model):
    return model.model.layers[0].self_attn.q_proj


# jitted: eagerly each op of the NF4 quantiser compiles on its own, per kernel shape (seconds)
quantize_tree = jax.jit(quantize_params, static_argnums=1)


def assert_same_tree(a, b):
    """Same structure (quantised pytrees included) and bit-identical leaves."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def linen():
    """The Linen Llama and its float params (the NNX models are built from these weights)."""
    model = models.build(CONFIG)
    return model, models.init_params(model, jax.random.key(0))


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantised_nnx_llama_equals_the_linen_quantised_llama(fmt, linen):
    _, params = linen
    qconfig = models.LlamaConfig.tiny(quantize=fmt)
    qlinen, qparams = models.build(qconfig), quantize_tree(params, fmt)
    model = quantize(from_linen(CONFIG, params), fmt)  # surgery on a float model
    assert type(q_proj(model)) is QuantLinear and type(model.lm_head) is nnx.Linear
    assert_same_tree(to_linen(model), qparams)  # identical codes, the head left float
    assert_close(model(IDS), qlinen.apply({"params": qparams}, IDS), 1e-5)
    # The same with the adapters: the tree is Linen's injected quantised tree, leaf for leaf.
    lj.nnx.inject(model, LORA, jax.random.key(1))
    tree = lj.inject(qparams, LORA, jax.random.key(1))
    assert_same_tree(lj.nnx.params(model), tree)
    assert lj.nnx.layouts(model) == lj.nnx.layouts(from_linen(CONFIG, params))
    assert_close(model(IDS), lj.apply(qlinen, {"params": tree}, IDS), 1e-5)
    # A config with quantize= builds the same layers from the Linen quantised tree (their
    # forward is the one checked above).
    built = from_linen(qconfig, qparams)
    assert type(q_proj(built)) is QuantLinear and type(built.lm_head) is nnx.Linear
    assert_same_tree(to_linen(built), qparams)


@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_writes_a_plain_kernel(fmt, linen):
    qlinen, (_, params) = models.build(models.LlamaConfig.tiny(quantize=fmt)), linen
    model = lj.nnx.inject(quantize(from_linen(CONFIG, params), fmt), LORA, jax.random.key(1))
    merged = lj.nnx.merge(model)
    layer = q_proj(merged)
    assert type(layer) is nnx.Linear and not hasattr(layer, "lora_a")
    kernel = layer.kernel.get_value()
    assert isinstance(kernel, jax.Array) and kernel.dtype == jnp.float32  # the param dtype
    assert is_quantized(q_proj(model).kernel.get_value())  # the model passed in is kept
    linen_merged = lj.merge(lj.nnx.params(model))
    assert_same_tree(to_linen(merged), linen_merged)
    if fmt == "fp8":  # see the module docstring: FP8 quantises activations only unmerged
        assert_close(merged(IDS), models.build(CONFIG).apply({"params": linen_merged}, IDS), 1e-5)
    else:
        assert_close(merged(IDS), model(IDS), 1e-5)
    assert not np.allclose(merged(IDS), qlinen.apply({"params": to_linen(model)}, IDS))


@pytest.mark.parametrize("fmt", ["nf4", "fp8"])
def test_inject_then_quantise_is_quantise_then_inject(fmt, linen):
    _, params = linen
    first = lj.nnx.inject(quantize(from_linen(CONFIG, params), fmt), LORA, jax.random.key(1))
    second = quantize(lj.nnx.inject(from_linen(CONFIG, params), LORA, jax.random.key(1)), fmt)
    layer = q_proj(second)
    assert isinstance(layer, lj.nnx.LoraLinear) and isinstance(layer, QuantLinear)
    assert_same_tree(lj.nnx.params(second), lj.nnx.params(first))
    assert_close(second(IDS), first(IDS), 1e-6)


def test_a_step_trains_the_adapters_only(linen):
    _, params = linen
    model = lj.nnx.inject(quantize(from_linen(CONFIG, params), "nf4"), LORA, jax.random.key(1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=lj.nnx.LoraParam)
    assert not any(map(is_quantized, jax.tree.leaves(
        nnx.state(model, lj.nnx.LoraParam), is_leaf=is_quantized)))
    before = jax.tree.map(np.asarray, lj.nnx.params(model))

    @nnx.jit
    def step(model, optimizer):
        loss_fn = lambda m: models.cross_entropy(m(IDS), IDS, shift=True)  # noqa: E731
        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lj.nnx.LoraParam))
        loss, grads = grad_fn(model)
        optimizer.update(model, grads)
        return loss, grads

    loss, grads = step(model, optimizer)
    assert np.isfinite(float(loss))
    grad_paths = {p[-1] for p, _ in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(grads))}
    assert {str(k.key) for k in grad_paths} == {"lora_a", "lora_b"}
    after = lj.nnx.params(model)
    base_before, adapters_before = lj.split(before)
    base_after, adapters_after = lj.split(after)
    assert_same_tree(base_after, base_before)  # the NF4 codes and scales, bit for bit
    a_moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(adapters_after),
                                                         jax.tree.leaves(adapters_before))]
    assert sum(a_moved) >= len(a_moved) // 2  # A and B of every layer (scales do not move)


def test_fp8_row_scaling_equals_the_linen_row_scaled_llama(linen):
    """`quantize(..., fp8_scaling="row")` and `LlamaConfig(fp8_scaling="row")` give the Linen
    row-scaled model's logits (1e-5, module docstring), with and without adapters, and the
    option is a static field: not in the state or the Linen-form tree, kept through
    `nnx.split` / `nnx.merge` (what `nnx.jit` does), gone with `lj.nnx.merge`."""
    _, params = linen
    rconfig = models.LlamaConfig.tiny(quantize="fp8", fp8_scaling="row")
    rlinen, qparams = models.build(rconfig), quantize_tree(params, "fp8")
    want = rlinen.apply({"params": qparams}, IDS)
    surgery = quantize(from_linen(CONFIG, params), "fp8", fp8_scaling="row")
    built = from_linen(rconfig, qparams)  # NnxLlama passes config.fp8_scaling to quantize
    for model in (surgery, built):
        assert q_proj(model).fp8_scaling == "row" and q_proj(model).quant_impl == "xla"
        assert_same_tree(to_linen(model), qparams)  # no leaf for the option
        assert_close(model(IDS), want, 1e-5)
    tensor = models.build(models.LlamaConfig.tiny(quantize="fp8")).apply({"params": qparams}, IDS)
    assert not np.allclose(want, tensor, rtol=1e-5, atol=1e-5)  # the scalings round differently

    graphdef, state = nnx.split(surgery)
    assert "fp8_scaling" not in str(jax.tree_util.tree_structure(nnx.to_pure_dict(state)))
    assert q_proj(nnx.merge(graphdef, state)).fp8_scaling == "row"
    lj.nnx.inject(surgery, LORA, jax.random.key(1))
    tree = lj.inject(qparams, LORA, jax.random.key(1))
    assert_same_tree(lj.nnx.params(surgery), tree)
    assert q_proj(surgery).fp8_scaling == "row"  # Lora<QuantLinear> keeps it
    assert_close(surgery(IDS), lj.apply(rlinen, {"params": tree}, IDS), 1e-5)
    merged = lj.nnx.merge(surgery)
    assert type(q_proj(merged)) is nnx.Linear
    assert_close(merged(IDS), models.build(CONFIG).apply({"params": lj.merge(tree)}, IDS), 1e-5)


class Wide(nnx.Module):
    """One block projection, FP8 after `quantize`."""

    def __init__(self, rngs):
        self.up_proj = nnx.Linear(64, 32, rngs=rngs)

    def __call__(self, x):
        return self.up_proj(x)


def test_fp8_row_scaling_keeps_a_small_row_that_tensor_scaling_crushes():
    """Rows 1e6 apart: one per-tensor amax puts the small row below e4m3's smallest subnormal
    (2^-9 of the 448 the large row maps to), so tensor scaling returns ~0 for it; a per-row
    amax keeps it to e4m3's ~6% relative rounding. Bounds: row within 10% of the float result
    on the small row, tensor off by more than 50% of it; both equal `QuantDense`'s output."""
    x = jax.random.normal(jax.random.key(3), (2, 64)) * jnp.array([[1e3], [1e-3]])
    outputs = {}
    for scaling in ("tensor", "row"):
        model = quantize(Wide(nnx.Rngs(0)), "fp8", fp8_scaling=scaling)
        outputs[scaling] = model(x)
        kernel = model.up_proj.kernel.get_value()
        linen = QuantDense(32, quant="fp8", fp8_scaling=scaling).apply(
            {"params": {"kernel": kernel, "bias": model.up_proj.bias[...]}}, x)
        np.testing.assert_array_equal(outputs[scaling], linen)
    exact = x[1] @ kernel.dequantize() + model.up_proj.bias[...]
    small = {k: float(jnp.max(jnp.abs(v[1] - exact)) / jnp.max(jnp.abs(exact)))
             for k, v in outputs.items()}
    assert small["row"] < 0.1 < 0.5 < small["tensor"], small


class Block(nnx.Module):
    """Two block projections (NF4 and FP8 after `quantize` with `select=`) and a float head."""

    def __init__(self, rngs):
        self.up_proj = nnx.Linear(64, 16, rngs=rngs)
        self.down_proj = nnx.Linear(64, 16, rngs=rngs)
        self.lm_head = nnx.Linear(16, 4, rngs=rngs)


def quantised_block(seed):
    block = quantize(Block(nnx.Rngs(seed)), "nf4", select=lambda path: path == "up_proj")
    return quantize(block, "fp8", select=lambda path: path == "down_proj")


def test_quantised_state_round_trips_through_orbax(tmp_path):
    model = quantised_block(0)  # uint8 NF4 codes, float8 FP8 codes
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "state", nnx.state(model, nnx.Param))
    fresh = quantised_block(1)
    template = jax.tree.map(ocp.utils.to_shape_dtype_struct, nnx.state(fresh, nnx.Param))
    with ocp.StandardCheckpointer() as ckpt:
        nnx.update(fresh, ckpt.restore(tmp_path / "state", template))
    assert_same_tree(nnx.to_pure_dict(nnx.state(fresh, nnx.Param)),
                     nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert type(fresh.up_proj.kernel.get_value()).__name__ == "Nf4Kernel"


def test_refusals(linen):
    _, params = linen
    model = from_linen(CONFIG, params)
    with pytest.raises(ValueError, match="quantize='nf3'"):
        quantize(model, "nf3")
    with pytest.raises(ValueError, match="fmt=None"):
        quantize(model, None)
    with pytest.raises(ValueError, match="quant_impl='cuda'"):
        quantize(model, "int8", impl="cuda")
    with pytest.raises(ValueError, match=r"fp8_scaling='column': use one of \('tensor', 'row'\)"):
        quantize(model, "fp8", fp8_scaling="column")
    assert not is_quantized(q_proj(model).kernel.get_value())  # refused before any change
    with pytest.raises(ValueError, match="matched no layer.*lm_head"):
        quantize(model, "int8", select=lambda path: path.endswith("nothing"))
    quantize(model, "int8")
    with pytest.raises(ValueError, match=r"_proj: its kernel is already quantised \(Int8Kernel\)"):
        quantize(model, "nf4")
    with pytest.raises(lj.LoraError, match="DoRA"):
        lj.nnx.inject(model, lj.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
                      jax.random.key(1))
    with pytest.raises(lj.LoraError, match="pissa.*quantised base"):
        lj.nnx.inject(model, lj.LoraConfig(r=2, target_modules=["q_proj"],
                                           init_lora_weights="pissa"), jax.random.key(1))
    dora = lj.nnx.inject(from_linen(CONFIG, params), lj.LoraConfig(
        r=2, target_modules=["q_proj"], use_dora=True), jax.random.key(1))
    with pytest.raises(lj.LoraError, match="DoRA's weight norm over a quantised kernel"):
        quantize(dora, "int8")(IDS)


class Mixed(nnx.Module):
    """An `nnx.LinearGeneral`, an `nnx.Einsum` and a Linear whose inputs NF4 cannot block."""

    def __init__(self, rngs):
        self.general = nnx.LinearGeneral(64, (2, 8), rngs=rngs)
        self.einsum = nnx.Einsum("bd,dh->bh", (64, 16), rngs=rngs)
        self.narrow = nnx.Linear(48, 8, rngs=rngs)


@pytest.mark.parametrize("name,match", [
    ("general", "general: LinearGeneral layers cannot be stored quantised"),
    ("einsum", "einsum: Einsum layers cannot be stored quantised"),
    ("narrow", r"narrow: nf4 needs the input dimension divisible by 64.*\(48, 8\)")])
def test_unsupported_layers_are_refused_by_name(name, match):
    model = Mixed(nnx.Rngs(0))
    with pytest.raises(ValueError, match=match):
        quantize(model, "nf4", select=lambda path: path == name)
    assert not any(is_quantized(x) for x in jax.tree.leaves(  # nothing half-done
        nnx.state(model), is_leaf=is_quantized))


def test_a_quantised_model_is_placed_by_the_rules_and_equals_one_device(linen):
    """`sharding.shard_nnx` walks into a quantised kernel's pytree: each field (codes, scale)
    gets the sharding `param_shardings` gives it in the Linen-form tree (before the fix the
    whole tree of shardings was handed to every field), and the placed model's logits equal one
    device's within 1e-5 of their largest value (only float32 summation order changes: the
    tp-split contractions are summed across devices). int8: its leaves divide on any mesh of
    the tiny shape, where NF4's 64-input blocks do not split over fsdp or a row layer's tp."""
    import sharding
    from sharding_common import mesh_of

    _, params = linen
    model = quantize(from_linen(CONFIG, params), "int8")
    lj.nnx.inject(model, LORA, jax.random.key(1))
    expected = model(IDS)
    mesh = mesh_of(dp=2, fsdp=2, tp=2)
    placed = sharding.nnx_shardings(model, mesh)
    by_rule = sharding.param_shardings(lj.nnx.params(model), mesh)
    layer0 = by_rule["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    state = nnx.to_pure_dict(placed)["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"]
    assert is_quantized(layer0) and state.codes == layer0.codes and state.scale == layer0.scale
    sharding.shard_nnx(model, mesh)
    assert q_proj(model).kernel.get_value().codes.sharding == layer0.codes
    assert_close(nnx.jit(lambda m, ids: m(ids))(model, IDS), expected, 1e-5)
