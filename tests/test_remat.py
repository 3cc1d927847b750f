"""`lora_jax.remat_policy`: a "dots" policy keeps one full-width value per adapted projection
(the sum base + delta) instead of its two halves, with gradients unchanged."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from jax._src.ad_checkpoint import saved_residuals  # public print_saved_residuals prints only
from jax.extend.core import Primitive
from models.attention import saves_flash_attention
from models.llama import Llama, LlamaConfig
from models.options import remat_policy_for
from tests.sharding_common import run_fast

SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
IDS = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % 128


def _model(remat_policy):
    return Llama(LlamaConfig.from_hf_dict(SHAPE, scan_layers=True, remat_policy=remat_policy))


@functools.cache
def _params():
    """The injected params, drawn once: the remat policy changes no parameter. One compile at
    optimisation level 0 (tests/sharding_common.py) instead of each test's eager op-by-op ones."""
    config = lj.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    init = lambda key, adapter_key: lj.inject(_model("none").init(key, IDS)["params"], config,
                                              adapter_key)
    return run_fast(init, jax.random.key(0), jax.random.key(1))


def _loss_and_adapters(remat_policy):
    model = _model(remat_policy)
    base, adapters = lj.split(_params())

    def loss(a):
        return jnp.mean(lj.apply(model, {"params": lj.combine(base, a)}, IDS) ** 2)

    return loss, adapters


def _mlp_width_residuals(loss, adapters) -> int:
    """Saved values shaped like a stacked gate/up output [layers, batch, seq, intermediate]."""
    shape = (SHAPE["num_hidden_layers"], *IDS.shape, SHAPE["intermediate_size"])
    return sum(r[0].shape == shape for r in saved_residuals(loss, adapters))


def test_models_dots_policy_saves_one_output_per_adapted_projection():
    loss, adapters = _loss_and_adapters("dots_saveable")  # models extend it with remat_policy
    assert _mlp_width_residuals(loss, adapters) == 2  # gate and up, each once


def test_plain_dots_policy_saves_both_halves():
    """What remat_policy fixes: under the plain policy the same model keeps x @ W and
    (x @ A) @ B of gate and up apart (4 values), to recompute their sums."""
    loss_none, adapters = _loss_and_adapters("none")
    plain = jax.checkpoint(loss_none, policy=jax.checkpoint_policies.dots_saveable)
    assert _mlp_width_residuals(plain, adapters) == 4
    named = jax.checkpoint(loss_none, policy=lj.remat_policy("dots_saveable"))
    assert _mlp_width_residuals(named, adapters) == 2


@functools.cache
def _unrematerialised_gradients():
    loss, adapters = _loss_and_adapters("none")
    return run_fast(jax.grad(loss), adapters)


@pytest.mark.parametrize("policy", ["dots_saveable", "dots_with_no_batch_dims_saveable"])
def test_gradients_equal_the_unrematerialised_ones(policy):
    loss, adapters = _loss_and_adapters(policy)
    # jitted (level 0, as the reference): eager would compile the scan's passes one by one
    got, want = run_fast(jax.grad(loss), adapters), _unrematerialised_gradients()
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        # float32; recomputation may fuse differently, nothing else differs
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_unknown_policy_name_is_a_clear_error():
    with pytest.raises(ValueError, match="not a policy of jax.checkpoint_policies"):
        lj.remat_policy("dots_savable")


def test_models_policy_keeps_the_flash_attention_forward():
    """cuDNN's attention is a fused kernel, not a dot: the models' dots policy names its forward
    primitive explicitly (checked by name here; the GPU profile shows the recompute gone)."""
    flash, other = Primitive("dot_product_attention_fwd_wrapper"), Primitive("exp")
    assert saves_flash_attention(flash) and not saves_flash_attention(other)
    policy = remat_policy_for(LlamaConfig.from_hf_dict(SHAPE, remat_policy="dots_saveable"))
    assert policy(flash) and not policy(other)


def test_one_parser_accepts_names_factories_and_rejects_bad_names_listing_valid_ones():
    """`remat_policies.resolve` parses the names of `lj.remat_policy` and of the models' option
    alike: both accept a names factory (`save_only_these_names[:a,b]`), both reject a typo with
    the same message, which lists the valid names."""
    from jax.ad_checkpoint import checkpoint_name
    from remat_policies import policy_names

    mine = lj.remat_policy("save_only_these_names:mine")
    x = jnp.ones((4, 4))
    fn = lambda x: jnp.sum(jnp.sin(checkpoint_name(x @ x, "mine")) @ x)  # noqa: E731
    assert len(saved_residuals(jax.checkpoint(fn, policy=mine), x)) > len(
        saved_residuals(jax.checkpoint(fn, policy=lj.remat_policy("full")), x))
    lj.remat_policy("save_only_these_names")  # the adapted outputs and nothing else
    LlamaConfig.from_hf_dict(SHAPE, remat_policy="save_only_these_names:mine")
    for name in ("none", "full", "dots_saveable", "nothing_saveable", "checkpoint_dots"):
        assert name in policy_names()
        lj.remat_policy(name)
        LlamaConfig.from_hf_dict(SHAPE, remat_policy=name)
    for make in (lj.remat_policy, lambda n: LlamaConfig.from_hf_dict(SHAPE, remat_policy=n)):
        with pytest.raises(ValueError, match="save_only_these_names") as err:
            make("dots_savable")
        assert "dots_saveable" in str(err.value) and "'dots_savable'" in str(err.value)


def test_models_accept_a_policy_function():
    policy = lj.remat_policy("dots_saveable")
    assert remat_policy_for(LlamaConfig.from_hf_dict(SHAPE, remat_policy=policy)) is policy
