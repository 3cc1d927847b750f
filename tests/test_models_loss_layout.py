"""Loss functions (plain and vocab-chunked) and the parameter-path conventions other packages
rely on (HF names, scanned stacks, layer_container, the Parallelism seam)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from lora_jax.hf_names import layer_name
from models.parallel import NoParallelism
from tests.test_models_fixtures import random_ids, tiny_config


# -- loss --------------------------------------------------------------------------------------

def _reference_nll(logits, labels):
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    return -np.take_along_axis(np.asarray(logp), labels[..., None], -1)[..., 0]


def test_cross_entropy_alignment_mask_and_ignore_index():
    rng = np.random.RandomState(0)
    logits = rng.randn(2, 6, 11).astype(np.float32)
    labels = rng.randint(0, 11, (2, 6))
    nll = _reference_nll(logits, labels)
    np.testing.assert_allclose(models.cross_entropy(logits, labels), nll.mean(), rtol=1e-6)
    # shift=True: logits[:, t] scored against labels[:, t + 1] (HF labels=input_ids)
    shifted = _reference_nll(logits[:, :-1], labels[:, 1:]).mean()
    np.testing.assert_allclose(models.cross_entropy(logits, labels, shift=True), shifted,
                               rtol=1e-6)
    mask = np.ones_like(labels)
    mask[0, :3] = 0
    ignored = labels.copy()
    ignored[0, :3] = -100
    want = nll[mask.astype(bool)].mean()
    np.testing.assert_allclose(models.cross_entropy(logits, labels, mask), want, rtol=1e-6)
    np.testing.assert_allclose(models.cross_entropy(logits, ignored), want, rtol=1e-6)
    assert float(models.cross_entropy(logits, labels, np.zeros_like(mask))) == 0.0
    assert models.cross_entropy(logits.astype(jnp.bfloat16), labels).dtype == jnp.float32


@pytest.mark.parametrize("chunk", [16, 10, 128])  # divides V, leaves a remainder, > V
def test_chunked_cross_entropy_equals_plain_values_and_gradients(chunk):
    """Same maths, different summation order: float32 agreement to 1e-5 relative."""
    rng = np.random.RandomState(1)
    hidden = jnp.asarray(rng.randn(2, 5, 8), jnp.float32)
    kernel = jnp.asarray(rng.randn(8, 48), jnp.float32)
    labels = rng.randint(0, 48, (2, 5))
    mask = np.ones_like(labels)
    mask[1, 3:] = 0

    def plain(h, w):
        return models.cross_entropy(h @ w, labels, mask, shift=True)

    def chunked(h, w):
        return models.chunked_cross_entropy(h, w, labels, mask, chunk_size=chunk, shift=True)

    np.testing.assert_allclose(chunked(hidden, kernel), plain(hidden, kernel), rtol=1e-5)
    g_plain = jax.grad(plain, argnums=(0, 1))(hidden, kernel)
    g_chunk = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, kernel)
    for a, b in zip(g_chunk, g_plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_loss_on_a_model_matches_logits_loss():
    model = models.build(tiny_config("llama", tie_word_embeddings=True))
    params = models.init_params(model, jax.random.key(0))
    ids = random_ids(2, 12)
    logits, hidden = jax.jit(lambda p: (model.apply({"params": p}, ids),
                                        model.apply({"params": p}, ids, return_hidden=True)))(params)
    kernel = models.head_kernel(model.config, params)
    np.testing.assert_allclose(
        models.chunked_cross_entropy(hidden, kernel, ids, chunk_size=40, shift=True),
        models.cross_entropy(logits, ids, shift=True), rtol=1e-5)


# -- parameter paths ---------------------------------------------------------------------------

def _paths(params):
    return {".".join(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_unscanned_paths_are_hf_names():
    llama = models.init_params(models.build(tiny_config("llama")), jax.random.key(0))
    q = llama["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert q.shape == (64, 64)  # [in, out]
    assert llama["model"]["layers"]["1"]["self_attn"]["k_proj"]["kernel"].shape == (64, 32)
    assert {"model.embed_tokens.embedding", "model.norm.scale", "lm_head.kernel",
            "model.layers.1.mlp.down_proj.kernel",
            "model.layers.0.post_attention_layernorm.scale"} <= _paths(llama)
    gpt2 = models.init_params(models.build(tiny_config("gpt2")), jax.random.key(0))
    assert gpt2["transformer"]["h"]["0"]["attn"]["c_attn"]["kernel"].shape == (64, 192)
    assert {"transformer.wte.embedding", "transformer.wpe.embedding", "transformer.ln_f.bias",
            "transformer.h.1.mlp.c_fc.kernel", "transformer.h.1.ln_2.scale"} <= _paths(gpt2)
    assert "lm_head.kernel" not in _paths(gpt2)  # tied
    for params in (llama, gpt2):
        for path in _paths(params):  # every path maps to an HF tensor name
            models.hf_tensor_name(tuple(path.split(".")))


def test_scanned_paths_and_layer_container():
    config = tiny_config("llama", scan_layers=True)
    params = models.init_params(models.build(config), jax.random.key(0))
    assert params["model"]["layers"]["self_attn"]["q_proj"]["kernel"].shape == (2, 64, 64)
    assert params["model"]["layers"]["input_layernorm"]["scale"].shape == (2, 64)
    assert models.layer_container(params) == "model.layers" == models.layer_container(config)
    assert models.layer_container({"params": params}) == "model.layers"
    assert models.layer_container(tiny_config("gpt2")) == "transformer.h"
    assert models.is_scanned(params)
    assert not models.is_scanned(models.init_params(models.build(tiny_config("llama")),
                                                    jax.random.key(0)))
    # Layer i's HF name under the container (the rule lives with the PEFT names in lora_jax).
    assert layer_name("model.layers.self_attn.q_proj", 1, "model.layers") == \
        "model.layers.1.self_attn.q_proj"
    with pytest.raises(ValueError, match="not under"):
        layer_name("model.norm", 0, "model.layers")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_unstack_layers_runs_the_unscanned_model_identically(family):
    """A tree initialised scanned, unstacked, gives the unscanned model the scanned one's
    logits; stacking it again restores every leaf bit for bit."""
    scanned_cfg = tiny_config(family, scan_layers=True)
    scanned = models.init_params(models.build(scanned_cfg), jax.random.key(0))
    unrolled = models.unstack_layers(scanned)
    container = models.layer_container(scanned)
    assert not models.is_scanned(unrolled) and models.is_scanned(scanned)
    ids = jnp.arange(16, dtype=jnp.int32).reshape(2, 8)
    want = models.build(scanned_cfg).apply({"params": scanned}, ids)
    got = models.build(tiny_config(family)).apply({"params": unrolled}, ids)
    # Same math in float32; XLA fuses a loop body and an unrolled stack differently, so the
    # last bits may differ (a wrong layer order or a misplaced leaf is off by O(1)).
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    again = models.stack_layers({"params": unrolled})["params"]
    assert jax.tree_util.tree_structure(again) == jax.tree_util.tree_structure(scanned)
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(scanned)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="already unscanned"):
        models.unstack_layers(unrolled, container)
    with pytest.raises(ValueError, match="already scanned"):
        models.stack_layers(scanned)


class RecordingParallelism(NoParallelism):
    """Records each projection's role and each activation mark."""

    def __init__(self):
        self.roles, self.marks = {}, []

    def dense(self, features, *, role, name, **kw):
        self.roles[name] = role
        return super().dense(features, role=role, name=name, **kw)

    def constrain(self, x, mark):
        self.marks.append(mark)
        return x

    __hash__ = object.__hash__
    __eq__ = object.__eq__


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_projection_goes_through_the_parallelism_seam(family):
    par = RecordingParallelism()
    model = models.build(tiny_config(family, tie_word_embeddings=False), par)
    params = models.init_params(model, jax.random.key(0))
    dense_names = {p.split(".")[-2] for p in _paths(params) if p.endswith(".kernel")}
    assert dense_names == set(par.roles)
    want = ({"q_proj": "column", "k_proj": "column", "v_proj": "column", "o_proj": "row",
             "gate_proj": "column", "up_proj": "column", "down_proj": "row",
             "lm_head": "replicated"} if family == "llama" else
            {"c_attn": "column", "c_fc": "column", "c_proj": "row", "lm_head": "replicated"})
    assert par.roles == want
    assert par.marks.count("residual") == 1 + 2 and par.marks.count("logits") == 1


def test_configs_round_trip_through_hf_dicts_and_presets():
    for config in (tiny_config("llama"), models.LlamaConfig.llama3_1b(),
                   models.LlamaConfig.llama3_8b(), models.LlamaConfig.llama31_8b(),
                   tiny_config("gpt2"), models.GPT2Config.gpt2()):
        again = type(config).from_hf_dict(config.to_hf_dict())
        assert again == config
        hash(config)  # configs are static arguments of jitted functions
    one_b = models.LlamaConfig.llama3_1b()
    assert (one_b.hidden_size, one_b.num_hidden_layers, one_b.head_dim,
            one_b.tie_word_embeddings, one_b.rope_scaling.factor) == (2048, 16, 64, True, 32.0)
    eight_b = models.LlamaConfig.llama3_8b(dtype=jnp.bfloat16, scan_layers=True)
    assert (eight_b.hidden_size, eight_b.intermediate_size, eight_b.head_dim,
            eight_b.num_key_value_heads, eight_b.dtype) == (4096, 14336, 128, 8, jnp.bfloat16)
    abstract = jax.eval_shape(lambda: models.init_params(models.build(eight_b),
                                                         jax.random.key(0)))
    n = sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(abstract))
    assert 8.0e9 < n < 8.1e9  # Llama-3-8B: 8.03B parameters


def test_bad_runtime_options():
    with pytest.raises(ValueError, match="remat_policy"):
        tiny_config("llama", remat_policy="sometimes")
    with pytest.raises(ValueError, match="attention_impl"):
        tiny_config("gpt2", attention_impl="flash")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        tiny_config("llama", num_key_value_heads=3)
    # A special id outside the vocabulary is only warned about (transformers loads it too);
    # generation, which needs it, refuses it (test_models_generate).
    with pytest.warns(UserWarning, match="eos_token_id=999 is outside the vocabulary"):
        tiny_config("llama", eos_token_id=999)





def test_gpt2_dropout_acts_only_when_not_deterministic():
    model = models.build(tiny_config("gpt2", scan_layers=True))  # per-layer rngs split by scan
    params = models.init_params(model, jax.random.key(0))
    ids = random_ids(2, 8)
    clean = model.apply({"params": params}, ids)
    run = jax.jit(lambda key: model.apply({"params": params}, ids, deterministic=False,
                                          rngs={"dropout": key}))
    noisy = [run(jax.random.key(k)) for k in (1, 1, 2)]
    np.testing.assert_array_equal(noisy[0], noisy[1])
    assert not np.allclose(noisy[0], clean) and not np.allclose(noisy[0], noisy[2])
