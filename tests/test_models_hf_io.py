"""Show 2 and 5: save_hf output loads in transformers; sharded checkpoints load; bad input errors.

Tolerance for logits: 1e-5 of the largest |logit| (float32; see test_models_parity).
"""
import json


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file, save_file

import lora_jax as lj
import models
from tests.test_models_fixtures import (hf_gpt2, hf_llama, random_ids,
                                        tiny_config, torch_forward)

RTOL = 1e-5


def assert_logits_close(ours, ref):
    ours, ref = np.asarray(ours), np.asarray(ref)
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=RTOL * np.abs(ref).max())


# -- save_hf -> transformers, and sharded checkpoints ----------------------------------

@pytest.mark.parametrize("family,scan", [("llama", True), ("llama", False), ("gpt2", True)])
def test_save_hf_loads_in_transformers_with_equal_logits(tmp_path, family, scan):
    ids = random_ids(2, 20)
    model = models.build(tiny_config(family, scan_layers=scan))
    params = models.init_params(model, jax.random.key(0))
    files = models.save_hf(tmp_path, model, params)
    assert {f.name for f in files} == {"model.safetensors", "config.json"}
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert ref.dtype == torch.float32
    assert_logits_close(model.apply({"params": params}, ids), torch_forward(ref, ids).logits)


def test_sharded_save_writes_index_and_loads_both_ways(tmp_path):
    ids = random_ids(2, 20)
    model = models.build(tiny_config("llama", tie_word_embeddings=False))
    params = models.init_params(model, jax.random.key(1))
    files = models.save_hf(tmp_path, model, params, max_shard_bytes=40_000)
    shards = models.hf_io.shard_names(tmp_path)
    assert len(shards) >= 3 and (tmp_path / "model.safetensors.index.json") in files
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    expected = model.apply({"params": params}, ids)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_logits_close(expected, torch_forward(ref, ids).logits)
    again, loaded = models.load_hf(tmp_path, scan_layers=True)
    assert_logits_close(again.apply({"params": loaded}, ids), expected)


def test_transformers_sharded_checkpoint_loads(tmp_path):
    ref = hf_llama(tmp_path / "one")
    ref.save_pretrained(tmp_path / "many", max_shard_size="20KB")
    assert len(list((tmp_path / "many").glob("*.safetensors"))) > 1
    ids = random_ids(2, 20)
    model, params = models.load_hf(tmp_path / "many")
    assert_logits_close(model.apply({"params": params}, ids), torch_forward(ref, ids).logits)


def test_bf16_checkpoint_and_param_dtype(tmp_path):
    ref = hf_llama(tmp_path / "f32")
    ref.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model, params = models.load_hf(tmp_path / "bf16", param_dtype=jnp.float32)
    leaf = params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert leaf.dtype == jnp.float32
    want = ref.model.layers[0].self_attn.q_proj.weight.float().detach().numpy().T
    np.testing.assert_array_equal(np.asarray(leaf), want)  # bf16 -> f32 is exact


def test_bare_trunk_checkpoint_without_prefix_loads(tmp_path):
    """Old GPT-2 checkpoints name tensors `h.0.attn...` (GPT2Model) and keep attn.bias buffers."""
    ref = hf_gpt2(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    renamed = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    renamed["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))  # a causal buffer
    (tmp_path / "model.safetensors").unlink()
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = random_ids(1, 16)
    model, params = models.load_hf(tmp_path)
    assert_logits_close(model.apply({"params": params}, ids), torch_forward(ref, ids).logits)


def test_load_places_each_leaf_on_the_requested_sharding(tmp_path):
    hf_llama(tmp_path)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("dp", "tp"))

    def shard(path, shape):  # column-split q_proj (scanned: [L, in, out]), replicate the rest
        spec = P(None, None, "tp") if path.endswith("q_proj.kernel") else P()
        return NamedSharding(mesh, spec)

    model, params = models.load_hf(tmp_path, scan_layers=True, shardings=shard)
    q = params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape == (2, 32, 32) and q.sharding.spec == P(None, None, "tp")
    assert q.addressable_shards[0].data.shape == (2, 32, 8)
    _, plain = models.load_hf(tmp_path, scan_layers=True)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, plain)


def test_save_refuses_adapters_and_existing_files(tmp_path):
    model = models.build(tiny_config("llama"))
    params = models.init_params(model, jax.random.key(0))
    injected = lj.inject(params, lj.LoraConfig(r=2, target_modules=["q_proj"]), jax.random.key(1))
    with pytest.raises(models.CheckpointError, match="lora_jax.merge"):
        models.save_hf(tmp_path / "a", model, injected)
    models.save_hf(tmp_path / "b", model, params)
    with pytest.raises(models.CheckpointError, match="overwrite=True"):
        models.save_hf(tmp_path / "b", model, params)
    models.save_hf(tmp_path / "b", model, params, overwrite=True)


# -- bad input -------------------------------------------------------------------------

@pytest.fixture
def llama_dir(tmp_path):
    hf_llama(tmp_path)
    return tmp_path


def _rewrite(directory, change):
    """Apply `change(dict of tensors)` to the checkpoint's single safetensors file."""
    file = directory / "model.safetensors"
    tensors = change(load_file(file))
    file.unlink()
    save_file(tensors, file, metadata={"format": "pt"})


def test_bos_outside_the_vocabulary_loads_with_a_warning(tmp_path):
    """transformers loads a checkpoint whose bos_token_id lies outside the vocabulary; so do we
    (a warning), and only generation, which needs an id, refuses one that is out of range."""
    torch_model = hf_gpt2(tmp_path, bos_token_id=50256, eos_token_id=50256)
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path)  # the reference accepts it
    with pytest.warns(UserWarning, match="bos_token_id=50256 is outside the vocabulary"):
        model, params = models.load_hf(tmp_path)
    ids = random_ids(1, 8)
    assert_logits_close(model.apply({"params": params}, jnp.asarray(ids)),
                        torch_forward(torch_model, ids).logits)
    with pytest.raises(ValueError, match="eos_token_id=50256 is outside the model's vocab"):
        models.generate(model, params, jnp.asarray(ids), max_new_tokens=2,
                        eos_token_id=model.config.eos_token_id)
    out = models.generate(model, params, jnp.asarray(ids), max_new_tokens=2, eos_token_id=1)
    assert out.shape == (1, 10)


def test_missing_config_json(llama_dir):
    (llama_dir / "config.json").unlink()
    with pytest.raises(models.CheckpointFileNotFoundError, match="config.json"):
        models.load_hf(llama_dir)


def test_missing_safetensors(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors"):
        models.load_hf(llama_dir)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        models.load_hf(tmp_path / "nowhere")


def test_missing_shard_listed_in_index(tmp_path):
    hf_llama(tmp_path / "x").save_pretrained(tmp_path / "many", max_shard_size="20KB")
    victim = sorted((tmp_path / "many").glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises(models.CheckpointFileNotFoundError, match=victim.name):
        models.load_hf(tmp_path / "many")


def test_unsupported_model_type(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    with pytest.raises(models.CheckpointError, match="'mistral' is not supported.*gpt2.*llama"):
        models.load_hf(llama_dir)


def test_unsupported_rope_type(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(models.CheckpointError, match="config.json.*'yarn' is not supported"):
        models.load_hf(llama_dir)


def test_shape_disagreeing_with_config(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(models.CheckpointError,
                       match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.down_proj"
                             r"\.weight' has shape \(32, 64\), but config\.json implies "
                             r"\(32, 48\)"):
        models.load_hf(llama_dir)


def test_missing_tensor(llama_dir):
    _rewrite(llama_dir, lambda t: {k: v for k, v in t.items()
                                   if k != "model.layers.1.self_attn.k_proj.weight"})
    with pytest.raises(models.CheckpointError,
                       match=r"1 tensor\(s\) missing from .*model\.safetensors.*"
                             r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        models.load_hf(llama_dir)


def test_extra_tensor(llama_dir):
    _rewrite(llama_dir, lambda t: {**t, "model.layers.2.mlp.up_proj.weight":
                                   t["model.layers.1.mlp.up_proj.weight"]})
    with pytest.raises(models.CheckpointError,
                       match=r"unexpected tensor.*'model\.layers\.2\.mlp\.up_proj\.weight' in "
                             r".*model\.safetensors"):
        models.load_hf(llama_dir)


def test_untied_config_with_tied_checkpoint_is_a_missing_head(tmp_path):
    hf_llama(tmp_path, tie=True)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    with pytest.raises(models.CheckpointError, match="lm_head.weight"):
        models.load_hf(tmp_path)


def test_truncated_file_is_a_clear_error(llama_dir):
    file = llama_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(models.CheckpointError, match="model.safetensors: not a readable"):
        models.load_hf(llama_dir)


def test_errors_do_not_touch_the_checkpoint(llama_dir):
    before = {p.name: p.read_bytes() for p in llama_dir.iterdir()}
    config = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(models.CheckpointError, match="missing"):
        models.load_hf(llama_dir)
    after = {p.name: p.read_bytes() for p in llama_dir.iterdir()}
    assert before.keys() == after.keys() and before["model.safetensors"] == after[
        "model.safetensors"]



