"""Per-row (per-token) FP8 scaling of an FP8-STORED frozen base (`fp8_scaling="row"`).

Row mode scales each row of the activation x (forward) and of `dy * channel scale` (backward) by
its own amax over the last axis, and applies that [..., 1] scale to the GEMM's output.

Tolerances, and why each can fail:
- Against the recipe written out by hand (per-row amax, e4m3 / e5m2 casts, a float64 product of
  the codes, rescale): the same codes enter both, so only the GEMM's float32 summation order
  differs (64 terms): 1e-5 of the largest entry (measured 1.0e-7 forward, 1.3e-7 backward).
  A per-tensor scale, a scale on the wrong axis or a missing channel scale changes the codes
  and gives errors of order 1e-2..1.
- Against the unquantised float32 product, judged PER ROW: e4m3 rounds a normal value to 3
  mantissa bits (at most 2^-4 relative, rms about 2^-4/sqrt(3) = 3.6e-2 for a uniform spread),
  on both x and W, so a row's relative error is about 3e-2 (measured here: <= 3.0e-2); the
  bound 8e-2 is tests/test_fp8.py's for per-tensor FP8. The rows span six decades of magnitude:
  with one scale per tensor the smallest rows underflow e4m3 (below its 2^-9 subnormal step
  after scaling) and lose ~100%, which the test checks, so it can tell row from tensor scaling.
- Tensor parallelism, one layer: in row mode a row's amax is reduced (pmax) only over the axes
  that split the row's features, so every device scales exactly as one device does: 1e-5, as
  tests/test_quant_tp.py. Dropping that pmax, or adding one over a token axis (dp, fsdp, sp),
  gives a device scales of its own and misses 1e-5 by orders of magnitude (checked by hand:
  with `sharding/layers.py`'s row axes set to none, and to every split axis, this test and
  the two below failed).
- Tensor parallelism, whole model (dp2 x tp2 with SP): measured 5e-7 (logits) and 9e-7
  (adapter gradients) of each leaf's maximum. Float32 reordering upstream can still move a value
  sitting on an e4m3 rounding edge by one code (~7e-5 of the logits' maximum per flip,
  tests/test_quant_tp.py), so the bound is 2e-4: a couple of flips. Tensor instead of row mode
  differs by 8e-2, and a dropped feature-axis pmax fails the bound too (checked).
"""
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import lora_jax as lj
from models.llama import Llama, LlamaConfig
from models.loss import cross_entropy
from models.options import RuntimeOptions
from models.quant import quantize, quantized_matmul
from sharding import BATCH_AXES, TensorParallelism, shard_params
from sharding.layers import column_parallel, row_parallel
from tests.sharding_common import lora_logits_loss_grads, mesh_of, run_fast
from tests.test_quant_tp import assert_close_to_max

E4M3, E5M2 = jnp.float8_e4m3fn, jnp.float8_e5m2
CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1)
LORA = lj.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)


def spread_rows(shape, seed):
    """Gaussian rows whose magnitudes span 1e-3..1e3 (so per-row and per-tensor scales differ
    by up to 1e6 between rows)."""
    rng = np.random.default_rng(seed)
    rows = int(np.prod(shape[:-1]))
    mags = 10.0 ** rng.permutation(np.linspace(-3, 3, rows))
    return (rng.standard_normal(shape) * mags.reshape(*shape[:-1], 1)).astype(np.float32)


def by_hand_rows(v, fp8_dtype):
    """Per-row scaled cast, written out: (codes as float64, scale [..., 1] as float64)."""
    amax = np.max(np.abs(v), axis=-1, keepdims=True).astype(np.float32)
    scale = np.maximum(amax, np.float32(1e-12)) / np.float32(jnp.finfo(fp8_dtype).max)
    codes = np.asarray(jnp.asarray(v / scale).astype(fp8_dtype).astype(jnp.float32))
    return codes.astype(np.float64), scale.astype(np.float64)


def operands():
    x = spread_rows((2, 8, 64), seed=1)
    w = (0.02 * np.random.default_rng(2).standard_normal((64, 48))).astype(np.float32)
    return x, quantize(jnp.asarray(w), "fp8"), w


def row_rel_errors(y, want):
    y, want = np.asarray(y, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(y - want, axis=-1) / np.linalg.norm(want, axis=-1)


def test_row_mode_is_the_recipe_computed_by_hand():
    x, q, _ = operands()
    codes_t = np.asarray(q.codes_t.astype(jnp.float32), np.float64)  # [out, in]
    channel = np.asarray(q.scale, np.float64)
    x8, sx = by_hand_rows(x, E4M3)
    want = (x8 @ codes_t.T) * sx * channel
    y, vjp = jax.vjp(lambda x: quantized_matmul(x, q, jnp.float32, fp8_scaling="row"),
                     jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(y), want, rtol=0, atol=1e-5 * np.abs(want).max())
    # Backward: dx = rows of (dy * channel scale), e5m2 per row, times the stored codes.
    dy = spread_rows(y.shape, seed=3)
    g8, sg = by_hand_rows((dy * np.asarray(q.scale)).astype(np.float32), E5M2)
    want_dx = (g8 @ codes_t) * sg
    (dx,) = vjp(jnp.asarray(dy))
    np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=0,
                               atol=1e-5 * np.abs(want_dx).max())


def test_row_mode_is_within_fp8_rounding_of_the_exact_product_on_every_row():
    x, q, _ = operands()
    exact = x.astype(np.float64) @ np.asarray(q.dequantize(jnp.float32), np.float64)
    row = row_rel_errors(quantized_matmul(jnp.asarray(x), q, jnp.float32, fp8_scaling="row"),
                         exact)
    tensor = row_rel_errors(quantized_matmul(jnp.asarray(x), q, jnp.float32), exact)
    assert row.max() < 8e-2, row.max()
    assert tensor.max() > 0.5, tensor.max()  # per tensor, the 1e-3 rows underflow


def test_tiny_llama_in_row_mode_gives_gradients_only_to_adapters():
    """quantize="fp8", fp8_scaling="row": the frozen FP8 leaves get exactly zero cotangents,
    every lora_a / lora_b a finite non-zero one; the option reaches the layers (row and tensor
    mode give different logits) and the loss stays within FP8's bound of tensor mode's."""
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 500, (2, 8)), jnp.int32)
    models = {mode: Llama(LlamaConfig.tiny(quantize="fp8", fp8_scaling=mode, **CONFIG))
              for mode in ("tensor", "row")}
    params = run_fast(lambda k: lj.inject(models["row"].init(k, ids)["params"], LORA,
                                          jax.random.key(1)), jax.random.key(0))

    def loss(p, model):
        out = lj.apply(model, {"params": p}, ids)
        return cross_entropy(out, ids, shift=True), out

    (loss_row, logits_row), grads = run_fast(
        jax.value_and_grad(functools.partial(loss, model=models["row"]), has_aux=True), params)
    loss_tensor, logits_tensor = run_fast(functools.partial(loss, model=models["tensor"]),
                                          params)
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        name = jax.tree_util.keystr(path)
        if any(k in name for k in ("lora_a", "lora_b")):
            assert np.all(np.isfinite(leaf)) and np.any(np.asarray(leaf)), name
        elif "kernel" in name and leaf.dtype != jax.dtypes.float0:  # codes_t, scale
            assert not np.any(np.asarray(leaf, np.float32)), name
    assert not np.array_equal(np.asarray(logits_row), np.asarray(logits_tensor))
    assert abs(float(loss_row) - float(loss_tensor)) < 8e-2 * float(loss_tensor)


def _loss_and_grad(matmul, dy):
    """(loss, y), dx of `sum(y * dy)`: the output gradient is `dy` exactly, whatever float32
    order y was summed in (a loss of y, e.g. sin(y), would pass y's last-bit differences on to
    the gradient, and an e5m2 code at a rounding edge could flip)."""
    f = lambda x: jnp.sum(matmul(x) * dy)  # noqa: E731
    return jax.value_and_grad(lambda x: (f(x), matmul(x)), has_aux=True)


def test_tp_layers_in_row_mode_scale_as_one_device():
    """Column, row and row + SP layers on dp2 x fsdp2 x tp2: output and input gradient equal
    one device's row-mode `quantized_matmul` within 1e-5 (see the module docstring). The row
    layer's x and the column layer's dy are split on their features over tp: without the pmax
    over tp this fails; the batch split over dp x fsdp must NOT be reduced over, or it fails."""
    mesh = mesh_of(dp=2, fsdp=2, tp=2)
    x = jnp.asarray(spread_rows((4, 8, 256), seed=4))
    q = quantize(jnp.asarray(0.02 * np.random.default_rng(5).standard_normal((256, 128)),
                             jnp.float32), "fp8")
    dy = jnp.asarray(spread_rows((4, 8, 128), seed=6))  # rows of six decades, like x's
    (_, y_ref), dx_ref = run_fast(_loss_and_grad(
        lambda x: quantized_matmul(x, q, jnp.float32, fp8_scaling="row"), dy), x)
    x_sharded = jax.device_put(x, NamedSharding(mesh, P(BATCH_AXES)))
    layers = {"column": functools.partial(column_parallel, mesh=mesh),
              "row": functools.partial(row_parallel, mesh=mesh),
              "row_sp": functools.partial(row_parallel, mesh=mesh, sequence_parallel=True)}
    for name, layer in layers.items():
        (_, y), dx = run_fast(_loss_and_grad(lambda x: layer(x, q, fp8_scaling="row"), dy),
                              x_sharded)
        assert_close_to_max((y, dx), (y_ref, dx_ref), 1e-5)
    # Tensor mode differs from row mode far beyond that tolerance: the option is what's tested.
    (_, y_tensor), dx_tensor = run_fast(_loss_and_grad(lambda x: row_parallel(x, q, mesh=mesh),
                                                       dy), x_sharded)
    for got, want in ((y_tensor, y_ref), (dx_tensor, dx_ref)):
        assert np.abs(np.asarray(got) - np.asarray(want)).max() > 1e-3 * np.abs(want).max()


def _pmax_axes(fn, x) -> list[tuple[str, ...]]:
    """The axes of every pmax in `fn`'s jaxpr (forward and backward when fn is a gradient)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pmax":
                found.append(tuple(eqn.params["axes"]))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(x).jaxpr)
    return found


def test_row_mode_reduces_the_amax_over_the_feature_axis_only():
    """Which pmaxes run, forward + backward, in row mode on dp2 x fsdp2 x tp2: the row layer's
    forward over tp (x split on in), the column layer's backward over tp (dy split on out), and
    none over dp or fsdp; tensor mode reduces over the batch axes too."""
    mesh = mesh_of(dp=2, fsdp=2, tp=2)
    x = jax.device_put(jnp.ones((4, 8, 256)), NamedSharding(mesh, P(BATCH_AXES)))
    q = quantize(jnp.ones((256, 128)), "fp8")
    for layer in (column_parallel, row_parallel):
        grad = jax.grad(lambda x: jnp.sum(layer(x, q, mesh=mesh, fp8_scaling="row")))
        assert _pmax_axes(grad, x) == [("tp",)], layer.__name__
        tensor = _pmax_axes(jax.grad(lambda x: jnp.sum(layer(x, q, mesh=mesh))), x)
        assert tensor and all({"dp", "fsdp"} <= set(a) for a in tensor), layer.__name__


@pytest.mark.parametrize("dp,tp,sp", [(2, 2, True)])
def test_tensor_parallel_llama_in_row_mode_matches_one_device(dp, tp, sp):
    config = LlamaConfig.tiny(quantize="fp8", fp8_scaling="row", **CONFIG)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (4, 8)).astype(np.int32)
    params = run_fast(lambda k: Llama(config).init(k, ids)["params"], jax.random.key(0))
    base, adapters = lj.split(run_fast(lambda p: lj.inject(p, LORA, jax.random.key(1)), params))
    logits_ref, _, grads_ref = run_fast(functools.partial(lora_logits_loss_grads, Llama(config)),
                                        adapters, base, ids)
    mesh = mesh_of(dp=dp, tp=tp)
    model = Llama(config, TensorParallelism(mesh=mesh, sequence_parallel=sp))
    logits, _, grads = run_fast(functools.partial(lora_logits_loss_grads, model),
                                shard_params(adapters, mesh), shard_params(base, mesh),
                                jax.device_put(ids, NamedSharding(mesh, P(BATCH_AXES))))
    assert_close_to_max(logits, logits_ref, 2e-4)
    assert_close_to_max(grads, grads_ref, 2e-4)


def test_bad_fp8_scaling_is_refused_clearly():
    with pytest.raises(ValueError, match=r"fp8_scaling='column': use one of \('tensor', 'row'\)"):
        RuntimeOptions(fp8_scaling="column")
    with pytest.raises(ValueError, match=r"fp8_scaling='rows': use one of"):
        quantized_matmul(jnp.ones((2, 64)), quantize(jnp.ones((64, 8)), "fp8"),
                         fp8_scaling="rows")
    # NF4 / int8 accept and ignore it: same values as the default.
    q = quantize(jnp.asarray(operands()[2]), "int8")
    x = jnp.asarray(operands()[0])
    np.testing.assert_array_equal(quantized_matmul(x, q, jnp.float32, fp8_scaling="row"),
                                  quantized_matmul(x, q, jnp.float32))


def test_cli_flag_and_benchmark_variant_reach_the_config():
    from benchmarks import jax_worker
    from examples.cli import parse_args
    from examples.modeling import model_config
    cfg = parse_args(["--model", "llama3", "--quantize", "fp8", "--fp8-scaling", "row"])
    assert cfg.fp8_scaling == "row"
    config, _ = model_config(cfg)
    assert config.fp8_scaling == "row" and config.quantize == "fp8"
    assert model_config(parse_args(["--model", "llama3", "--quantize", "fp8"]))[0].fp8_scaling \
        == "tensor"
    for other in ([], ["--quantize", "nf4"]):
        with pytest.raises(ValueError, match="--fp8-scaling row .*add --quantize fp8"):
            parse_args(["--fp8-scaling", "row", *other])
    opts = jax_worker.parse_variant(["attn=xla", "quant=fp8", "fp8_scaling=row"])
    bench_cfg, *_ = jax_worker.build("tiny", opts, batch=2, seq=32, abstract=True)
    assert bench_cfg.fp8_scaling == "row"
    with pytest.raises(SystemExit, match="add quant=fp8"):
        jax_worker.build("tiny", jax_worker.parse_variant(["fp8_scaling=row"]), batch=2, seq=32,
                         abstract=True)
