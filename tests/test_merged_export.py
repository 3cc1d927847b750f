"""Merged export: `export_merged` writes an orbax checkpoint and a Hugging Face
directory; transformers loads the latter as a plain model whose logits equal our *unmerged*
`apply` within 1e-5 relative (float32; merging reassociates `x W + s (x A) B` into
`x (W + s A B)`, and torch and XLA sum in different orders: a few ulps per layer)."""
from __future__ import annotations

import jax
import numpy as np
import pytest

import lora_jax as lj
import models
from tests.test_models_fixtures import rel_err
from tests.test_peft import (checkpoints, lora_config, our_logits, random_adapters,  # noqa: F401
                             torch_logits, torch_model)

RTOL = 1e-5


@pytest.mark.parametrize("family,scan", [("gpt2", True), ("llama", False)])
def test_merged_hf_export_matches_unmerged_apply(checkpoints, tmp_path, family, scan):  # noqa: F811
    model, base = models.load_hf(checkpoints / family, scan_layers=scan)
    config = lora_config(family, rslora=False)
    params = random_adapters(lj.inject(base, config, jax.random.key(1)), seed=2)
    out = lj.export_merged(tmp_path / "merged", params, models.hf_writer(model))
    hf = torch_model(out / "hf")  # a plain transformers model: no PEFT involved
    err = rel_err(torch_logits(hf), our_logits(model, params))
    print(f"{family} scan={scan}: merged HF export vs unmerged apply, rel err {err:.2e}")
    assert err < RTOL
    assert rel_err(our_logits(model, base), our_logits(model, params)) > 1e-2  # adapter matters
    # The orbax copy restores to exactly `merge(params)`.
    merged = lj.merge(params)
    restored = lj.load_merged(out, merged)
    assert jax.tree.structure(restored) == jax.tree.structure(merged)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_merged_export_in_bf16_and_never_clobbers(checkpoints, tmp_path):  # noqa: F811
    model, base = models.load_hf(checkpoints / "llama")
    params = random_adapters(lj.inject(base, lora_config("llama", False), jax.random.key(1)),
                             seed=2)
    out = lj.export_merged(tmp_path / "m", params, models.hf_writer(model), orbax=False,
                           dtype="bfloat16")
    assert sorted(p.name for p in out.iterdir()) == ["hf"]
    assert '"torch_dtype": "bfloat16"' in (out / "hf" / "config.json").read_text()
    before = (out / "hf" / "model.safetensors").read_bytes()
    with pytest.raises(lj.LoraError, match="overwrite=True"):
        lj.export_merged(out, params, models.hf_writer(model))
    bad = {**params, "lm_head": {"kernel": np.full((32, 96), np.nan, np.float32),
                                 "lora_a": np.ones((32, 2), np.float32),
                                 "lora_b": np.ones((2, 96), np.float32),
                                 "lora_scale": np.float32(1.0)}}
    with pytest.raises(lj.LoraError, match="NaN"):
        lj.export_merged(out, bad, models.hf_writer(model), overwrite=True)
    assert (out / "hf" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
