"""The FP8 frozen base (`models.fp8`, the `base_fp8` model option).

FP8 is lossy by design, so the tolerances are those of the format, not of float32: e4m3 keeps 3
mantissa bits (round-off up to 2^-4 relative per element) and e5m2 2 bits; with per-tensor
scaling the measured relative error of a Gaussian matmul is ~4e-2 (e4m3, docs/PERFORMANCE.md) and ~6e-2
for the e5m2 gradient. The bounds below (8e-2, 1.2e-1) are twice that, and a wrong scale,
transpose or contraction gives errors of order 1, so the checks can fail.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from models.fp8 import fp8_dot_general, quantize
from models.llama import Llama, LlamaConfig

DENSE_DIMS = (((2,), (0,)), ((), ()))
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def operands():
    x = jax.random.normal(jax.random.key(0), (4, 16, 128))
    w = 0.05 * jax.random.normal(jax.random.key(1), (128, 96))
    return x, w


def test_quantize_scales_amax_to_the_format_maximum():
    x = jnp.array([[-3.0, 0.5], [1.0, 2.0]])
    q, scale = quantize(x, jnp.float8_e4m3fn)
    assert q.dtype == jnp.float8_e4m3fn
    assert float(scale) == pytest.approx(3.0 / 448.0)
    assert float(jnp.max(jnp.abs(q.astype(jnp.float32)))) == 448.0
    _, zero_scale = quantize(jnp.zeros((3,)), jnp.float8_e4m3fn)
    assert float(zero_scale) > 0  # an all-zero tensor must not divide by zero


def test_forward_and_input_gradient_match_float32_within_fp8_error():
    x, w = operands()
    exact = jax.lax.dot_general(x, w, DENSE_DIMS)
    assert rel(fp8_dot_general(x, w, DENSE_DIMS), exact) < 8e-2
    loss = lambda dot: lambda x: jnp.sum(jnp.sin(dot(x, w, DENSE_DIMS)))
    g8 = jax.grad(loss(fp8_dot_general))(x)
    g32 = jax.grad(loss(jax.lax.dot_general))(x)
    assert rel(g8, g32) < 1.2e-1


def test_both_matmuls_run_in_fp8():
    x, w = operands()
    fwd = jax.make_jaxpr(lambda x: fp8_dot_general(x, w, DENSE_DIMS))(x)
    bwd = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(fp8_dot_general(x, w, DENSE_DIMS))))(x)
    assert "f8_e4m3fn" in str(fwd)
    assert "f8_e5m2" in str(bwd)  # the gradient operand of the input-gradient GEMM


def test_kernel_is_treated_as_frozen():
    x, w = operands()
    gw = jax.grad(lambda w: jnp.sum(fp8_dot_general(x, w, DENSE_DIMS)))(w)
    assert not np.any(np.asarray(gw))


def test_unsupported_contraction_is_a_clear_error():
    x, w = operands()
    with pytest.raises(ValueError, match="supports x\\[..., in\\] . kernel\\[in, out\\] only"):
        fp8_dot_general(x, w.T, (((2,), (1,)), ((), ())))


def lora_llama(base_fp8: bool, **options):
    cfg = LlamaConfig.from_hf_dict(TINY, base_fp8=base_fp8, **options)
    return Llama(cfg)


def test_llama_with_lora_runs_on_the_fp8_base_close_to_float32():
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, TINY["vocab_size"])
    params = jax.jit(lora_llama(False).init)(jax.random.key(0), ids)["params"]
    params = lj.inject(params, lj.LoraConfig(r=4, target_modules="all-linear",
                                             init_lora_weights="gaussian"), jax.random.key(2))
    ref, out = (jax.jit(functools.partial(lj.apply, lora_llama(fp8)))({"params": params}, ids)
                for fp8 in (False, True))
    # Two layers of e4m3 projections compound: 1.5e-1 is ~2x the measured 7e-2.
    assert rel(out, ref) < 1.5e-1
    base, adapters = lj.split(params)
    loss = lambda a: jnp.mean(lj.apply(lora_llama(True), {"params": lj.combine(base, a)},
                                       ids) ** 2)
    grads = jax.jit(jax.grad(loss))(adapters)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_base_fp8_skip_keeps_the_named_projections_out_of_fp8():
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, TINY["vocab_size"])
    params = lora_llama(False).init(jax.random.key(0), ids)["params"]
    every = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    ref = lora_llama(False).apply({"params": params}, ids)
    all_skipped = lora_llama(True, base_fp8_skip=every).apply({"params": params}, ids)
    np.testing.assert_array_equal(np.asarray(all_skipped), np.asarray(ref))

    def fp8_casts(skip):
        model = lora_llama(True, base_fp8_skip=skip)
        return str(jax.make_jaxpr(lambda p: model.apply({"params": p}, ids))(params)).count(
            "f8_e4m3fn[")

    # Every FP8 projection casts alike: keeping six of seven in bf16 leaves a seventh of them.
    only_down = fp8_casts(every[:-1])
    assert only_down > 0 and fp8_casts(()) == 7 * only_down
    with pytest.raises(ValueError, match="tuple of projection names"):
        lora_llama(True, base_fp8_skip="q_proj")


def test_dots_remat_policy_saves_the_fp8_outputs_like_bf16_dots():
    """`jax.checkpoint`'s dots policies cannot see inside the custom VJP; without the named
    policy the FP8 outputs would be recomputed (fewer residuals, an extra forward)."""
    from jax._src.ad_checkpoint import saved_residuals
    ids = jnp.zeros((2, 16), jnp.int32)
    counts = {}
    for fp8 in (False, True):
        model = lora_llama(fp8, remat_policy="dots_saveable", scan_layers=True)
        params = lj.inject(model.init(jax.random.key(0), ids)["params"],
                           lj.LoraConfig(r=4, target_modules="all-linear"), jax.random.key(2))
        base, adapters = lj.split(params)
        f = lambda a: jnp.mean(lj.apply(model, {"params": lj.combine(base, a)}, ids) ** 2)
        counts[fp8] = sorted(str(r[0].shape) for r in saved_residuals(f, adapters)
                             if "scan" in r[1])
    assert counts[True] == counts[False]


def test_tensor_parallel_layers_refuse_the_fp8_base():
    from sharding import TensorParallelism, make_mesh
    mesh = make_mesh(dp=-1)
    with pytest.raises(NotImplementedError, match="base_fp8"):
        TensorParallelism(mesh=mesh).dense(8, role="column", name="q", use_bias=False,
                                      dtype=jnp.float32, param_dtype=jnp.float32,
                                      kernel_init=None, bias_init=None,
                                      dot_general=fp8_dot_general)


def test_rowwise_quantize_scales_each_row_to_the_format_maximum():
    x = jnp.array([[1.0, -4.0], [0.5, 0.25]], jnp.float32)
    q, scale = quantize(x, jnp.float8_e4m3fn, rowwise=True)
    assert scale.shape == (2, 1)
    np.testing.assert_allclose(jnp.max(jnp.abs(q.astype(jnp.float32)), axis=-1), [448.0, 448.0])


def test_rescale_probe_forms_agree_on_the_cpu(tmp_path, capsys):
    """`benchmarks.fp8_rescale_probe --smoke`: every FP8 form of the q/k/v block runs and its
    loss stays within FP8 rounding of bf16's (e4m3 has 3 mantissa bits: 2% of a sum of squares
    is a loose bound that a wrong scale, off by its own size, fails), and --hlo-dir writes each
    form's optimised HLO."""
    import json

    from benchmarks import fp8_rescale_probe
    fp8_rescale_probe.main(["--smoke", "--hlo-dir", str(tmp_path)])
    rows = {r["form"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == set(fp8_rescale_probe.FORMS)
    for form, row in rows.items():
        assert abs(row["loss"] / rows["bf16"]["loss"] - 1) < 0.02, (form, row)
        assert (tmp_path / f"probe_{form}_default.hlo.txt").is_file()


def test_levers_probe_head_runs_in_fp8_within_its_error_on_the_cpu(capsys):
    """`benchmarks.fp8_levers_probe --smoke`: the head's bf16 and FP8 rows run, and their
    forwards stay within their formats' rounding of float32 (bf16 ~0.4% per element, e4m3 with
    3 mantissa bits ~6% per element, averaged down over a 128-long dot; a wrong scale is off by
    100% or more)."""
    import json

    from benchmarks import fp8_levers_probe
    fp8_levers_probe.main(["--smoke"])
    rows = {r["form"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert set(rows) == {"bf16", "fp8"}
    assert rows["bf16"]["rel_err"] < 0.01 and rows["fp8"]["rel_err"] < 0.1, rows
