"""Throughput of LoRA training across GPUs: data, tensor+sequence, and data x tensor parallelism.

Trains a random-weight Llama-3 shape in bf16 (scanned layers, remat, cuDNN attention, LoRA r=16
on the seven projections, AdamW on the adapters) under each layout and prints one JSON line per
layout: tokens/s per GPU, its ratio to one GPU, peak memory, and the losses next to one GPU's.

Every layout trains the same model replica batch (`--batch` sequences) from the same weights on
the same tokens: data parallelism gives each replica an identical copy, so the mean loss, the
gradients and the whole loss curve equal one GPU's up to bf16 rounding, and tokens/s per GPU is
directly comparable (weak scaling: dp multiplies the tokens per step, tp divides the work).

Each layout runs in its own process (clean device memory); `--layouts` picks them:
  1gpu       one device (the reference; always run first)
  dp         dp = all GPUs
  tp_sp      tp = --tp (default: all GPUs), sequence parallel
  dp_tp_sp   tp = --tp (default 4), dp = the rest, sequence parallel
  fsdp_tp    fsdp = the rest, tp = --tp
  or explicit sizes: dp=2,fsdp=1,tp=4,sp=1 (cp=N: context parallelism, ring attention, tp=1;
             zz=1 with it: the load-balanced zig-zag layout; cm=1 with tp>1, sp=1: collective
             matmul, sp's all-gather / reduce-scatter as ppermute rings, sharding.collective_matmul)

    python -m benchmarks.parallel_throughput --shape 8b --batch 4 --seq 2048 --steps 8
    python -m benchmarks.parallel_throughput --shape 1b --layouts 1gpu dp tp_sp dp=2,tp=4,sp=1
    python -m benchmarks.parallel_throughput --shape 8b --batch 1 --seq 16384 --layouts 1gpu cp=2
    python -m benchmarks.parallel_throughput --shape tiny --attn xla --tp 2 --seq 64 --steps 2
        (with XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu)
    python -m benchmarks.parallel_throughput --shape 8b --batch 4 --quantize nf4 \
        --layouts 1gpu tp_sp fsdp_tp       (QLoRA: the base stored quantised, models.quant)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

PRESETS = ("1gpu", "dp", "tp_sp", "dp_tp_sp")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="1b", help="1b | 8b | tiny (benchmarks/shapes.py)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per model replica")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layouts", nargs="+", default=list(PRESETS),
                    help="presets and/or explicit sizes such as dp=2,tp=4,sp=1")
    ap.add_argument("--tp", type=int, default=None, help="tensor-parallel size of tp layouts")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--remat", default="dots_saveable")
    ap.add_argument("--attn", default="cudnn", help="cudnn | xla (use xla on CPU)")
    ap.add_argument("--adapter-dtype", default="bfloat16")
    ap.add_argument("--chunk", type=int, default=4096, help="loss chunk (tokens or vocab)")
    ap.add_argument("--quantize", choices=("nf4", "int8", "fp8"), default=None,
                    help="store the frozen block projections quantised (QLoRA's base)")
    ap.add_argument("--layout", default=None, help=argparse.SUPPRESS)  # child-process mode
    return ap.parse_args(argv)


def layout_sizes(name: str, n: int, tp: int | None) -> dict:
    """{dp, fsdp, tp, sp} of a preset or of "dp=2,fsdp=1,tp=4,sp=1"."""
    if "=" in name:
        sizes = {k: int(v) for k, v in (kv.split("=") for kv in name.split(","))}
        return {"dp": 1, "fsdp": 1, "tp": 1, "sp": 0, **sizes}
    tp_default = min(4, n) if name in ("dp_tp_sp", "fsdp_tp") else n
    t = tp or tp_default
    presets = {"1gpu": dict(dp=1, fsdp=1, tp=1, sp=0), "dp": dict(dp=n, fsdp=1, tp=1, sp=0),
               "tp_sp": dict(dp=1, fsdp=1, tp=t, sp=1),
               "dp_tp_sp": dict(dp=n // t, fsdp=1, tp=t, sp=1),
               "fsdp_tp": dict(dp=1, fsdp=n // t, tp=t, sp=0)}
    if name not in presets:
        raise SystemExit(f"unknown layout {name!r}: use {sorted(presets)} or dp=..,tp=..,sp=..")
    return presets[name]


# ---------------------------------------------------------------------------------------------
# Child: one layout, one JSON line.


def run_layout(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    import lora_jax as lj
    import sharding
    from benchmarks.shapes import DEFAULT_BATCH, SHAPES, TARGETS
    from models.llama import Llama, LlamaConfig, head_kernel

    # ---- mesh
    sizes = layout_sizes(args.layout, jax.device_count(), args.tp)
    cp = sizes.get("cp", 1)
    n_dev = sizes["dp"] * sizes["fsdp"] * sizes["tp"] * cp
    mesh = sharding.make_mesh(dp=sizes["dp"], fsdp=sizes["fsdp"], tp=sizes["tp"], cp=cp,
                              devices=jax.devices()[:n_dev])
    sp = bool(sizes["sp"])

    # ---- model
    cfg = LlamaConfig.from_hf_dict(SHAPES[args.shape], dtype=jnp.bfloat16,
                                   param_dtype=jnp.bfloat16, scan_layers=True,
                                   remat_policy=args.remat, attention_impl=args.attn,
                                   quantize=args.quantize)
    sharding.check_config_fits(mesh, cfg)
    batch = args.batch or DEFAULT_BATCH[args.shape]
    replicas = sizes["dp"] * sizes["fsdp"]
    sharding.check_batch_fits(mesh, batch=batch * replicas, seq=args.seq, sequence_parallel=sp)
    lora = lj.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                         adapter_dtype=args.adapter_dtype)
    order = sharding.zigzag_order(args.seq, cp) if sizes.get("zz") else None
    model = Llama(cfg, sharding.ContextParallelism(
        mesh=mesh, layout="zigzag" if order is not None else "contiguous") if cp > 1 else
        sharding.TensorParallelism(mesh=mesh, sequence_parallel=sp,
                                   collective_matmul=bool(sizes.get("cm"))))

    # ---- shard: base, adapters and optimizer state born sharded
    def init_params(key):
        params = Llama(cfg).init(key, jnp.zeros((1, 8), jnp.int32))["params"]
        return lj.split(lj.inject(params, lora, jax.random.fold_in(key, 1)))

    key = jax.random.key(0)
    tx = lj.optimizer(optax.adamw(1e-4, weight_decay=0.0), jax.eval_shape(init_params, key)[1])

    def init(key):
        base, adapters = init_params(key)
        return base, adapters, tx.init(adapters)

    shardings = sharding.param_shardings(jax.eval_shape(init, key), mesh)
    base, adapters, opt_state = jax.jit(init, out_shardings=shardings)(key)

    # ---- step
    loss_fn, ce = make_loss(cfg, model, mesh, sp, args.chunk, head_kernel, order)

    def step(adapters, opt_state, base, ids):
        loss, grads = jax.value_and_grad(loss_fn)(adapters, base, ids)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    step = jax.jit(step, donate_argnums=(0, 1),
                   out_shardings=(shardings[1], shardings[2], sharding.replicated(mesh)))

    # ---- loop: every replica gets the same `batch` sequences (see the module docstring)
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (batch, args.seq), np.int32)
    if order is not None:  # the zig-zag layout: tokens arrive permuted (make_loss undoes it)
        tokens = tokens[:, order]
    ids = sharding.shard_batch(np.tile(tokens, (replicas, 1)), mesh)
    losses, times = [], []
    t_start = time.perf_counter()
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        adapters, opt_state, loss = step(adapters, opt_state, base, ids)
        losses.append(float(loss))   # also waits for the step
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        else:
            warmup_s = time.perf_counter() - t_start
    step_s = statistics.median(times)
    tokens_per_step = batch * replicas * args.seq
    peak = max((d.memory_stats() or {}).get("peak_bytes_in_use", 0) for d in mesh.devices.flat)
    return {"layout": args.layout, **sizes, "gpus": n_dev, "shape": args.shape,
            "batch_per_replica": batch, "global_batch": batch * replicas, "seq": args.seq,
            "step_s": step_s, "tokens_per_s": tokens_per_step / step_s,
            "tokens_per_s_per_gpu": tokens_per_step / step_s / n_dev,
            "peak_gib_per_gpu": peak / 2**30, "losses": losses, "ce": ce,
            "warmup_s": warmup_s, "quantize": args.quantize,
            "platform": jax.devices()[0].platform,
            "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__}


def make_loss(cfg, model, mesh, sp, chunk, head_kernel, order=None):
    """(loss_fn(adapters, base, ids), name). tp > 1: vocabulary-parallel CE (the head is split
    on the vocabulary). tp = 1: the fused frozen-head CE of the one-GPU benchmark, run per data
    shard in shard_map (every shard has the same token count, so the mean of means is the mean)."""
    import functools

    import jax
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import lora_jax as lj
    import sharding
    from models.fused_ce import frozen_head_cross_entropy
    from sharding.compat import shard_map

    def hidden_of(adapters, base, ids):
        positions = None if order is None else jax.numpy.asarray(order)[None]
        return lj.apply(model, {"params": lj.combine(base, adapters)}, ids, return_hidden=True,
                        positions=positions)

    def labels_of(ids):
        """Next-token targets aligned with the (possibly zig-zag ordered) inputs."""
        if order is None:
            return sharding.shift_labels(ids)
        natural = ids[:, np.argsort(order)]
        return sharding.shift_labels(natural)[:, order]

    if sharding.axis_size(mesh, (sharding.TP, sharding.CP)) > 1:  # cp: tokens split too
        def vocab_parallel(adapters, base, ids):
            return sharding.vocab_parallel_cross_entropy(
                hidden_of(adapters, base, ids), head_kernel(cfg, base),
                labels_of(ids), mesh=mesh, sequence_parallel=sp, chunk_size=chunk)
        return vocab_parallel, "vocab_parallel"

    spec = sharding.drop_trivial_axes(P(sharding.BATCH_AXES), mesh)
    local = functools.partial(frozen_head_cross_entropy, chunk_size=chunk, shift=True)
    # One loss per data shard, averaged outside. check_vma=False: the fused loss's scan starts
    # from an unannotated scalar carry; nothing here reduces across devices inside, so the
    # per-shard cotangents need no psum (the head kernel is stop_gradient'ed inside).
    fused = shard_map(lambda h, w, ids: local(h, w, ids)[None], mesh=mesh,
                      in_specs=(spec, P(), spec), out_specs=P(*spec[:1]), check_vma=False)

    def fused_loss(adapters, base, ids):
        return fused(hidden_of(adapters, base, ids), head_kernel(cfg, base), ids).mean()
    return fused_loss, "fused_frozen_head"


# ---------------------------------------------------------------------------------------------
# Parent: run the layouts, compare with one GPU.


def main(argv=None):
    args = parse_args(argv)
    if args.layout is not None:
        print("RESULT " + json.dumps(run_layout(args)), flush=True)
        return
    names = ["1gpu"] + [n for n in args.layouts if n != "1gpu"]
    child = [a for a in (argv if argv is not None else sys.argv[1:])]
    reference = None
    for name in names:
        result = run_child(child, name)
        if reference is None:
            reference = result
        print(json.dumps(compare(result, reference)), flush=True)


def run_child(argv: list[str], name: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.parallel_throughput", *argv, "--layout", name]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"layout": name, "error": (proc.stderr or proc.stdout)[-3000:]}
    return json.loads(lines[-1][len("RESULT "):])


def compare(result: dict, reference: dict) -> dict:
    """Add tokens/s per GPU relative to one GPU and the loss curve's relative distance."""
    if "error" in result or "error" in reference:
        return result
    ref_losses, losses = reference["losses"], result["losses"]
    rel = [abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)]
    return {**result,
            "per_gpu_vs_1gpu": result["tokens_per_s_per_gpu"] / reference["tokens_per_s_per_gpu"],
            "loss_1gpu": ref_losses, "loss_rel_diff_first": rel[0],
            "loss_rel_diff_max": max(rel)}


if __name__ == "__main__":
    main()
