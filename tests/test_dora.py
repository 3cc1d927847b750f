"""DoRA (`LoraConfig(use_dora=True)`) proven equal to HF PEFT's `use_dora=True`.

Tiny random GPT-2 (Conv1D, fan_in_fan_out) and Llama checkpoints, torch CPU float32, adapters
with random non-zero A, B and a magnitude moved off its initial value, so every term of DoRA
acts. Tolerances (max |diff| / max |ref|, float32 on both sides):
  - logits and gradients within 1e-5 (the project's float32 parity threshold): the two sides
    run the same math in a different order (torch vs XLA matmul blocking; PEFT forms
    `W + s B A` for the norm, we expand `||W||^2 + 2s<A^T W, B> + s^2 <A^T A B, B>`), which
    differs by a few float32 ulps per layer (measured: ~1e-6 and below);
  - the factored norm against the materialised one and a float64 numpy reference: 1e-5 relative
    (float32 rounding of sums of 8-64 products);
  - merged against unmerged: 1e-5 (the merged kernel is rounded once more to float32).
"""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

import lora_jax as lj
import models
from lora_jax import dora, peft_io
from tests.test_models_fixtures import rel_err
from tests.test_nnx import X, LinenNet, NnxNet
from tests.test_peft import IDS, checkpoints, random_adapters, torch_logits  # noqa: F401
from tests.test_peft import torch_model
from tests import test_peft_training as training

RTOL = 1e-5
TARGETS = {"gpt2": ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj"]}


def dora_config(family: str, **kw) -> lj.LoraConfig:
    return lj.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], use_dora=True,
                         rank_pattern={TARGETS[family][1]: 2}, **kw)


def moved_magnitudes(params, seed: int):
    """Magnitudes as after training: each column's norm times a factor in [0.7, 1.3]."""
    rng = np.random.default_rng(seed)

    def move(path, x):
        if path[-1].key != "lora_magnitude":
            return x
        return x * jnp.asarray(rng.uniform(0.7, 1.3, x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(move, params)


def adapted(checkpoints, family, scan):  # noqa: F811
    model, base = models.load_hf(checkpoints / family, scan_layers=scan)
    config = dora_config(family)
    params = lj.inject(base, config, jax.random.key(1))
    # Random A and B after inject (so the magnitude was initialised from W alone, as PEFT does
    # with B = 0), then moved magnitudes: g = m / ||W + sAB|| differs from 1 and per column.
    params = moved_magnitudes(random_adapters(params, seed=2, a_std=0.2, b_std=0.05), seed=3)
    return model, base, params, config


def peft_of(checkpoints, tmp_path, model, params, config, family):  # noqa: F811
    out = lj.export_peft(tmp_path / "peft", params, config, **models.peft_naming(model))
    return peft.PeftModel.from_pretrained(torch_model(checkpoints / family), out,
                                          is_trainable=True).eval(), out


def loss_of(model, base, ids):
    def loss(adapters):
        logits = lj.apply(model, {"params": lj.combine(base, adapters)}, ids)
        return models.cross_entropy(logits, ids, shift=True), logits
    return loss


# ---------------------------------------------------------------------------------------------
# the math
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape_in,shape_out", [((24,), (40,)), ((6, 4), (5,)), ((12,), (2, 8))])
def test_factored_norm_equals_materialised(shape_in, shape_out):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((*shape_in, *shape_out)).astype(np.float32)
    a = rng.standard_normal((*shape_in, 3)).astype(np.float32)
    b = rng.standard_normal((3, *shape_out)).astype(np.float32)
    factored = np.sqrt(np.asarray(dora.weight_norm_sq(w, a, b, 0.7)))
    w2 = w.reshape(-1, int(np.prod(shape_out))).astype(np.float64)
    ref = np.linalg.norm(w2 + 0.7 * a.reshape(len(w2), 3) @ b.reshape(3, -1), axis=0)
    np.testing.assert_allclose(factored.reshape(-1), ref, rtol=RTOL)
    np.testing.assert_allclose(np.asarray(dora.materialised_norm(w, a, b, 0.7)).reshape(-1), ref,
                               rtol=RTOL)
    # the row split of a row-parallel layer: the partial sums add up to the whole
    half = shape_in[0] // 2
    parts = [dora.weight_norm_sq(w[s], a[s], b, 0.7) for s in (slice(0, half), slice(half, None))]
    np.testing.assert_allclose(np.sqrt(np.asarray(parts[0] + parts[1])).reshape(-1), ref,
                               rtol=RTOL)


def test_dense_output_is_the_hand_formula():
    """One Dense with bias: `m / ||W + sAB|| * (x (W + sAB)) + bias`; and its gradients with
    the norm a constant (PEFT detaches it): A's and B's are plain LoRA's times g."""
    import flax.linen as nn
    layer = nn.Dense(6, name="q_proj")
    x = jax.random.normal(jax.random.key(0), (3, 5))
    params = {"q_proj": layer.init(jax.random.key(1), x)["params"]}
    params["q_proj"]["bias"] = jnp.linspace(-1, 1, 6)
    params = moved_magnitudes(random_adapters(lj.inject(
        params, lj.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"], use_dora=True),
        jax.random.key(2)), seed=4, a_std=0.5, b_std=0.5), seed=5)
    p = jax.tree.map(np.float64, params["q_proj"])
    adapted = p["kernel"] + 1.5 * p["lora_a"] @ p["lora_b"]
    g = p["lora_magnitude"] / np.linalg.norm(adapted, axis=0)
    want = np.asarray(x, np.float64) @ adapted * g + p["bias"]

    class One(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(6, name="q_proj")(x)

    got = lj.apply(One(), {"params": params}, x)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=RTOL * np.abs(want).max())
    assert np.abs(g - 1).max() > 0.05  # the magnitude acts
    # gradients of <c, y> with the norm a constant: dA = s x^T (c g) B^T, dB = s (x A)^T (c g),
    # dm = sum_rows c * (x (W + sAB)) / norm
    c = np.asarray(jax.random.normal(jax.random.key(6), want.shape), np.float64)
    frozen, adapters = lj.split(params)
    grads = jax.grad(lambda ad: jnp.sum(jnp.asarray(c, jnp.float32) * lj.apply(
        One(), {"params": lj.combine(frozen, ad)}, x)))(adapters)["q_proj"]
    xd = np.asarray(x, np.float64)
    hand = {"lora_a": 1.5 * xd.T @ ((c * g) @ p["lora_b"].T),
            "lora_b": 1.5 * (xd @ p["lora_a"]).T @ (c * g),
            "lora_magnitude": np.sum(c * (xd @ adapted), axis=0) / np.linalg.norm(adapted, axis=0)}
    for name, ref in hand.items():
        np.testing.assert_allclose(grads[name], ref, rtol=RTOL, atol=RTOL * np.abs(ref).max(),
                                   err_msg=name)


def test_bfloat16_keeps_small_rescalings():
    """In bfloat16 compute, a magnitude 0.3% above the norm still rescales the output by 0.3%:
    g - 1 is formed in float32 before the cast (bfloat16's spacing near 1 is 0.8%, which would
    round g to 1 and drop the rescaling). Tolerance: 5% of the 0.3% change (bfloat16 outputs
    carry ~0.4% relative rounding; the change is measured on their difference)."""
    import flax.linen as nn

    class One(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(64, use_bias=False, dtype=jnp.bfloat16, name="q_proj")(x)

    x = jax.random.normal(jax.random.key(0), (4, 32))
    params = lj.inject(One().init(jax.random.key(1), x)["params"],
                       lj.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
                       jax.random.key(2))
    assert params["q_proj"]["lora_magnitude"].dtype == jnp.float32
    up = jax.tree_util.tree_map_with_path(
        lambda p, v: v * 1.003 if p[-1].key == "lora_magnitude" else v, params)
    y0, y1 = (np.asarray(lj.apply(One(), {"params": p}, x), np.float64) for p in (params, up))
    ratio = np.sum(y1 * y0) / np.sum(y0 * y0) - 1  # least-squares y1 = (1 + ratio) y0
    assert abs(ratio - 0.003) < 0.05 * 0.003, ratio


# ---------------------------------------------------------------------------------------------
# against PEFT
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,scan", [("gpt2", False), ("llama", True)])
def test_logits_and_gradients_equal_peft(checkpoints, tmp_path, family, scan):  # noqa: F811
    model, base, params, config = adapted(checkpoints, family, scan)
    pm, out = peft_of(checkpoints, tmp_path, model, params, config, family)
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    # the export reads back exactly (magnitudes restacked for the scanned tree)
    jax.tree.map(np.testing.assert_array_equal, lj.lora_params(lj.import_peft(out, base)),
                 lj.lora_params(params))
    ids = jnp.asarray(IDS)
    frozen, adapters = lj.split(params)
    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_of(model, frozen, ids),
                                                    has_aux=True))(adapters)
    t_ids = torch.tensor(np.asarray(IDS), dtype=torch.long)
    t_logits = pm(t_ids).logits
    t_loss = torch.nn.functional.cross_entropy(t_logits[:, :-1].reshape(-1, t_logits.shape[-1]),
                                               t_ids[:, 1:].reshape(-1))
    t_loss.backward()
    print(f"{family} scan={scan}: logits rel err {rel_err(logits, t_logits.detach()):.2e}")
    assert rel_err(logits, t_logits.detach()) < RTOL
    assert rel_err(jax.jit(functools.partial(lj.apply, model))({"params": base}, ids),
                   t_logits.detach()) > 1e-2
    # our gradients in PEFT's layout, by the exporter's own unstacking and naming
    ours = {ad.name: ad for ad in peft_io.torch_adapters(
        _with_scales(grads, adapters),
        models.layer_container(model) if scan else None)}
    named = dict(pm.named_parameters())
    worst = 0.0
    for name, ad in ours.items():
        prefix = f"base_model.model.{name}"
        for ours_g, key in ((ad.a, "lora_A.default.weight"), (ad.b, "lora_B.default.weight"),
                            (ad.magnitude, "lora_magnitude_vector.default.weight")):
            theirs = named[f"{prefix}.{key}"].grad.numpy()
            err = rel_err(ours_g, theirs)
            worst = max(worst, err)
            assert err < RTOL, (name, key, err)
    print(f"{family} scan={scan}: worst gradient rel err {worst:.2e} over {len(ours)} modules")
    assert len(ours) == 2 * len(TARGETS[family])


def _with_scales(grads, adapters):
    """The gradient tree with the (gradient-free) scale leaves put back, so the exporter's
    `torch_adapters` can lay it out as PEFT does."""
    return jax.tree_util.tree_map_with_path(
        lambda path, g, a: a if path[-1].key == "lora_scale" else g, grads, adapters)


@pytest.mark.parametrize("family,scan", [("llama", True)])  # GPT-2's Conv1D: the gradient test
def test_adamw_losses_equal_peft(checkpoints, tmp_path, family, scan):  # noqa: F811
    """20 AdamW steps on A, B and the magnitude, the harness of `test_peft_training`: per-step
    losses within 1e-5 relative of PEFT's (measured 3.2e-7; GPT-2 unscanned 3.2e-7 too)."""
    model, _, params, config = adapted(checkpoints, family, scan)
    pm, _ = peft_of(checkpoints, tmp_path, model, params, config, family)
    assert sum("magnitude" in n for n, p in pm.named_parameters() if p.requires_grad) > 0
    ours, theirs = training.jax_losses(model, params), training.torch_losses(pm)
    rel = np.abs(np.array(ours) - np.array(theirs)) / np.abs(np.array(theirs))
    print(f"DoRA {family} scan={scan}: loss {theirs[0]:.4f} -> {theirs[-1]:.4f}, max per-step "
          f"relative difference {rel.max():.2e}")
    assert theirs[-1] < theirs[0] - 0.05
    assert rel.max() < RTOL, rel


def test_peft_saved_dora_imports(checkpoints, tmp_path):  # noqa: F811
    """PEFT's own DoRA adapter (its init of the magnitude, then moved) loads and gives PEFT's
    logits; the magnitude is where PEFT keeps it."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(torch_model(checkpoints / "gpt2"), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], use_dora=True,
        init_lora_weights=False, fan_in_fan_out=True))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.7, 1.3))
    pm.save_pretrained(tmp_path / "theirs")
    keys = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector" in keys
    model, base = models.load_hf(checkpoints / "gpt2")
    params = lj.import_peft(tmp_path / "theirs", base)
    assert params["transformer"]["h"]["1"]["mlp"]["c_fc"]["lora_magnitude"].shape == (128,)
    assert lj.peft_lora_config(tmp_path / "theirs").use_dora
    ours = np.asarray(jax.jit(functools.partial(lj.apply, model))({"params": params},
                                                                 jnp.asarray(IDS)))
    theirs = torch_logits(pm.eval())
    print(f"PEFT-saved DoRA -> lora_jax: logits rel err {rel_err(ours, theirs):.2e}")
    assert rel_err(ours, theirs) < RTOL
    # and back: our export of the imported adapter is PEFT's file, tensor for tensor
    again = lj.export_peft(tmp_path / "again", params, lj.peft_lora_config(tmp_path / "theirs"),
                           **models.peft_naming(model))
    mine = load_file(str(again / "adapter_model.safetensors"))
    assert set(mine) == set(keys)
    for k in keys:
        np.testing.assert_array_equal(mine[k], keys[k])


# ---------------------------------------------------------------------------------------------
# merge, NNX, files, refusals
# ---------------------------------------------------------------------------------------------

def test_merge_equals_unmerged(checkpoints):  # noqa: F811
    model, base, params, _ = adapted(checkpoints, "llama", True)
    ids = jnp.asarray(IDS)
    merged = jax.jit(lj.merge)(params)
    assert "lora_magnitude" not in str(jax.tree_util.tree_structure(merged))
    err = rel_err(jax.jit(model.apply)({"params": merged}, ids),
                  jax.jit(functools.partial(lj.apply, model))({"params": params}, ids))
    print(f"merged vs unmerged: rel err {err:.2e}")
    assert err < RTOL


def test_nnx_dora_equals_linen():
    """NNX layers (Linear and multi-axis LinearGeneral) carry the magnitude like A and B, and
    give the Linen path's outputs and merge."""
    config = lj.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True,
                           init_lora_weights=False)
    model = NnxNet(nnx.Rngs(0))
    base = lj.nnx.params(model)
    layouts = lj.kernel_layouts(LinenNet(), {"params": base}, X)
    linen = lj.inject(base, config, jax.random.key(1), layouts=layouts)
    model = lj.nnx.inject(model, config, jax.random.key(1))
    jax.tree.map(np.testing.assert_array_equal, lj.nnx.params(model), linen)
    assert model.layers[0].v_proj.lora_magnitude[...].shape == (2, 8)
    state = nnx.to_pure_dict(nnx.state(model, lj.nnx.LoraParam))
    assert sum("lora_magnitude" in str(p) for p, _ in
               jax.tree_util.tree_leaves_with_path(state)) == 6
    moved = moved_magnitudes(linen, seed=7)
    lj.nnx.load(model, moved)
    ref = lj.apply(LinenNet(), {"params": moved}, X)
    np.testing.assert_allclose(model(X), ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    assert not np.allclose(model(X), lj.apply(LinenNet(), {"params": linen}, X), atol=1e-3)
    np.testing.assert_allclose(lj.nnx.merge(model)(X), ref, rtol=RTOL,
                               atol=RTOL * np.abs(ref).max())


def test_checkpoint_round_trip_and_trainable_leaves(tmp_path):
    import flax.linen as nn
    params = {"q_proj": nn.Dense(4).init(jax.random.key(0), jnp.ones((1, 3)))["params"]}
    config = lj.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    params = moved_magnitudes(lj.inject(params, config, jax.random.key(1)), seed=1)
    assert lj.trainable_mask(params)["q_proj"]["lora_magnitude"]
    assert lj.summary(params).trainable == 3 * 2 + 2 * 4 + 4  # A, B and the magnitude
    assert lj.LoraConfig.from_dict(config.to_dict()) == config
    lj.save_adapter(tmp_path / "ckpt", params, config)
    back = lj.load_adapter(tmp_path / "ckpt", lj.split(params)[0])
    np.testing.assert_array_equal(back["q_proj"]["lora_magnitude"],
                                  params["q_proj"]["lora_magnitude"])
    assert lj.adapter_config(tmp_path / "ckpt").use_dora
    plain_config = lj.LoraConfig(r=2, target_modules=["q_proj"])
    lj.save_adapter(tmp_path / "plain", lj.inject(lj.split(params)[0], plain_config,
                                                   jax.random.key(1)), plain_config)
    with pytest.raises(lj.LoraError, match="lora_magnitude: the model has this leaf"):
        lj.load_adapter(tmp_path / "plain", params)  # a plain checkpoint into a DoRA model


def test_refusals(checkpoints, tmp_path):  # noqa: F811
    model, _, params, config = adapted(checkpoints, "llama", False)
    with pytest.raises(lj.LoraError, match="vLLM cannot serve DoRA"):
        lj.export_peft(tmp_path / "vllm", params, config, uniform_scale=True)
    out = lj.export_peft(tmp_path / "ok", params, config)
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": False}))
    with pytest.raises(lj.LoraError, match="no use_dora: true"):
        lj.import_peft(out, lj.split(params)[0])
    with pytest.raises(lj.LoraError, match="use_dora"):
        lj.LoraConfig(r=2, target_modules=["q_proj"], use_dora="yes")
    einsum = nnx.Einsum("bi,io->bo", (4, 3), rngs=nnx.Rngs(0))
    with pytest.raises(lj.LoraError, match="DoRA on nnx.Einsum"):
        lj.nnx.inject(einsum, lj.LoraConfig(r=2, target_modules=".*", use_dora=True),
                      jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# tensor parallelism: sharded == one device
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_dora():
    """The sharding tests' toy (scanned blocks, column and row layers with and without bias, a
    column head and a replicated head), every layer with a DoRA adapter and moved magnitudes."""
    from tests.sharding_common import run_fast
    from tests.test_sharding_layers import B, D, R, S, V, Toy
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, S, D), np.float32)
    labels = rng.integers(0, V, (B, S)).astype(np.int32)
    config = lj.LoraConfig(r=R, lora_alpha=8, target_modules=".*", init_lora_weights=False,
                           use_dora=True)
    params = run_fast(lambda k: lj.inject(Toy().init(k, x)["params"], config,
                                          jax.random.fold_in(k, 1)), jax.random.key(0))
    base, adapters = lj.split(moved_magnitudes(params, seed=11))
    return x, labels, base, adapters


@pytest.mark.parametrize("dp,fsdp,tp,sp,dropout", [(2, 2, 2, True, 0.25), (1, 1, 4, False, 0.0)])
def test_tensor_parallel_dora_equals_one_device(toy_dora, dp, fsdp, tp, sp, dropout):
    """Loss and every adapter gradient (A, B, magnitude) of the column, row and replicated
    layers under shard_map equal one device's `lora_jax.apply`, with and without LoRA dropout
    (same draws), fsdp-split kernels and sequence parallelism. Tolerance: the sharding tests'
    1e-5 absolute and relative (psums reorder float32 sums)."""
    from sharding import TensorParallelism
    from tests.sharding_common import TOL, assert_trees_close, mesh_of
    from tests.test_sharding_layers import Toy, loss_and_grads
    rngs = {"dropout": jax.random.key(7)} if dropout else None
    want = loss_and_grads(Toy(), toy_dora, rngs=rngs, lora_dropout=dropout)
    mesh = mesh_of(dp, fsdp, tp)
    model = Toy(TensorParallelism(mesh=mesh, sequence_parallel=sp))
    got = loss_and_grads(model, toy_dora, mesh, rngs=rngs, lora_dropout=dropout)
    np.testing.assert_allclose(got[0], want[0], **TOL)
    assert_trees_close(got[1], want[1], **TOL)
    mags = [g for p, g in jax.tree_util.tree_leaves_with_path(got[1])
            if p[-1].key == "lora_magnitude"]
    assert len(mags) == 7 and all(float(jnp.abs(g).max()) > 0 for g in mags)


# ---------------------------------------------------------------------------------------------
# the CLI and vLLM
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow  # end to end (~15-50 s: the CLI's compile)
def test_cli_dora_trains_exports_and_is_refused_for_vllm(tmp_path):
    """`--dora` through `examples.train.main`: the adapters carry magnitudes that trained, the
    PEFT export says use_dora and holds them, vLLM serving of it is refused by name, and the
    merged export equals the adapted model."""
    from examples import train as train_lib
    model = models.build(models.GPT2Config.tiny())
    models.save_hf(tmp_path / "gpt2", model, models.init_params(model, jax.random.key(0)))
    args = ["--model-path", str(tmp_path / "gpt2"), "--tokenizer", "bytes", "--batch-size", "4",
            "--seq-len", "32", "--steps", "3", "--rank", "4", "--alpha", "8", "--lr", "1e-2",
            "--dp", "1", "--no-progress", "--eval-interval", "0", "--dora",
            "--export-peft", str(tmp_path / "peft"), "--export-merged", str(tmp_path / "merged")]
    assert train_lib.main(args) == 0
    base_model, base = models.load_hf(tmp_path / "gpt2")
    params = lj.import_peft(tmp_path / "peft", base)
    mods = {p: m for p, m in lj.tree.modules_of(params).items() if "lora_magnitude" in m}
    assert len(mods) == 8  # all-linear on 2 GPT-2 blocks: c_attn, c_proj, c_fc, mlp.c_proj
    # the magnitudes started at the base kernels' column norms (B = 0) and trained away
    moved = max(float(np.abs(np.asarray(m["lora_magnitude"])
                             - np.linalg.norm(np.asarray(m["kernel"]), axis=0)).max())
                for m in mods.values())
    assert moved > 1e-4
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["use_dora"] is True
    with pytest.raises(lj.LoraError, match="vLLM cannot serve DoRA"):
        lj.check_vllm_servable(tmp_path / "peft")
    ids = jnp.asarray(IDS % 64)
    merged_model, merged = models.load_hf(tmp_path / "merged" / "hf")
    want = lj.apply(base_model, {"params": params}, ids)
    assert rel_err(merged_model.apply({"params": merged}, ids), want) < RTOL


# ---------------------------------------------------------------------------------------------
# the benchmark, on CPU
# ---------------------------------------------------------------------------------------------

def test_benchmark_smoke_on_the_tiny_shape():
    """`benchmarks.dora_vs_peft`'s pieces on CPU, in process: the lora-jax worker's DoRA step
    trains (bf16), PEFT's DoRA worker steps, and the driver builds the four command lines."""
    from benchmarks import dora_vs_peft, peft_worker
    from tests.test_benchmarks_worker import first_losses
    losses = first_losses(["dora=1"], steps=2)
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    torch.manual_seed(0)
    model, fwd, opt = peft_worker.build("tiny", False, 4, "cpu", dora=True)
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
    ids = torch.randint(0, 512, (2, 16))
    assert np.isfinite(float(peft_worker.train_step(fwd, opt, ids)))
    ns = type("Args", (), dict(tiny=True, shape="1b", batch=0, seq=2048, steps=1))
    cmds = {c: dora_vs_peft.command(c, ns) for c in dora_vs_peft.CONFIGS}
    assert "dora=1" in cmds["jax-dora"] and "dora=0" in cmds["jax-lora"]
    assert "--dora" in cmds["peft+compile-dora"] and "--compile" in cmds["peft+compile-dora"]
    assert all("tiny" in c for c in cmds.values())
    ratios = dora_vs_peft.summary({"jax-dora": {"tokens_per_s": 30.0},
                                   "peft-eager-dora": {"tokens_per_s": 10.0}})
    assert ratios["jax-dora / peft-eager-dora"] == 3.0
