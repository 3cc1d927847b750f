"""The largest batch x sequence that fits on one GPU: lora-jax against HF PEFT (eager, compiled).

Each configuration runs in its own process, so peak memory and out-of-memory state are its own.
The process builds the model once, then tries sizes in increasing tokens per step: two training
steps each (the first compiles; the second is timed; lora-jax compiles ahead of time, and with
`--one-step` runs and times a single step), stopping at the first out-of-memory error.
One JSON line per configuration (`attempts`, `max_batch`, `max_seq`, `max_tokens`, `peak_gib` at
the largest fit, `oom_at`), then a table.

    # batch search at seq 2048, one configuration per framework
    python -m benchmarks.max_fit --shape 8b --seq 2048 --frameworks jax peft-eager peft+compile \\
        --batches 4 8 12 16 24 32 48 64 --out results.jsonl
    # one jax configuration per --jax-variant ("default": jax_worker's defaults); NAME:ckpt, PEFT
    # with gradient checkpointing (--peft-checkpointing on|both: for every PEFT name); a batch
    # list per configuration, by framework or by NAME:VARIANT as the configuration is keyed
    python -m benchmarks.max_fit --shape 8b --seq 2048 \\
        --frameworks jax peft-eager:ckpt peft-eager peft+compile \\
        --jax-variant remat=nothing_saveable --jax-variant default \\
        --batches-for jax:remat=nothing_saveable=64,128 jax=8,10,12 peft-eager:ckpt=16,24,32 \\
        peft-eager=4,5,6 peft+compile=6,7,8 --timeout 200 --out max_fit_8b.jsonl
    # sequence search at batch 1
    python -m benchmarks.max_fit --shape 8b --frameworks jax --batches 1 --seqs 4096 8192 16384
    # CPU smoke test (cuDNN attention falls back to XLA's off GPU)
    python -m benchmarks.max_fit --shape tiny --seq 64 --batches 1 2 --frameworks jax peft-eager
    # long context (jax only): the 8B shape with 2 of its layers, then XLA's accounting alone
    # (--compile-only: each size compiled, not run; it "fits" when XLA's peak is under the limit)
    python -m benchmarks.max_fit --shape 8b --frameworks jax --batches 1 --layers 2 \
        --seqs 131072 262144 524288 --jax-variant remat=offload_layer_input,mlp_chunk=8192
    python -m benchmarks.max_fit --shape 8b --frameworks jax --batches 1 --compile-only \
        --seqs 131072 262144 524288 --jax-variant remat=offload_layer_input:0.75,mlp_chunk=8192
    # the whole 32-layer step at a length whose step takes minutes: one step, compiled ahead
    python -m benchmarks.max_fit --shape 8b --frameworks jax --batches 1 --one-step \
        --seqs 393216 --jax-variant remat=offload_layer_input:0.75,mlp_chunk=8192 --timeout 570

Peak memory: PyTorch's is reset before each size. JAX has no reset, so its figure is the process
high-water mark, which (sizes only grow) is the current size's unless a smaller one used more.
torch.compile traces the dimensions that vary between sizes as dynamic from the first call, so
one graph serves every size (left to itself it would recompile on the second size, as dynamic).
XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.95 here, as in jax_worker) caps what JAX may use.
"""
import argparse
import gc
import itertools
import json
import os
import signal
import subprocess
import sys
import time

from benchmarks.lora_vs_peft import emit

FRAMEWORKS = ("jax", "peft-eager", "peft+compile")
CONFIG_NAMES = FRAMEWORKS + ("peft-eager:ckpt", "peft+compile:ckpt")  # :ckpt, checkpointing on
ATTEMPT, META = "ATTEMPT ", "META "  # the worker's stdout prefixes; libraries print other lines
# Matched by name so neither this driver nor the tests import jax or torch.
XLA_ERRORS = {"JaxRuntimeError", "XlaRuntimeError"}
XLA_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory")


class OutOfMemoryError(RuntimeError):
    """--compile-only: XLA's accounting of a compiled step exceeds the device's memory limit
    (named like torch's, so `is_oom` takes it as what it stands for)."""


def sizes(batches: list[int], seqs: list[int]) -> list[tuple[int, int]]:
    """(batch, seq) pairs by tokens per step, so that the first out-of-memory ends the search."""
    return sorted(itertools.product(batches, seqs), key=lambda bs: (bs[0] * bs[1], bs[1]))


def is_oom(err: BaseException | None) -> bool:
    """An accelerator out-of-memory error: XLA's RESOURCE_EXHAUSTED or torch's OutOfMemoryError,
    also as the cause or context of another (torch.compile wraps errors raised as it compiles)."""
    while err is not None:
        names = {cls.__name__ for cls in type(err).__mro__}
        if "OutOfMemoryError" in names:
            return True
        if names & XLA_ERRORS and any(m in str(err) for m in XLA_OOM_MARKERS):
            return True
        err = err.__cause__ or err.__context__
    return False


def search(pairs, attempt, on_oom=lambda: None, emit=lambda row: None) -> list[dict]:
    """Try `attempt(batch, seq) -> (peak_gib, step_s)` on each pair until one runs out of memory.

    Returns one row per pair tried: {batch, seq, fits, peak_gib, step_s} (and `oom`, the error's
    first line; `attempt` may return a third item, a dict of further fields for the row). Larger
    pairs are not tried after an out-of-memory error: a failed JAX call may have consumed its
    donated buffers. Any other error propagates, so a crash never reads as "does not fit".
    """
    rows = []
    for batch, seq in pairs:
        row = {"batch": batch, "seq": seq, "fits": False, "peak_gib": None, "step_s": None}
        try:
            result = attempt(batch, seq)
            row["peak_gib"], row["step_s"] = result[:2]
            row.update(result[2] if len(result) > 2 else {})
            row["fits"] = True
        except Exception as err:
            if not is_oom(err):
                raise
            row["oom"] = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        rows.append(row)
        emit(row)
        if not row["fits"]:
            on_oom()  # here, not in the except block: the traceback's frames pin the activations
            break
    return rows


def summarize(rows: list[dict]) -> dict:
    """The largest size that fitted (0 when none did) and the first that did not (None: no
    out-of-memory was reached, so the real limit may be higher)."""
    fits = [r for r in rows if r["fits"]]
    best = max(fits, key=lambda r: r["batch"] * r["seq"], default=None)
    oom = next((r for r in rows if not r["fits"]), None)
    return {"max_batch": best["batch"] if best else 0, "max_seq": best["seq"] if best else 0,
            "max_tokens": best["batch"] * best["seq"] if best else 0,
            "peak_gib": best["peak_gib"] if best else None,
            "oom_at": [oom["batch"], oom["seq"]] if oom else None}


# ---------------------------------------------------------------- worker: one configuration


def jax_attempt(shape: str, variant: str, first: tuple[int, int], layers: int | None = None,
                compile_only: bool = False, steps: int = 2):
    """Build the lora-jax model once; returns (attempt, on_oom, variant label). Each attempt
    compiles the step ahead of time (its seconds in the row's `compile_s`), then runs `steps`
    steps and times the last: 2 by default; 1 (`--one-step`) where two steps of a long sequence
    would not fit the time a run has."""
    from benchmarks import jax_worker as jw  # before jax: it sets the allocator's memory fraction
    import jax
    import optax
    import lora_jax as lj
    opts = jw.parse_variant([v for v in variant.split(",") if v and v != "default"])
    if jax.default_backend() != "gpu" and opts["attn"] == "cudnn":
        opts["attn"] = "xla"  # cuDNN is GPU-only; the CPU smoke test runs the same code otherwise
    label = ",".join(f"{k}={v}" for k, v in opts.items() if jw.DEFAULTS[k] != v)
    if compile_only:
        return compiled_attempt(jw, shape, opts, first, layers), lambda: None, label
    cfg, model, base, adapters = jw.build(shape, opts, *first, layers=layers)
    # The step donates adapters and optimizer state, and a call that ran out of memory may already
    # have consumed them: every attempt starts from this host copy.
    host = jax.device_get(adapters)
    del adapters
    tx = lj.optimizer(optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0), host)
    step = jw.make_step(cfg, model, tx, opts)

    def attempt(batch: int, seq: int):
        adapters = jax.device_put(host)
        opt_state = tx.init(adapters)
        ids = jax.random.randint(jax.random.key(1), (batch, seq), 0, cfg.vocab_size)
        t0 = time.perf_counter()
        compiled = step.lower(adapters, opt_state, base, ids).compile()
        compile_s = time.perf_counter() - t0
        for _ in range(steps):
            t0 = time.perf_counter()
            adapters, opt_state, loss = compiled(adapters, opt_state, base, ids)
            loss.block_until_ready()
        step_s = time.perf_counter() - t0  # the last call's
        stats = jax.devices()[0].memory_stats() or {}  # None on CPU
        return (stats.get("peak_bytes_in_use", 0) / 2**30, step_s,
                {"compile_s": compile_s, "steps": steps, "loss": float(loss)})

    return attempt, lambda: None, label


def compiled_attempt(jw, shape: str, opts: dict, first: tuple[int, int], layers: int | None):
    """--compile-only: an attempt that compiles the step on abstract inputs and returns XLA's
    peak (`jax_worker.compile_memory`), raising `OutOfMemoryError` past the device's limit."""
    import jax
    cfg, model, base, adapters = jw.build(shape, opts, *first, layers=layers, abstract=True)
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")  # None on CPU
    host_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30

    def attempt(batch: int, seq: int):
        report = jw.compile_memory(cfg, model, base, adapters, opts, batch, seq)
        peak = report["peak_gib"]
        if limit and peak is not None and peak > limit / 2**30:
            raise OutOfMemoryError(f"compiled step needs {peak:.1f} GiB by XLA's accounting, "
                                   f"over the device limit {limit / 2**30:.1f} GiB")
        return peak, None, {"compile_s": report["compile_s"], "memory": report["memory"],
                            "host_peak_gib": report.get("host_peak_gib"),
                            "host_ram_gib": host_ram, "layers": cfg.num_hidden_layers}

    return attempt


def peft_attempt(shape: str, compile_: bool, checkpointing: bool, dynamic: tuple[int, ...]):
    """Build the PEFT model once; returns (attempt, on_oom, variant label). `dynamic`: the
    input dimensions (0 batch, 1 sequence) that change between attempts."""
    import torch
    from benchmarks import peft_worker as pw
    cuda = torch.cuda.is_available()
    torch.manual_seed(0)
    model, fwd, opt = pw.build(shape, compile_, 16, "cuda" if cuda else "cpu")
    if checkpointing:  # what HF's Trainer does for a PEFT model with gradient_checkpointing=True
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    vocab = model.config.vocab_size

    def attempt(batch: int, seq: int):
        ids = torch.randint(0, vocab, (batch, seq), device="cuda" if cuda else "cpu")
        for dim in dynamic:  # one torch.compile graph for all sizes, not a recompile per size
            torch._dynamo.maybe_mark_dynamic(ids, dim)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            t0 = time.perf_counter()
            pw.train_step(fwd, opt, ids)
            if cuda:
                torch.cuda.synchronize()
        step_s = time.perf_counter() - t0  # the second step's: the first one compiles or warms up
        return (torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0), step_s

    def on_oom():  # drop the half-done step's gradients and hand cached blocks back
        opt.zero_grad(set_to_none=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    return attempt, on_oom, "checkpointing" if checkpointing else ""


def worker(args) -> None:
    """One configuration: META line (variant, build time), then one ATTEMPT line per size."""
    pairs = sizes(args.batches, args.seqs)
    t0 = time.perf_counter()
    if args.worker == "jax":
        attempt, on_oom, label = jax_attempt(args.shape, args.variant, pairs[0], args.layers,
                                             args.compile_only, 1 if args.one_step else 2)
    else:
        dynamic = tuple(d for d, values in enumerate((args.batches, args.seqs)) if len(values) > 1)
        attempt, on_oom, label = peft_attempt(args.shape, args.worker == "peft+compile",
                                              args.checkpointing, dynamic)
    print(META + json.dumps({"variant": label, "init_s": time.perf_counter() - t0}), flush=True)
    search(pairs, attempt, on_oom, emit=lambda row: print(ATTEMPT + json.dumps(row), flush=True))


# ---------------------------------------------------------------- driver


def configs(args) -> list[dict]:
    """One entry per worker process: key (NAME or NAME:VARIANT, as --batches-for names it),
    framework and the worker flags."""
    out = []
    for name in args.frameworks:
        fw, _, suffix = name.partition(":")
        if fw == "jax":
            for v in args.jax_variant or ["default"]:
                key = "jax" if v in ("", "default") else f"jax:{v}"
                out.append({"key": key, "framework": fw, "flags": ["--variant", v or "default"]})
            continue
        modes = {"off": [False], "on": [True], "both": [False, True]}[args.peft_checkpointing]
        for ckpt in [True] if suffix == "ckpt" else modes:
            out.append({"key": fw + (":ckpt" if ckpt else ""), "framework": fw,
                        "flags": ["--checkpointing"] if ckpt else []})
    return out


def batches_for(key: str, overrides: list[str], default: list[int]) -> list[int]:
    """The batch list of configuration `key`: an exact NAME:VARIANT=B,B,.. override, else its
    framework's NAME=B,B,.., else the default."""
    if any("=" not in item for item in overrides):
        raise SystemExit(f"--batches-for takes NAME[:VARIANT]=B,B,..; got {overrides}")
    table = dict(item.rpartition("=")[::2] for item in overrides)
    picked = table.get(key) or table.get(key.partition(":")[0])
    return [int(b) for b in picked.split(",")] if picked else default


def run_worker(cmd: list[str], timeout: int) -> tuple[list[dict], dict, str | None]:
    """Run one worker; returns (attempt rows, meta, error). Rows printed before a crash or a
    timeout are kept: they are the sizes that did fit."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        # First line: the exception's own (the last of stderr), for the table; then the tail.
        last = ([l for l in err.splitlines() if l.strip()] or [""])[-1]
        error = None if proc.returncode == 0 else f"exit {proc.returncode}: {last}\n{err[-1500:]}"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own group: torch.compile's worker pool goes too
        out, err = proc.communicate()
        error = f"timeout after {timeout}s"
    lines = out.splitlines()
    rows = [json.loads(l[len(ATTEMPT):]) for l in lines if l.startswith(ATTEMPT)]
    meta = next((json.loads(l[len(META):]) for l in lines if l.startswith(META)), {})
    return rows, meta, error


def run_config(conf: dict, args) -> dict:
    """The JSON record of one configuration."""
    batches = batches_for(conf["key"], args.batches_for, args.batches)
    cmd = [sys.executable, "-m", "benchmarks.max_fit", "--worker", conf["framework"],
           "--shape", args.shape, "--batches", *map(str, batches), "--seqs", *map(str, args.seqs),
           *conf["flags"], *(["--layers", str(args.layers)] if args.layers else []),
           *(["--compile-only"] if args.compile_only else []),
           *(["--one-step"] if args.one_step else [])]
    t0 = time.perf_counter()
    rows, meta, error = run_worker(cmd, args.timeout)
    record = {"framework": "lora-jax" if conf["framework"] == "jax" else conf["framework"],
              "variant": meta.get("variant", conf["key"].partition(":")[2]), "shape": args.shape,
              "seq": args.seqs[0] if len(args.seqs) == 1 else args.seqs, "attempts": rows,
              **({"layers": args.layers} if args.layers else {}),
              **({"mode": "compile-only"} if args.compile_only else {}),
              **summarize(rows), "init_s": meta.get("init_s"), "wall_s": time.perf_counter() - t0}
    return {**record, "error": error} if error else record


def table(records: list[dict]) -> str:
    out = [f"{'configuration':<40}{'largest fit':>14}{'tokens/step':>13}{'peak GiB':>10}  limit"]
    for r in records:
        name = r["framework"] + (f" [{r['variant']}]" if r["variant"] else "")
        fit = f"{r['max_batch']} x {r['max_seq']}"
        peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
        peak += "*" if r.get("mode") == "compile-only" else ""
        limit = (f"OOM at {r['oom_at'][0]} x {r['oom_at'][1]}" if r["oom_at"] else
                 r.get("error", "no OOM: all sizes fit").splitlines()[0][:60])
        out.append(f"{name:<40}{fit:>14}{r['max_tokens']:>13}{peak:>10}  {limit}")
    return "\n".join(out)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--seqs", type=int, nargs="+", help="several sequence lengths (replaces --seq)")
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 8, 12, 16, 24, 32, 48, 64])
    ap.add_argument("--batches-for", nargs="+", default=[], metavar="NAME[:VARIANT]=B,B,..",
                    help="a configuration's own batch list, e.g. peft-eager=4,5,6")
    ap.add_argument("--frameworks", nargs="+", choices=CONFIG_NAMES, default=list(FRAMEWORKS),
                    help="NAME:ckpt, a PEFT configuration with gradient checkpointing")
    ap.add_argument("--jax-variant", action="append", default=[],
                    help="one jax configuration each: 'default' or comma-separated key=value "
                         "options of benchmarks.jax_worker")
    ap.add_argument("--peft-checkpointing", nargs="?", const="on", default="off",
                    choices=("off", "on", "both"),
                    help="HF gradient checkpointing for the plain PEFT names (bare: on)")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    ap.add_argument("--out", default="", help="append the JSON records to this file")
    ap.add_argument("--layers", type=int, default=None,
                    help="jax only: the shape with this many layers (per-layer memory and time "
                         "at long context)")
    ap.add_argument("--compile-only", action="store_true",
                    help="jax only: compile each size, run nothing; peak GiB (marked *) is XLA's "
                         "memory_analysis() of the step")
    ap.add_argument("--one-step", action="store_true",
                    help="jax only: compile ahead of time, then run and time a single step (not "
                         "two), for lengths whose step takes minutes")
    ap.add_argument("--worker", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="default", help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.seqs = args.seqs or [args.seq]
    if args.layers is not None and args.layers < 1:
        ap.error(f"--layers {args.layers}: give a positive number of layers")
    others = [f for f in args.frameworks if not f.startswith("jax")]
    if (args.layers or args.compile_only or args.one_step) and others and not args.worker:
        ap.error(f"--layers, --compile-only and --one-step are for the jax framework only; drop "
                 f"{others} (run them separately)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    records = []
    for conf in configs(args):
        record = run_config(conf, args)
        emit(record, args.out)
        records.append(record)
    print(table(records))


if __name__ == "__main__":
    main()
