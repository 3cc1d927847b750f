"""Long context on one device: the sequence-chunked MLP (`mlp_chunk`), the offloaded layer
boundaries (`remat_policy="offload_layer_input[:f]"`) and the benchmarks' `--layers` /
`--compile-only`. Tiny float32 Llamas; the CPU backend has a pinned-host memory space, so the
offload policy really moves the saved layer inputs there and its gradients are compared."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals  # public print_saved_residuals prints only

import lora_jax as lj
import remat_policies
from benchmarks import jax_worker, max_fit
from models.chunking import check_chunk, chunked_mlp
from models.llama import Llama, LlamaConfig

SHAPE = dict(vocab_size=128, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
IDS = (jnp.arange(32, dtype=jnp.int32).reshape(2, 16) * 7) % 128
LORA = lj.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)  # B != 0


@jax.jit
def _params():
    model = Llama(LlamaConfig.from_hf_dict(SHAPE, scan_layers=True))
    return lj.inject(model.init(jax.random.key(0), IDS)["params"], LORA, jax.random.key(1))


PARAMS = _params()  # scanned layout; unstacked for the unscanned models


def _setup(scan: bool, **options):
    """(model, base, adapters, loss) of the tiny model with `options`; the same weights for
    every option."""
    from models.layout import unstack_layers
    model = Llama(LlamaConfig.from_hf_dict(SHAPE, scan_layers=scan, **options))
    base, adapters = lj.split(PARAMS if scan else unstack_layers(PARAMS))

    def loss(a):
        logits = lj.apply(model, {"params": lj.combine(base, a)}, IDS)
        return jnp.mean(logits.astype(jnp.float32) ** 2), logits

    return model, base, adapters, loss


def _logits_and_grads(scan: bool, **options):
    _, _, adapters, loss = _setup(scan, **options)
    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(adapters)
    return logits, grads


def _assert_close(got, want, rtol):
    """Per leaf: max |got - want| <= rtol * max |want| (a float32 sum reassociated over the
    chunks moves each value by a few ulp of the leaf's largest entry, not of itself)."""
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        if path[-1].key not in ("lora_a", "lora_b"):  # lora_scale: a constant, no gradient
            continue
        scale = float(jnp.max(jnp.abs(w)))
        assert scale > 0, path  # every adapter gets a gradient
        err = float(jnp.max(jnp.abs(g - w)))
        assert err <= rtol * scale, (jax.tree_util.keystr(path), err, scale)


# Float32. Chunking runs the same per-token matmuls on slices, so the logits agree to rounding
# of the blocked matmul; adapter gradients sum over tokens, and the chunked backward adds the
# chunks' partial sums in another order: ~1e-7 relative measured, 2e-6 leaves room for XLA's
# fusion choices while any real error (a missed adapter, a wrong chunk order) is O(1).
CHUNK_RTOL = 2e-6


@pytest.mark.parametrize("scan", [True, False])
def test_chunked_mlp_equals_the_unchunked_model(scan):
    """(With the layer remat too: test_offloaded_boundaries_give_the_full_remat_gradients.)"""
    want_logits, want_grads = _logits_and_grads(scan)
    got_logits, got_grads = _logits_and_grads(scan, mlp_chunk=4)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-6, atol=1e-6)
    _assert_close(got_grads, want_grads, CHUNK_RTOL)
    # The interceptor adapted the MLP inside the chunk loop: its adapters changed the output.
    _, base, adapters, loss = _setup(scan, mlp_chunk=4)
    no_mlp_lora = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 0 if "mlp" in jax.tree_util.keystr(p) else x, adapters)
    assert float(jnp.max(jnp.abs(jax.jit(loss)(no_mlp_lora)[1] - got_logits))) > 1e-3


def _width_residuals(loss, adapters, width) -> int:
    return sum(r[0].ndim >= 3 and r[0].shape[-1] == width
               for r in saved_residuals(lambda a: loss(a)[0], adapters))


def test_chunked_mlp_keeps_no_full_length_intermediates():
    """Without any layer remat the plain MLP keeps its [B, T, intermediate] activations for
    the backward pass; chunked, each chunk is recomputed and nothing that wide is kept."""
    _, _, adapters, plain = _setup(False)
    _, _, _, chunked = _setup(False, mlp_chunk=8)
    width = SHAPE["intermediate_size"]
    assert _width_residuals(plain, adapters, width) >= 2
    assert _width_residuals(chunked, adapters, width) == 0


def _logits(scan: bool, **options):
    _, _, adapters, loss = _setup(scan, **options)
    return jax.jit(loss)(adapters)[1]


def test_chunk_errors():
    with pytest.raises(ValueError, match="mlp_chunk=5 does not divide the sequence length 16"):
        _logits(True, mlp_chunk=5)
    assert check_chunk(16, 4) == 4
    for bad in (0, -8, True, 2.5, "64"):
        with pytest.raises(ValueError, match="positive number of tokens"):
            LlamaConfig.from_hf_dict(SHAPE, mlp_chunk=bad)
    # A call no longer than one chunk (decoding, a short prompt) runs unchunked.
    np.testing.assert_array_equal(_logits(False, mlp_chunk=64), _logits(False))

    class OtherParallelism:  # anything but NoParallelism: the shard_map layers split T
        pass
    cfg = LlamaConfig.from_hf_dict(SHAPE, mlp_chunk=4)
    with pytest.raises(NotImplementedError, match="mlp_chunk=4 is not supported"):
        chunked_mlp(None, jnp.zeros((1, 16, 32)), cfg, OtherParallelism())


def test_offload_policy_names():
    assert remat_policies.offload_fraction("offload_layer_input") == 1.0
    assert remat_policies.offload_fraction("offload_layer_input:0.25") == 0.25
    assert remat_policies.offload_fraction("full") is None
    assert callable(remat_policies.resolve("offload_layer_input:0.5"))
    assert "offload_layer_input[:fraction]" in remat_policies.policy_names()
    for bad in ("offload_layer_input:1.5", "offload_layer_input:half"):
        with pytest.raises(ValueError, match="fraction of each layer input"):
            LlamaConfig.from_hf_dict(SHAPE, remat_policy=bad)


def test_an_offloading_policy_lets_the_pinned_host_pool_grow(monkeypatch):
    """XLA caps its GPU pinned host pool at 64 GB unless XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB says
    otherwise; an offloading policy raises it to 90% of RAM (a user's value stays), before the
    backend starts: from the CLI's flag parsing and the benchmarks' variant parsing."""
    env = remat_policies.HOST_MEMORY_LIMIT_ENV
    monkeypatch.delenv(env, raising=False)
    assert remat_policies.allow_pinned_host_memory("dots_saveable") is None
    assert env not in os.environ
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    assert remat_policies.allow_pinned_host_memory("offload_layer_input:0.5") == str(
        int(0.9 * ram_gb)) == os.environ[env]
    monkeypatch.setenv(env, "7")
    assert remat_policies.allow_pinned_host_memory("offload_layer_input") == "7"
    with pytest.raises(ValueError, match="fraction of each layer input"):
        remat_policies.allow_pinned_host_memory("offload_layer_input:2")

    from examples.cli import run_cli
    seen = []
    for argv, want in ((["--remat", "offload_layer_input:0.75"], str(int(0.9 * ram_gb))),
                       (["--remat", "full"], None)):
        monkeypatch.delenv(env, raising=False)
        assert run_cli(lambda cfg: seen.append(os.environ.get(env)), argv) == 0
        assert seen[-1] == want
    monkeypatch.delenv(env, raising=False)
    jax_worker.parse_variant(["remat=offload_layer_input:0.75"])
    assert os.environ[env] == str(int(0.9 * ram_gb))


@pytest.mark.parametrize("scan,policy,part", [(True, "offload_layer_input:0.25", 4),
                                               (False, "offload_layer_input", 1)])
def test_offloaded_boundaries_give_the_full_remat_gradients(scan, policy, part):
    """The CPU backend has a pinned-host memory space: the saved layer inputs (all of each, or
    a quarter of its tokens) are placed there (the residuals' avals say `<host>`), and the
    gradients equal plain full recomputation's. With the chunked MLP inside the remat."""
    _, want = _logits_and_grads(scan, remat_policy="full")
    layers, (batch, length), dim = SHAPE["num_hidden_layers"], IDS.shape, SHAPE["hidden_size"]
    _, got = _logits_and_grads(scan, remat_policy=policy, mlp_chunk=8)
    # The same layer maths replayed from the same saved inputs; only the MLP's chunked
    # reductions reorder float32 sums (CHUNK_RTOL's reasoning).
    _assert_close(got, want, CHUNK_RTOL)
    _, _, adapters, loss = _setup(scan, remat_policy=policy)
    saved = [str(r[0]) for r in saved_residuals(lambda a: loss(a)[0], adapters)]
    host = [s for s in saved if "<host>" in s]
    offloaded = length // part
    if scan:  # one stacked value: every layer's offloaded tokens
        assert host == [f"float32<host>[{layers},{batch},{offloaded},{dim}]"], saved
    else:
        assert host == [f"float32<host>[{batch},{offloaded},{dim}]"] * layers, saved
    if part > 1:  # the rest of each input stays on the device
        rest = f"{batch},{length - offloaded},{dim}]"
        assert (f"float32[{layers},{rest}" if scan else f"float32[{rest}") in saved, saved


def test_benchmark_layers_and_compile_only(monkeypatch):
    opts = jax_worker.parse_variant(["attn=xla", "mlp_chunk=16",
                                     "remat=offload_layer_input:0.5"])
    cfg, model, base, adapters = jax_worker.build("tiny", opts, 1, 32, layers=1, abstract=True)
    assert cfg.num_hidden_layers == 1 and cfg.mlp_chunk == 16
    assert isinstance(jax.tree.leaves(base)[0], jax.ShapeDtypeStruct)  # nothing allocated
    # max_fit's compile-only worker: each size compiled, XLA's accounting as the row's peak.
    attempt, _, label = max_fit.jax_attempt("tiny", "remat=offload_layer_input:0.5,mlp_chunk=16",
                                            (1, 32), layers=1, compile_only=True)
    rows = max_fit.search([(1, 32)], attempt)
    assert "mlp_chunk=16" in label and rows[0]["fits"] and rows[0]["layers"] == 1
    memory = rows[0]["memory"]
    assert rows[0]["peak_gib"] == pytest.approx(memory["argument_gib"] + memory["output_gib"]
                                                - memory["alias_gib"] + memory["temp_gib"])
    assert rows[0]["peak_gib"] > 0 and rows[0]["step_s"] is None
    # The driver passes both flags to the worker and refuses them for PEFT.
    seen = []
    monkeypatch.setattr(max_fit, "run_worker", lambda cmd, timeout: (seen.append(cmd) or
                                                                     ([], {}, None)))
    args = max_fit.parse_args(["--shape", "8b", "--frameworks", "jax", "--batches", "1",
                               "--layers", "2", "--compile-only", "--seqs", "524288"])
    record = max_fit.run_config(max_fit.configs(args)[0], args)
    assert seen[0][-3:] == ["--layers", "2", "--compile-only"]
    assert record["layers"] == 2 and record["mode"] == "compile-only"
    with pytest.raises(SystemExit):
        max_fit.parse_args(["--frameworks", "jax", "peft-eager", "--layers", "2"])



def test_cli_mlp_chunk_reaches_the_model_and_bad_chunks_are_refused():
    """`examples.train --mlp-chunk N` sets the model's `mlp_chunk` (whose parity with the
    unchunked model the tests above check), with the offloading remat policy by name; bad
    chunks are refused before any work."""
    from examples.cli import TrainConfig, check, parse_args
    from examples.modeling import model_config
    cfg = parse_args(["--model", "llama3", "--seq-len", "32", "--mlp-chunk", "8",
                      "--remat", "offload_layer_input:0.5"])
    check(cfg)
    config, _ = model_config(cfg)
    assert config.mlp_chunk == 8 and config.remat_policy == "offload_layer_input:0.5"
    assert model_config(parse_args(["--model", "llama3"]))[0].mlp_chunk is None
    for kw, message in ((dict(mlp_chunk=5), "does not divide --seq-len"),
                        (dict(mlp_chunk=0), ">= 1"),
                        (dict(mlp_chunk=8, tp=2, sp=True), "--tp 1")):
        with pytest.raises(ValueError, match=message):
            check(TrainConfig(seq_len=32, **kw))
