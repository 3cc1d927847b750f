"""Command-line flags of `python -m examples.train` -> a frozen `TrainConfig`, and the error
boundary that turns a bad flag into one line on stderr instead of a traceback.

Argument parsing lives here and nowhere else; the training code takes a `TrainConfig`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import pathlib
import re
import sys
from typing import Callable, Sequence

DEFAULT_DATA = str(pathlib.Path(__file__).parent / "data" / "sonnets.txt")
MODELS = ("gpt2", "llama3")
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = ("float32", "bfloat16")
REGEX_CHARS = set("*()[]|\\^$+?{}")
EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3  # the run stopped at a non-finite loss or gradient norm
# A random base has nothing to keep and far to go; a pretrained one wants LoRA's usual rates.
EMBEDDED_LR, CHECKPOINT_LR = 1e-2, 2e-4


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Everything one training run needs; `parse_args` builds it from flags.

    Field names follow the flags (`--batch-size` -> `batch_size`). See `parser()` for the help
    text of each field.
    """

    # model and data
    model: str | None = None
    model_path: str | None = None
    tokenizer: str | None = None
    data: str = DEFAULT_DATA
    eval_fraction: float = 0.1
    # LoRA
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: str | tuple[str, ...] = "all-linear"
    rslora: bool = False
    loraplus_ratio: float | None = None
    adapter_name: str = "default"
    modules_to_save: tuple[str, ...] | None = None
    init: str = "default"
    dora: bool = False
    # adapters, checkpoints, exports
    adapter_in: str | None = None
    adapter_out: str | None = None
    checkpoint_dir: str | None = None
    save_every: int = 0
    keep: int = 3
    resume: bool = False
    export_peft: str | None = None
    export_merged: str | None = None
    export_dtype: str | None = None
    overwrite: bool = False
    # parallelism and processes
    dp: int = -1
    fsdp: int = 1
    tp: int = 1
    sp: bool = False
    collective_matmul: bool = False
    cp: int = 1
    cp_layout: str = "zigzag"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    # numerics and model run-time options
    dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"
    attention: str | None = None
    quantize: str | None = None
    quant_impl: str = "xla"
    mlp_chunk: int | None = None
    fp8_scaling: str = "tensor"
    # optimisation
    batch_size: int = 8
    seq_len: int = 128
    grad_accum: int = 1
    lr: float | None = None
    schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    steps: int = 200
    stop_after: int = 0
    eval_interval: int = 50
    seed: int = 0
    # output
    metrics_file: str | None = None
    plot: str | None = None
    peak_tflops: float = 790.0
    progress: bool = True
    sample_prompt: str | None = None
    sample_tokens: int = 64

    @property
    def multi_process(self) -> bool:
        return (self.num_processes or 1) > 1

    @property
    def learning_rate(self) -> float:
        """`--lr`, else the default for the kind of base model."""
        if self.lr is not None:
            return self.lr
        return EMBEDDED_LR if self.model_path is None else CHECKPOINT_LR

    @property
    def plot_path(self) -> str | None:
        """The loss-curve PNG: `--plot`, else the metrics file with a .png suffix."""
        if self.plot:
            return self.plot
        return str(pathlib.Path(self.metrics_file).with_suffix(".png")) if self.metrics_file \
            else None


def parse_names(text: str) -> tuple[str, ...]:
    """`--modules-to-save`: comma-separated module-name suffixes ("lm_head,embed_tokens")."""
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise ValueError("--modules-to-save is empty: pass module names such as lm_head")
    return names


def parse_targets(text: str) -> str | tuple[str, ...]:
    """`--targets`: "all-linear"; a comma-separated list of module-name suffixes
    ("q_proj,v_proj", PEFT's list semantics); or a regex matched with fullmatch on the whole
    dotted module path (any value containing regex characters, e.g. `.*\\.(q|v)_proj`)."""
    text = text.strip()
    if text == "all-linear" or REGEX_CHARS & set(text):
        return text
    names = tuple(t.strip() for t in text.split(",") if t.strip())
    if not names:
        raise ValueError("--targets is empty: pass 'all-linear', names such as q_proj,v_proj, "
                         "or a regex")
    return names


def parse_init(text: str) -> str:
    """`--init`: default, gaussian, pissa, pissa_niter_K (K >= 0) or olora."""
    if text in ("default", "gaussian", "pissa", "olora") or re.fullmatch(r"pissa_niter_\d+", text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: use default, gaussian, pissa, pissa_niter_K (K "
                                     "an integer, e.g. pissa_niter_4) or olora")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m examples.train",
        description="LoRA fine-tuning of GPT-2 / Llama-3 with lora_jax: data, tensor and "
                    "sequence parallelism, orbax checkpoints, resume, PEFT and merged export.")
    for title, add in (
        ("model and data", _model_flags),
        ("LoRA", _lora_flags),
        ("adapters, checkpoints and exports", _output_dir_flags),
        ("parallelism", _parallel_flags),
        ("numerics", _numerics_flags),
        ("optimisation", _optimisation_flags),
        ("output", _output_flags)):
        add(ap.add_argument_group(title), TrainConfig())
    return ap


def _model_flags(g, d: TrainConfig) -> None:
    g.add_argument("--model", choices=MODELS, default=d.model,
                   help="model family: gpt2 (default) or llama3; with --model-path it is read "
                        "from config.json (and must agree if given)")
    g.add_argument("--model-path", help="local Hugging Face checkpoint directory (config.json + "
                   "*.safetensors); default: an embedded tiny config with random weights")
    g.add_argument("--tokenizer", help="directory with tokenizer.json, or 'bytes'; default: the "
                   "model path's tokenizer.json (bytes for the embedded model)")
    g.add_argument("--data", default=d.data, help=".txt (one document) or .jsonl ({'text'} or "
                   "{'prompt','completion'} per line: loss on the completion only); default: "
                   "the embedded sonnets")
    g.add_argument("--eval-fraction", type=float, default=d.eval_fraction,
                   help="tail of the token stream held out for evaluation")


def _lora_flags(g, d: TrainConfig) -> None:
    g.add_argument("--rank", "-r", type=int, default=d.rank)
    g.add_argument("--alpha", type=float, default=d.alpha, help="scale = alpha / rank")
    g.add_argument("--dropout", type=float, default=d.dropout, help="LoRA dropout")
    g.add_argument("--targets", type=parse_targets, default=d.targets,
                   help="'all-linear' (default; skips the output head), comma-separated module "
                        "names (q_proj,v_proj), or a regex on the full module path")
    g.add_argument("--rslora", action="store_true", help="scale = alpha / sqrt(rank)")
    g.add_argument("--loraplus-ratio", type=float, default=d.loraplus_ratio,
                   help="LoRA+: B's learning rate = this x --lr (e.g. 16); default: plain LoRA")
    g.add_argument("--adapter-name", default=d.adapter_name,
                   help="the trained adapter's name in --adapter-out and --export-peft (PEFT "
                        "puts a non-default name in <export-peft>/<name>/, as save_pretrained "
                        "does); default: 'default'")
    g.add_argument("--modules-to-save", type=parse_names, default=d.modules_to_save,
                   help="comma-separated modules trained in full beside the adapters (PEFT's "
                        "modules_to_save), e.g. lm_head; a tied head: the embedding's name")
    g.add_argument("--init", type=parse_init, default=d.init,
                   help="adapter initialisation: default (PEFT's kaiming A, zero B), gaussian, "
                        "pissa, pissa_niter_K (K an integer: randomized SVD) or olora; pissa and "
                        "olora also change the base (the exports are converted for the original "
                        "base)")
    g.add_argument("--dora", action="store_true",
                   help="DoRA (PEFT's use_dora): a trained magnitude per output feature; its "
                        "PEFT export loads in PEFT, not in vLLM (serve --export-merged)")


def _output_dir_flags(g, d: TrainConfig) -> None:
    g.add_argument("--adapter-in", help="start from this save_adapter checkpoint (its rank, "
                   "alpha and targets replace the LoRA flags)")
    g.add_argument("--adapter-out", help="save the trained adapter here (orbax, save_adapter)")
    g.add_argument("--checkpoint-dir", help="training-state checkpoints (adapters, optimizer, "
                   "rng, data position) for --resume")
    g.add_argument("--save-every", type=int, default=d.save_every,
                   help="checkpoint every N steps (and always at the end); 0: only at the end")
    g.add_argument("--keep", type=int, default=d.keep, help="checkpoints to keep")
    g.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --checkpoint-dir")
    g.add_argument("--export-peft", help="write a HF PEFT adapter directory here")
    g.add_argument("--export-merged", help="merge and write <dir>/hf (transformers/vLLM) and "
                   "<dir>/orbax")
    g.add_argument("--export-dtype", choices=DTYPES, help="dtype of the merged HF weights")
    g.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def _parallel_flags(g, d: TrainConfig) -> None:
    g.add_argument("--dp", type=int, default=d.dp, help="data parallel (-1: the devices left)")
    g.add_argument("--fsdp", type=int, default=d.fsdp, help="data parallel, frozen base split")
    g.add_argument("--tp", type=int, default=d.tp, help="tensor parallel")
    g.add_argument("--sp", action="store_true", help="sequence parallel (needs --tp > 1)")
    g.add_argument("--collective-matmul", action="store_true",
                   help="with --tp > 1 --sp: overlap the sequence all-gather / reduce-scatter "
                        "with the matmuls (ppermute rings, sharding.collective_matmul)")
    g.add_argument("--cp", type=int, default=d.cp, help="context parallel: each sequence split "
                   "in --cp chunks, ring attention (--tp 1; --seq-len a multiple of it)")
    g.add_argument("--cp-layout", choices=("zigzag", "contiguous"), default=d.cp_layout,
                   help="chunk order under --cp: zigzag balances causal attention over the "
                        "devices (--seq-len a multiple of 2 x --cp); contiguous is plain")
    g.add_argument("--coordinator", help="host:port of process 0 (multi-process runs)")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)


def _numerics_flags(g, d: TrainConfig) -> None:
    g.add_argument("--dtype", choices=DTYPES, default=d.dtype,
                   help="compute and frozen-base dtype (adapters stay float32)")
    g.add_argument("--scan-layers", action="store_true", help="nn.scan the layers (faster "
                   "compiles for deep models)")
    g.add_argument("--remat", default=d.remat, help="'none', 'full', a "
                   "jax.checkpoint_policies name, e.g. dots_saveable, or a names factory, "
                   "e.g. save_only_these_names:a,b (see remat_policies)")
    g.add_argument("--attention", choices=("xla", "cudnn"), help="attention implementation")
    g.add_argument("--quantize", choices=("nf4", "int8", "fp8"), default=d.quantize,
                   help="QLoRA: store the frozen block projections quantised (models.quant); "
                        "any --dp/--fsdp/--tp/--sp; adapters stay float32")
    g.add_argument("--quant-impl", choices=("xla", "pallas"), default=d.quant_impl,
                   help="with --quantize nf4|int8: 'pallas' dequantises inside the GEMM "
                        "(models.quant_pallas, Triton on GPU); 'xla' dequantises first. "
                        "Under --tp > 1 per device on its shard; with --dp/--fsdp alone "
                        "the call runs on gathered operands (no SPMD rule)")
    g.add_argument("--fp8-scaling", choices=("tensor", "row"), default=d.fp8_scaling,
                   help="with --quantize fp8: one FP8 scale per activation tensor ('tensor') "
                        "or per token row ('row', models.quant)")
    g.add_argument("--mlp-chunk", type=int, default=d.mlp_chunk, metavar="TOKENS",
                   help="long context: run the MLP over slices of TOKENS tokens of the "
                        "sequence (models.chunking; --seq-len a multiple of it, --tp 1); with "
                        "--remat offload_layer_input:F the layer inputs go to host memory")


def _optimisation_flags(g, d: TrainConfig) -> None:
    g.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="sequences per optimizer step (global)")
    g.add_argument("--seq-len", type=int, default=d.seq_len)
    g.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help="split each step's batch into this many sequential micro-batches")
    g.add_argument("--lr", type=float, default=d.lr, help="peak learning rate; default: "
                   f"{EMBEDDED_LR:g} for the embedded random model, {CHECKPOINT_LR:g} with "
                   "--model-path")
    g.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help="0: off")
    g.add_argument("--steps", type=int, default=d.steps, help="total optimizer steps")
    g.add_argument("--stop-after", type=int, default=d.stop_after,
                   help="end this run after N steps (checkpointed), e.g. to fit a job's time "
                        "limit; --resume continues on the same schedule. 0: run to --steps")
    g.add_argument("--eval-interval", type=int, default=d.eval_interval, help="0: off")
    g.add_argument("--seed", type=int, default=d.seed)


def _output_flags(g, d: TrainConfig) -> None:
    g.add_argument("--metrics-file", help="JSONL, one line per step (step, loss, ...)")
    g.add_argument("--plot", help="loss-curve PNG (default: the metrics file's name, .png)")
    g.add_argument("--peak-tflops", type=float, default=d.peak_tflops,
                   help="per-device peak for MFU (790: H200 bf16 dense)")
    g.add_argument("--no-progress", dest="progress", action="store_false")
    g.add_argument("--sample-prompt", help="print a greedy continuation of this after training")
    g.add_argument("--sample-tokens", type=int, default=d.sample_tokens)


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Flags -> a checked `TrainConfig` (argparse exits with status 2 on unknown flags).

    Example:
      >>> parse_args(["--model", "llama3", "--tp", "2", "--sp"]).tp
      2
    """
    ns = vars(parser().parse_args(argv))
    cfg = TrainConfig(**ns)
    check(cfg)
    return cfg


def check(cfg: TrainConfig) -> None:
    """Flag combinations that are wrong before any model or device is touched."""
    positive = {"--rank": cfg.rank, "--batch-size": cfg.batch_size, "--seq-len": cfg.seq_len,
                "--grad-accum": cfg.grad_accum, "--keep": cfg.keep, "--fsdp": cfg.fsdp,
                "--tp": cfg.tp, "--cp": cfg.cp}
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    nonneg = {"--steps": cfg.steps, "--eval-interval": cfg.eval_interval,
              "--save-every": cfg.save_every,
              "--stop-after": cfg.stop_after, "--warmup-steps": cfg.warmup_steps}
    for flag, value in nonneg.items():
        if value < 0:
            raise ValueError(f"{flag} must be >= 0, got {value}")
    _check_reals(cfg)
    if not re.fullmatch(r"[A-Za-z0-9_\-]+", cfg.adapter_name):
        raise ValueError(f"--adapter-name {cfg.adapter_name!r}: use letters, digits, '_' or '-'")
    _check_quantize(cfg)
    _check_mlp_chunk(cfg)
    if cfg.dp < 1 and cfg.dp != -1:
        raise ValueError(f"--dp must be >= 1 or -1 (the devices left), got {cfg.dp}")
    if cfg.batch_size % cfg.grad_accum:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by --grad-accum "
                         f"{cfg.grad_accum}")
    if cfg.sp and cfg.tp == 1:
        raise ValueError("--sp splits the sequence over the tensor-parallel devices: it needs "
                         "--tp > 1")
    if cfg.collective_matmul and (cfg.tp == 1 or not cfg.sp):
        raise ValueError("--collective-matmul overlaps sequence parallelism's all-gather and "
                         "reduce-scatter with the matmuls: it needs --tp > 1 and --sp")
    if cfg.cp > 1 and cfg.tp > 1:
        raise ValueError(f"--cp {cfg.cp} does not combine with --tp {cfg.tp}: the tensor-parallel "
                         "layers would gather the cp-split sequence before every projection; "
                         "use --cp with --dp/--fsdp and --tp 1")
    if cfg.resume and not cfg.checkpoint_dir:
        raise ValueError("--resume needs --checkpoint-dir")
    if cfg.adapter_in and cfg.init != "default":
        raise ValueError(f"--init {cfg.init} initialises new adapters; --adapter-in loads "
                         "trained ones: pass one of them")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ValueError(f"--eval-fraction must be in [0, 1), got {cfg.eval_fraction}")
    if cfg.eval_interval and cfg.eval_fraction == 0.0:
        raise ValueError("--eval-interval needs held-out data: set --eval-fraction > 0 or "
                         "--eval-interval 0")
    if (cfg.coordinator is not None or cfg.multi_process) and None in (
            cfg.coordinator, cfg.num_processes, cfg.process_id):
        raise ValueError("multi-process runs need all of --coordinator, --num-processes and "
                         "--process-id")


def _check_quantize(cfg: TrainConfig) -> None:
    """A quantised base runs with every layout (dp, fsdp, tp, sp); it takes plain LoRA only, so
    the variants that read or rewrite the kernel are refused here, before any loading."""
    if cfg.quant_impl != "xla" and cfg.quantize is None:
        raise ValueError(f"--quant-impl {cfg.quant_impl} chooses how a quantised base "
                         "multiplies: add --quantize nf4|int8, or drop --quant-impl")
    if cfg.fp8_scaling != "tensor" and cfg.quantize != "fp8":
        raise ValueError(f"--fp8-scaling {cfg.fp8_scaling} chooses how an FP8-stored base "
                         f"scales its activations: add --quantize fp8 (got --quantize "
                         f"{cfg.quantize}), or drop --fp8-scaling")
    if cfg.quantize is None:
        return
    if cfg.dora:
        raise ValueError(f"--dora needs the kernel's weight norm, which a quantised base "
                         f"(--quantize {cfg.quantize}) does not give: drop one of them")
    if cfg.init not in ("default", "gaussian"):  # pissa*, olora: they rewrite the kernels
        raise ValueError(f"--init {cfg.init} rewrites the base kernels, which a quantised base "
                         f"(--quantize {cfg.quantize}) cannot hold: use --init default or "
                         "gaussian, or drop --quantize")


def _check_mlp_chunk(cfg: TrainConfig) -> None:
    """The chunked MLP slices the whole sequence on one device's view: a positive chunk that
    divides --seq-len, and no tensor parallelism (sequence parallelism already splits it)."""
    if cfg.mlp_chunk is None:
        return
    if cfg.mlp_chunk < 1:
        raise ValueError(f"--mlp-chunk must be >= 1 tokens, got {cfg.mlp_chunk}")
    if cfg.seq_len % cfg.mlp_chunk:
        raise ValueError(f"--mlp-chunk {cfg.mlp_chunk} does not divide --seq-len {cfg.seq_len}: "
                         "choose a chunk that divides it, or drop --mlp-chunk")
    if cfg.tp != 1:
        raise ValueError(f"--mlp-chunk runs with --tp 1 (got --tp {cfg.tp}): under tensor "
                         "parallelism use --sp, which splits the sequence already")


def _check_reals(cfg: TrainConfig) -> None:
    """Real-valued flags: finite, and in their range (a NaN learning rate would train NaN)."""
    rules = [("--lr", cfg.lr, lambda v: v > 0, "> 0"),
             ("--alpha", cfg.alpha, lambda v: True, ""),
             ("--dropout", cfg.dropout, lambda v: 0 <= v < 1, "in [0, 1)"),
             ("--grad-clip", cfg.grad_clip, lambda v: v >= 0, ">= 0 (0: off)"),
             ("--weight-decay", cfg.weight_decay, lambda v: v >= 0, ">= 0"),
             ("--peak-tflops", cfg.peak_tflops, lambda v: v > 0, "> 0"),
             ("--loraplus-ratio", cfg.loraplus_ratio, lambda v: v > 0, "> 0")]
    for flag, value, ok, wanted in rules:
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise ValueError(f"{flag} must be a finite number {wanted}".rstrip() +
                             f", got {value}")


def one_line(message: str, limit: int = 600) -> str:
    """An exception message as one line: list items joined with '; ', long lists cut short."""
    lines = [re.sub(r"^-\s+", "", line.strip()) for line in str(message).splitlines()]
    lines = [line for line in lines if line]
    if len(lines) > 6:
        lines = lines[:4] + [f"... ({len(lines) - 5} more)", lines[-1]]
    text = lines[0] if lines else ""
    for line in lines[1:]:
        text += (" " if text.endswith(":") else "; ") + line
    return text if len(text) <= limit else text[:limit - 3] + "..."


class Diverged(RuntimeError):
    """The loss or gradient norm became NaN/inf: the run stopped without saving that state."""


def run_cli(main: Callable[[TrainConfig], object], argv: Sequence[str] | None = None,
            errors: tuple[type[BaseException], ...] = (ValueError, OSError)) -> int:
    """Parse flags, run `main(config)`; a bad input prints `error: <one line>` to stderr and
    returns 2, a diverged run returns 3 (no traceback either way). The library's errors
    (LoraError, MeshError, DataError, CheckpointError) are all ValueErrors; OSError covers
    files that cannot be read or written (the message names the file)."""
    try:
        cfg = parse_args(argv)
        from remat_policies import allow_pinned_host_memory  # here: --help stays free of jax
        allow_pinned_host_memory(cfg.remat)  # an offloading policy: before JAX starts its GPU
        main(cfg)
    except Diverged as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except errors as err:
        print(f"error: {one_line(str(err))}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return 0
