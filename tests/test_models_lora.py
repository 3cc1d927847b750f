"""Show 4: the LoRA core on the real models: inject, apply, merge on Llama (q_proj, v_proj) and
GPT-2 (c_attn), scanned and not, and the loss gradient reaches only the adapters.

Tolerance: merged vs unmerged logits within 1e-5 of the largest |logit| (float32; merging
reassociates x(W + sAB) vs xW + s(xA)B).
"""
import functools

import jax
import numpy as np
import pytest

import lora_jax as lj
import models
from lora_jax.hf_names import layer_name
from tests.sharding_common import jit_fast
from tests.test_models_fixtures import hf_gpt2, hf_llama, random_ids

CASES = {"llama": (hf_llama, ["q_proj", "v_proj"]), "gpt2": (hf_gpt2, ["c_attn"])}


@pytest.mark.parametrize("scan", [False, True], ids=["loop", "scan"])
@pytest.mark.parametrize("family", list(CASES))
def test_inject_apply_merge_on_real_models(tmp_path, family, scan):
    make, targets = CASES[family]
    make(tmp_path)
    model, params = models.load_hf(tmp_path, scan_layers=scan)
    ids = random_ids(2, 16)
    # Jitted (level 0): eager, every op of the model compiles on its own, at each new shape.
    apply_base, apply_lora = jit_fast(model.apply), jit_fast(functools.partial(lj.apply, model))
    base = apply_base({"params": params}, ids)

    config = lj.LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    injected = jit_fast(lambda p, key: lj.inject(p, config, key))(params, jax.random.key(1))
    adapted = lj.summary(injected)
    assert adapted.trainable > 0
    # B = 0 at init: the adapted model is the base model.
    np.testing.assert_allclose(apply_lora({"params": injected}, ids), base,
                               rtol=1e-6, atol=1e-6 * np.abs(base).max())

    # A non-zero B (as after training) must change the output, and merge must reproduce it.
    trained_config = lj.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                   init_lora_weights=False)
    trained = jit_fast(lambda p, key: lj.inject(p, trained_config, key))(params,
                                                                          jax.random.key(2))
    unmerged = apply_lora({"params": trained}, ids)
    assert np.abs(unmerged - base).max() > 1e-3 * np.abs(base).max()
    merged = apply_base({"params": jit_fast(lj.merge)(trained)}, ids)
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5 * np.abs(unmerged).max())

    # Adapter paths are the HF module names (scanned: the container path, one slice per layer).
    container = models.layer_container(params)
    paths = sorted(".".join(k.key for k in p[:-1]) for p, _ in
                   jax.tree_util.tree_flatten_with_path(lj.lora_params(trained))[0]
                   if p[-1].key == "lora_a")
    names = [layer_name(p, i, container) if scan else p
             for p in paths for i in (range(2) if scan else [None])]
    expected = sorted(f"{container}.{i}.{mod}" for i in range(2) for mod in
                      (["self_attn.q_proj", "self_attn.v_proj"] if family == "llama"
                       else ["attn.c_attn"]))
    assert sorted(names) == expected


def test_loss_gradient_reaches_only_adapters(tmp_path):
    hf_llama(tmp_path)
    model, params = models.load_hf(tmp_path, scan_layers=True, remat_policy="full")
    ids = random_ids(2, 16)
    config = lj.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    params = jit_fast(lambda p, key: lj.inject(p, config, key))(params, jax.random.key(0))
    base, adapters = lj.split(params)

    def loss(a):
        logits = lj.apply(model, {"params": lj.combine(base, a)}, ids)
        return models.cross_entropy(logits, ids, shift=True)

    grads = jit_fast(jax.grad(loss))(adapters)
    leaves = jax.tree_util.tree_leaves(grads)
    assert leaves and all(np.isfinite(g).all() for g in leaves)
    assert any(float(np.abs(g).max()) > 0 for g in leaves)


def test_generate_with_unmerged_adapters_equals_merged(tmp_path):
    """`apply_fn=partial(lora_jax.apply, model)` decodes with live adapters like merged ones."""
    hf_gpt2(tmp_path)
    model, params = models.load_hf(tmp_path, scan_layers=True)
    config = lj.LoraConfig(r=4, lora_alpha=32, target_modules=["c_attn"],
                           init_lora_weights=False)
    trained = jit_fast(lambda p, key: lj.inject(p, config, key))(params, jax.random.key(2))
    ids = random_ids(2, 6)
    live = models.generate(model, trained, ids, max_new_tokens=6,
                           apply_fn=functools.partial(lj.apply, model))
    merged = models.generate(model, lj.merge(trained), ids, max_new_tokens=6)
    np.testing.assert_array_equal(live, merged)
