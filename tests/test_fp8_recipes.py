"""`benchmarks.fp8_recipes` re-implements the FP8 matmul to vary its recipe; with the recipe of
`models.fp8` (per-tensor scales, e5m2 gradient) it must give the same forward and input
gradient, or its comparisons would not be about `models.fp8`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models.projection
from benchmarks.fp8_recipes import recipe_dot_general, use_recipe
from models import fp8

DIMS = (((2,), (0,)), ((), ()))


def test_models_fp8_recipe_is_reproduced():
    x = jax.random.normal(jax.random.key(0), (2, 8, 32), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (32, 16), jnp.bfloat16)
    ours = recipe_dot_general(False, fp8.GRADIENT_DTYPE)
    y_ref, vjp_ref = jax.vjp(lambda x: fp8.fp8_dot_general(x, w, DIMS), x)
    y, vjp = jax.vjp(lambda x: ours(x, w, DIMS), x)
    dy = jax.random.normal(jax.random.key(2), y.shape, y.dtype)
    # models.fp8 rounds the GEMM output to bf16 before rescaling (2^-8 relative); a different
    # recipe (e4m3 gradient, row scales) moves results by several percent and fails this.
    np.testing.assert_allclose(np.float32(y), np.float32(y_ref), rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.float32(vjp(dy)[0]), np.float32(vjp_ref(dy)[0]),
                               rtol=1e-2, atol=1e-2)


def test_bf16_gradient_recipe_is_exact_in_the_backward():
    x = jax.random.normal(jax.random.key(0), (4, 32), jnp.float32)
    w = jax.random.normal(jax.random.key(1), (32, 16), jnp.float32)
    forward_only = recipe_dot_general(False, None)
    _, vjp = jax.vjp(lambda x: forward_only(x, w, DIMS), x)
    dy = jnp.ones((4, 16), jnp.float32)
    np.testing.assert_allclose(vjp(dy)[0], dy @ w.T, rtol=1e-6)


def test_use_recipe_swaps_the_models_fp8_matmul_and_refuses_unknown_names():
    try:
        use_recipe("fwd_only")
        assert models.projection.fp8_dot_general is not fp8.fp8_dot_general
    finally:
        use_recipe("tensor_e5m2")
    assert models.projection.fp8_dot_general is fp8.fp8_dot_general
    with pytest.raises(SystemExit, match="unknown FP8 recipe"):
        use_recipe("e3m4")


def test_depth_scaled_divides_only_the_residual_output_kernels():
    from benchmarks.jax_worker import depth_scaled
    params = {"model": {"layers": {"self_attn": {"o_proj": {"kernel": jnp.ones((2, 3))},
                                                  "q_proj": {"kernel": jnp.ones((2, 3))}},
                                   "mlp": {"down_proj": {"kernel": jnp.ones((2, 3)),
                                                         "bias": jnp.ones(3)}}}}}
    out = depth_scaled(params, num_layers=8)["model"]["layers"]
    np.testing.assert_allclose(out["self_attn"]["o_proj"]["kernel"], 0.25)  # 1 / sqrt(16)
    np.testing.assert_allclose(out["mlp"]["down_proj"]["kernel"], 0.25)
    np.testing.assert_allclose(out["self_attn"]["q_proj"]["kernel"], 1.0)
    np.testing.assert_allclose(out["mlp"]["down_proj"]["bias"], 1.0)


def test_fp8_drift_measures_float32_below_fp8_on_the_tiny_shape():
    from benchmarks.fp8_drift import drift, random_model
    from benchmarks.shapes import SHAPES
    ids = jax.random.randint(jax.random.key(1), (2, 32), 0, SHAPES["tiny"]["vocab_size"])
    row = drift(*random_model(SHAPES["tiny"], "hf", ids), ids,
                ["", "q_proj+k_proj+v_proj+o_proj+gate_proj+up_proj+down_proj"])
    # float32 vs bf16 is bf16 rounding (~1e-2); FP8 adds e4m3's (~1e-1); skipping every
    # projection leaves a bf16 model, so its distance is exactly 0.
    assert row["float32"] < 3e-2 < row["fp8"] < 0.5
    assert row["fp8 skip=q_proj+k_proj+v_proj+o_proj+gate_proj+up_proj+down_proj"] == 0.0


def test_fp8_drift_reads_a_hugging_face_checkpoint(tmp_path):
    import models
    from benchmarks.fp8_drift import checkpoint_model, drift
    from models.llama import Llama, LlamaConfig
    config = LlamaConfig.tiny()
    params = Llama(config).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    models.save_hf(tmp_path, Llama(config), params)
    model_for, loaded = checkpoint_model(str(tmp_path))
    assert model_for().config.scan_layers and model_for(base_fp8=True).config.base_fp8
    row = drift(model_for, loaded, jnp.arange(32, dtype=jnp.int32).reshape(2, 16), [""])
    assert row["float32"] < 3e-2 < row["fp8"] < 0.5


def test_activation_amax_none_removes_the_reduction_and_restores():
    """`fp8_amax=none` (a speed bound) must take every amax out of the FP8-stored matmul, forward
    and backward, and "current" must put models.fp8's own scaled cast back."""
    from benchmarks.fp8_recipes import use_activation_amax
    from models.quant import quantize, quantized_matmul
    x = jax.random.normal(jax.random.key(0), (4, 32), jnp.bfloat16)
    q = quantize(jax.random.normal(jax.random.key(1), (32, 16), jnp.bfloat16) * 0.05, "fp8")

    def reductions() -> int:
        def f(x):
            return jnp.sum(quantized_matmul(x, q, jnp.bfloat16).astype(jnp.float32))
        return str(jax.make_jaxpr(jax.grad(f))(x)).count("reduce_max")

    current = fp8.quantize
    try:
        use_activation_amax("none")
        assert fp8.quantize is not current
        assert reductions() == 0
        y = quantized_matmul(x, q, jnp.bfloat16)  # saturating scale-1 cast: finite output
        assert bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
    finally:
        use_activation_amax("current")
    assert fp8.quantize is current
    assert reductions() == 2  # x in the forward, dy in the backward
    with pytest.raises(SystemExit, match="fp8_amax='delayed'"):
        use_activation_amax("delayed")
