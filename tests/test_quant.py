"""QLoRA: frozen kernels stored in NF4 / int8 / FP8 (`models.quant`).

Tolerances, and why each can fail:
- bitsandbytes parity: NF4 codes and block absmax are *identical* (same code book, same
  float32 arithmetic: x * (1 / absmax), nearest code, ties down), so the dequantised values
  are equal bit for bit without double quantisation. With double quantisation the 4-bit codes
  are identical; bnb's CPU kernel picks the 8-bit absmax code by an approximate binary search
  (BinSearch), which in about 0.1-1% of blocks returns the neighbour of the nearest code, and
  its float32 mean (the offset) may differ from ours in the last few bits (4e-6 relative). We
  pick the nearest; the test checks that every block where the two differ is one where bnb's
  choice is *not* nearer than ours, within 1% of the gap between the two codes, and bounds the
  value error there by one step of the 8-bit map.
- Round trip: elementwise bounds derived from each format's grid (NF4: half the widest gap of
  the code book times the block absmax; int8: half a step; e4m3: 2^-4 relative, or half the
  subnormal step 2^-10 of the scale). A wrong layout, scale or packing gives errors of order 1.
- Matmul/model: nf4 and int8 compute `x @ dequantize(W)` exactly as a dense layer with the
  dequantised kernel does: float32 within 1e-5 relative. FP8 also quantises the activations per
  call (e4m3, e5m2 for the gradient): 8e-2 / 1.2e-1 as in tests/test_fp8.py.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
from models.llama import Llama, LlamaConfig
from models.loss import cross_entropy
from models.quant import (DYNAMIC_MAP, NF4_CODE, Fp8Kernel, Int8Kernel, Nf4Kernel, QuantDense,
                          quantize, quantize_nf4, quantize_params, quantized_matmul)

FORMATS = ("nf4", "int8", "fp8")
MODEL = dict(hidden_size=128, intermediate_size=256,  # in % 64 == 0 for every projection
             num_hidden_layers=1)


def gaussian(shape, seed=0, std=0.02):
    return (std * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def rel(a, b):
    return float(jnp.linalg.norm(jnp.asarray(a, jnp.float32) - b) / jnp.linalg.norm(b))


# ----------------------------------------------------------------------------- bitsandbytes


@pytest.fixture(scope="module")
def bnb():
    return pytest.importorskip("bitsandbytes.functional")


def bnb_quantize(bnb, w, double_quant):
    import torch
    return bnb.quantize_4bit(torch.from_numpy(np.ascontiguousarray(w.T)), blocksize=64,
                             compress_statistics=double_quant, quant_type="nf4")


@pytest.mark.parametrize("shape", [(128, 48), (320, 40), (64, 1000)])
def test_nf4_equals_bitsandbytes_without_double_quant(bnb, shape):
    w = gaussian(shape, seed=shape[0])
    packed, state = bnb_quantize(bnb, w, double_quant=False)
    q = quantize_nf4(jnp.asarray(w), double_quant=False)
    # Our codes are [in/2, out]; bnb's flat [out, in/2] bytes: the same bytes transposed.
    np.testing.assert_array_equal(np.asarray(q.codes).T.reshape(-1), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.absmax).T.reshape(-1), state.absmax.numpy())
    np.testing.assert_array_equal(np.asarray(q.dequantize(jnp.float32)),
                                  bnb.dequantize_4bit(packed, state).numpy().T)
    np.testing.assert_array_equal(np.asarray(NF4_CODE), state.code.numpy())


@pytest.mark.parametrize("shape", [(128, 48), (320, 40), (64, 1000)])
def test_nf4_double_quant_matches_bitsandbytes(bnb, shape):
    w = gaussian(shape, seed=shape[0])
    packed, state = bnb_quantize(bnb, w, double_quant=True)
    q = quantize(jnp.asarray(w), "nf4")
    np.testing.assert_array_equal(np.asarray(q.codes).T.reshape(-1), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(DYNAMIC_MAP, bnb.create_dynamic_map().numpy())
    # The offset is a float32 mean over all block scales and absmax2 is taken after subtracting
    # it: summed in another order than torch's (XLA fuses the jitted quantiser), they differ by
    # a few float32 ulps (measured 1.0e-6 relative); 4e-6 is still far below a wrong formula.
    np.testing.assert_allclose(np.asarray(q.absmax2), state.state2.absmax.numpy(), rtol=4e-6)
    np.testing.assert_allclose(float(q.offset), float(state.offset), rtol=4e-6)
    ours = np.asarray(q.absmax).T.reshape(-1).astype(int)
    theirs = state.absmax.numpy().astype(int)
    differ = np.nonzero(ours != theirs)[0]
    assert len(differ) <= max(2, 0.01 * len(ours)), f"{len(differ)} of {len(ours)} scale codes"
    # Where they differ, ours is the nearest code (bnb's approximate search is not).
    _, plain = bnb_quantize(bnb, w, double_quant=False)
    target = (plain.absmax.numpy() - float(q.offset)) / np.repeat(np.asarray(q.absmax2), 256)[
        :len(ours)]
    for i in differ:
        gap = abs(DYNAMIC_MAP[ours[i]] - DYNAMIC_MAP[theirs[i]])
        assert abs(ours[i] - theirs[i]) == 1
        assert abs(target[i] - DYNAMIC_MAP[ours[i]]) <= abs(target[i] - DYNAMIC_MAP[theirs[i]]) \
            + 0.01 * gap
    ref = bnb.dequantize_4bit(packed, state).numpy().T
    deq = np.asarray(q.dequantize(jnp.float32))
    # Equal up to float32 rounding except in the blocks whose scale code differs, where the
    # difference is at most one 8-bit map step (<= 0.0625 of the group absmax) of the scale.
    max_step = float(np.max(np.diff(DYNAMIC_MAP))) * float(np.max(np.asarray(q.absmax2)))
    err = np.abs(deq - ref)
    assert float(err.max()) <= max_step + 1e-7
    if len(differ) == 0:
        np.testing.assert_allclose(deq, ref, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_within_the_format_grid(fmt):
    w = jnp.asarray(gaussian((256, 96), seed=3))
    q = quantize(w, fmt)
    assert q.shape == w.shape and q.ndim == 2 and q.dtype == w.dtype
    deq = np.asarray(q.dequantize(jnp.float32))
    err = np.abs(deq - np.asarray(w))
    if fmt == "nf4":
        half_gap = float(np.max(np.diff(NF4_CODE))) / 2
        block_max = np.abs(np.asarray(w)).reshape(4, 64, 96).max(axis=1)  # [in/64, out]
        # The absmax itself is 8-bit double quantised: allow its step (<= 1/16 of the group max).
        bound = half_gap * np.repeat(block_max, 64, axis=0) + 0.07 * np.max(block_max)
        assert np.all(err <= bound)
        assert rel(deq, w) < 0.12  # NF4 on Gaussian weights: ~0.09
    elif fmt == "int8":
        assert np.all(err <= np.asarray(q.scale)[None, :] / 2 + 1e-9)
        assert rel(deq, w) < 0.01
    else:
        scale = np.asarray(q.scale)[None, :]
        assert np.all(err <= np.maximum(np.abs(np.asarray(w)) * 2.0 ** -4, scale * 2.0 ** -10)
                      + 1e-9)
        assert q.codes_t.shape == (96, 256) and q.codes_t.dtype == jnp.float8_e4m3fn


@pytest.mark.parametrize("fmt", FORMATS)
def test_stacked_kernels_quantise_per_layer(fmt):
    w = jnp.asarray(gaussian((3, 128, 32), seed=4))
    deq = jax.jit(lambda w: quantize(w, fmt).dequantize(jnp.float32))
    q = quantize(w, fmt)
    assert q.shape == (3, 128, 32)
    stacked = deq(w)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(stacked[i]), np.asarray(deq(w[i])))


def test_bad_shapes_and_formats_are_refused():
    with pytest.raises(ValueError, match="divisible by 64"):
        quantize(jnp.ones((96, 8)), "nf4")
    with pytest.raises(ValueError, match="use one of"):
        quantize(jnp.ones((64, 8)), "nf3")
    with pytest.raises(ValueError, match="quantize='int4'"):
        LlamaConfig.tiny(quantize="int4")
    with pytest.raises(ValueError, match="input features"):
        quantized_matmul(jnp.ones((2, 32)), quantize(jnp.ones((64, 8)), "int8"))


# ----------------------------------------------------------------------------- the matmul


@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul_and_input_gradient_equal_the_dequantised_kernel(fmt):
    x = jnp.asarray(gaussian((2, 8, 128), seed=5, std=1.0))
    q = quantize(jnp.asarray(gaussian((128, 64), seed=6)), fmt)
    w = q.dequantize(jnp.float32)
    f = lambda x: jnp.sum(jnp.sin(quantized_matmul(x, q, jnp.float32)))
    ref = lambda x: jnp.sum(jnp.sin(x @ w))
    fwd_tol, grad_tol = (8e-2, 1.2e-1) if fmt == "fp8" else (1e-5, 1e-5)
    assert rel(quantized_matmul(x, q, jnp.float32), x @ w) < fwd_tol
    assert rel(jax.grad(f)(x), jax.grad(ref)(x)) < grad_tol
    # The frozen kernel's cotangent is zero (float0 for integer codes).
    gq = jax.grad(lambda q: jnp.sum(quantized_matmul(x, q, jnp.float32)), allow_int=True)(q)
    for leaf in jax.tree.leaves(gq):
        if leaf.dtype != jax.dtypes.float0:
            assert not np.any(np.asarray(leaf, np.float32))


def _kernel_sized_float_residuals(f, *args, n_in, n_out):
    from jax._src.ad_checkpoint import saved_residuals
    found = []
    for aval, _ in saved_residuals(f, *args):
        if jnp.issubdtype(aval.dtype, jnp.floating) and aval.dtype.itemsize >= 2 and \
                sorted(aval.shape[-2:]) == sorted((n_in, n_out)):
            found.append(aval)
    return found


@pytest.mark.parametrize("fmt", FORMATS)
def test_no_dequantised_kernel_is_kept_for_the_backward(fmt):
    """The forward's residuals hold the quantised leaves and no float [in, out] kernel; the
    same computation written naively (dequantise, then a dense matmul) keeps one: the check can
    fail."""
    n_in, n_out = 256, 192
    x = jnp.ones((4, n_in), jnp.bfloat16)
    q = quantize(jnp.asarray(gaussian((n_in, n_out), seed=7)), fmt, dtype=jnp.bfloat16)
    ours = lambda x: jnp.sum(quantized_matmul(x, q, jnp.bfloat16))
    naive = lambda x: jnp.sum(x @ q.dequantize(jnp.bfloat16))
    assert _kernel_sized_float_residuals(ours, x, n_in=n_in, n_out=n_out) == []
    assert _kernel_sized_float_residuals(naive, x, n_in=n_in, n_out=n_out) != []


# ----------------------------------------------------------------------------- the model


def tiny(fmt, **kw):
    return Llama(LlamaConfig.tiny(quantize=fmt, **MODEL, **kw))


@jax.jit
def dequantised(params):
    return jax.tree.map(lambda k: k.dequantize() if hasattr(k, "dequantize") else k, params,
                        is_leaf=lambda k: hasattr(k, "dequantize"))


@pytest.fixture(scope="module")
def ids():
    return jnp.asarray(np.random.default_rng(0).integers(0, 500, (2, 8)), jnp.int32)


@pytest.mark.parametrize("fmt", FORMATS)
def test_lora_over_a_quantised_llama(fmt, ids):
    """inject / apply / grads / merge / PEFT export over a quantised scanned Llama: equal to the
    same adapters over the dense model whose kernels are the dequantised ones."""
    model, dense = tiny(fmt, scan_layers=True), Llama(LlamaConfig.tiny(**MODEL, scan_layers=True))
    params = jax.jit(lambda k: model.init(k, ids)["params"])(jax.random.key(0))
    q_proj = params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert type(q_proj) is {"nf4": Nf4Kernel, "int8": Int8Kernel, "fp8": Fp8Kernel}[fmt]
    assert not hasattr(params["lm_head"]["kernel"], "dequantize")  # the head stays dense
    config = lj.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                           init_lora_weights=False)
    p = lj.inject(params, config, jax.random.key(1))
    ref = dequantised(p)
    base, adapters = lj.split(p)
    _, ref_adapters = lj.split(ref)

    def loss(model, base):
        return lambda a: cross_entropy(lj.apply(model, {"params": lj.combine(base, a)}, ids),
                                       ids, shift=True)

    (l, g), (lr, gr) = (jax.jit(jax.value_and_grad(loss(model, base)))(adapters),
                        jax.jit(jax.value_and_grad(loss(dense, lj.split(ref)[0])))(ref_adapters))
    tol = (8e-2, 1.2e-1) if fmt == "fp8" else (1e-5, 1e-5)
    assert abs(float(l) - float(lr)) <= tol[0] * abs(float(lr))
    for path in ("q_proj", "down_proj"):
        sub = "self_attn" if path == "q_proj" else "mlp"
        for leaf in ("lora_a", "lora_b"):
            got = g["model"]["layers"][sub][path][leaf]
            want = gr["model"]["layers"][sub][path][leaf]
            assert rel(got, want) < tol[1]
    # Merge dequantises, adds, and writes the kernel's own dtype as a plain array.
    merged = jax.jit(lj.merge)(p)
    mk = merged["model"]["layers"]["mlp"]["up_proj"]["kernel"]
    assert isinstance(mk, jax.Array) and mk.dtype == jnp.float32
    want = np.asarray(jax.jit(lj.merge)(ref)["model"]["layers"]["mlp"]["up_proj"]["kernel"])
    # float32 rounding of kernel + scale * A @ B (a fusion may round once less: FMA), relative
    # to the kernel's magnitude since the sum can cancel.
    np.testing.assert_allclose(np.asarray(mk), want, rtol=0, atol=1e-6 * np.abs(want).max())
    if fmt != "fp8":
        y = jax.jit(functools.partial(lj.apply, model))({"params": p}, ids)
        np.testing.assert_allclose(np.asarray(jax.jit(dense.apply)({"params": merged}, ids)),
                                   np.asarray(y), rtol=1e-5, atol=1e-5)


def test_peft_export_of_a_qlora_adapter_is_the_plain_export(tmp_path, ids):
    """The adapter file does not depend on how the base is stored: exporting over the NF4 base
    writes the same tensors as over the dequantised base (which PEFT then loads as usual)."""
    from safetensors.numpy import load_file
    import models
    model = tiny("nf4")
    params = jax.jit(lambda k: model.init(k, ids)["params"])(jax.random.key(0))
    config = lj.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                           init_lora_weights=False)
    p = lj.inject(params, config, jax.random.key(1))
    naming = models.peft_naming(model)
    lj.export_peft(tmp_path / "q", p, config, **naming)
    lj.export_peft(tmp_path / "d", dequantised(p), config, **naming)
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("q", "d"))
    assert sorted(a) == sorted(b) and len(a) == 4  # 1 layer x (q, v) x (A, B)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_quantize_params_matches_a_quantised_init(ids):
    """Quantising a dense tree (what loading does) gives the tree a quantised model runs."""
    dense = Llama(LlamaConfig.tiny(**MODEL))
    params = jax.jit(lambda k: dense.init(k, ids)["params"])(jax.random.key(0))
    qparams = quantize_params(params, "int8")
    model = tiny("int8")
    y = model.apply({"params": qparams}, ids)
    np.testing.assert_allclose(np.asarray(y), np.asarray(dense.apply(
        {"params": dequantised(qparams)}, ids)), rtol=1e-5, atol=1e-5)
    structure = jax.tree.structure(jax.eval_shape(lambda k: model.init(k, ids)["params"],
                                                  jax.random.key(0)))
    assert jax.tree.structure(qparams) == structure
    # summary counts a quantised kernel as the weights it stands for (NF4 packs two per byte).
    for fmt in FORMATS:
        assert lj.summary(quantize_params(params, fmt)).total == lj.summary(params).total


class OneLayer(nn.Module):
    @nn.compact
    def __call__(self, x):  # no dtype: the adapter runs in the kernel's dequantised dtype
        return QuantDense(64, quant="int8", dtype=None, param_dtype=jnp.float32, name="proj")(x)


def test_quant_dense_is_adapted_by_the_interceptor():
    layer = OneLayer()
    x = jnp.asarray(gaussian((3, 128), seed=8, std=1.0))
    params = layer.init(jax.random.key(0), x)["params"]
    p = lj.inject(params, lj.LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False),
                  jax.random.key(1))
    m = p["proj"]
    w = m["kernel"].dequantize(jnp.float32)
    want = x @ w + float(m["lora_scale"]) * (x @ m["lora_a"]) @ m["lora_b"]
    np.testing.assert_allclose(np.asarray(lj.apply(layer, {"params": p}, x)), np.asarray(want),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["nf4", "fp8"])
def test_sharded_equals_one_device(fmt):
    """dp2 x fsdp2 x tp2 (GSPMD, the quantised leaves split by the kernel's rules) gives the
    loss and adapter gradients of one device: float32, 1e-5 (reduction order only). nf4 covers
    codes/absmax in the kernel layout, fp8 the transposed codes_t and per-channel scales."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from sharding import BATCH_AXES, make_mesh, param_shardings
    model = tiny(fmt, scan_layers=True)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 500, (4, 8)), jnp.int32)
    params = jax.jit(lambda k: model.init(k, ids)["params"])(jax.random.key(0))
    p = lj.inject(params, lj.LoraConfig(r=4, target_modules="all-linear",
                                        init_lora_weights=False), jax.random.key(1))
    base, adapters = lj.split(p)

    def loss(a, base, ids):
        return cross_entropy(lj.apply(model, {"params": lj.combine(base, a)}, ids), ids,
                             shift=True)

    step = jax.jit(jax.value_and_grad(loss))
    l1, g1 = step(adapters, base, ids)
    mesh = make_mesh(dp=2, fsdp=2, tp=2)
    shard = param_shardings(p, mesh)
    p8 = jax.device_put(p, shard)
    kernel = p8["model"]["layers"]["mlp"]["down_proj"]["kernel"]
    codes = kernel.codes if fmt == "nf4" else kernel.codes_t
    assert codes.sharding.spec == (P(None, "tp", "fsdp") if fmt == "nf4"
                                   else P(None, "fsdp", "tp"))
    base8, adapters8 = lj.split(p8)
    l8, g8 = step(adapters8, base8, jax.device_put(ids, NamedSharding(mesh, P(BATCH_AXES))))
    np.testing.assert_allclose(float(l8), float(l1), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                   atol=1e-5 * float(np.max(np.abs(np.asarray(b)))))


def test_load_hf_quantises_tensor_by_tensor(tmp_path, monkeypatch, ids):
    """`load_hf(quantize=)` gives the tree `quantize_params` gives from the dense load, placed
    by the partition rules, and reads each projection's float tensor one layer at a time."""
    import models
    from models import hf_io
    from sharding import leaf_sharding, make_mesh
    dense = Llama(LlamaConfig.tiny(**{**MODEL, "num_hidden_layers": 2}))
    params = jax.jit(lambda k: dense.init(k, ids)["params"])(jax.random.key(0))
    models.save_hf(tmp_path / "ckpt", dense, params)
    reads = []
    real = hf_io._read_leaf
    monkeypatch.setattr(hf_io, "_read_leaf", lambda src, *a: reads.append(
        (src.dotted, len(src.names))) or real(src, *a))
    mesh = make_mesh(dp=2, fsdp=2, tp=2)
    model, q = models.load_hf(tmp_path / "ckpt", quantize="nf4", scan_layers=True,
                              shardings=leaf_sharding(mesh))
    kernel_reads = [n for path, n in reads if path.endswith("proj.kernel")]
    assert kernel_reads and set(kernel_reads) == {1}  # one layer's tensor per read
    _, stacked = models.load_hf(tmp_path / "ckpt", scan_layers=True)
    want = quantize_params(stacked, "nf4")
    assert jax.tree.structure(q) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(q), jax.tree.leaves(want)):
        if jnp.issubdtype(a.dtype, jnp.integer):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # codes: identical
        else:  # the double quant's mean, summed in another order on 8 devices: float32 ulps
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)
    codes = q["model"]["layers"]["self_attn"]["q_proj"]["kernel"].codes
    assert codes.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tp")
    # The sharded run sums in another order: float32, 1e-5 of the logits' scale.
    apply = jax.jit(model.apply)
    got, ref = (np.asarray(apply({"params": t}, ids)) for t in (q, want))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.slow
def test_cli_quantize_flag(tmp_path, capsys):
    """`--quantize nf4` trains LoRA over the NF4 base; the merged export writes plain kernels
    (an unadapted one is exactly the dequantised NF4 kernel); --tp > 1 parses, DoRA and the
    base-rewriting inits are refused clearly."""
    import json
    import models
    from examples import train as train_lib
    from examples.cli import parse_args
    config = LlamaConfig.tiny(num_hidden_layers=1)
    dense = models.build(config)
    params = models.init_params(dense, jax.random.key(0))
    models.save_hf(tmp_path / "ckpt", dense, params)
    args = ["--model-path", str(tmp_path / "ckpt"), "--tokenizer", "bytes", "--batch-size", "4",
            "--seq-len", "16", "--steps", "3", "--rank", "4", "--lr", "1e-2", "--dp", "1",
            "--no-progress", "--targets", "q_proj,v_proj", "--quantize", "nf4",
            "--metrics-file", str(tmp_path / "m.jsonl"), "--export-merged",
            str(tmp_path / "merged"), "--export-peft", str(tmp_path / "peft")]
    assert train_lib.main(args) == 0
    losses = [r["loss"] for r in map(json.loads, open(tmp_path / "m.jsonl")) if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    _, merged = models.load_hf(tmp_path / "merged" / "hf")
    layer = merged["model"]["layers"]["0"]["self_attn"]
    want = quantize(params["model"]["layers"]["0"]["self_attn"]["k_proj"]["kernel"],
                    "nf4").dequantize(jnp.float32)
    np.testing.assert_array_equal(np.asarray(layer["k_proj"]["kernel"]), np.asarray(want))
    assert (tmp_path / "peft" / "adapter_model.safetensors").exists()
    assert parse_args(["--quantize", "nf4", "--tp", "2", "--sp"]).tp == 2  # tests/test_quant_tp
    with pytest.raises(ValueError, match="--dora"):
        parse_args(["--quantize", "nf4", "--dora"])
    with pytest.raises(ValueError, match="--init pissa rewrites the base"):
        parse_args(["--quantize", "int8", "--init", "pissa"])


@pytest.mark.slow
def test_qlora_benchmark_smoke():
    """`benchmarks.qlora --tiny` runs a lora-jax row end to end on CPU and reports it."""
    from benchmarks import qlora
    rows = qlora.main(["--tiny", "--only", "fp8-stored"])
    assert len(rows) == 1 and "error" not in rows[0], rows
    assert rows[0]["opts"]["quant"] == "fp8" and np.isfinite(rows[0]["loss"])
