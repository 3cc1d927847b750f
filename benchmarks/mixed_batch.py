"""Mixed-batch adapters on one GPU: each batch row its own adapter, against one adapter for all.

Random-weight Llama (bf16, scanned layers), N adapters of rank r on all seven projections.
Rows, one JSON line each:

  generate   prompt P tokens then KV-cache greedy generation of G tokens (`models.generate`),
             batch B: "one" (one adapter for the whole batch; "base", no adapter, with
             --with-base) and
             "mixed-<method>" (N adapters, row i runs adapter i % N; methods of
             `lora_jax.adapter_op.MixedBatch`); ms per generated token = whole call / G (the
             prefill is one of G+1 forwards). A "ratio" row gives mixed / one per method.
  train      forward + backward (adapter gradients) at batch B x seq T, same modes.
  peft       PyTorch + HF PEFT on the same GPU for reference (a child process, so each
             framework has the GPU to itself): `generate(adapter_names=...)` against one
             active adapter, same shape, batch, lengths.

    python -m benchmarks.mixed_batch                                   # 1b, batches 8 32
    python -m benchmarks.mixed_batch --methods auto dense --train-methods auto --no-peft
    python -m benchmarks.mixed_batch --tiny                            # CPU smoke test
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--tiny", action="store_true",
                    help="CPU smoke test: tiny shape, short lengths, batch 4, one rep")
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128, help="generated tokens")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--methods", nargs="+", default=["auto", "gather", "ragged", "dense"],
                    help="mixed-batch methods timed in generation")
    ap.add_argument("--train-methods", nargs="+", default=["auto", "ragged", "dense"],
                    help="mixed-batch methods timed in training (auto is gather there)")
    ap.add_argument("--with-base", action="store_true",
                    help="also time generation without adapters")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-seq", type=int, default=512)
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--framework", choices=["jax", "peft"], default="jax",
                    help="peft: the PyTorch side (run as a child of the jax side)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.tiny:
        args.shape, args.batches, args.prompt, args.new = "tiny", [4], 8, 4
        args.train_batch, args.train_seq, args.reps, args.adapters = 4, 16, 1, 3
    return args


def emit(row: dict, out: str) -> None:
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def timed(fn, reps: int) -> tuple[float, float]:
    """(first call incl. compile, median of `reps` later calls), seconds; fn blocks."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times)


# ---------------------------------------------------------------------------------------------
# JAX


def jax_setup(args):
    import jax
    import jax.numpy as jnp

    import lora_jax as lj
    from benchmarks.shapes import SHAPES, TARGETS
    from models.llama import Llama, LlamaConfig
    gpu = jax.devices()[0].platform == "gpu"
    cfg = LlamaConfig.from_hf_dict(SHAPES[args.shape], dtype=jnp.bfloat16,
                                   param_dtype=jnp.bfloat16, scan_layers=True,
                                   remat_policy="dots_saveable",
                                   attention_impl="cudnn" if gpu else None)
    model = Llama(cfg)
    base = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"])(
        jax.random.key(0))
    lora_cfg = lj.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                             adapter_dtype="bfloat16")

    @jax.jit
    def one_adapter(base, key):  # only the adapter leaves leave the jit: no copy of the base
        tree = lj.lora_params(lj.inject(base, lora_cfg, key))
        # a trained-like B (inject's is zero); the cost is the same, the values are not trivial
        return jax.tree_util.tree_map_with_path(
            lambda p, x: (0.01 * jax.random.normal(key, x.shape)).astype(x.dtype)
            if p[-1].key == "lora_b" else x, tree)

    adapters = [one_adapter(base, jax.random.key(k + 1)) for k in range(args.adapters)]
    stacked = lj.stack_adapters(base, adapters)
    return cfg, model, base, adapters, stacked


def jax_generate_rows(args, cfg, model, base, adapters, stacked):
    import jax
    import jax.numpy as jnp

    import lora_jax as lj
    from models.generate import generate
    rows = []
    for batch in args.batches:
        prompt = jax.random.randint(jax.random.key(7), (batch, args.prompt), 0, cfg.vocab_size)
        index = jnp.arange(batch, dtype=jnp.int32) % args.adapters
        modes = [("base", base, None, {})] if args.with_base else []
        modes += [("one", lj.combine(base, adapters[0]), functools.partial(lj.apply, model), {})]
        modes += [(f"mixed-{m}", stacked, functools.partial(lj.apply, model, mixed_method=m),
                   {"adapter_index": index}) for m in args.methods]
        for mode, params, apply_fn, extra in modes:
            run = lambda: generate(model, params, prompt, max_new_tokens=args.new,  # noqa: E731
                                   apply_fn=apply_fn, apply_kwargs=extra).block_until_ready()
            row = {"bench": "generate", "framework": "lora-jax", "mode": mode,
                   "shape": args.shape, "batch": batch, "prompt": args.prompt, "new": args.new,
                   "adapters": args.adapters, "rank": args.rank}
            rows.append(measured(row, run, args, lambda dt: {
                "gen_s": dt, "ms_per_token": 1e3 * dt / args.new,
                "tokens_per_s": batch * args.new / dt}))
    return rows


def measured(row: dict, run, args, figures) -> dict:
    """`row` with the figures of `run` (or the error it raised: one failing method, e.g. a
    lowering the GPU lacks, must not cost the others' rows), emitted."""
    try:
        first, dt = timed(run, args.reps)
        row = {**row, **figures(dt), "first_call_s": first}
    except Exception as e:  # noqa: BLE001 - reported in the row, the run goes on
        row = {**row, "error": f"{type(e).__name__}: {str(e)[:500]}"}
    emit(row, args.out)
    return row


def jax_train_rows(args, cfg, model, base, adapters, stacked):
    import jax
    import jax.numpy as jnp

    import lora_jax as lj
    from models.fused_ce import frozen_head_cross_entropy
    from models.llama import head_kernel
    batch, seq = args.train_batch, args.train_seq
    ids = jax.random.randint(jax.random.key(3), (batch, seq), 0, cfg.vocab_size)
    index = jnp.arange(batch, dtype=jnp.int32) % args.adapters
    frozen = lj.split(base)[0]
    rows = []

    def loss_fn(ad, fz, ids, extra, method):
        hidden = lj.apply(model, {"params": lj.combine(fz, ad)}, ids, return_hidden=True,
                          mixed_method=method, **extra)
        return frozen_head_cross_entropy(hidden[:, :-1], head_kernel(cfg, fz), ids[:, 1:],
                                         chunk_size=4096)

    grad = jax.jit(jax.value_and_grad(loss_fn), static_argnums=4)
    modes = [("one", adapters[0], {}, "auto")]
    modes += [(f"mixed-{m}", lj.lora_params(stacked), {"adapter_index": index}, m)
              for m in args.train_methods]
    for mode, ad, extra, method in modes:
        run = lambda: jax.block_until_ready(grad(ad, frozen, ids, extra, method))  # noqa: E731
        row = {"bench": "train", "framework": "lora-jax", "mode": mode, "shape": args.shape,
               "batch": batch, "seq": seq, "adapters": args.adapters, "rank": args.rank}
        rows.append(measured(row, run, args, lambda dt: {
            "step_s": dt, "tokens_per_s": batch * seq / dt}))
    return rows


def ratio_rows(rows: list[dict], key: str) -> list[dict]:
    """mixed-<method> / one, per bench and batch."""
    out = []
    for r in rows:
        if not r["mode"].startswith("mixed-") or key not in r:
            continue
        one = next((o for o in rows if o["mode"] == "one" and o["bench"] == r["bench"]
                    and o["batch"] == r["batch"] and key in o), None)
        if one is None:
            continue
        out.append({"bench": r["bench"] + "_ratio", "framework": r["framework"],
                    "mode": r["mode"], "batch": r["batch"], "shape": r["shape"],
                    "ratio_vs_one": r[key] / one[key]})
    return out


def run_jax(args) -> None:
    import jax
    cfg, model, base, adapters, stacked = jax_setup(args)
    rows = jax_generate_rows(args, cfg, model, base, adapters, stacked)
    for r in ratio_rows(rows, "gen_s"):
        emit({**r, "goal": "<= 1.15", "jax": jax.__version__,
              "device": jax.devices()[0].device_kind}, args.out)
    if not args.no_train:
        train = jax_train_rows(args, cfg, model, base, adapters, stacked)
        for r in ratio_rows(train, "step_s"):
            emit(r, args.out)


# ---------------------------------------------------------------------------------------------
# PyTorch + PEFT


def run_peft(args) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.shapes import SHAPES, TARGETS
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = LlamaConfig(**{k: v for k, v in SHAPES[args.shape].items() if k != "model_type"})
    cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    names = [f"a{k}" for k in range(args.adapters)]
    lcfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                      init_lora_weights=False)  # random B: a trained-like adapter
    pm = get_peft_model(model, lcfg, adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, lcfg)
    pm.eval()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for batch in args.batches:
        ids = torch.randint(0, cfg.vocab_size, (batch, args.prompt), device=device)
        rows = [names[k % args.adapters] for k in range(batch)]
        for mode, kw in (("one", {}), ("mixed", {"adapter_names": rows})):
            pm.set_adapter(names[0])

            def run():
                with torch.no_grad():
                    pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                max_new_tokens=args.new, min_new_tokens=args.new,
                                do_sample=False, pad_token_id=0, **kw)
                sync()
            first, dt = timed(run, 1)  # a reference: one timed call after the warm-up
            emit({"bench": "generate", "framework": "peft-eager", "mode": mode,
                  "shape": args.shape, "batch": batch, "prompt": args.prompt, "new": args.new,
                  "adapters": args.adapters, "rank": args.rank, "gen_s": dt,
                  "ms_per_token": 1e3 * dt / args.new, "tokens_per_s": batch * args.new / dt,
                  "torch": torch.__version__}, args.out)


def spawn_peft(argv: list[str]) -> None:
    """The PEFT side in its own process (each framework has the GPU's memory to itself)."""
    cmd = [sys.executable, "-m", "benchmarks.mixed_batch", *argv, "--framework", "peft"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            print(line, flush=True)
    if proc.returncode != 0:
        print(json.dumps({"bench": "peft", "error": f"exit {proc.returncode}",
                          "tail": proc.stderr[-1500:]}), flush=True)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.framework == "peft":
        return run_peft(args)
    run_jax(args)
    if not args.no_peft:
        spawn_peft(argv)


if __name__ == "__main__":
    main()
