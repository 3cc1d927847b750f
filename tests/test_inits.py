"""Initialisations against the real HF PEFT library (torch CPU, float32, tiny GPT-2 and Llama):
PiSSA, pissa_niter_K, OLoRA and gaussian, and PEFT's conversion of a PiSSA/OLoRA adapter back
to plain LoRA for the original base (`export_peft(..., initial_adapters=)`).

Why products, not raw A and B: an SVD's singular pairs (and a QR's columns) are defined only up
to a sign per pair, and torch's and XLA's LAPACK calls may choose different signs (or rotate
within a repeated singular value). What PiSSA and OLoRA *mean* is sign-free: the product
`scale * A @ B` (the rank-r truncated SVD, or the projection of W onto its first r columns' span)
and the residual kernel `W - scale * A @ B`. Those, and the logits, are compared.

Tolerances: 1e-5 relative (max |diff| / max |ref|) on residual kernels, products and logits:
both sides run float32 SVD/QR (LAPACK gesdd/geqrf, different builds and blocking) on 32x32 to
32x128 matrices, whose results agree to a few ulps of the largest singular value; the base
models alone agree to ~3e-7 (tests/test_peft.py) and the injected model computes the same
function as the base up to one float32 rounding of the residual per weight.
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
from peft.tuners.lora import LoraLayer
from safetensors.numpy import load_file

import lora_jax as lj
import models
from lora_jax import inits
from lora_jax.merge import delta
from lora_jax.tree import modules_of
from tests.test_models_fixtures import VOCAB, rel_err
from tests.test_peft import (FAMILIES, checkpoints, our_logits, torch_logits,  # noqa: F401
                             torch_model)

RTOL = 1e-5


def configs(family: str, init, **kw):
    """Our LoraConfig and PEFT's, with rank and alpha patterns (so scales differ per module)."""
    targets, ranks, alphas = FAMILIES[family]
    fields = dict(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, **kw)
    return (lj.LoraConfig(rank_pattern=ranks, alpha_pattern=alphas, **fields),
            peft.LoraConfig(rank_pattern=dict(ranks), alpha_pattern=dict(alphas), **fields))


_INJECTED: dict = {}


def injected(checkpoints, family: str, init: str, scan: bool = False):
    """(model, base, params injected with `configs(family, init)` and key 0), computed once per
    module run: several tests share the same injected trees (eager SVDs are the slow part)."""
    key = (str(checkpoints), family, init, scan)
    if key not in _INJECTED:
        model, base = models.load_hf(checkpoints / family, scan_layers=scan)
        _INJECTED[key] = (model, base, lj.inject(base, configs(family, init)[0],
                                                 jax.random.key(0)))
    return _INJECTED[key]


def peft_modules(pm) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """`{HF module name: (residual kernel [in, out], scale * A @ B [in, out])}` of a PEFT model,
    in our layout (Linear weights are [out, in]; GPT-2's Conv1D weights are [in, out])."""
    out = {}
    for name, module in pm.base_model.model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        weight = module.get_base_layer().weight.detach().numpy()
        conv1d = type(module.get_base_layer()).__name__ == "Conv1D"
        a = module.lora_A["default"].weight.detach().numpy()
        b = module.lora_B["default"].weight.detach().numpy()
        prod = module.scaling["default"] * (b @ a).T
        out[name] = (weight if conv1d else weight.T, prod)
    return out


def our_modules(params) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The same for an unscanned tree of ours (its dotted paths are the HF names)."""
    out = {}
    for path, m in modules_of(params).items():
        if "lora_a" in m:
            prod = np.asarray(m["lora_scale"]) * np.asarray(delta(m["lora_a"], m["lora_b"], 2))
            out[path] = (np.asarray(m["kernel"]), prod)
    return out


def svd_tolerance(w: np.ndarray, rank: int) -> float:
    """1e-5, or the float32 conditioning of the rank-r truncated SVD if that is worse: by
    Wedin's theorem a perturbation E of W moves the top-r singular subspaces by about
    |E| / (S_r - S_{r+1}), and float32 LAPACK leaves |E| ~ eps * S_1 (times a small constant; 8
    here). The tiny random checkpoints have close singular values (gaps down to 1% of S_1), where
    torch's and XLA's SVDs, each correct to that bound, differ from each other (and from a
    float64 SVD) by up to ~1.5e-5 relative; the sum, residual + product, still equals W, so the
    logits keep 1e-5."""
    s = np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)
    eps = float(np.finfo(np.float32).eps)
    return max(RTOL, 8 * eps * s[0] / (s[rank - 1] - s[rank]))


# ---------------------------------------------------------------------------------------------
# PiSSA / OLoRA at init: equal to PEFT's, model output unchanged
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,init", [("llama", "pissa"), ("llama", "olora"),
                                         ("gpt2", "pissa")])
def test_init_equals_peft(checkpoints, tmp_path, family, init):  # noqa: F811
    """Residual kernels and products equal PEFT's; the injected model equals PEFT's and the
    base; a PEFT adapter saved with this init (unconverted) is refused by import_peft."""
    ours_cfg, peft_cfg = configs(family, init)
    pm = peft.get_peft_model(torch_model(checkpoints / family), peft_cfg).eval()
    model, base, params = injected(checkpoints, family, init)
    theirs, ours = peft_modules(pm), our_modules(params)
    assert sorted(theirs) == sorted(ours) and len(ours) == 2 * len(FAMILIES[family][0])
    worst = worst_err = 0.0
    for name, (kernel, prod) in theirs.items():
        w = np.asarray(modules_of(base)[name]["kernel"])
        tol = RTOL if init == "olora" else svd_tolerance(w, ours_cfg.rank_for(name))
        err = max(rel_err(ours[name][0], kernel), rel_err(ours[name][1], prod))
        worst, worst_err = max(worst, err / tol), max(worst_err, err)
        assert err < tol, (name, err, tol)
        # the kernel did change: by the whole rank-r part (far more than the tolerance)
        assert rel_err(ours[name][0], w) > 1e-2, name
    logits, base_logits = our_logits(model, params), our_logits(model, base)
    peft_logits = torch_logits(pm)
    print(f"{family} {init}: residual/product max rel err {worst_err:.1e} ({worst:.2f} of its "
          f"tolerance); logits vs "
          f"PEFT {rel_err(logits, peft_logits):.1e}, vs base {rel_err(logits, base_logits):.1e}")
    assert rel_err(logits, peft_logits) < RTOL and rel_err(logits, base_logits) < RTOL
    pm.save_pretrained(tmp_path / "unconverted")
    with pytest.raises(lj.LoraError, match="path_initial_model_for_weight_conversion"):
        lj.import_peft(tmp_path / "unconverted", base)


@pytest.mark.parametrize("init", ["pissa"])
def test_scanned_stack_equals_per_layer(checkpoints, init):  # noqa: F811
    """A scanned Llama's `[L, in, out]` kernels are factorised per layer (batched SVD/QR): the
    same residuals and products as the unscanned tree's, layer by layer (batched LAPACK calls
    may round differently: 1e-6 of each array's max), and the output is the base's."""
    flat = our_modules(injected(checkpoints, "llama", init)[2])
    model, base, params = injected(checkpoints, "llama", init, scan=True)
    for path, m in modules_of(params).items():
        if "lora_a" not in m:
            continue
        prods = np.asarray(m["lora_scale"])[:, None, None] * np.asarray(
            delta(m["lora_a"], m["lora_b"], 3))
        for i in range(2):
            name = path.replace("model.layers.", f"model.layers.{i}.")
            assert rel_err(np.asarray(m["kernel"][i]), flat[name][0]) < 1e-6, name
            assert rel_err(prods[i], flat[name][1]) < 1e-6, name
    assert rel_err(our_logits(model, params), our_logits(model, base)) < RTOL


def test_gpt2_olora_is_the_qr_of_the_torch_weight(checkpoints):  # noqa: F811
    """PEFT's olora_init runs QR on `base_layer.weight` without undoing Conv1D's `[in, out]`
    layout, so on GPT-2 it builds A/B of the wrong shapes and its forward fails (peft 0.21). We
    apply OLoRA's definition to the `[out, in]` weight as for Linear: checked against numpy's QR,
    and the model's output is unchanged."""
    config = configs("gpt2", "olora")[0]
    model, base = models.load_hf(checkpoints / "gpt2")
    params = lj.inject(base, config, jax.random.key(0))
    for name, (kernel, prod) in our_modules(params).items():
        w = np.asarray(modules_of(base)[name]["kernel"], np.float64)
        q, r = np.linalg.qr(w.T)
        rank = config.rank_for(name)
        want = config.scale_for(name) * (q[:, :rank] @ r[:rank]).T
        assert rel_err(prod, want) < RTOL and rel_err(kernel, w - want) < RTOL, name
    assert rel_err(our_logits(model, params), our_logits(model, base)) < RTOL


# ---------------------------------------------------------------------------------------------
# Training, then export for the ORIGINAL base (PEFT's path_initial_model_for_weight_conversion)
# ---------------------------------------------------------------------------------------------

def train(model, params, steps=3):
    """A few AdamW steps on the adapters (lr 1e-2: they move visibly)."""
    base, adapters = lj.split(params)
    tx = lj.optimizer(optax.adamw(1e-2), adapters)
    ids = jnp.asarray(np.random.RandomState(0).randint(3, VOCAB, (2, 12)), jnp.int32)

    @jax.jit
    def step(adapters, opt_state):
        def loss(a):
            logits = lj.apply(model, {"params": lj.combine(base, a)}, ids)
            return models.cross_entropy(logits, ids, shift=True)
        grads = jax.grad(loss)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state

    opt_state = tx.init(adapters)
    for _ in range(steps):
        adapters, opt_state = step(adapters, opt_state)
    return lj.combine(base, adapters)


@pytest.mark.parametrize("family,scan,init,rslora", [("llama", True, "olora", True),
                                                     ("gpt2", False, "pissa", False)])
def test_trained_export_loads_on_the_original_base(checkpoints, tmp_path, family, scan, init,
                                                   rslora):  # noqa: F811
    config = configs(family, init, use_rslora=rslora)[0]
    model, original = models.load_hf(checkpoints / family, scan_layers=scan)
    injected = lj.inject(original, config, jax.random.key(0))
    initial = lj.lora_params(injected)
    trained = train(model, injected)
    naming = models.peft_naming(model)
    with pytest.raises(lj.LoraError, match="initial_adapters="):
        lj.export_peft(tmp_path / "refused", trained, config, **naming)
    assert not (tmp_path / "refused").exists()
    out = lj.export_peft(tmp_path / "peft", trained, config, initial_adapters=initial, **naming)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["init_lora_weights"] is True and cfg["r"] == 8
    read = lj.LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=["x"],
                         use_rslora=cfg["use_rslora"], rank_pattern=cfg["rank_pattern"],
                         alpha_pattern=cfg["alpha_pattern"])
    names = {k[len("base_model.model."):].rsplit(".lora_", 1)[0]
             for k in load_file(str(out / "adapter_model.safetensors"))}
    assert len(names) == 2 * len(FAMILIES[family][0])
    for name in names:
        assert read.rank_for(name) == 2 * config.rank_for(name), name  # PEFT's doubling
        np.testing.assert_allclose(read.scale_for(name), config.scale_for(name), rtol=1e-7)
    pm = peft.PeftModel.from_pretrained(torch_model(checkpoints / family), out).eval()
    ours, theirs = our_logits(model, trained), torch_logits(pm)
    moved = rel_err(ours, our_logits(model, original))
    print(f"{family} scan={scan} {init} rslora={rslora}: trained moved logits by {moved:.1e}; "
          f"PEFT over the original base vs ours: {rel_err(ours, theirs):.1e}")
    assert moved > 1e-3  # training changed the model, so the check below means something
    assert rel_err(ours, theirs) < RTOL


def test_conversion_tensors_equal_peft_save_pretrained(checkpoints, tmp_path):  # noqa: F811
    """PEFT's own conversion of the same initial and trained adapters writes the same tensors,
    bit for bit, and an equivalent config (same rank and scale for every module)."""
    ours_cfg, peft_cfg = configs("llama", "pissa")
    model, _, start = injected(checkpoints, "llama", "pissa")
    initial, trained = lj.lora_params(start), train(model, start, steps=1)
    pm = peft.get_peft_model(torch_model(checkpoints / "llama"), peft_cfg).eval()

    def load(tree):  # our adapters into PEFT's modules (A [r, in], B [out, r])
        mods = modules_of(tree)
        with torch.no_grad():
            for name, module in pm.base_model.model.named_modules():
                if isinstance(module, LoraLayer):
                    module.lora_A["default"].weight.copy_(torch.from_numpy(
                        np.asarray(mods[name]["lora_a"]).T.copy()))
                    module.lora_B["default"].weight.copy_(torch.from_numpy(
                        np.asarray(mods[name]["lora_b"]).T.copy()))

    load(initial)
    pm.peft_config["default"].init_lora_weights = True  # PEFT's documented step
    pm.save_pretrained(tmp_path / "init")
    pm.peft_config["default"].init_lora_weights = "pissa"
    load(trained)
    pm.save_pretrained(tmp_path / "theirs",
                       path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    out = lj.export_peft(tmp_path / "ours", trained, ours_cfg, initial_adapters=initial)
    theirs, ours = (load_file(str(d / "adapter_model.safetensors"))
                    for d in (tmp_path / "theirs", out))
    assert sorted(theirs) == sorted(ours)
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key])
    a, b = (json.loads((d / "adapter_config.json").read_text()) for d in (tmp_path / "theirs", out))
    for name in our_modules(trained):
        pa, pb = (lj.LoraConfig(r=c["r"], lora_alpha=c["lora_alpha"], target_modules=["x"],
                                rank_pattern=c["rank_pattern"], alpha_pattern=c["alpha_pattern"])
                  for c in (a, b))
        assert (pa.rank_for(name), pa.scale_for(name)) == (pb.rank_for(name), pb.scale_for(name))
    assert a["init_lora_weights"] is True and b["init_lora_weights"] is True


def test_residual_base_and_conversion_contracts(checkpoints):  # noqa: F811
    """`residual_base(original, initial)` rebuilds inject's kernels bit for bit (what a resume
    relies on); `to_plain_lora` refuses initial adapters of another shape; an untrained
    conversion is a zero change (B' A' = B0 A0 - B0 A0, to float32 rounding)."""
    config = configs("llama", "pissa")[0]
    _, original, params = injected(checkpoints, "llama", "pissa", scan=True)
    initial = lj.lora_params(params)
    rebuilt = lj.residual_base(original, initial)
    for got, want in zip(jax.tree.leaves(rebuilt), jax.tree.leaves(lj.split(params)[0])):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    plain, start = modules_of(lj.to_plain_lora(params, initial)), modules_of(initial)
    for path, m in plain.items():
        if "lora_a" in m:
            a0, b0 = start[path]["lora_a"], start[path]["lora_b"]
            assert m["lora_a"].shape[-1] == m["lora_b"].shape[1] == 2 * a0.shape[-1]
            # A B - A0 B0 in one float32 matmul: zero up to the accumulation's rounding
            zero = float(jnp.abs(delta(m["lora_a"], m["lora_b"], 3)).max())
            assert zero < 1e-6 * float(jnp.abs(delta(a0, b0, 3)).max()), path
    other = lj.lora_params(lj.inject(original, config.__class__(
        **{**config.to_dict(), "r": 2, "rank_pattern": {}}), jax.random.key(0)))
    with pytest.raises(lj.LoraError, match="initial adapters do not fit"):
        lj.to_plain_lora(params, other)


# ---------------------------------------------------------------------------------------------
# pissa_niter_K and gaussian
# ---------------------------------------------------------------------------------------------

def test_pissa_niter_recovers_the_exact_svd():
    """A kernel with a decaying spectrum S_i = 0.7**i (64 x 48, r = 4): the randomized SVD's
    product `A @ B` against the exact SVD's. Halko et al.: the error of the rank-r range found
    with K subspace iterations shrinks like (S_r / S_{r-1})**(2K+1) = 0.7**(2K+1) times a modest
    constant; we allow 4x that (or float32's 1e-5 floor) and check that it falls with K."""
    rng = np.random.RandomState(0)
    u, _ = np.linalg.qr(rng.randn(64, 48))
    v, _ = np.linalg.qr(rng.randn(48, 48))
    w = jnp.asarray((u * 0.7 ** np.arange(48)) @ v.T, jnp.float32)
    scale = jnp.float32(2.0)
    a, b = inits.pissa_factors(w, 4, scale)
    exact = scale * a @ b
    errors = []
    for k in (2, 4, 8, 16):
        a, b = inits.pissa_factors(w, 4, scale, niter=k, key=jax.random.key(k))
        err = rel_err(scale * a @ b, exact)
        errors.append(err)
        assert err < max(4 * 0.7 ** (2 * k + 1), RTOL), (k, err)
    print("pissa_niter_K rel err of the rank-4 part, K = 2, 4, 8, 16:",
          ", ".join(f"{e:.1e}" for e in errors))
    assert errors[-1] < errors[0] / 100
    # wide kernels take the transposed route (torch's m < n branch): the same bound
    a, b = inits.pissa_factors(w.T, 4, scale, niter=8, key=jax.random.key(8))
    assert rel_err(scale * a @ b, exact.T) < 4 * 0.7 ** 17


def test_gaussian_a_std_is_one_over_r_and_b_zero():
    """PEFT: `nn.init.normal_(lora_A, std=1/r)`, B zeros. A [512, 8] holds n = 4096 draws: the
    sample std's relative standard error is 1/sqrt(2n) = 1.1%; we allow 5 sigma (5.5%), and the
    mean 5 standard errors (5 * (1/r) / sqrt(n))."""
    r = 8
    base = {"fc": {"kernel": jnp.zeros((512, 256))}}
    params = lj.inject(base, lj.LoraConfig(r=r, target_modules=["fc"],
                                           init_lora_weights="gaussian"), jax.random.key(0))
    a = np.asarray(params["fc"]["lora_a"], np.float64)
    assert abs(a.std() * r - 1) < 5 / np.sqrt(2 * a.size)
    assert abs(a.mean()) < 5 / r / np.sqrt(a.size)
    assert not np.asarray(params["fc"]["lora_b"]).any()


# ---------------------------------------------------------------------------------------------
# config, NNX, mesh
# ---------------------------------------------------------------------------------------------

def test_config_validates_init_names():
    for good in (True, False, "gaussian", "pissa", "olora", "pissa_niter_0", "pissa_niter_16"):
        lj.LoraConfig(target_modules=["q"], init_lora_weights=good)
    for bad in ("loftq", "PiSSA", "pissa_niter_", "pissa_niter_x", 1, None):
        with pytest.raises(lj.LoraError, match="'pissa_niter_K'.*'olora'"):
            lj.LoraConfig(target_modules=["q"], init_lora_weights=bad)
    with pytest.raises(lj.LoraError, match="positive scale"):
        lj.inject({"q": {"kernel": jnp.ones((8, 8))}},
                  lj.LoraConfig(r=2, lora_alpha=-2, target_modules=["q"],
                                init_lora_weights="pissa"), jax.random.key(0))


@pytest.mark.parametrize("init", ["pissa"])
def test_nnx_inject_replaces_the_kernel_as_linen(init):
    """`lj.nnx.inject` rewrites each targeted layer's kernel in place: the same tree as the
    Linen `inject` (same float32 code, so equal to 1e-6 of each array's max; the Linen tree's
    logits equal the base's, tested above)."""
    from examples.nnx_llama import from_linen
    config = models.LlamaConfig.tiny()
    linen = models.build(config)
    params = models.init_params(linen, jax.random.key(0))
    lora = lj.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=init)
    model = lj.nnx.inject(from_linen(config, params), lora, jax.random.key(1))
    want = lj.inject(params, lora, jax.random.key(1))
    got = lj.nnx.params(model)
    assert jax.tree.structure(want) == jax.tree.structure(got)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got)):
        assert rel_err(x, y) < 1e-6, path
    original = modules_of(params)
    changed = [p for p, m in modules_of(got).items() if "lora_a" in m]
    assert changed and all(rel_err(modules_of(got)[p]["kernel"], original[p]["kernel"]) > 1e-2
                           for p in changed)  # the model's own kernels were replaced


def test_sharded_inject_equals_one_device(checkpoints):  # noqa: F811
    """pissa_niter_2 injected under jit on a (dp2, fsdp2, tp2) mesh with the partition rules' output
    shardings (`sharding.init_sharded`, as the CLI does): the SVD runs on the mesh (XLA gathers
    each kernel for LAPACK) and the residual kernels come back split like the base. Same tree
    as the same jitted inject on one device to 1e-5 of each array's max (measured ~5e-6): the
    subspace iterations' matmuls `W @ Q` run split over the mesh, so their float32 sums are
    reordered (~1e-7), and the QR/SVD amplify that by the spectrum's conditioning (the gaps of
    these random kernels are a few % of S_1, see svd_tolerance); same logits to 1e-5."""
    from sharding import init_sharded, make_mesh, param_shardings
    # q_proj is column-parallel (kernel split on out), down_proj row-parallel (split on in)
    config = lj.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                           init_lora_weights="pissa_niter_2")
    model, base = models.load_hf(checkpoints / "llama", scan_layers=True)
    mesh = make_mesh(dp=2, fsdp=2, tp=2)
    sharded_base = jax.device_put(base, param_shardings(base, mesh))
    inject = lambda p: lj.inject(p, config, jax.random.key(0))  # noqa: E731
    sharded = init_sharded(inject, sharded_base, mesh=mesh)
    single = jax.jit(inject)(base)
    worst = worst_err = 0.0
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(sharded),
                            jax.tree.leaves(single)):
        worst = max(worst, rel_err(np.asarray(x), np.asarray(y)))
    print(f"pissa_niter_2 sharded vs one device: max rel err {worst:.1e}")
    assert worst < RTOL
    q = sharded["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding == sharded_base["model"]["layers"]["self_attn"]["q_proj"]["kernel"].sharding
    logits = our_logits(model, sharded)
    assert rel_err(logits, our_logits(model, single)) < RTOL
    assert rel_err(logits, our_logits(model, base)) < RTOL  # the model is unchanged at init


# ---------------------------------------------------------------------------------------------
# CLI: --init
# ---------------------------------------------------------------------------------------------

def test_cli_init_pissa_resume_and_exports(tmp_path, capsys):
    """`--init pissa` through `examples.train.main` on a tiny Llama: the initial adapters are
    saved once in the checkpoint dir; a run stopped after 1 of 3 steps and resumed logs the
    uninterrupted run's losses exactly (same residual base, rebuilt from the saved initial
    adapters); --init is one of the settings a resume compares; without --resume
    the saved initial adapters are never replaced; both adapter outputs are converted for the
    ORIGINAL base (rank 2r) and reproduce the trained model there (1e-5, float32 rounding of
    W_res + s(AB) vs W + s(AB - A0B0)); the merged export is the trained model."""
    from examples import train as train_lib
    from examples.cli import parse_args
    from tests.test_examples_train import flags, losses
    config = models.LlamaConfig.tiny()
    plain = models.build(config)
    original = models.init_params(plain, jax.random.key(0))
    models.save_hf(tmp_path / "llama", plain, original)
    base_flags = lambda tmp, *extra: flags(str(tmp_path / "llama"), tmp, "--dp", "1",  # noqa: E731
                                           "--init", "pissa", "--eval-interval", "0", *extra,
                                           steps=3)
    (tmp_path / "whole").mkdir()
    out = train_lib.train(parse_args(base_flags(
        tmp_path / "whole", "--adapter-out", str(tmp_path / "adapter"), "--export-peft",
        str(tmp_path / "peft"))))
    parted = base_flags(tmp_path, "--checkpoint-dir", str(tmp_path / "ckpt"), "--save-every", "1")
    assert train_lib.main(parted + ["--stop-after", "1"]) == 0
    saved = tmp_path / "ckpt" / "initial_adapters"
    stamp = sorted((p.name, p.stat().st_mtime_ns) for p in saved.rglob("*"))
    assert saved.is_dir() and stamp
    settings = train_lib.run_settings(parse_args(parted), out.lora_config, "x", np.zeros(3))
    assert settings["--init"] == "pissa"  # a resume with another --init is refused
    assert train_lib.main(parted + ["--overwrite"]) == 2  # no --resume: the files are kept
    assert "initial adapters of an earlier run" in capsys.readouterr().err
    assert train_lib.main(parted + ["--resume"]) == 0
    np.testing.assert_array_equal(losses(tmp_path / "metrics.jsonl"),
                                  losses(tmp_path / "whole" / "metrics.jsonl"))
    # on a dp2 x tp2 mesh (the SVD on sharded kernels, the residual base split by the rules):
    # the single-device losses to 1e-5 (tests/test_examples_train.py's float32 bar)
    (tmp_path / "mesh").mkdir()
    assert train_lib.main(base_flags(tmp_path / "mesh", "--dp", "2", "--tp", "2")) == 0
    np.testing.assert_allclose(losses(tmp_path / "mesh" / "metrics.jsonl"),
                               losses(tmp_path / "whole" / "metrics.jsonl"), rtol=0, atol=1e-5)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in saved.rglob("*")) == stamp

    ids = jnp.asarray([list(b"Shall I compare thee to a summer's day?")])
    adapted = jax.jit(functools.partial(lj.apply, out.model))  # traced once per tree layout
    want = np.asarray(adapted({"params": out.params}, ids))
    assert rel_err(want, jax.jit(plain.apply)({"params": original}, ids)) > 1e-3  # it trained
    for restored in (lj.import_peft(tmp_path / "peft", original),
                     lj.load_adapter(tmp_path / "adapter", original)):
        assert rel_err(adapted({"params": restored}, ids), want) < RTOL
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["init_lora_weights"]) == (8, 16, True)
    assert lj.adapter_config(tmp_path / "adapter").init_lora_weights is True


def test_cli_init_flag_values():
    from examples.cli import parse_args
    from examples.modeling import lora_config
    for flag, want in (("default", True), ("gaussian", "gaussian"), ("olora", "olora"),
                       ("pissa_niter_4", "pissa_niter_4")):
        assert lora_config(parse_args(["--init", flag])).init_lora_weights == want
    with pytest.raises(SystemExit):
        parse_args(["--init", "loftq"])
    with pytest.raises(ValueError, match="--adapter-in loads"):
        parse_args(["--init", "pissa", "--adapter-in", "x"])


def test_dense_general_and_bf16_kernels():
    """A DenseGeneral kernel `[d, heads, head_dim]` is factorised as the linear map it is, its
    flattened `[d, heads * head_dim]` matrix (the same matrix PEFT's export writes), and a
    bfloat16 kernel keeps its dtype: residual computed in float32 then cast (as PEFT), adapters
    in float32. Checked against numpy's float64 SVD of the flattened kernel (1e-5; 1e-2 for the
    bf16 residual, bfloat16's 8-bit mantissa), and the model's output is unchanged."""
    import flax.linen as nn

    class Net(nn.Module):
        dtype: object = jnp.float32

        @nn.compact
        def __call__(self, x):
            h = nn.DenseGeneral((4, 8), name="qkv", param_dtype=self.dtype)(x)
            return nn.Dense(16, name="out", param_dtype=self.dtype)(h.reshape(*h.shape[:-2], 32))

    x = jax.random.normal(jax.random.key(3), (2, 16))
    for dtype, tol in ((jnp.float32, RTOL), (jnp.bfloat16, 1e-2)):
        model = Net(dtype)
        variables = model.init(jax.random.key(0), x)
        config = lj.LoraConfig(r=3, lora_alpha=6, target_modules=["qkv", "out"],
                               init_lora_weights="pissa")
        params = lj.inject(variables, config, jax.random.key(1),
                           layouts=lj.kernel_layouts(model, variables, x))["params"]
        qkv = params["qkv"]
        assert qkv["kernel"].dtype == dtype and qkv["lora_a"].dtype == jnp.float32
        assert qkv["lora_a"].shape == (16, 3) and qkv["lora_b"].shape == (3, 4, 8)
        w = np.asarray(variables["params"]["qkv"]["kernel"], np.float64).reshape(16, 32)
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        top = (u[:, :3] * s[:3]) @ vt[:3]
        prod = 2.0 * np.asarray(delta(qkv["lora_a"], qkv["lora_b"], 3)).reshape(16, 32)
        assert rel_err(prod, top) < RTOL
        assert rel_err(np.asarray(qkv["kernel"], np.float64).reshape(16, 32), w - top) < tol
        got = lj.apply(model, {"params": params}, x)
        assert rel_err(got, model.apply(variables, x)) < tol


def test_inits_benchmark_smoke(capsys):
    """`python -m benchmarks.inits_time` on the tiny shape (CPU): one JSON row per framework
    and init, and lora-jax's residual + s·A·B gives each kernel back (1e-5)."""
    from benchmarks import inits_time
    assert inits_time.main(["--shape", "tiny", "--layers", "1", "--rank", "4",
                            "--inits", "pissa_niter_2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]
    assert [(r["framework"], r["init"]) for r in rows] == [
        ("lora-jax", "pissa_niter_2"), ("peft", "pissa_niter_2")]
    assert all(r["seconds"] > 0 for r in rows)
    assert all(r["residual_check"] < RTOL for r in rows if r["framework"] == "lora-jax")
