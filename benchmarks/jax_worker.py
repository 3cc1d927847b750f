"""The lora-jax side of the benchmark: one configuration per process, one JSON line out.

Random-weight Llama of the given shape in bf16 (scanned layers, cuDNN flash attention, remat
policy, chunked cross-entropy), LoRA r=16 / alpha=32 on all seven projections via `lora_jax`,
AdamW on the adapters only, one jitted step with donated adapter and optimizer state.

Options (`--variant key=value`, repeatable): remat=<policy>|full|none, attn=cudnn|xla,
adapter_dtype=bfloat16|float32, ce=fused|chunked|full, chunk=<tokens>, scan=1|0,
triton_gemm=1|0 (XLA's Triton GEMM autotuning candidates), cmdbuf=1|0 (CUDA-graph command
buffers; off, a profile names every kernel's XLA op), fp8=1|0 (FP8 frozen base: the block
projections multiply in FP8 with per-tensor scaling, `models.fp8`), fp8_recipe=<name> (with
fp8=1: another quantisation recipe from `benchmarks.fp8_recipes`, e.g. fwd_only),
fp8_skip=q_proj+k_proj (with fp8=1: projections kept in bf16, `base_fp8_skip`),
quant=nf4|int8|fp8 (a frozen base
STORED quantised, `models.quant`: random normal(0.02) kernels quantised at init, per layer inside
the scanned init), quant_impl=xla|pallas (with quant=nf4|int8: `RuntimeOptions.quant_impl`,
"pallas" dequantises inside the GEMM, `models.quant_pallas`), fp8_scaling=tensor|row (with
quant=fp8: `RuntimeOptions.fp8_scaling`, "row" scales x and dy per token row), fp8_amax=none
(with quant=fp8, a speed bound only: every FP8 cast with scale 1 and no amax reduction,
`benchmarks.fp8_recipes.use_activation_amax`; its loss means nothing), init=hf|scaled (hf: every kernel normal(0.02), as transformers initialises Llama; scaled: the
residual-branch outputs o_proj and down_proj divided by sqrt(2 L), Megatron's "scaled init";
on the 8B shape it did not reduce the FP8 forward's drift, see `benchmarks.fp8_drift`),
dora=1|0 (DoRA, `LoraConfig(use_dora=True)`: a trained magnitude per output feature,
`benchmarks.dora_vs_peft`), mlp_chunk=<tokens> (a sequence-chunked MLP, `RuntimeOptions.mlp_chunk`;
empty: unchunked). remat= takes every `remat_policies` name, `offload_layer_input[:f]` too (each
layer's input, or a fraction f of its tokens, kept in pinned host memory).

Long context (docs/PERFORMANCE.md, "Long context on one GPU"):
  --layers N      the shape with N layers instead of its own (per-layer memory and time at a
                  length where the whole model's step would take too long)
  --compile-only  lower and compile the step for (--batch, --seq) on abstract inputs (no weights
                  are allocated, nothing runs) and print XLA's own memory accounting
                  (`compiled.memory_analysis()`): whether a size fits, without running it

    python -m benchmarks.jax_worker --shape 8b --batch 1 --seq 524288 --compile-only \
        --variant remat=offload_layer_input:0.75 --variant mlp_chunk=8192
"""
import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
# XLA reads its flags once, at backend start: the variants that are XLA flags are set here.
XLA_FLAG_VARIANTS = {"triton_gemm=0": "--xla_gpu_enable_triton_gemm=false",
                     "cmdbuf=0": "--xla_gpu_enable_command_buffer="}
for _variant, _flag in XLA_FLAG_VARIANTS.items():
    if _variant in " ".join(sys.argv):
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + _flag

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import lora_jax as lj  # noqa: E402
from benchmarks.shapes import SHAPES, TARGETS, flops_per_token  # noqa: E402
from models.llama import Llama, LlamaConfig, head_kernel  # noqa: E402
from models.fused_ce import frozen_head_cross_entropy  # noqa: E402
from models.layout import unstack_layers  # noqa: E402
from models.loss import chunked_cross_entropy, cross_entropy  # noqa: E402
from remat_policies import allow_pinned_host_memory  # noqa: E402
from benchmarks.trace_summary import render, summarize_dir  # noqa: E402

PEAK_BF16 = 790e12
DEFAULTS = {"remat": "dots_saveable", "attn": "cudnn", "adapter_dtype": "bfloat16",
            "ce": "fused", "chunk": "4096", "scan": "1", "triton_gemm": "1", "fp8": "0",
            "cmdbuf": "1", "fp8_recipe": "tensor_e5m2", "init": "hf", "fp8_skip": "",
            "quant": ""}
DEFAULTS["dora"] = "0"  # dora=1: LoraConfig(use_dora=True)
DEFAULTS["quant_impl"] = "xla"  # quant_impl=pallas: fused NF4/int8 GEMM (models.quant_pallas)
DEFAULTS["fp8_scaling"] = "tensor"  # fp8_scaling=row (with quant=fp8): per-token FP8 scales
DEFAULTS["fp8_amax"] = "current"  # none (with quant=fp8): scale-1 casts, no amax; a speed bound
DEFAULTS["mlp_chunk"] = ""  # mlp_chunk=8192: the MLP over 8192-token slices of the sequence
RESIDUAL_OUTPUTS = ("o_proj", "down_proj")


def depth_scaled(params, num_layers: int):
    """Megatron's scaled init: the kernels that write into the residual stream (o_proj,
    down_proj) divided by sqrt(2 * num_layers), so the residual stream grows more slowly with
    depth. Tried as a random model less sensitive to rounding; on the 8B shape it was not
    (FP8 drift 113% against 110%, docs/PERFORMANCE.md)."""
    factor = (2 * num_layers) ** -0.5

    def scale(path, leaf):
        names = {getattr(k, "key", None) for k in path}
        return leaf * factor if names & set(RESIDUAL_OUTPUTS) and path[-1].key == "kernel" \
            else leaf
    return jax.tree_util.tree_map_with_path(scale, params)


def projection_names(joined: str) -> tuple[str, ...]:
    """Projection names joined by "+" (how fp8_skip= and --fp8-skip spell them) as a tuple:
    "q_proj+k_proj" -> ("q_proj", "k_proj"), "" -> ()."""
    return tuple(filter(None, joined.split("+")))


def fp8_scaling_option(opts: dict) -> dict:
    """The config's `fp8_scaling` override ({} for the default): "row" only with quant=fp8,
    the one format it changes, so a row-scaled run cannot be mistaken for another format's."""
    if opts["fp8_scaling"] == "tensor":
        return {}
    if opts["quant"] != "fp8":
        raise SystemExit(f"fp8_scaling={opts['fp8_scaling']} scales an FP8-stored base's "
                         "activations: add quant=fp8")
    return {"fp8_scaling": opts["fp8_scaling"]}


def parse_variant(items: list[str]) -> dict:
    """The options of `--variant key=value` items over DEFAULTS. With an offloading remat policy
    it also lets XLA's pinned host pool grow past its 64 GB default (`remat_policies.
    allow_pinned_host_memory`): here, because every entry point parses its variant before it
    touches the GPU, and XLA reads that limit when its GPU backend starts."""
    opts = dict(DEFAULTS)
    for item in items:
        key, _, value = item.partition("=")
        if key not in DEFAULTS:
            raise SystemExit(f"unknown variant key {key!r}; known: {sorted(DEFAULTS)}")
        opts[key] = value
    allow_pinned_host_memory(opts["remat"])
    return opts


def shape_config(shape: str, layers: int | None = None) -> dict:
    """The `config.json` dict of a benchmark shape, with `layers` layers if given."""
    if layers is not None and layers < 1:
        raise SystemExit(f"--layers {layers}: give a positive number of layers")
    config = dict(SHAPES[shape])
    if layers is not None:
        config["num_hidden_layers"] = layers
    return config


def build(shape: str, opts: dict, batch: int, seq: int, rank: int = 16, *,
          layers: int | None = None, abstract: bool = False):
    """(config, model, base, adapters) of a benchmark configuration. `layers` overrides the
    shape's layer count; `abstract` gives base and adapters as `jax.ShapeDtypeStruct`s (nothing
    allocated: for `compile_memory`)."""
    if opts["fp8"] == "1":
        from benchmarks.fp8_recipes import use_recipe
        use_recipe(opts["fp8_recipe"])
    if opts["fp8_amax"] != "current":
        if opts["quant"] != "fp8":
            raise SystemExit("fp8_amax= changes how an FP8-stored base scales its activations: "
                             "add quant=fp8")
        from benchmarks.fp8_recipes import use_activation_amax
        use_activation_amax(opts["fp8_amax"])
    if opts["init"] not in ("hf", "scaled"):
        raise SystemExit(f"init={opts['init']!r}: use hf or scaled")
    unrolled = opts["scan"] == "0"
    cfg = LlamaConfig.from_hf_dict(shape_config(shape, layers), dtype=jnp.bfloat16,
                                   param_dtype=jnp.bfloat16,
                                   scan_layers=True, remat_policy=opts["remat"],
                                   attention_impl=None if opts["attn"] == "auto" else opts["attn"],
                                   base_fp8=opts["fp8"] == "1",
                                   base_fp8_skip=projection_names(opts["fp8_skip"]),
                                   mlp_chunk=int(opts["mlp_chunk"]) if opts["mlp_chunk"] else None,
                                   **({"quantize": opts["quant"]} if opts["quant"] else {}),
                                   **({"quant_impl": opts["quant_impl"]}
                                      if opts["quant_impl"] != "xla" else {}),
                                   **fp8_scaling_option(opts))
    lora_cfg = lj.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                             adapter_dtype=opts["adapter_dtype"], use_dora=opts["dora"] == "1")

    @jax.jit
    def init(key):
        # Always initialised scanned: an unrolled 8B init takes minutes to compile, a scanned
        # one seconds; `unstack_layers` then gives the unrolled model its layout.
        params = Llama(cfg).init(key, jnp.zeros((1, 8), jnp.int32))["params"]
        if opts["init"] == "scaled":
            params = depth_scaled(params, cfg.num_hidden_layers)
        params = lj.inject(params, lora_cfg, jax.random.fold_in(key, 1))
        return lj.split(unstack_layers(params) if unrolled else params)

    key = jax.random.key(0)
    base, adapters = jax.eval_shape(init, key) if abstract else init(key)
    if unrolled:
        cfg = dataclasses.replace(cfg, scan_layers=False)
    return cfg, Llama(cfg), base, adapters


def make_step(cfg, model, tx, opts):
    chunk = int(opts["chunk"])

    def loss_fn(adapters, base, ids):
        variables = {"params": lj.combine(base, adapters)}
        if opts["ce"] == "full":
            logits = lj.apply(model, variables, ids)
            return cross_entropy(logits[:, :-1], ids[:, 1:])
        hidden = lj.apply(model, variables, ids, return_hidden=True)
        if opts["ce"] == "fused":
            return frozen_head_cross_entropy(hidden[:, :-1], head_kernel(cfg, base), ids[:, 1:],
                                             chunk_size=chunk)
        return chunked_cross_entropy(hidden[:, :-1], head_kernel(cfg, base), ids[:, 1:],
                                     chunk_size=chunk)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(adapters, opt_state, base, ids):
        loss, grads = jax.value_and_grad(loss_fn)(adapters, base, ids)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    return step


def compile_memory(cfg, model, base, adapters, opts: dict, batch: int, seq: int) -> dict:
    """Lower and compile the training step for a [batch, seq] batch without running it; XLA's
    memory accounting of the executable in GiB, and the compile time.

    `peak_gib` is arguments + outputs - aliased (the donated adapter and optimizer state) +
    temporaries: what the device must hold at once by XLA's own count (the allocator adds some
    fragmentation). `host_*` is pinned host memory (offloaded remat residuals live there).
    Works on abstract inputs (`build(..., abstract=True)`): nothing is allocated or run.
    """
    tx = lj.optimizer(optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0), adapters)
    opt_state = jax.eval_shape(tx.init, adapters)
    step = make_step(cfg, model, tx, opts)
    ids = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    t0 = time.perf_counter()
    compiled = step.lower(adapters, opt_state, base, ids).compile()
    compile_s = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    if stats is None:  # some backends keep no accounting
        return {"compile_s": compile_s, "memory": None, "peak_gib": None}
    fields = ("argument", "output", "alias", "temp", "generated_code", "host_argument",
              "host_output", "host_alias", "host_temp")
    memory = {f"{f}_gib": getattr(stats, f"{f}_size_in_bytes", 0) / 2**30 for f in fields}
    peak = (memory["argument_gib"] + memory["output_gib"] - memory["alias_gib"]
            + memory["temp_gib"])
    host = (memory["host_argument_gib"] + memory["host_output_gib"] - memory["host_alias_gib"]
            + memory["host_temp_gib"])
    return {"compile_s": compile_s, "memory": memory, "peak_gib": peak, "host_peak_gib": host}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--profile", default="",
                    help="after timing, trace --profile-steps more steps into this directory "
                         "and add a summary of the GPU time (benchmarks.trace_summary)")
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--layers", type=int, default=None,
                    help="the shape with this many layers (per-layer cost at long context)")
    ap.add_argument("--compile-only", action="store_true",
                    help="compile the step on abstract inputs and print XLA's memory accounting; "
                         "run nothing")
    args = ap.parse_args()
    opts = parse_variant(args.variant)
    variant = ",".join(f"{k}={v}" for k, v in opts.items() if DEFAULTS[k] != v)
    if args.compile_only:
        cfg, model, base, adapters = build(args.shape, opts, args.batch, args.seq,
                                           layers=args.layers, abstract=True)
        print(json.dumps({
            "framework": "lora-jax", "mode": "compile-only", "variant": variant,
            "shape": args.shape, "layers": cfg.num_hidden_layers, "batch": args.batch,
            "seq": args.seq, **compile_memory(cfg, model, base, adapters, opts, args.batch,
                                              args.seq),
            "backend": jax.default_backend(), "jax": jax.__version__, "opts": opts}))
        return
    t0 = time.perf_counter()
    cfg, model, base, adapters = build(args.shape, opts, args.batch, args.seq,
                                       layers=args.layers)
    jax.block_until_ready((base, adapters))
    init_s = time.perf_counter() - t0
    tx = lj.optimizer(optax.adamw(1e-4, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0), adapters)
    opt_state = tx.init(adapters)
    step = make_step(cfg, model, tx, opts)
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, cfg.vocab_size)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        adapters, opt_state, loss = step(adapters, opt_state, base, ids)
    loss.block_until_ready()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        adapters, opt_state, loss = step(adapters, opt_state, base, ids)
        loss.block_until_ready()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    profile = None
    if args.profile:  # after timing, so tracing overhead never enters the figures
        with jax.profiler.trace(args.profile):
            for _ in range(args.profile_steps):
                adapters, opt_state, loss = step(adapters, opt_state, base, ids)
            loss.block_until_ready()
        profile = summarize_dir(args.profile, args.profile_steps)
        print(render(profile), file=sys.stderr)
    tps = args.batch * args.seq / dt
    stats = jax.devices()[0].memory_stats() or {}
    print(json.dumps({
        "framework": "lora-jax", "variant": variant, "shape": args.shape,
        "layers": cfg.num_hidden_layers, "batch": args.batch,
        "seq": args.seq, "step_s": dt, "tokens_per_s": tps,
        "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30,
        "mfu": tps * flops_per_token(shape_config(args.shape, args.layers), args.seq) / PEAK_BF16,
        "loss": float(loss), "init_s": init_s, "warmup_s": compile_s, "jax": jax.__version__,
        "opts": opts, **({"profile": profile} if profile else {})}))


if __name__ == "__main__":
    main()
