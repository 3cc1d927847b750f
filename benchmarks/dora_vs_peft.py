"""DoRA training speed and memory: lora-jax's DoRA against PyTorch + HF PEFT's DoRA (eager and
torch.compile), with lora-jax's plain LoRA as the baseline, in one run on one GPU.

Each configuration runs in its own process (`benchmarks.jax_worker` / `benchmarks.peft_worker`,
as `benchmarks.lora_vs_peft` runs them), so each has the GPU to itself and its peak memory is its
own; every result is printed as one JSON line as soon as it exists, then a table and one
summary line with the ratios.

    python -m benchmarks.dora_vs_peft                       # 1B shape, bf16, seq 2048, batch 8
    python -m benchmarks.dora_vs_peft --out dora.jsonl
    python -m benchmarks.dora_vs_peft --tiny                # CPU smoke run (tiny shape, seconds)

What differs: PEFT's DoRA forms `lora_B(lora_A(I))` ([in, out]) and `W + s * B A` every step
to take the column norm; lora-jax expands the norm as `||W||^2 + 2s<A^T W, B> + s^2 <A^T A B, B>`
(an [r, out] product and an r x r Gram, `lora_jax.dora`), never forming the [in, out] sum.
"""
import argparse
import sys

from benchmarks.lora_vs_peft import emit, run_one, table
from benchmarks.shapes import DEFAULT_BATCH

CONFIGS = ("jax-lora", "jax-dora", "peft-eager-dora", "peft+compile-dora")


def command(config: str, args) -> list[str]:
    """The worker command line of one configuration."""
    shape = "tiny" if args.tiny else args.shape
    batch = str(args.batch or DEFAULT_BATCH[shape])
    seq = str(32 if args.tiny else args.seq)
    common = ["--shape", shape, "--batch", batch, "--seq", seq, "--steps", str(args.steps)]
    if config.startswith("jax"):
        variants = ["--variant", f"dora={int(config == 'jax-dora')}"]
        if args.tiny:  # cuDNN attention is GPU-only
            variants += ["--variant", "attn=xla", "--warmup", "1"]
        return [sys.executable, "-m", "benchmarks.jax_worker", *common, *variants]
    extra = ["--dora"] + (["--compile"] if config.startswith("peft+compile") else [])
    if args.tiny:
        extra += ["--device", "cpu", "--warmup", "1"]
    return [sys.executable, "-m", "benchmarks.peft_worker", *common, *extra]


def summary(rows: dict[str, dict]) -> dict:
    """Throughput ratios of lora-jax DoRA to each other configuration that ran."""
    ours = rows.get("jax-dora", {}).get("tokens_per_s")
    out = {"summary": "dora_vs_peft"}
    for name, row in rows.items():
        if ours and name != "jax-dora" and row.get("tokens_per_s"):
            out[f"jax-dora / {name}"] = ours / row["tokens_per_s"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--batch", type=int, default=0, help="0: the shape's default (8 for 1b)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--only", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run on the tiny shape")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    rows = {}
    for config in args.only:
        row = {"config": config, **run_one(command(config, args), args.timeout)}
        emit(row, args.out)
        rows[config] = row
    emit(summary(rows), args.out)
    print(table(list(rows.values())), file=sys.stderr)
    return 0 if all("error" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
