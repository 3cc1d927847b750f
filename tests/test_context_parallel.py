"""Context parallelism (sharding/context.py): ring attention over sequence chunks equals plain
attention on one device, forward and backward, and the tiny Llama with LoRA split over cp
(alone and with dp) gives one device's logits, loss and adapter gradients.

Tolerance: float32, 1e-5 absolute and relative (tests/sharding_common.py). The ring computes the
same softmax as one device, only accumulated chunk by chunk (rescaled running max and sum), so
results differ by float32 reordering: ~1e-7 relative per operation, observed <= 1e-6 here.
"""
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
import models
from models.llama import Llama, LlamaConfig
from models.loss import cross_entropy
from sharding import (CP, ContextParallelism, MeshError, collective_counts, collectives,
                      make_mesh, ring_attention, shard_batch, shard_params, shift_labels,
                      vocab_parallel_cross_entropy, zigzag_order)
from tests.sharding_common import (TOL, assert_trees_close, compile_fast, lora_logits_loss_grads,
                                   run_fast)

B, S, HQ, HKV, D = 2, 16, 4, 2, 8          # GQA: two query heads per key/value head


def cp_mesh(cp, dp=1, fsdp=1, tp=1):
    return make_mesh(dp=dp, fsdp=fsdp, tp=tp, cp=cp, devices=jax.devices()[:dp * fsdp * tp * cp])


def qkv(seed=0, seq=S):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(B, seq, h, D)), jnp.float32)
                 for h in (HQ, HKV, HKV))


def attention_and_grads(attn, q, k, v):
    """(out, d(sum(out * w))/d(q, k, v)) for a fixed random cotangent w."""
    w = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)
    out, vjp = jax.vjp(attn, q, k, v)
    return out, vjp(w)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("cp,dp,block", [(2, 1, None), (4, 1, 512), (2, 2, 3)],
                         ids=["cp2", "cp4", "dp2_cp2_blocks2"])
def test_ring_attention_matches_one_device(cp, dp, block, causal):
    """Whole chunks (block None, or 512 > the chunk), and chunks of 8 keys folded 2 at a time
    (3 rounds down to the largest divisor, 2): the inner scan's running softmax."""
    q, k, v = qkv()
    plain = functools.partial(jax.nn.dot_product_attention, is_causal=causal)
    ring = functools.partial(ring_attention, mesh=cp_mesh(cp, dp), causal=causal,
                             block_size=block)
    out_ref, grads_ref = run_fast(functools.partial(attention_and_grads, plain), q, k, v)
    out, grads = run_fast(functools.partial(attention_and_grads, ring), q, k, v)
    np.testing.assert_allclose(out, out_ref, **TOL)
    assert_trees_close(grads, grads_ref, **TOL)


@pytest.mark.parametrize("cp,dp,block", [(2, 1, None), (4, 2, 2)], ids=["cp2", "dp2_cp4_blocks"])
def test_zigzag_ring_matches_one_device(cp, dp, block):
    """The load-balanced layout: inputs in zig-zag order; after the first step each device
    computes only the unmasked half of a chunk pair (lax.cond on the source's index), forward
    and backward. Equal to plain causal attention permuted the same way."""
    q, k, v = qkv(seq=2 * S)
    order = zigzag_order(2 * S, cp)
    plain = functools.partial(jax.nn.dot_product_attention, is_causal=True)
    ring = functools.partial(ring_attention, mesh=cp_mesh(cp, dp), layout="zigzag",
                             block_size=block)
    # attention_and_grads's cotangent w is drawn for the zig-zag order: the reference's is
    # w[:, argsort(order)], i.e. compare through a permuted cotangent.
    w = jnp.asarray(np.random.default_rng(9).normal(size=q.shape), jnp.float32)
    out_ref, vjp = jax.vjp(plain, q, k, v)
    grads_ref = vjp(w[:, np.argsort(order)])
    out, grads = run_fast(functools.partial(attention_and_grads, ring),
                          q[:, order], k[:, order], v[:, order])
    np.testing.assert_allclose(out, out_ref[:, order], **TOL)
    assert_trees_close(grads, tuple(g[:, order] for g in grads_ref), **TOL)
    assert list(zigzag_order(8, 2)) == [0, 1, 6, 7, 2, 3, 4, 5]
    with pytest.raises(MeshError, match="not divisible by 8"):
        zigzag_order(12, 4)


def test_ring_over_another_axis():
    """The ring may run over any mesh axis, e.g. tp's devices (issue 18: "over the tp or a cp
    axis"), with a batch that does not split over dp (kept whole on each device)."""
    q, k, v = qkv()
    mesh = make_mesh(dp=2, tp=4)
    out = run_fast(functools.partial(ring_attention, mesh=mesh, axis="tp"), q[:1], k[:1], v[:1])
    ref = run_fast(functools.partial(jax.nn.dot_product_attention, is_causal=True),
                   q[:1], k[:1], v[:1])
    np.testing.assert_allclose(out, ref, **TOL)


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_ring_passes_chunks_and_never_gathers_keys_or_values(layout):
    """Forward and backward programs: k/v chunks move by collective-permute, n - 1 hops at
    least, and there is no all-gather (nor any other collective) that would assemble them."""
    cp = 4
    q, k, v = qkv()
    ring = functools.partial(ring_attention, mesh=cp_mesh(cp), layout=layout)
    for fn in (ring, functools.partial(attention_and_grads, ring)):
        text = compile_fast(fn, q, k, v).as_text()
        counts = collective_counts(text)
        assert set(counts) == {"collective-permute"}, counts
        assert counts["collective-permute"] >= cp - 1, counts
        shapes = {shape for op in collectives(text) for shape in op.shapes}
        assert shapes == {(B, S // cp, HKV, D)}, shapes     # one k/v (or dk/dv) chunk each


def test_ring_refuses_a_sequence_that_does_not_split():
    q, k, v = qkv(seq=S + 2)
    with pytest.raises(MeshError, match="not divisible by it.*multiple of 4"):
        ring_attention(q, k, v, mesh=cp_mesh(4))
    with pytest.raises(MeshError, match="sequence length 18 is not divisible"):
        shard_batch(np.zeros((B, S + 2), np.int32), cp_mesh(4))
    q, k, v = qkv()
    with pytest.raises(MeshError, match="already splits the batch"):
        ring_attention(q, k, v, mesh=cp_mesh(2, dp=2), axis="dp")
    with pytest.raises(ValueError, match="block_size=0"):
        ring_attention(q, k, v, mesh=cp_mesh(2), block_size=0)
    with pytest.raises(MeshError, match="share batch, sequence"):
        ring_attention(q, k[:, :8], v[:, :8], mesh=cp_mesh(2))


# ---------------------------------------------------------------------------------------------
# The tiny Llama (GQA 4:2, RoPE with llama3 scaling), scanned, adapters on every linear layer
# with random B so every adapter gradient is non-zero.

CONFIG = LlamaConfig.tiny(scan_layers=True)
LORA = lj.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)



@functools.lru_cache(maxsize=None)
def reference():
    ids = np.random.default_rng(0).integers(0, CONFIG.vocab_size, (4, S), np.int32)
    params = run_fast(lambda key: Llama(CONFIG).init(key, ids)["params"], jax.random.key(0))
    base, adapters = lj.split(run_fast(lambda p: lj.inject(p, LORA, jax.random.key(1)), params))
    out = run_fast(functools.partial(lora_logits_loss_grads, Llama(CONFIG)), adapters, base, ids)
    return base, adapters, ids, out


@pytest.mark.parametrize("dp,fsdp,cp,remat", [(1, 1, 2, "none"), (1, 1, 4, "none"),
                                               (2, 1, 2, "dots_saveable"), (1, 2, 2, "none")],
                         ids=["cp2", "cp4", "dp2_cp2_remat", "fsdp2_cp2"])
def test_llama_with_lora_under_context_parallelism_matches_one_device(dp, fsdp, cp, remat):
    """Remat (the training scripts' dots_saveable) re-runs the ring's custom-VJP forward in the
    backward pass; the numbers do not change."""
    base, adapters, ids, (logits_ref, loss_ref, grads_ref) = reference()
    mesh = cp_mesh(cp, dp, fsdp)
    model = Llama(dataclasses.replace(CONFIG, remat_policy=remat), ContextParallelism(mesh=mesh))
    batch = shard_batch(ids, mesh)
    assert batch.sharding.spec[1] == CP
    logits, loss, grads = run_fast(functools.partial(lora_logits_loss_grads, model),
                                   shard_params(adapters, mesh), shard_params(base, mesh), batch)
    np.testing.assert_allclose(logits, logits_ref, **TOL)
    np.testing.assert_allclose(loss, loss_ref, **TOL)
    assert_trees_close(grads, grads_ref, **TOL)


def test_llama_with_zigzag_layout_matches_one_device():
    """The balanced layout in the model: tokens, targets and positions in zig-zag order (RoPE
    and the causal mask follow the positions); the logits are one device's, permuted, and the
    loss and adapter gradients are one device's."""
    base, adapters, ids, (logits_ref, loss_ref, grads_ref) = reference()
    cp = 4
    mesh = cp_mesh(cp)
    order = zigzag_order(S, cp)
    targets = np.asarray(shift_labels(jnp.asarray(ids)))[:, order]
    model = Llama(CONFIG, ContextParallelism(mesh=mesh, layout="zigzag"))

    def run(adapters, base, ids, targets):
        def loss_fn(adapters):
            logits = lj.apply(model, {"params": lj.combine(base, adapters)}, ids,
                              positions=jnp.asarray(order)[None])
            return cross_entropy(logits, targets), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(adapters)
        return logits, loss, grads

    logits, loss, grads = run_fast(run, shard_params(adapters, mesh), shard_params(base, mesh),
                                   shard_batch(ids[:, order], mesh),
                                   shard_batch(targets, mesh))
    np.testing.assert_allclose(logits, logits_ref[:, order], **TOL)
    np.testing.assert_allclose(loss, loss_ref, **TOL)
    assert_trees_close(grads, grads_ref, **TOL)


def test_context_parallelism_refusals():
    from examples.cli import TrainConfig, check

    with pytest.raises(MeshError, match="does not combine with tensor parallelism"):
        ContextParallelism(mesh=cp_mesh(2, tp=2))
    with pytest.raises(ValueError, match="--cp 2 does not combine with --tp 2"):
        check(TrainConfig(cp=2, tp=2))
    with pytest.raises(MeshError, match="no 'cp' axis"):
        ContextParallelism(mesh=make_mesh(dp=2, devices=jax.devices()[:2]))
    model = Llama(LlamaConfig.tiny(), ContextParallelism(mesh=cp_mesh(2)))
    ids = jnp.zeros((2, 8), jnp.int32)
    params = jax.eval_shape(Llama(LlamaConfig.tiny()).init, jax.random.key(0), ids)
    with pytest.raises(MeshError, match="no attention_mask"):
        jax.eval_shape(functools.partial(model.apply, attention_mask=jnp.ones_like(ids)),
                       params, ids)
    with pytest.raises(MeshError, match="sequence length 7 is not divisible"):
        jax.eval_shape(model.apply, params, ids[:, :7])


def test_cp_axis_exists_only_when_asked_for():
    assert make_mesh(dp=8).axis_names == ("dp", "fsdp", "tp")
    assert make_mesh(dp=8, cp=1).axis_names == ("dp", "fsdp", "tp")
    mesh = make_mesh(dp=2, cp=-1)
    assert mesh.axis_names == ("dp", "fsdp", "cp", "tp") and dict(mesh.shape)["cp"] == 4
    with pytest.raises(MeshError, match="x cp=3"):
        make_mesh(dp=2, cp=3)


@pytest.mark.parametrize("dp,cp", [(1, 4), (2, 2)])
def test_vocab_parallel_loss_splits_tokens_over_cp(dp, cp):
    """The training CLI's loss takes cp-split hidden states and labels: each device scores its
    own chunk, token sums added over cp; the same mean as one device, value and gradient."""
    rng = np.random.default_rng(3)
    hidden = jnp.asarray(rng.normal(size=(4, S, 16)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(16, 64)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 64, (4, S)), jnp.int32)
    mask = jnp.asarray(rng.random((4, S)) > 0.3)

    def plain(hidden, head):
        return cross_entropy(hidden @ head, labels, mask)

    mesh = cp_mesh(cp, dp)
    split = functools.partial(vocab_parallel_cross_entropy, labels=labels, mask=mask, mesh=mesh,
                              chunk_size=32)
    ref = run_fast(jax.value_and_grad(plain, argnums=(0, 1)), hidden, head)
    got = run_fast(jax.value_and_grad(lambda h, w: split(h, w), argnums=(0, 1)), hidden, head)
    assert_trees_close(got, ref, **TOL)


def test_training_cli_with_cp_logs_the_single_device_losses(tmp_path):
    """`examples.train --dp 2 --cp 2` (sequence chunks in the default zig-zag order, positions
    in the batch, ring attention, the cp-split loss) logs the losses of one device within 1e-5
    (float32, losses ~6). No eval: it is the same loss function, and its compile would double
    the test's time."""
    from examples import train as train_lib

    ckpt = tmp_path / "llama"
    model = Llama(LlamaConfig.tiny())
    models.save_hf(ckpt, model, models.init_params(model, jax.random.key(0)))
    logs = {}
    for name, layout in {"single": ["--dp", "1"], "dp2_cp2": ["--dp", "2", "--cp", "2"]}.items():
        logs[name] = tmp_path / f"{name}.jsonl"
        assert train_lib.main([
            "--model-path", str(ckpt), "--tokenizer", "bytes", "--batch-size", "4",
            "--seq-len", "32", "--steps", "3", "--eval-interval", "0", "--rank", "4",
            "--lr", "1e-2", "--no-progress", "--metrics-file", str(logs[name]), *layout]) == 0
    read = {name: [json.loads(line) for line in open(path)] for name, path in logs.items()}
    ref, got = ([r["loss"] for r in read[n]] for n in ("single", "dp2_cp2"))
    assert len(ref) == len(got) == 3
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
