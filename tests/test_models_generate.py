"""Show 3: KV-cache generation equals uncached generation and transformers' greedy generate;
plus sampling, top-p, and the tokenizers."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import models
from models.generate import top_p_filter
from tests.test_models_fixtures import hf_gpt2, hf_llama, random_ids, tiny_config

NEW = 12
EOS, PAD = 1, 2


def padded_batch():
    """Two prompts of 10 tokens, the first left-padded by 4."""
    ids = random_ids(2, 10, seed=3)
    mask = np.ones_like(ids)
    mask[0, :4] = 0
    ids[0, :4] = PAD
    return ids, mask


def greedy(model, params, ids, mask=None, **kw):
    return np.asarray(models.generate(model, params, ids, max_new_tokens=NEW, prompt_mask=mask,
                                      pad_token_id=PAD, **kw))


@pytest.mark.parametrize("family,scan", [("llama", False), ("gpt2", True)])
def test_cache_and_no_cache_give_the_same_greedy_tokens(family, scan):
    model = models.build(tiny_config(family, scan_layers=scan))
    params = models.init_params(model, jax.random.key(0))
    ids, mask = padded_batch()
    cached = greedy(model, params, ids, mask)
    assert cached.shape == (2, 10 + NEW)
    np.testing.assert_array_equal(cached, greedy(model, params, ids, mask, use_cache=False))
    np.testing.assert_array_equal(cached[:, :10], ids)
    if family == "llama":  # a left-padded row generates what it generates alone
        alone = greedy(model, params, ids[:1, 4:])
        np.testing.assert_array_equal(cached[0, 10:], alone[0, 6:])


def test_sampling_with_and_without_cache_agree():
    model = models.build(tiny_config("llama"))
    params = models.init_params(model, jax.random.key(0))
    ids, mask = padded_batch()
    kw = dict(max_new_tokens=NEW, prompt_mask=mask, temperature=0.9, top_p=0.8,
              rng=jax.random.key(7), pad_token_id=PAD)
    a = models.generate(model, params, ids, **kw)
    b = models.generate(model, params, ids, use_cache=False, **kw)
    np.testing.assert_array_equal(a, b)
    c = models.generate(model, params, ids, **{**kw, "rng": jax.random.key(8)})
    assert not np.array_equal(a, c)  # the key matters (random weights: near-uniform logits)


def test_rows_are_padded_after_eos():
    model = models.build(tiny_config("gpt2", scan_layers=True))  # as above: a jit cache hit
    params = models.init_params(model, jax.random.key(0))
    ids, mask = padded_batch()
    free = greedy(model, params, ids, mask)
    eos = int(free[0, 10 + 2])  # make row 0's third generated token the "eos"
    out = greedy(model, params, ids, mask, eos_token_id=eos)
    for row in range(2):
        hits = np.flatnonzero(free[row, 10:] == eos)
        if hits.size == 0:
            np.testing.assert_array_equal(out[row], free[row])
            continue
        first = 10 + hits[0]
        np.testing.assert_array_equal(out[row, :first + 1], free[row, :first + 1])
        assert (out[row, first + 1:] == PAD).all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_tokens_equal_transformers_generate(tmp_path, family):
    ref = (hf_llama if family == "llama" else hf_gpt2)(tmp_path)
    ids = random_ids(2, 8, seed=5)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor(ids, dtype=torch.long),
                              attention_mask=torch.ones(ids.shape, dtype=torch.long),
                              max_new_tokens=NEW, do_sample=False, eos_token_id=EOS,
                              pad_token_id=PAD).numpy()
    # transformers stops once every row has finished; the rest would be padding.
    theirs = np.pad(theirs, ((0, 0), (0, 8 + NEW - theirs.shape[1])), constant_values=PAD)
    model, params = models.load_hf(tmp_path)
    ours = models.generate(model, params, ids, max_new_tokens=NEW, eos_token_id=EOS,
                           pad_token_id=PAD)
    np.testing.assert_array_equal(ours, theirs)


def test_cached_logits_equal_full_forward():
    """Prefill + one-token steps reproduce the full forward's logits (float32 reassociation
    only: 1e-5 of the largest logit)."""
    model = models.build(tiny_config("llama", scan_layers=True))
    params = models.init_params(model, jax.random.key(0))
    ids = random_ids(2, 12)
    apply = jax.jit(model.apply)
    full = apply({"params": params}, ids)
    cache = models.init_cache(model.config, batch=2, max_len=16)
    first, cache = apply({"params": params}, ids[:, :8], cache=cache)
    steps = [first]
    for t in range(8, 12):
        out, cache = apply({"params": params}, ids[:, t:t + 1], cache=cache)
        steps.append(out)
    assert int(cache.end) == 12
    got = np.concatenate([np.asarray(s) for s in steps], axis=1)
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(top_p_filter(logits, 0.7)))
    np.testing.assert_array_equal(kept, [[True, True, False, False]])
    kept = np.isfinite(np.asarray(top_p_filter(logits, 0.81)))
    np.testing.assert_array_equal(kept, [[True, True, True, False]])


def test_sampling_needs_an_rng_and_gpt2_has_a_length_limit():
    model = models.build(tiny_config("gpt2"))
    params = models.init_params(model, jax.random.key(0))
    with pytest.raises(ValueError, match="rng"):
        models.generate(model, params, random_ids(1, 4), max_new_tokens=2, temperature=1.0)
    with pytest.raises(ValueError, match="max_positions=128"):
        models.generate(model, params, random_ids(1, 100), max_new_tokens=29)


# -- tokenizers --------------------------------------------------------------------------------

def test_byte_tokenizer_round_trip_and_demo_generation():
    tok = models.load_tokenizer(None)
    text = "Shall I compare thee — à un jour d'été?"
    ids = tok.encode(text)
    assert max(ids) < 256 and tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text
    model = models.build(models.GPT2Config.tiny())  # the embedded demo's model and tokenizer
    params = models.init_params(model, jax.random.key(0))
    out = models.generate_text(model, params, tok, "Shall I", max_new_tokens=5)
    assert isinstance(out, str)


def _write_tokenizer(directory):
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers, trainers

    tok = Tokenizer(tmodels.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["shall i compare thee to a summer's day"] * 20, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>"}))


def test_hf_tokenizer_json_matches_transformers(tmp_path):
    _write_tokenizer(tmp_path)
    tok = models.load_tokenizer(tmp_path)
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    text = "thee to a summer's day, shall i?"
    assert tok.encode(text) == ref(text)["input_ids"]
    assert tok.decode(tok.encode(text)) == text
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.vocab_size == ref.vocab_size


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        models.load_tokenizer(tmp_path)
