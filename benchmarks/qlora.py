"""QLoRA on one GPU: lora-jax with a frozen base STORED in NF4 / int8 / FP8 against PyTorch +
PEFT + bitsandbytes QLoRA and PEFT + torch.compile (bf16), side by side in one run.

Random-weight Llama shapes, seq 2048, LoRA r=16 on the 7 projections, AdamW on the adapters.
Each row is its own process (`benchmarks.jax_worker` with `--variant quant=...`, or
`benchmarks.peft_worker` with `--bnb4` / `--compile`), printing one JSON line.

bitsandbytes is not in the GPU image: put its manylinux wheel in `.wheels/` (not tracked); the
driver installs it with `pip install --no-index` before the PEFT + bitsandbytes rows.

    python -m benchmarks.qlora --out benchmarks/results/qlora_h200.jsonl
    python -m benchmarks.qlora --tiny            # CPU smoke test: every lora-jax row, tiny shape
    python -m benchmarks.qlora --only "jax nf4" "jax int8" --quant-impl pallas  # fused GEMM
"""
import argparse
import glob
import subprocess
import sys

from benchmarks.lora_vs_peft import emit, run_one, table

# (name, worker, shape, batch, extra args). The goals: NF4 8B b2 >= 11.7k tok/s at
# <= 28 GiB and b4 fits; FP8 stored 8B >= 26k tok/s at <= 0.5x PEFT+compile's memory; 70B NF4
# trains on one H200 (batch 1, full remat).
ROWS = [
    ("jax nf4", "jax", "8b", 2, ["--variant", "quant=nf4"]),
    ("jax nf4", "jax", "8b", 4, ["--variant", "quant=nf4"]),
    ("jax int8", "jax", "8b", 4, ["--variant", "quant=int8"]),
    ("jax fp8-stored", "jax", "8b", 4, ["--variant", "quant=fp8"]),
    ("jax nf4 70b", "jax", "70b", 1, ["--variant", "quant=nf4", "--variant", "remat=full"]),
    ("peft+bnb nf4", "peft", "8b", 2, ["--bnb4"]),
    ("peft+bnb nf4 ckpt", "peft", "8b", 1, ["--bnb4", "--grad-ckpt"]),
    ("peft+compile bf16", "peft", "8b", 4, ["--compile"]),
]


def command(worker: str, shape: str, batch: int, extra: list[str], args) -> list[str]:
    common = ["--shape", shape, "--batch", str(batch), "--seq", str(args.seq),
              "--steps", str(args.steps)]
    if worker == "jax":
        tiny = ["--variant", "attn=xla"] if args.tiny else []  # cuDNN attention is GPU-only
        impl = ["--variant", f"quant_impl={args.quant_impl}"] if args.quant_impl != "xla" else []
        return [sys.executable, "-m", "benchmarks.jax_worker", *common, *extra, *tiny, *impl]
    device = ["--device", "cpu"] if args.tiny else []
    return [sys.executable, "-m", "benchmarks.peft_worker", *common, *extra, *device]


def install_bitsandbytes() -> str:
    """pip-install the wheel in .wheels/ unless bitsandbytes imports already; returns a note."""
    try:
        import bitsandbytes  # noqa: F401
        return "present"
    except ImportError:
        wheels = sorted(glob.glob(".wheels/bitsandbytes-*.whl"))
        if not wheels:
            return "missing: put the bitsandbytes wheel in .wheels/"
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                               wheels[-1]], capture_output=True, text=True)
        return "installed" if proc.returncode == 0 else f"install failed: {proc.stderr[-300:]}"


def selected_rows(args) -> list[tuple]:
    rows = [r for r in ROWS if not args.only or any(o in r[0] for o in args.only)]
    if args.tiny:  # every lora-jax row on the tiny shape; the torch anchors need a GPU
        rows = [(n, w, "tiny", 2, x) for n, w, s, b, x in rows if w == "jax"]
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--only", nargs="+", default=[], help="substrings of row names to run")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test on the tiny shape")
    ap.add_argument("--timeout", type=int, default=300)
    ap.add_argument("--out", default="")
    ap.add_argument("--quant-impl", choices=("xla", "pallas"), default="xla",
                    help="how the lora-jax rows' NF4 / int8 kernels multiply (pallas: "
                         "dequantised inside the GEMM, models.quant_pallas)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.seq, args.steps = min(args.seq, 32), min(args.steps, 2)
    rows = selected_rows(args)
    if any(w == "peft" and "--bnb4" in x for _, w, _, _, x in rows):
        print(f"bitsandbytes: {install_bitsandbytes()}", file=sys.stderr)
    results = []
    for name, worker, shape, batch, extra in rows:
        row = {"row": name, **run_one(command(worker, shape, batch, extra, args), args.timeout)}
        emit(row, args.out)
        results.append(row)
    print(table(results))
    return results


if __name__ == "__main__":
    main()
