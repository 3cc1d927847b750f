"""Several named adapters in one tree, against the real HF PEFT library (torch CPU, float32) on
the tiny random GPT-2 and Llama checkpoints of tests/test_peft.py.

Tolerances. Logits: 1e-5 relative (max |diff| / max |ref|), as tests/test_peft.py argues: the
same float32 math in a different order. Gradients: 1e-5 relative per leaf (same argument; the
backward pass adds a few more roundings). add_weighted_adapter's factors ("linear", "cat") are
elementwise products and sums of the same float32 numbers: 1e-6 relative. "svd" factors are
compared as delta weights (B @ A), since singular vectors are defined up to sign: 1e-5 of the
largest entry (two LAPACK SVDs of the same float32 matrix).
"""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import pytest
import torch

import lora_jax as lj
import models
from lora_jax import named
from tests.test_models_fixtures import rel_err
from tests.sharding_common import jit_fast
from tests.test_peft import (IDS, checkpoints, our_logits, random_adapters_of,  # noqa: F401
                             torch_logits, torch_model)

RTOL = 1e-5
TARGETS = {  # (default adapter's targets, adapter "b"'s): they overlap and differ
    "gpt2": (["c_attn", "attn.c_proj"], ["c_attn", "c_fc"]),
    "llama": (["q_proj", "v_proj", "o_proj"], ["q_proj", "k_proj", "up_proj"]),
}


def two_adapters(checkpoints, family, scan, rank_b=2):
    """Base, params with "default" (r=4, alpha 8) and "b" (r=rank_b, alpha 3), their configs."""
    model, base = models.load_hf(checkpoints / family, scan_layers=scan)
    ta, tb = TARGETS[family]
    ca = lj.LoraConfig(r=4, lora_alpha=8, target_modules=ta)
    cb = lj.LoraConfig(r=rank_b, lora_alpha=3, target_modules=tb)
    # (random_adapters_of: the same trees as random_adapters of an eager inject, no eager compiles)
    params = random_adapters_of(lambda t: lj.inject(t, ca, jax.random.key(1)), base, seed=2)
    b = random_adapters_of(lambda t: lj.lora_params(
        lj.inject(t, cb, jax.random.key(1), adapter_name="b"), adapter_name="b"), params, seed=3)
    params = named.put_adapter(params, "b", named.isolate(b, "b"))
    return model, base, params, {"default": ca, "b": cb}


def peft_with_both(checkpoints, family, directory):
    pm = peft.PeftModel.from_pretrained(torch_model(checkpoints / family), directory).eval()
    pm.load_adapter(directory / "b", adapter_name="b")
    return pm.eval()


@functools.lru_cache(maxsize=None)
def _selected_apply(model, adapters):
    return jit_fast(functools.partial(lj.apply, model, adapters=adapters))


def selected_logits(model, params, adapters):
    """Logits with `adapters` selected: one compile per model and selection."""
    return np.asarray(_selected_apply(model, adapters)({"params": params}, jnp.asarray(IDS)))


@pytest.mark.parametrize("family,scan", [("gpt2", False), ("llama", True)])
def test_selections_equal_peft_and_both_layouts_round_trip(checkpoints, tmp_path, family, scan):
    model, base, params, configs = two_adapters(checkpoints, family, scan)
    assert lj.adapter_names(params) == ("default", "b")
    out = lj.export_peft_adapters(tmp_path / "ours", params, configs, **models.peft_naming(model))
    assert (out / "adapter_config.json").is_file() and (out / "b" / "adapter_config.json").is_file()
    assert json.loads((out / "b" / "adapter_config.json").read_text())["r"] == 2
    pm = peft_with_both(checkpoints, family, out)
    errors = {}
    for ours_sel, theirs_sel in [(("default",), "default"), (("b",), "b"),
                                 (None, ["default", "b"]), (("default", "b"), ["default", "b"])]:
        pm.base_model.set_adapter(theirs_sel)
        errors[str(ours_sel)] = rel_err(selected_logits(model, params, ours_sel), torch_logits(pm))
    with pm.disable_adapter():
        errors["()"] = rel_err(selected_logits(model, params, ()), torch_logits(pm))
    print(f"{family} scan={scan} selections, rel err: {errors}")
    assert max(errors.values()) < RTOL
    # The selections differ from each other (none of the comparisons above is vacuous).
    assert rel_err(selected_logits(model, params, ("b",)),
                   selected_logits(model, params, ("default",))) > 1e-3
    # PEFT's own multi-adapter save_pretrained imports into our tree under the same names,
    # bit for bit, and our export re-imports bit for bit.
    pm.base_model.set_adapter(["default", "b"])
    pm.save_pretrained(tmp_path / "theirs")
    for directory in (tmp_path / "theirs", out):
        again = lj.import_peft_adapters(directory, base)
        assert lj.adapter_names(again) == ("default", "b")
        for got, want in zip(jax.tree.leaves(lj.lora_params(again)),
                             jax.tree.leaves(lj.lora_params(params)), strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # delete_adapter, both sides.
    pm.delete_adapter("b")
    pm.base_model.set_adapter("default")
    only = lj.delete_adapter(params, "b")
    assert lj.adapter_names(only) == ("default",)
    assert named.NAMED not in str(jax.tree.structure(only))
    assert rel_err(our_logits(model, only), torch_logits(pm)) < RTOL


def test_training_one_adapter_freezes_the_other_and_gradients_equal_peft(checkpoints):
    """Both adapters active, "b" trained: b's gradients equal PEFT's (default frozen there by
    requires_grad); the optimizer leaves "default" bit-identical and moves "b"."""
    model, _, params, configs = two_adapters(checkpoints, "llama", False)
    ids = jnp.asarray(IDS)

    def loss(tree):
        logits = lj.apply(model, {"params": tree}, ids)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    rest, b = lj.split(params, adapter_name="b")
    grads = jit_fast(jax.grad(lambda a: loss(lj.combine(rest, a))))(b)
    pm = torch_peft(checkpoints, params, configs)
    pm.base_model.set_adapter(["default", "b"])
    for name, p in pm.named_parameters():
        p.requires_grad_(".b." in name and "lora_" in name)
    out = pm(torch.tensor(np.asarray(IDS), dtype=torch.long), labels=torch.tensor(
        np.asarray(IDS), dtype=torch.long))
    out.loss.backward()
    theirs = {n: p.grad.numpy() for n, p in pm.named_parameters() if p.grad is not None}
    assert theirs and all(".b." in n for n in theirs)
    worst = 0.0
    for path, ads, _ in named.iter_adapter_modules(grads):
        hf = f"base_model.model.{path}"
        g = ads["b"]
        worst = max(worst, rel_err(g["lora_a"].T, theirs[f"{hf}.lora_A.b.weight"]),
                    rel_err(g["lora_b"].T, theirs[f"{hf}.lora_B.b.weight"]))
    print(f"gradient of adapter b vs PEFT: rel err {worst:.2e}")
    assert worst < RTOL
    # The optimizer over the whole tree, adapter_name="b": default bit-identical, b moved.
    tx = lj.optimizer(optax.adam(1e-2), params, adapter_name="b")
    state = tx.init(params)

    def step(p, s):
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s

    step, new = jit_fast(step), params
    for _ in range(2):
        new, state = step(new, state)
    for got, want in zip(jax.tree.leaves(lj.lora_params(new, adapter_name="default")),
                         jax.tree.leaves(lj.lora_params(params, adapter_name="default"))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    moved = [float(np.abs(np.asarray(g) - np.asarray(w)).max()) for g, w in zip(
        jax.tree.leaves(lj.lora_params(new, adapter_name="b")),
        jax.tree.leaves(lj.lora_params(params, adapter_name="b")))]
    assert max(moved) > 1e-3
    mask = jax.tree.leaves(lj.trainable_mask(params, adapter_name="b"))
    assert sum(mask) == 2 * len(named.adapter_paths(params, "b"))


def torch_peft(checkpoints, params, configs, tmp=None):
    import tempfile
    from pathlib import Path
    directory = Path(tempfile.mkdtemp()) / "p"
    lj.export_peft_adapters(directory, params, configs)
    return peft_with_both(checkpoints, "llama", directory)


@pytest.mark.parametrize("kind", ["linear", "cat", "svd", "svd_rank2"])
def test_add_weighted_adapter_equals_peft(checkpoints, kind):
    combination = kind.split("_")[0]
    model, _, params, configs = two_adapters(checkpoints, "llama", False, rank_b=4)
    extra = dict(svd_rank=2) if kind == "svd_rank2" else {}
    weights = [0.7, -0.4]
    ours = lj.add_weighted_adapter(params, ["default", "b"], weights, "ab",
                                   combination_type=combination, **extra)
    pm = torch_peft(checkpoints, params, configs)
    pm.add_weighted_adapter(["default", "b"], weights, "ab", combination_type=combination,
                            **extra)
    pm.base_model.set_adapter("ab")
    worst = 0.0
    for path, ads, _ in named.iter_adapter_modules(ours):
        a_t, b_t = peft_factors(pm, path, "ab")
        a, b = np.asarray(ads["ab"]["lora_a"]), np.asarray(ads["ab"]["lora_b"])
        assert float(ads["ab"]["lora_scale"]) == pm.get_submodule(
            f"base_model.model.{path}").scaling["ab"] == 1.0
        if combination == "svd":  # singular vectors are defined up to sign: compare B @ A
            assert a.shape[-1] == a_t.shape[0] == extra.get("svd_rank", 4)
            worst = max(worst, rel_err((a @ b).T, b_t @ a_t))
        else:
            r = a.shape[-1]  # PEFT pads "cat" to the sum of the configs' ranks with zeros
            assert not a_t[r:].any() and not b_t[:, r:].any()
            np.testing.assert_allclose(a.T, a_t[:r], rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(b.T, b_t[:, :r], rtol=1e-6, atol=1e-7)
    err = rel_err(selected_logits(model, ours, ("ab",)), torch_logits(pm))
    print(f"add_weighted_adapter {kind}: delta rel err {worst:.2e}, logits rel err {err:.2e}")
    assert worst < 1e-5 and err < RTOL
    assert rel_err(selected_logits(model, ours, ("ab",)),
                   selected_logits(model, ours, ())) > 1e-3  # the new adapter matters


def peft_factors(pm, path, name):
    layer = pm.get_submodule(f"base_model.model.{path}")
    return (layer.lora_A[name].weight.detach().numpy(),
            layer.lora_B[name].weight.detach().numpy())


def test_add_weighted_adapter_svd_clamp_equals_peft_where_the_svds_agree_on_signs(checkpoints):
    """svd_clamp clips at a quantile of the signed factors, so its result depends on the signs
    the SVD library picks (PEFT: torch's LAPACK; lora_jax: numpy's), which differ for some
    modules. Where both SVDs pick the same signs (checked on the unclamped factors) the clamped
    factors equal PEFT's; at least a third of the modules are such."""
    _, _, params, configs = two_adapters(checkpoints, "llama", False, rank_b=4)
    args = (["default", "b"], [0.7, -0.4])
    ours = lj.add_weighted_adapter(params, *args, "c", combination_type="svd", svd_rank=2,
                                   svd_clamp=0.9)
    ours = lj.add_weighted_adapter(ours, *args, "u", combination_type="svd", svd_rank=2)
    pm = torch_peft(checkpoints, params, configs)
    pm.add_weighted_adapter(*args, "c", combination_type="svd", svd_rank=2, svd_clamp=0.9)
    pm.add_weighted_adapter(*args, "u", combination_type="svd", svd_rank=2)
    agreed, modules = 0, named.iter_adapter_modules(ours)
    for path, ads, _ in modules:
        a_u, _ = peft_factors(pm, path, "u")
        if np.any(np.sum(np.asarray(ads["u"]["lora_a"]).T * a_u, axis=1) < 0):
            continue  # a singular pair with opposite signs: a different, equally valid clamp
        agreed += 1
        a_t, b_t = peft_factors(pm, path, "c")
        np.testing.assert_allclose(np.asarray(ads["c"]["lora_a"]).T, a_t, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ads["c"]["lora_b"]).T, b_t, rtol=1e-5, atol=1e-6)
    print(f"svd_clamp: {agreed} of {len(modules)} modules with the same SVD signs, all equal")
    assert agreed >= len(modules) // 3


def test_sharded_two_adapters_equal_one_device():
    """Both adapters placed by the one rule (named leaves like the default's) on tp=4 x dp=2
    with the tensor-parallel layers (a row-parallel o_proj/down_proj carries both adapters, so
    the concatenated adapter's partial sums ride the one reduction): loss and every adapter
    gradient equal one device (tests/sharding_common.TOL: float32, 1e-5)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from models.llama import Llama, LlamaConfig
    from models.loss import cross_entropy
    from sharding import BATCH_AXES, TensorParallelism, param_specs, shard_params
    from tests.sharding_common import TOL, assert_trees_close, mesh_of, run_fast
    config = LlamaConfig.tiny(num_attention_heads=16, num_key_value_heads=8, scan_layers=True)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (8, 16), np.int32)
    params = run_fast(lambda k: Llama(config).init(k, ids)["params"], jax.random.key(0))
    cfg = lj.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    cfg_b = lj.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "o_proj", "down_proj"],
                          init_lora_weights=False)
    params = jit_fast(lambda p: lj.inject(lj.inject(p, cfg, jax.random.key(1)), cfg_b,
                                          jax.random.key(2), adapter_name="b"))(params)
    base, adapters = lj.split(params)
    specs = param_specs(adapters)
    layer = specs["model"]["layers"]["self_attn"]
    assert layer["o_proj"]["lora_named"]["b"]["lora_a"] == layer["o_proj"]["lora_a"] == P(
        None, "tp", None)
    assert layer["q_proj"]["lora_named"]["b"]["lora_b"] == P(None, None, "tp")

    def run(model, adapters, base, ids):
        def loss(a):
            return cross_entropy(lj.apply(model, {"params": lj.combine(base, a)}, ids), ids,
                                 shift=True)
        return jax.value_and_grad(loss)(adapters)

    ref = run_fast(functools.partial(run, Llama(config)), adapters, base, ids)
    mesh = mesh_of(dp=2, tp=4)
    model = Llama(config, TensorParallelism(mesh=mesh))
    got = run_fast(functools.partial(run, model), shard_params(adapters, mesh),
                   shard_params(base, mesh),
                   jax.device_put(ids, NamedSharding(mesh, P(BATCH_AXES))))
    print(f"sharded two adapters: loss {float(got[0])} vs {float(ref[0])}")
    np.testing.assert_allclose(got[0], ref[0], **TOL)
    assert_trees_close(got[1], ref[1], **TOL)
    grad_b = got[1]["model"]["layers"]["self_attn"]["q_proj"]["lora_named"]["b"]["lora_a"]
    assert float(jnp.abs(grad_b).max()) > 0


def test_save_load_by_name_and_errors(tmp_path):
    from tests.toy_models import DenseNet
    model = DenseNet()
    x = jnp.ones((2, 16))
    base = model.init(jax.random.key(0), x)["params"]
    cfg = lj.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    params = lj.inject(lj.inject(base, cfg, jax.random.key(1)), cfg, jax.random.key(1),
                       adapter_name="b")
    a_default = lj.lora_params(params, adapter_name="default")["block"]["q_proj"]["lora_a"]
    a_b = lj.lora_params(params, adapter_name="b")["block"]["q_proj"]["lora_named"]["b"]["lora_a"]
    assert not np.allclose(a_default, a_b)  # one rng, two names: two draws
    counts = lj.summary(params)
    assert counts.trainable == 2 * lj.summary(lj.delete_adapter(params, "b")).trainable == 2 * (
        2 * 2 * (16 + 16))  # two adapters x two modules x (A + B) of rank 2 on 16 x 16
    with pytest.raises(lj.LoraError, match="several adapters"):
        lj.save_adapter(tmp_path / "x", params, cfg)
    lj.save_adapter(tmp_path / "b", params, cfg, adapter_name="b")
    loaded = lj.load_adapter(tmp_path / "b", base)  # the stored name comes back
    assert lj.adapter_names(loaded) == ("b",)
    assert lj.adapter_names(lj.load_adapter(tmp_path / "b", base, adapter_name="default")) == (
        "default",)
    both = lj.load_adapter(tmp_path / "b", lj.delete_adapter(params, "b"))
    for got, want in zip(jax.tree.leaves(both), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    as_c = lj.load_adapter(tmp_path / "b", params, adapter_name="c")
    assert lj.adapter_names(as_c) == ("default", "b", "c")
    np.testing.assert_array_equal(lj.apply(model, {"params": lj.named.select(as_c, "c")}, x),
                                  lj.apply(model, {"params": params}, x, adapters="b"))
    merged = lj.merge(as_c, adapter_names=("c",))
    np.testing.assert_allclose(model.apply({"params": merged}, x),
                               lj.apply(model, {"params": params}, x, adapters="b"), atol=1e-6)
    with pytest.raises(lj.LoraError, match="already holds an adapter named 'b'"):
        lj.inject(params, cfg, jax.random.key(2), adapter_name="b")
    with pytest.raises(lj.LoraError, match=r"\['zz'\] are not in the tree"):
        lj.apply(model, {"params": params}, x, adapters=("zz",))
    with pytest.raises(lj.LoraError, match="adapter name 'a.b'"):
        lj.inject(params, cfg, jax.random.key(2), adapter_name="a.b")
    with pytest.raises(lj.LoraError, match="not supported by lora_jax"):
        lj.add_weighted_adapter(params, ["default", "b"], [1, 1], "t", combination_type="ties")
    cfg4 = lj.LoraConfig(r=4, target_modules=["q_proj"])
    with pytest.raises(lj.LoraError, match="'linear' needs one rank"):
        lj.add_weighted_adapter(lj.inject(params, cfg4, jax.random.key(3), adapter_name="d"),
                                ["b", "d"], [1, 1], "t", combination_type="linear")
    with pytest.raises(lj.LoraError, match="one weight per adapter"):
        lj.add_weighted_adapter(params, ["default", "b"], [1], "t")
    with pytest.raises(lj.LoraError, match="nnx layers hold one adapter"):
        lj.nnx.refuse_named(params)


def test_cli_adapter_name_names_the_outputs(tmp_path):
    """--adapter-name math: the orbax adapter loads back as "math", the PEFT export sits where
    save_pretrained puts a non-default adapter (<dir>/math/), both bit-equal to the trained one.
    (--adapter-in loads any checkpoint into the default place: test_examples_train's
    test_load_an_adapter_and_continue runs that path; test_save_load_by_name_and_errors shows a
    named checkpoint loading under another name.)"""
    from examples import train as train_lib
    from examples.cli import parse_args
    from models import GPT2Config
    from tests.test_examples_train import flags
    model = models.build(GPT2Config.tiny())
    models.save_hf(tmp_path / "gpt2", model, models.init_params(model, jax.random.key(0)))
    cfg = parse_args(flags(str(tmp_path / "gpt2"), tmp_path, "--dp", "1", "--adapter-name",
                           "math", "--adapter-out", str(tmp_path / "adapter"), "--export-peft",
                           str(tmp_path / "peft"), "--eval-interval", "0", steps=1))
    out = train_lib.train(cfg)
    base, trained = lj.split(out.params)
    want = jax.tree.leaves(trained)
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["math"]
    for restored in (lj.load_adapter(tmp_path / "adapter", base),
                     lj.import_peft_adapters(tmp_path / "peft", base)):
        assert lj.adapter_names(restored) == ("math",)
        for got, w in zip(jax.tree.leaves(lj.lora_params(restored)), want, strict=True):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(w))
    with pytest.raises(ValueError, match="--adapter-name 'a/b'"):
        parse_args(flags(str(tmp_path / "gpt2"), tmp_path, "--adapter-name", "a/b"))
