"""The NNX Llama (examples/nnx_llama.py) against the Linen `models.Llama`: same logits, and with
`lora_jax.nnx` the same adapters, PEFT files and AdamW training as the Linen LoRA path.

Tolerances: both models run the same float32 ops in the same order (matmul precision "highest",
conftest.py), so outputs agree far below 1e-5 relative (in practice exactly); the bound leaves
room for XLA fusing or reassociating a reduction differently between the two traced programs
(the NNX model is called eagerly, the Linen one through `lj.apply`). Merged vs unmerged: 1e-5,
since `W + s*A@B` rounds differently from `x@W + s*(x@A)@B`. Files: byte for byte. Training:
1e-6 relative on losses and adapters after 5 AdamW steps, as tests/test_nnx.py; this needs both
jitted steps to take the frozen weights as arguments (a closed-over base is a compile-time
constant XLA partly folds, which moved the Linen adapters by ~1e-5 relative: Adam's
`m / sqrt(v)` magnifies rounding in the small gradients). `mlp_chunk`: chunked against unchunked
as tests/test_long_context.py (logits 1e-6, adapter gradients 2e-6 of each leaf's largest
entry: only the order of the chunks' partial sums changes), against the Linen chunked Llama
1e-5 as above."""
import jax
import jax.numpy as jnp
from jax._src.ad_checkpoint import saved_residuals  # public print_saved_residuals prints only
import numpy as np
import optax
import pytest
from flax import nnx

import lora_jax as lj
import models
from examples.nnx_llama import NnxLlama, from_linen, to_linen

CONFIGS = {"untied": models.LlamaConfig.tiny(),
           "tied": models.LlamaConfig.tiny(tie_word_embeddings=True)}
LORA = lj.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False,
                     rank_pattern={"o_proj": 2}, alpha_pattern={"v_proj": 3})
IDS = jax.random.randint(jax.random.key(7), (2, 10), 0, 512)


def assert_close(a, b, rtol):
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


def shapes(tree):
    return jax.tree.map(jnp.shape, tree)


def base_pair(config):
    """The Linen model and its random params, and an NNX model with the same weights."""
    linen = models.build(config)
    params = models.init_params(linen, jax.random.key(0))
    return linen, params, from_linen(config, params)


def lora_pair(config):
    """(linen model, Linen params with adapters, NNX model with adapters), adapters injected
    independently from the same key."""
    linen, params, model = base_pair(config)
    return (linen, lj.inject(params, LORA, jax.random.key(1)),
            lj.nnx.inject(model, LORA, jax.random.key(1)))


@pytest.fixture(params=list(CONFIGS), scope="module")
def config(request):
    return CONFIGS[request.param]


def test_same_tree_and_logits_as_linen(config):
    linen, params, model = base_pair(config)
    fresh = nnx.to_pure_dict(nnx.state(NnxLlama(config, nnx.Rngs(0)), nnx.Param))
    assert shapes(fresh) == shapes(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    assert shapes(to_linen(model)) == shapes(params)  # the exact Linen tree, "0", "1" keys
    assert ("lm_head" in params) == (not config.tie_word_embeddings)
    jax.tree.map(np.testing.assert_array_equal, to_linen(model), params)
    assert_close(model(IDS), linen.apply({"params": params}, IDS), 1e-5)
    mask = jnp.ones_like(IDS).at[0, 7:].set(0)  # a padding mask takes the masked branch
    assert_close(model(IDS, attention_mask=mask),
                 linen.apply({"params": params}, IDS, attention_mask=mask), 1e-5)


def test_lora_same_adapters_outputs_and_merge(config):
    linen, params, model = lora_pair(config)
    jax.tree.map(np.testing.assert_array_equal, lj.nnx.params(model), params)
    assert_close(model(IDS), lj.apply(linen, {"params": params}, IDS), 1e-5)
    assert not np.allclose(model(IDS), linen.apply({"params": lj.split(params)[0]}, IDS))
    assert_close(lj.nnx.merge(model)(IDS), model(IDS), 1e-5)


def test_peft_files_are_the_linen_files(config, tmp_path):
    linen, params, model = lora_pair(config)
    naming = models.peft_naming(config)
    lj.export_peft(tmp_path / "nnx", lj.nnx.params(model), LORA, **naming)
    lj.export_peft(tmp_path / "linen", params, LORA, **naming)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "nnx" / name).read_bytes() == (tmp_path / "linen" / name).read_bytes()
    base = lj.split(params)[0]
    from_nnx = lj.import_peft(tmp_path / "nnx", base)
    assert_close(lj.apply(linen, {"params": from_nnx}, IDS), model(IDS), 1e-5)
    fresh = from_linen(config, base)
    lj.nnx.load(fresh, lj.import_peft(tmp_path / "linen", lj.nnx.params(fresh),
                                      layouts=lj.nnx.layouts(fresh)))
    assert_close(fresh(IDS), model(IDS), 1e-5)


def test_five_adamw_steps_equal_the_linen_path(config):
    linen, params, model = lora_pair(config)
    tx = optax.adamw(1e-2)
    opt = nnx.Optimizer(model, tx, wrt=lj.nnx.LoraParam)
    base, adapters = lj.split(params)
    ltx = lj.optimizer(tx, adapters)
    state = ltx.init(adapters)

    @nnx.jit
    def nnx_step(model, opt):
        loss, grads = nnx.value_and_grad(lambda m: next_token_loss(m(IDS)),
                                         argnums=nnx.DiffState(0, lj.nnx.LoraParam))(model)
        opt.update(model, grads)
        return loss

    @jax.jit
    def linen_step(base, adapters, state):  # base as an argument: a closed-over constant
        # would let XLA fold the frozen part of the forward at compile time, rounding otherwise
        loss, g = jax.value_and_grad(lambda a: next_token_loss(
            lj.apply(linen, {"params": lj.combine(base, a)}, IDS)))(adapters)
        updates, state = ltx.update(g, state, adapters)
        return optax.apply_updates(adapters, updates), state, loss

    losses = []
    for _ in range(5):
        nnx_loss = nnx_step(model, opt)
        adapters, state, linen_loss = linen_step(base, adapters, state)
        assert_close(nnx_loss, linen_loss, 1e-6)
        losses.append(float(linen_loss))
    assert losses[-1] < losses[0]  # it trains
    jax.tree.map(lambda a, b: assert_close(a, b, 1e-6), lj.nnx.adapters(model), adapters)


def next_token_loss(logits):
    return models.cross_entropy(logits, IDS, shift=True)


def test_from_linen_refuses_a_tree_of_another_shape():
    params = models.init_params(models.build(CONFIGS["untied"]), jax.random.key(0))
    with pytest.raises(ValueError, match="missing.*lm_head"):
        from_linen(CONFIGS["untied"], {"model": params["model"]})
    with pytest.raises(ValueError, match="unexpected.*lm_head"):
        from_linen(CONFIGS["tied"], params)


CHUNKED = models.LlamaConfig.tiny(mlp_chunk=4)
LONG_IDS = jax.random.randint(jax.random.key(8), (2, 16), 0, 512)  # 4 chunks of 4 tokens
CHUNK_RTOL = 2e-6  # tests/test_long_context.py: ~1e-7 measured, a missed adapter is O(1)


def chunk_pair(config):
    """(Linen params with adapters, NNX model with adapters) for `config`; the same weights
    and adapters for every `mlp_chunk` (the tree does not depend on it)."""
    _, params, model = base_pair(config)
    return lj.inject(params, LORA, jax.random.key(1)), lj.nnx.inject(model, LORA, jax.random.key(1))


def mean_square(model):
    logits = model(LONG_IDS)
    return jnp.mean(logits ** 2), logits


@nnx.jit
def logits_and_grads(model):
    """The NNX training path (nnx.jit, nnx.value_and_grad over the adapters)."""
    (_, logits), grads = nnx.value_and_grad(mean_square, has_aux=True,
                                            argnums=nnx.DiffState(0, lj.nnx.LoraParam))(model)
    return logits, nnx.to_pure_dict(grads)


def test_chunked_mlp_equals_the_unchunked_model_and_the_linen_chunked_model():
    want_logits, want_grads = logits_and_grads(chunk_pair(CONFIGS["untied"])[1])
    tree, model = chunk_pair(CHUNKED)
    got_logits, got_grads = logits_and_grads(model)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-6, atol=1e-6)
    for path, got in jax.tree_util.tree_leaves_with_path(got_grads):
        want = np.asarray(dict(jax.tree_util.tree_leaves_with_path(want_grads))[path])
        assert np.abs(want).max() > 0, path  # every adapter gets a gradient
        assert np.abs(got - want).max() <= CHUNK_RTOL * np.abs(want).max(), path
    assert_close(model(LONG_IDS), lj.apply(models.build(CHUNKED), {"params": tree}, LONG_IDS),
                 1e-5)
    # A quantised base (its kernel pytrees broadcast into the loop like any Param).
    quantised = {chunk: NnxLlama(models.LlamaConfig.tiny(quantize="nf4", mlp_chunk=chunk),
                                 nnx.Rngs(0))(LONG_IDS) for chunk in (None, 4)}
    np.testing.assert_allclose(quantised[4], quantised[None], rtol=1e-6, atol=1e-6)


def test_chunked_mlp_keeps_no_full_length_intermediates():
    """The remat inside the chunk loop works: unchunked, the backward pass keeps the MLP's
    [B, T, intermediate] activations; chunked, nothing that wide is kept."""
    def wide_residuals(config):
        graphdef, adapters, rest = nnx.split(chunk_pair(config)[1], lj.nnx.LoraParam, ...)

        def loss(a):  # copy=True: the chunk loop's nnx.scan takes Variables of this trace only
            return mean_square(nnx.merge(graphdef, a, rest, copy=True))[0]
        return sum(r[0].ndim >= 3 and r[0].shape[-1] == config.intermediate_size
                   for r in saved_residuals(loss, adapters))
    assert wide_residuals(CONFIGS["untied"]) >= 2
    assert wide_residuals(CHUNKED) == 0


def test_chunked_mlp_draws_a_dropout_mask_per_chunk():
    """The adapters' dropout streams are carried through the chunks (not broadcast, which
    would drop their updates and repeat one mask): each advances once per chunk."""
    dropout = lj.LoraConfig(r=4, target_modules=["up_proj"], lora_dropout=0.5)

    def counts(config):
        model = lj.nnx.inject(base_pair(config)[2], dropout, jax.random.key(1),
                              rngs=nnx.Rngs(dropout=2))
        model(LONG_IDS)
        return {int(c) for c in jax.tree.leaves(nnx.state(model, nnx.RngCount))}
    assert counts(CONFIGS["untied"]) == {1}
    assert counts(CHUNKED) == {4}


def test_chunk_errors_and_short_calls():
    model = from_linen(models.LlamaConfig.tiny(mlp_chunk=5), base_pair(CONFIGS["untied"])[1])
    with pytest.raises(ValueError, match="mlp_chunk=5 does not divide the sequence length 16"):
        model(LONG_IDS)
    # A call no longer than one chunk (a short prompt) runs unchunked: the same ops.
    np.testing.assert_array_equal(model(IDS[:, :5]), base_pair(CONFIGS["untied"])[2](IDS[:, :5]))
