"""Show 1: our GPT-2 / Llama logits and loss equal transformers' on tiny random checkpoints.

Tolerance: logits within 1e-5 of the largest |logit| (float32, matmul precision "highest";
the two frameworks sum in different orders, which costs ~1e-7 relative).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from tests.test_models_fixtures import (hf_gpt2, hf_llama, random_ids, rel_err,
                                        tiny_config, torch_forward)

RTOL = 1e-5
MEASURED: dict[str, float] = {}


def assert_close(ours, ref, what: str) -> None:
    ours, ref = np.asarray(ours), np.asarray(ref)
    MEASURED[what] = rel_err(ours, ref)
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max(), err_msg=what)


LLAMA_CASES = {  # name: (hf_llama kwargs)
    "gqa-untied-scaled": dict(kv_heads=2, tie=False, scaling=True),
    "gqa-tied-unscaled": dict(kv_heads=2, tie=True, scaling=False),
    "mqa-tied-scaled": dict(kv_heads=1, tie=True, scaling=True),
    "mha-untied-unscaled-bias": dict(kv_heads=4, tie=False, scaling=False,
                                     attention_bias=True, mlp_bias=True),
}


# Every case unscanned; scanning (a different code path, independent of the attention shape)
# on the two cases with the most going on.
LLAMA_RUNS = [(case, False) for case in LLAMA_CASES] + [("gqa-untied-scaled", True),
                                                        ("mqa-tied-scaled", True)]


@pytest.mark.parametrize("case,scan", LLAMA_RUNS)
def test_llama_logits_and_loss_match_transformers(tmp_path, case, scan):
    ref_model = hf_llama(tmp_path, **LLAMA_CASES[case])
    ids = random_ids(2, 40)  # longer than original_max_position_embeddings=16
    ref = torch_forward(ref_model, ids, labels=ids)
    model, params = models.load_hf(tmp_path, scan_layers=scan)
    logits = model.apply({"params": params}, ids)
    assert_close(logits, ref.logits.numpy(), f"llama/{case}/{'scan' if scan else 'loop'}")
    loss = models.cross_entropy(logits, ids, shift=True)
    np.testing.assert_allclose(float(loss), float(ref.loss), rtol=RTOL)


@pytest.mark.parametrize("tie,scan", [(True, False), (True, True), (False, False)])
def test_gpt2_logits_and_loss_match_transformers(tmp_path, tie, scan):
    ref_model = hf_gpt2(tmp_path, tie=tie)
    ids = random_ids(2, 40)
    ref = torch_forward(ref_model, ids, labels=ids)
    model, params = models.load_hf(tmp_path, scan_layers=scan)
    assert ("lm_head" in params) is (not tie)
    logits = model.apply({"params": params}, ids)
    assert_close(logits, ref.logits.numpy(), f"gpt2/{'tied' if tie else 'untied'}/"
                                             f"{'scan' if scan else 'loop'}")
    loss = models.cross_entropy(logits, ids, shift=True)
    np.testing.assert_allclose(float(loss), float(ref.loss), rtol=RTOL)


def test_rope_scaling_changes_the_model(tmp_path):
    """The llama3 scaling path is really exercised: the same weights without it differ."""
    hf_llama(tmp_path, scaling=True)
    ids = random_ids(1, 40)
    model, params = models.load_hf(tmp_path)
    unscaled = models.Llama(models.LlamaConfig.from_hf_dict(
        {**models.read_config(tmp_path), "rope_scaling": None, "rope_parameters": None}))
    a = model.apply({"params": params}, ids)
    b = unscaled.apply({"params": params}, ids)
    assert rel_err(a, b) > 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_batch_matches_transformers(tmp_path, family):
    """The padding-mask path: left-padded rows, transformers' default positions (0..T-1)."""
    ref_model = (hf_llama if family == "llama" else hf_gpt2)(tmp_path)
    ids = random_ids(2, 24)
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    ref = torch_forward(ref_model, ids, mask).logits.numpy()
    model, params = models.load_hf(tmp_path)
    logits = np.asarray(model.apply({"params": params}, ids, attention_mask=mask))
    real = mask.astype(bool)
    assert_close(logits[real], ref[real], f"{family}/left-padded")


def test_bf16_compute_stays_near_float32(tmp_path):
    """bf16 weights and compute (the GPU setting) track float32: bf16 has 8 mantissa bits, so
    ~1e-2 relative after a few layers is its expected rounding, not a bug."""
    hf_llama(tmp_path)
    ids = random_ids(2, 32)
    model32, p32 = models.load_hf(tmp_path)
    model16, p16 = models.load_hf(tmp_path, dtype=jnp.bfloat16)
    assert jax.tree_util.tree_leaves(p16)[0].dtype == jnp.bfloat16
    out16 = model16.apply({"params": p16}, ids)
    assert out16.dtype == jnp.bfloat16
    assert rel_err(out16.astype(jnp.float32), model32.apply({"params": p32}, ids)) < 3e-2


def test_remat_policies_keep_gradients():
    """Rematerialisation changes memory, never values: scan + "dots_saveable" against the plain
    loop ("full" runs in test_models_lora's gradient test)."""
    ids = random_ids(2, 16)
    runs = [(False, "none"), (True, "dots_saveable")]
    params = models.init_params(models.build(tiny_config("llama")),
                                jax.random.key(0))
    grads = []
    for scan, policy in runs:
        model = models.build(tiny_config("llama", scan_layers=scan, remat_policy=policy))

        def loss(p, model=model):
            return models.cross_entropy(model.apply({"params": p}, ids), ids, shift=True)

        g = jax.jit(jax.grad(loss))(models.stack_layers(params) if scan else params)
        grads.append(models.unstack_layers(g) if scan else g)
    for g in grads[1:]:  # same arithmetic, recomputed: equal up to float32 reassociation
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                                       atol=1e-7), g, grads[0])


def test_report_measured_errors():
    """Not a check: prints the measured relative errors of this module (run with -s)."""
    for what, err in sorted(MEASURED.items()):
        print(f"{what:40s} {err:.2e}")
