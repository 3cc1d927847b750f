"""Two-way interop with the real HF PEFT library: tiny random GPT-2 and
Llama checkpoints, torch CPU float32, adapters with random non-zero B, rank/alpha patterns and
rsLoRA, scanned and unscanned trees.

Tolerance: logits within 1e-5 relative (max |diff| / max |ref|): both sides run the same float32
math in a different order (torch vs XLA matmul blocking, fused vs unfused adds); the base models
alone agree to ~3e-7 and the adapter path adds a few ulps per layer."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import lora_jax as lj
import models
from tests.sharding_common import jit_fast
from tests.test_models_fixtures import hf_gpt2, hf_llama, random_ids, rel_err

RTOL = 1e-5
IDS = random_ids(2, 12)
FAMILIES = {
    # targets, rank_pattern, alpha_pattern (PEFT semantics: suffix keys); GPT-2 adapts only the
    # attention's c_proj, so export must not write the ambiguous suffix "c_proj".
    "gpt2": (["c_attn", "attn.c_proj", "c_fc"], {"c_fc": 2}, {"attn.c_proj": 3}),
    "llama": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              {"o_proj": 2, "up_proj": 3}, {"v_proj": 5}),
}
CASES = [("gpt2", False, False), ("gpt2", True, True), ("llama", False, True),
         ("llama", True, False)]  # (family, scan_layers, use_rslora)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    hf_gpt2(root / "gpt2")
    hf_llama(root / "llama")
    return root


def torch_model(directory: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, torch_dtype=torch.float32, attn_implementation="eager").eval()


def torch_logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(ids), dtype=torch.long)).logits.numpy()


# one compile per model config and tree shape, at optimisation level 0 (tests/sharding_common.py)
_apply = jit_fast(lj.apply, static_argnums=0)


def our_logits(model, params, ids=IDS) -> np.ndarray:
    return np.asarray(_apply(model, {"params": params}, jnp.asarray(ids)))


def lora_config(family: str, rslora: bool, **kw) -> lj.LoraConfig:
    targets, ranks, alphas = FAMILIES[family]
    return lj.LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern=ranks,
                         alpha_pattern=alphas, use_rslora=rslora, **kw)


def random_adapters(params, seed: int, a_std=0.2, b_std=0.05):
    """Adapters that change the output like a trained one: random A and B of moderate size.
    (inject's test-only random B, N(0, 1/r), would swamp the 0.02-std base weights.) Drawn on
    the host: one eager JAX draw per leaf shape would cost a compile each."""
    rng = np.random.default_rng(seed)

    def draw(path, x):
        std = {"lora_a": a_std, "lora_b": b_std}.get(path[-1].key)
        return x if std is None else jnp.asarray(std * rng.standard_normal(x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(draw, params)


def random_adapters_of(build, params, seed, a_std=0.2, b_std=0.05):
    """`random_adapters(build(params), seed)`, value for value, with `build` (e.g. an
    `lj.inject`) jitted at optimisation level 0 and the host draws passed in: the random A
    (and B) that `build` draws are then dead code, never compiled. Eager, they compile op by op
    at every leaf shape: about a second per inject. `seed`: an int or a numpy Generator."""
    rng = np.random.default_rng(seed)  # a Generator passes through, its state shared
    std = {"lora_a": a_std, "lora_b": b_std}
    draws = [jnp.asarray(std[path[-1].key] * rng.standard_normal(x.shape), x.dtype)
             for path, x in jax.tree_util.tree_leaves_with_path(jax.eval_shape(build, params))
             if path[-1].key in std]

    def with_draws(params, draws):
        draws = iter(draws)
        return jax.tree_util.tree_map_with_path(
            lambda path, x: next(draws) if path[-1].key in std else x, build(params))

    return jit_fast(with_draws)(params, draws)


def adapted(checkpoints, family, scan, rslora):
    model, base = models.load_hf(checkpoints / family, scan_layers=scan)
    config = lora_config(family, rslora)
    params = random_adapters_of(lambda b: lj.inject(b, config, jax.random.key(1)), base, seed=2)
    return model, base, params, config


# ---------------------------------------------------------------------------------------------
# (a) ours -> PEFT
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,scan,rslora", CASES)
def test_export_loads_in_peft_with_equal_logits(checkpoints, tmp_path, family, scan, rslora):
    model, base, params, config = adapted(checkpoints, family, scan, rslora)
    out = lj.export_peft(tmp_path / "peft", params, config,
                         base_model_name_or_path=str(checkpoints / family), **models.peft_naming(model))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["bias"] == "none" and cfg["use_rslora"] == rslora
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["fan_in_fan_out"] == (family == "gpt2")
    exported = lj.LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=["x"],
                             rank_pattern=cfg["rank_pattern"], alpha_pattern=cfg["alpha_pattern"])
    tensors = load_file(str(out / "adapter_model.safetensors"))
    names = {k[len("base_model.model."):].rsplit(".lora_", 1)[0] for k in tensors}
    assert len(names) == 2 * len(FAMILIES[family][0])  # every target, in both layers
    for name in names:  # PEFT reads the same rank and alpha for every module
        assert exported.rank_for(name) == config.rank_for(name), name
        assert exported.alpha_for(name) == config.alpha_for(name), name
    assert cfg["modules_to_save"] is None and cfg["use_dora"] is False
    pm = peft.PeftModel.from_pretrained(torch_model(checkpoints / family), out).eval()
    ours, theirs = our_logits(model, params), torch_logits(pm)
    print(f"export {family} scan={scan} rslora={rslora}: rel err {rel_err(ours, theirs):.2e}")
    assert rel_err(ours, theirs) < RTOL
    assert rel_err(our_logits(model, base), theirs) > 1e-2  # the adapter matters
    layer0 = ("transformer.h.0.attn.c_attn" if family == "gpt2"
              else "model.layers.0.self_attn.q_proj")
    assert tensors[f"base_model.model.{layer0}.lora_A.weight"].shape == (4, 32)
    assert tensors[f"base_model.model.{layer0}.lora_B.weight"].shape == (
        (96, 4) if family == "gpt2" else (32, 4))
    # ... and back, into the base or over other adapters: the same adapters, bit for bit.
    other = random_adapters_of(lambda b: lj.inject(b, config, jax.random.key(5)), base, seed=5)
    for again in (lj.import_peft(out, base), lj.import_peft(out, other)):
        for got, want in zip(jax.tree.leaves(lj.lora_params(again)),
                             jax.tree.leaves(lj.lora_params(params))):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_uniform_scale_export_is_what_vllm_computes(checkpoints, tmp_path):
    """Older vLLM scales every module by the global lora_alpha / r (it ignores the patterns)."""
    model, _, params, config = adapted(checkpoints, "llama", False, True)
    out = lj.export_peft(tmp_path / "vllm", params, config, uniform_scale=True)
    cfg = json.loads((out / "adapter_config.json").read_text())
    global_scale = cfg["lora_alpha"] / np.sqrt(cfg["r"])
    assert cfg["r"] == 4  # the largest rank: vLLM checks r against max_lora_rank
    pm = peft.PeftModel.from_pretrained(torch_model(checkpoints / "llama"), out).eval()
    scales = {m.scaling["default"] for m in pm.modules()
              if isinstance(getattr(m, "scaling", None), dict) and m.scaling}
    np.testing.assert_allclose(sorted(scales), [global_scale] * len(scales), rtol=1e-7)
    err = rel_err(our_logits(model, params), torch_logits(pm))
    print(f"export uniform_scale (vLLM) llama rslora: rel err {err:.2e}")
    assert err < RTOL


def test_scanned_export_needs_the_layer_container(checkpoints, tmp_path):
    """lora_jax knows no model family: a scanned stack's HF names need layer_container=."""
    model, _, params, config = adapted(checkpoints, "llama", True, False)
    with pytest.raises(lj.LoraError, match="layer_container="):
        lj.export_peft(tmp_path / "peft", params, config)
    assert not (tmp_path / "peft").exists()


# ---------------------------------------------------------------------------------------------
# (b) PEFT -> ours
# ---------------------------------------------------------------------------------------------

def peft_adapter(checkpoints, out: Path, family: str, rslora: bool, **extra) -> torch.nn.Module:
    """get_peft_model + random A and B + save_pretrained; returns the PEFT model."""
    torch.manual_seed(0)
    targets, ranks, alphas = FAMILIES[family]
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern=dict(ranks),
                          alpha_pattern=dict(alphas), use_rslora=rslora, **extra)
    pm = peft.get_peft_model(torch_model(checkpoints / family), cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                p.normal_(0.0, 0.2 if "lora_A" in name else 0.05)
    pm.save_pretrained(out)
    return pm


@pytest.mark.parametrize("family,scan,rslora", CASES)
def test_peft_adapter_imports_with_equal_logits(checkpoints, tmp_path, family, scan, rslora):
    pm = peft_adapter(checkpoints, tmp_path / "p", family, rslora)
    model, base = models.load_hf(checkpoints / family, scan_layers=scan)
    params = lj.import_peft(tmp_path / "p", base)
    err = rel_err(our_logits(model, params), torch_logits(pm))
    print(f"import {family} scan={scan} rslora={rslora}: rel err {err:.2e}")
    assert err < RTOL
    # Re-export: PEFT's tensors come back bit for bit.
    out = lj.export_peft(tmp_path / "again", params, lj.peft_lora_config(tmp_path / "p"),
                         **models.peft_naming(model))
    theirs = load_file(str(tmp_path / "p" / "adapter_model.safetensors"))
    ours = load_file(str(out / "adapter_model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key])


def test_import_places_adapters_by_the_given_shardings(checkpoints, tmp_path):
    """shardings= (the adapter rule of sharding.rules) places each imported leaf; without it
    the adapters are replicated over the kernel's devices. Values are the same either way."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sharding import leaf_sharding, make_mesh, param_shardings
    peft_adapter(checkpoints, tmp_path / "p", "llama", False)
    _, base = models.load_hf(checkpoints / "llama", scan_layers=True)
    mesh = make_mesh(dp=4, tp=2)
    base = jax.device_put(base, param_shardings(base, mesh))
    split = lj.import_peft(tmp_path / "p", base, shardings=leaf_sharding(mesh))
    whole = lj.import_peft(tmp_path / "p", base)
    q_split = split["model"]["layers"]["self_attn"]["q_proj"]
    assert q_split["lora_b"].sharding.spec == P(None, None, "tp")
    assert q_split["lora_a"].sharding.spec == P(None, None, None)
    q_whole = whole["model"]["layers"]["self_attn"]["q_proj"]
    assert q_whole["lora_b"].sharding == NamedSharding(mesh, P())
    for got, want in zip(jax.tree.leaves(lj.lora_params(split)),
                         jax.tree.leaves(lj.lora_params(whole))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_per_layer_alpha_into_scanned_tree(checkpoints, tmp_path):
    """A PEFT alpha_pattern keyed by one layer gives a per-layer scale in the stacked leaf."""
    key = "model.layers.1.self_attn.q_proj"
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          alpha_pattern={key: 20})
    pm = peft.get_peft_model(torch_model(checkpoints / "llama"), cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.1)
    pm.save_pretrained(tmp_path / "p")
    model, base = models.load_hf(checkpoints / "llama", scan_layers=True)
    params = lj.import_peft(tmp_path / "p", base)
    np.testing.assert_array_equal(params["model"]["layers"]["self_attn"]["q_proj"]["lora_scale"],
                                  np.float32([2.0, 5.0]))
    err = rel_err(our_logits(model, params), torch_logits(pm))
    print(f"import per-layer alpha, scanned: rel err {err:.2e}")
    assert err < RTOL
    out = lj.export_peft(tmp_path / "again", params, **models.peft_naming(model))
    assert json.loads((out / "adapter_config.json").read_text())["alpha_pattern"] == {
        "1.self_attn.q_proj": 20}


# ---------------------------------------------------------------------------------------------
# Bad input: a clear LoraError, nothing overwritten
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,message", [
    # DoRA and modules_to_save load now: tests/test_dora.py, tests/test_embedding_lora.py
    ({"bias": "lora_only"}, "bias='lora_only'"),
])
def test_unsupported_peft_features_are_errors(checkpoints, tmp_path, extra, message):
    peft_adapter(checkpoints, tmp_path / "p", "llama", False, **extra)
    _, base = models.load_hf(checkpoints / "llama")
    with pytest.raises(lj.LoraError, match=message):
        lj.import_peft(tmp_path / "p", base)


def test_embedding_adapter_needs_the_embedding(checkpoints, tmp_path):
    """Embedding adapters import (tests/test_embedding_lora.py); into a model whose table is
    named otherwise they are refused, naming the module."""
    cfg = peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"])
    peft.get_peft_model(torch_model(checkpoints / "llama"), cfg).save_pretrained(tmp_path / "p")
    _, base = models.load_hf(checkpoints / "llama")
    assert lj.import_peft(tmp_path / "p", base)["model"]["embed_tokens"]["lora_a"].shape == (96, 4)
    renamed = {**base, "model": {k if k != "embed_tokens" else "tok": v
                                 for k, v in base["model"].items()}}
    with pytest.raises(lj.LoraError, match="model.embed_tokens.*no embedding"):
        lj.import_peft(tmp_path / "p", renamed)


def test_wrong_base_missing_and_corrupt_files(checkpoints, tmp_path):
    peft_adapter(checkpoints, tmp_path / "p", "llama", False)
    hf_llama(tmp_path / "wide", hidden_size=48, head_dim=12)
    _, wide = models.load_hf(tmp_path / "wide")
    with pytest.raises(lj.LoraError, match=r"model.layers.0.self_attn.q_proj: lora_A \[4, 32\]"):
        lj.import_peft(tmp_path / "p", wide)
    _, gpt2 = models.load_hf(checkpoints / "gpt2")
    with pytest.raises(lj.LoraError, match="does not have as Dense layers"):
        lj.import_peft(tmp_path / "p", gpt2)
    _, base = models.load_hf(checkpoints / "llama")
    with pytest.raises(lj.LoraError, match="adapter_config.json not found"):
        lj.import_peft(tmp_path / "nothing", base)
    weights = tmp_path / "p" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(lj.LoraError, match="truncated or corrupt"):
        lj.import_peft(tmp_path / "p", base)
    weights.unlink()
    with pytest.raises(lj.LoraError, match="adapter_model.safetensors not found"):
        lj.import_peft(tmp_path / "p", base)


def test_export_never_clobbers(checkpoints, tmp_path):
    model, base, params, config = adapted(checkpoints, "gpt2", False, False)
    out = lj.export_peft(tmp_path / "peft", params, config)
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(lj.LoraError, match="overwrite=True"):
        lj.export_peft(out, params, config)
    with pytest.raises(lj.LoraError, match="no adapters"):
        lj.export_peft(out, base, config, overwrite=True)
    assert (out / "adapter_model.safetensors").read_bytes() == before
