"""LoRA on embeddings (PEFT's `lora_embedding_A/B`), tied heads and `modules_to_save`, against
the real HF PEFT library (torch CPU, float32) and hand computations.

Models: a tiny untied Llama, a tiny tied Llama and a tiny (tied) GPT-2 (tests/test_models_fixtures).

Tolerances (all relative: max |diff| / max |ref|, `rel_err`):
  - logits and gradients vs PEFT: 1e-5, the project's float32 parity bound (both sides run the
    same float32 math in a different order; measured ~1e-7 .. 1e-6);
  - AdamW losses vs PEFT, per step: 1e-5 (as tests/test_peft_training.py);
  - merged vs unmerged: 1e-5 (the merge adds scale*A@B to the table in float32: one rounding);
  - 8 fake devices vs one: 1e-5 (reduction order of the sharded matmuls and sums);
  - the hand computation of the op: 1e-6 (one float32 matmul each side).
"""
from __future__ import annotations

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from safetensors.numpy import load_file

import lora_jax as lj
import models
from lora_jax.adapter_op import Adapter, adapt_attend, adapt_embedding
import tests.test_peft_training
from tests.sharding_common import jit_fast
from tests.test_models_fixtures import VOCAB, hf_gpt2, hf_llama, random_ids, rel_err
from tests.test_peft import torch_model
from tests.test_peft_training import jax_losses, torch_losses

RTOL = 1e-5
IDS = random_ids(2, 12)
# name: (checkpoint maker, PEFT-style targets, modules_to_save)
CASES = {
    "llama": (lambda d: hf_llama(d), ["q_proj", "v_proj", "embed_tokens"], ["lm_head"]),
    "llama_tied": (lambda d: hf_llama(d, tie=True), ["q_proj", "embed_tokens"], None),
    "gpt2_tied": (lambda d: hf_gpt2(d), ["c_attn", "wte"], None),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_embed")
    for name, (make, _, _) in CASES.items():
        make(root / name)
    return root


def config_for(case: str, **kw) -> lj.LoraConfig:
    _, targets, saved = CASES[case]
    return lj.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": targets,
                            "modules_to_save": saved, **kw})


def trained_like(config, base, seed: int):
    """`base` injected by `config`, adapters and copies as after training: random A and B, copies
    moved off the base (host draws). Jitted at optimisation level 0 with the draws passed in:
    inject's own random draws are then dead code, never compiled (eager: one compile each)."""
    rng = np.random.default_rng(seed)
    inject = functools.partial(lj.inject, config=config, rng=jax.random.key(0))
    draws = [jnp.asarray((0.1 if path[-1].key in ADAPTER else 0.02) * rng.standard_normal(x.shape),
                         x.dtype)
             for path, x in jax.tree_util.tree_leaves_with_path(jax.eval_shape(inject, base))
             if path[-1].key in ADAPTER or path[-1].key.startswith("saved_")]

    def with_draws(base, draws):
        draws = iter(draws)

        def draw(path, x):
            key = path[-1].key
            if key in ADAPTER:
                return next(draws)
            return x + next(draws) if key.startswith("saved_") else x

        return jax.tree_util.tree_map_with_path(draw, inject(base))

    return jit_fast(with_draws)(base, draws)


ADAPTER = ("lora_a", "lora_b")


def setup(checkpoints, case, seed=1, **kw):
    model, base = models.load_hf(checkpoints / case)
    config = config_for(case, **kw)
    return model, base, config, trained_like(config, base, seed)


# One compile per model and tree shape (eager Linen runs op by op), at optimisation level 0.
_apply = jit_fast(lj.apply, static_argnums=0, static_argnames=("ensure_weight_tying",))
_base_apply = jit_fast(lambda model, p, x: model.apply({"params": p}, x), static_argnums=0)
_merge = jit_fast(lj.merge)


def ce(logits, ids):
    return models.cross_entropy(logits, ids, shift=True)


def our_loss_grads(model, params, ids, **kw):
    base, adapters = lj.split(params)

    def loss(a):
        return ce(lj.apply(model, {"params": lj.combine(base, a)}, ids, **kw), ids)

    logits = _apply(model, {"params": params}, ids, **kw)
    return np.asarray(logits), jit_fast(jax.grad(loss))(adapters)


def torch_loss_grads(pm, ids):
    pm.zero_grad()
    t = torch.tensor(np.asarray(ids), dtype=torch.long)
    logits = pm(t).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             t[:, 1:].reshape(-1))
    loss.backward()
    return logits.detach().numpy(), {n: p.grad.numpy().copy() for n, p in pm.named_parameters()
                                     if p.requires_grad}


def our_grad_for(torch_name: str, grads) -> np.ndarray:
    """Our gradient of the leaf PEFT calls `torch_name`, in PEFT's layout."""
    name = torch_name.removeprefix("base_model.model.")
    if m := re.fullmatch(r"(.+)\.lora_embedding_([AB])\.default", name):
        leaf = {"A": "lora_a", "B": "lora_b"}[m[2]]
        return np.asarray(_at(grads, m[1])[leaf]).T
    if m := re.fullmatch(r"(.+)\.lora_([AB])\.default\.weight", name):
        return np.asarray(_at(grads, m[1])[{"A": "lora_a", "B": "lora_b"}[m[2]]]).T
    if m := re.fullmatch(r"(.+)\.modules_to_save\.default\.weight", name):
        module = _at(grads, m[1])
        return (np.asarray(module["saved_kernel"]).T if "saved_kernel" in module
                else np.asarray(module["saved_embedding"]))
    raise AssertionError(f"unmapped PEFT parameter {torch_name}")


def _at(tree, dotted):
    for key in dotted.split("."):
        tree = tree[key]
    return tree


# ---------------------------------------------------------------------------------------------
# the op, by hand
# ---------------------------------------------------------------------------------------------

def test_embedding_op_equals_the_hand_computation():
    """Lookup: table[ids] + s * (onehot(ids) @ A) @ B; tied head: h @ (table + s A B).T."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((11, 6)).astype(np.float32)
    a, b = (rng.standard_normal(s).astype(np.float32) for s in ((11, 3), (3, 6)))
    ids = rng.integers(0, 11, (2, 5))
    h = rng.standard_normal((2, 5, 6)).astype(np.float32)
    adapter = Adapter(jnp.asarray(a), jnp.asarray(b), jnp.float32(1.5))
    onehot = np.eye(11, dtype=np.float64)[ids]
    want = table[ids] + 1.5 * onehot @ a @ b
    got = adapt_embedding(jnp.asarray(ids), jnp.asarray(table[ids]), adapter, dtype=jnp.float32)
    assert rel_err(got, want) < 1e-6
    want_head = h @ (table + 1.5 * a @ b).T
    got_head = adapt_attend(jnp.asarray(h), jnp.asarray(h @ table.T), adapter, dtype=jnp.float32)
    assert rel_err(got_head, want_head) < 1e-6


# ---------------------------------------------------------------------------------------------
# inject: PEFT's init, leaves, errors
# ---------------------------------------------------------------------------------------------

def test_inject_embedding_and_saved_copies(checkpoints):
    model, base = models.load_hf(checkpoints / "llama")
    config = config_for("llama")
    params = lj.inject(base, config, jax.random.key(0))
    emb = params["model"]["embed_tokens"]
    assert emb["lora_a"].shape == (96, 4) and emb["lora_b"].shape == (4, 32)
    # PEFT: lora_embedding_A zeros, lora_embedding_B standard normal; scale alpha / r.
    assert not np.asarray(emb["lora_a"]).any()
    assert abs(float(np.std(emb["lora_b"])) - 1.0) < 0.3 and float(emb["lora_scale"]) == 2.0
    np.testing.assert_array_equal(params["lm_head"]["saved_kernel"], base["lm_head"]["kernel"])
    adapters = lj.lora_params(params)
    assert set(adapters["lm_head"]) == {"saved_kernel"}
    assert lj.trainable_mask(params)["lm_head"] == {"kernel": False, "saved_kernel": True}
    s = lj.summary(params)
    assert s.per_target["lm_head (saved)"] == 96 * 32 and s.per_target["embed_tokens"] == 4 * 128
    # At init the output is the base model's (A = 0; the copies equal the originals).
    ids = jnp.asarray(IDS)
    np.testing.assert_array_equal(_apply(model, {"params": params}, ids),
                                  _base_apply(model, base, ids))
    # "all-linear" keeps skipping embeddings, as PEFT's does.
    everything = jax.eval_shape(  # the tree's structure is the point: no values computed
        lambda: lj.inject(base, lj.LoraConfig(r=4, target_modules="all-linear"), jax.random.key(0)))
    assert "lora_a" not in everything["model"]["embed_tokens"]


def test_inject_refuses_bad_requests(checkpoints):
    _, base = models.load_hf(checkpoints / "llama_tied")
    with pytest.raises(lj.LoraError, match="tied output head has no module"):
        lj.inject(base, config_for("llama_tied", modules_to_save=["lm_head"]), jax.random.key(0))
    with pytest.raises(lj.LoraError, match="both LoRA targets and modules_to_save"):
        lj.inject(base, lj.LoraConfig(target_modules=["embed_tokens"],
                                      modules_to_save=["embed_tokens"]), jax.random.key(0))
    with pytest.raises(lj.LoraError, match="exceeds the embedding table"):
        lj.inject(base, lj.LoraConfig(r=40, target_modules=["embed_tokens"]), jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# ours -> PEFT: logits and gradients
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_gradients_equal_peft(checkpoints, tmp_path, case):
    """Our export loaded by PEFT: equal logits and equal gradients of every trainable tensor.
    On the tied models the head stays on the base table in both (PEFT 0.21's default)."""
    model, base, config, params = setup(checkpoints, case)
    out = lj.export_peft(tmp_path / "p", params, config, **models.peft_naming(model))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["modules_to_save"] == CASES[case][2] and cfg["ensure_weight_tying"] is False
    pm = peft.PeftModel.from_pretrained(torch_model(checkpoints / case), out,
                                        is_trainable=True).eval()
    ids = jnp.asarray(IDS)
    ours, grads = our_loss_grads(model, params, ids)
    theirs, torch_grads = torch_loss_grads(pm, IDS)
    print(f"{case}: logits rel err {rel_err(ours, theirs):.1e}")
    assert rel_err(ours, theirs) < RTOL
    assert rel_err(np.asarray(_apply(model, {"params": base}, ids)), theirs) > 1e-2
    assert any("lora_embedding" in n for n in torch_grads)
    errs = {name: rel_err(our_grad_for(name, grads), g)
            for name, g in torch_grads.items()}
    print(f"{case}: worst gradient rel err {max(errs.values()):.1e} over {len(errs)} tensors")
    for name, err in errs.items():
        assert err < RTOL, (name, err)


def test_tied_head_with_ensure_weight_tying_equals_peft(checkpoints, tmp_path):
    """`ensure_weight_tying=True`: PEFT gives the tied lm_head a LoRA sharing the embedding's
    tensors (A_head = B_emb.T, B_head = A_emb.T); ours adapts `attend` with the transposed
    delta. Logits equal, and our gradient is the sum of PEFT's two views' gradients (one
    storage); merged equals unmerged."""
    model, base, config, params = setup(checkpoints, "llama_tied", ensure_weight_tying=True)
    out = lj.export_peft(tmp_path / "p", params, config)
    assert json.loads((out / "adapter_config.json").read_text())["ensure_weight_tying"] is True
    pm = peft.PeftModel.from_pretrained(torch_model(checkpoints / "llama_tied"), out,
                                        is_trainable=True).eval()
    ids = jnp.asarray(IDS)
    ours, grads = our_loss_grads(model, params, ids, ensure_weight_tying=True)
    theirs, tg = torch_loss_grads(pm, IDS)
    assert rel_err(ours, theirs) < RTOL
    plain = np.asarray(_apply(model, {"params": params}, ids))  # head on the base table
    assert rel_err(plain, theirs) > 1e-3
    emb, head = "base_model.model.model.embed_tokens", "base_model.model.lm_head"
    g = grads["model"]["embed_tokens"]
    assert rel_err(g["lora_a"], tg[f"{emb}.lora_embedding_A.default"].T
                   + tg[f"{head}.lora_B.default.weight"]) < RTOL
    assert rel_err(g["lora_b"], tg[f"{emb}.lora_embedding_B.default"].T
                   + tg[f"{head}.lora_A.default.weight"]) < RTOL
    merged = _base_apply(model, _merge(params), ids)
    assert rel_err(merged, ours) < RTOL
    # PEFT's own save (the tied head's copies and base weight included) imports to the same.
    pm.save_pretrained(tmp_path / "theirs")
    back = lj.import_peft(tmp_path / "theirs", base)
    tied = lj.peft_lora_config(tmp_path / "theirs").ensure_weight_tying
    assert tied and rel_err(_apply(model, {"params": back}, ids, ensure_weight_tying=tied),
                            theirs) < RTOL


# ---------------------------------------------------------------------------------------------
# merge
# ---------------------------------------------------------------------------------------------

def test_merge(checkpoints):
    """Untied: merged == unmerged (the table takes the delta, lm_head the trained copy). Tied
    without ensure_weight_tying: the merged head takes the delta too, as PEFT's merge does
    (merged equals PEFT's merge_and_unload, not the unmerged model)."""
    ids = jnp.asarray(IDS)
    model, base, config, params = setup(checkpoints, "llama")
    merged = _merge(params)
    assert set(merged["lm_head"]) == {"kernel"} and set(merged["model"]["embed_tokens"]) == {
        "embedding"}
    np.testing.assert_array_equal(merged["lm_head"]["kernel"], params["lm_head"]["saved_kernel"])
    assert rel_err(_base_apply(model, merged, ids),
                   _apply(model, {"params": params}, ids)) < RTOL

    model, base, config, params = setup(checkpoints, "gpt2_tied")
    out = lj.export_peft(checkpoints / "gpt2_merge", params, config, **models.peft_naming(model))
    pm = peft.PeftModel.from_pretrained(torch_model(checkpoints / "gpt2_tied"), out).eval()
    with torch.no_grad():
        theirs = pm.merge_and_unload()(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    ours = np.asarray(_base_apply(model, _merge(params), ids))
    assert rel_err(ours, theirs) < RTOL
    assert rel_err(ours, _apply(model, {"params": params}, ids)) > 1e-3


# ---------------------------------------------------------------------------------------------
# PEFT -> ours
# ---------------------------------------------------------------------------------------------

def test_peft_save_imports_with_equal_logits(checkpoints, tmp_path):
    """get_peft_model (embedding target, lm_head in modules_to_save), random weights,
    save_pretrained -> import_peft: equal logits; re-export gives PEFT's tensors bit for bit
    (all but the frozen base table PEFT adds, which we do not write)."""
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"],
                          modules_to_save=["lm_head"])
    pm = peft.get_peft_model(torch_model(checkpoints / "llama"), cfg).eval()
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.1)
            elif "modules_to_save" in name:
                p.add_(0.02 * torch.randn_like(p))
    pm.save_pretrained(tmp_path / "p")
    model, base = models.load_hf(checkpoints / "llama")
    params = lj.import_peft(tmp_path / "p", base)
    with torch.no_grad():
        theirs = pm(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    assert rel_err(_apply(model, {"params": params}, jnp.asarray(IDS)), theirs) < RTOL
    again = lj.export_peft(tmp_path / "again", params, lj.peft_lora_config(tmp_path / "p"))
    want = {k: v for k, v in load_file(str(tmp_path / "p" / "adapter_model.safetensors")).items()
            if ".base_layer." not in k}
    got = load_file(str(again / "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    # A table of another shape (a resized vocabulary) is refused, naming the module.
    other = {**base, "model": {**base["model"], "embed_tokens": {"embedding": jnp.zeros((100, 32))}}}
    with pytest.raises(lj.LoraError, match=r"model\.embed_tokens.*resized vocabulary"):
        lj.import_peft(tmp_path / "p", other)


# ---------------------------------------------------------------------------------------------
# training, checkpoints, sharding
# ---------------------------------------------------------------------------------------------

_harness_batch = tests.test_peft_training.batch


def no_pad_batch(step: int) -> np.ndarray:
    """test_peft_training's batches with ids in [3, VOCAB): HF's Llama embedding has
    `padding_idx` = pad_token_id (2), and torch's embedding gives that row no gradient, in
    PEFT's `lora_embedding_A` too; lora_jax's tables know no padding row (a documented
    difference that vanishes when pad positions are masked out of the loss, as usual)."""
    return (3 + _harness_batch(step) % (VOCAB - 3)).astype(np.int32)


def test_adamw_losses_equal_peft(checkpoints, tmp_path, monkeypatch):
    """20 AdamW steps on the embedding adapter, q/v adapters and the lm_head copy (the
    harness of tests/test_peft_training.py): per-step losses within 1e-5."""
    monkeypatch.setattr(tests.test_peft_training, "batch", no_pad_batch)
    model, base, config, params = setup(checkpoints, "llama", seed=3)
    init = lj.export_peft(tmp_path / "init", params, config)
    pm = peft.PeftModel.from_pretrained(torch_model(checkpoints / "llama"), init,
                                        is_trainable=True).eval()
    ours, theirs = jax_losses(model, params), torch_losses(pm)
    rel = np.abs(np.array(ours) - np.array(theirs)) / np.abs(np.array(theirs))
    print(f"AdamW: loss {theirs[0]:.4f} -> {theirs[-1]:.4f}, max rel diff {rel.max():.1e}")
    assert theirs[-1] < theirs[0] - 0.05
    assert rel.max() < RTOL, rel


def test_checkpoint_round_trip(checkpoints, tmp_path):
    _, base, config, params = setup(checkpoints, "llama")
    lj.save_adapter(tmp_path / "a", params, config)
    back = lj.load_adapter(tmp_path / "a", base)
    for got, want in zip(jax.tree.leaves(lj.lora_params(back)),
                         jax.tree.leaves(lj.lora_params(params))):
        np.testing.assert_array_equal(got, want)
    assert lj.adapter_config(tmp_path / "a").modules_to_save == ("lm_head",)


def test_sharded_equals_one_device(checkpoints):
    """8 fake devices (dp2 x fsdp2 x tp2), params placed by sharding's rules (the embedding
    adapter like its table: lora_a [V, r] split over tp as V is, lora_b whole; the lm_head copy
    like lm_head): loss and gradients equal one device's."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sharding import make_mesh, param_shardings
    model, base, config, params = setup(checkpoints, "llama")
    mesh = make_mesh(dp=2, fsdp=2, tp=2)
    shardings = param_shardings(params, mesh)
    assert shardings["model"]["embed_tokens"]["lora_a"].spec == P("tp", None)
    assert shardings["model"]["embed_tokens"]["lora_b"].spec == P(None, None)
    assert (shardings["lm_head"]["saved_kernel"].spec == shardings["lm_head"]["kernel"].spec
            == P("fsdp", "tp"))
    ids = jnp.asarray(random_ids(4, 12))

    def loss_grads(p, x):
        base_, adapters = lj.split(p)
        return jax.value_and_grad(
            lambda a: ce(lj.apply(model, {"params": lj.combine(base_, a)}, x), x))(adapters)

    one = jit_fast(loss_grads)(params, ids)
    sharded = jit_fast(loss_grads)(jax.device_put(params, shardings),
                                  jax.device_put(ids, NamedSharding(mesh, P(("dp", "fsdp")))))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(one), jax.tree.leaves(sharded)):
        if getattr(path[-1], "key", None) == "lora_scale":  # frozen: zero gradient on both
            assert not np.asarray(a).any() and not np.asarray(b).any()
        else:
            assert rel_err(b, a) < RTOL, path


def test_nnx_refuses_embedding_targets_and_modules_to_save():
    from flax import nnx

    class Tiny(nnx.Module):
        def __init__(self, rngs):
            self.embed_tokens = nnx.Embed(10, 8, rngs=rngs)
            self.q_proj = nnx.Linear(8, 8, rngs=rngs)

    with pytest.raises(lj.LoraError, match="embedding"):
        lj.nnx.inject(Tiny(nnx.Rngs(0)), lj.LoraConfig(target_modules=["q_proj", "embed_tokens"]),
                      jax.random.key(0))
    with pytest.raises(lj.LoraError, match="modules_to_save"):
        lj.nnx.inject(Tiny(nnx.Rngs(0)), lj.LoraConfig(target_modules=["q_proj"],
                                                       modules_to_save=["q_proj"]),
                      jax.random.key(0))


def test_cli_trains_an_embedding_adapter_and_a_saved_head(tmp_path):
    """`--targets q_proj,embed_tokens --modules-to-save lm_head`: both train (the embedding's A
    leaves zero, the head copy leaves the frozen head), and the PEFT export carries them."""
    from examples import train as train_lib
    from examples.cli import parse_args
    from models import LlamaConfig
    model = models.build(LlamaConfig.tiny())
    models.save_hf(tmp_path / "llama", model, models.init_params(model, jax.random.key(0)))
    cfg = parse_args(["--model-path", str(tmp_path / "llama"), "--tokenizer", "bytes",
                      "--batch-size", "4", "--seq-len", "32", "--steps", "2", "--dp", "1",
                      "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--no-progress",
                      "--targets", "q_proj,embed_tokens", "--modules-to-save", "lm_head",
                      "--export-peft", str(tmp_path / "peft")])
    assert cfg.modules_to_save == ("lm_head",)
    out = train_lib.train(cfg)
    emb, head = out.params["model"]["embed_tokens"], out.params["lm_head"]
    assert np.abs(np.asarray(emb["lora_a"])).max() > 0
    assert np.abs(np.asarray(head["saved_kernel"]) - np.asarray(head["kernel"])).max() > 0
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["modules_to_save"] == ["lm_head"]
    assert "embed_tokens" in peft_cfg["target_modules"]
    back = lj.import_peft(tmp_path / "peft", lj.split(out.params)[0])
    jax.tree.map(np.testing.assert_array_equal, lj.lora_params(back), lj.lora_params(out.params))


@pytest.mark.parametrize("case,saved,tied", [("gpt2_tied", "wte", False),
                                             ("llama_tied", "embed_tokens", False),
                                             ("llama_tied", "embed_tokens", True)])
def test_saved_embedding_of_a_tied_model_equals_peft(checkpoints, tmp_path, case, saved, tied):
    """modules_to_save of a tied table: the lookup runs the trained copy; the head reads the
    original (PEFT's default) or, with ensure_weight_tying, the copy (PEFT ties its head to the
    copy). Export -> PEFT and PEFT's save -> import both give PEFT's logits."""
    model, base = models.load_hf(checkpoints / case)
    config = lj.LoraConfig(r=4, lora_alpha=8, target_modules=CASES[case][1][:1],
                           modules_to_save=[saved], ensure_weight_tying=tied)
    params = trained_like(config, base, 1)
    out = lj.export_peft(tmp_path / "p", params, config, **models.peft_naming(model))
    pm = peft.PeftModel.from_pretrained(torch_model(checkpoints / case), out).eval()
    with torch.no_grad():
        theirs = pm(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
    ids = jnp.asarray(IDS)
    assert rel_err(_apply(model, {"params": params}, ids, ensure_weight_tying=tied), theirs) < RTOL
    assert rel_err(_apply(model, {"params": params}, ids, ensure_weight_tying=not tied),
                   theirs) > 1e-2  # the head's choice of table matters
    pm.save_pretrained(tmp_path / "theirs")
    back = lj.import_peft(tmp_path / "theirs", base)
    assert rel_err(_apply(model, {"params": back}, ids, ensure_weight_tying=tied), theirs) < RTOL
