"""lora-jax against PyTorch + HF PEFT (eager and torch.compile) on one GPU, in one run.

Each configuration runs in its own process (so each framework has the GPU to itself and peak
memory is its own), prints one JSON line; this driver collects them into a table.

    python -m benchmarks.lora_vs_peft --shapes 1b 8b --out results.jsonl
    python -m benchmarks.lora_vs_peft --shapes 1b --only jax --jax-variant remat=dots
"""
import argparse
import json
import os
import subprocess
import sys

from benchmarks.shapes import DEFAULT_BATCH

FRAMEWORKS = ("peft-eager", "peft+compile", "jax")


def command(framework: str, shape: str, args) -> list[str]:
    batch = str(args.batch or DEFAULT_BATCH[shape])
    common = ["--shape", shape, "--batch", batch, "--seq", str(args.seq),
              "--steps", str(args.steps)]
    if framework == "jax":
        extra = sum((["--variant", v] for v in args.jax_variant), [])
        return [sys.executable, "-m", "benchmarks.jax_worker", *common, *extra]
    flag = ["--compile"] if framework == "peft+compile" else []
    return [sys.executable, "-m", "benchmarks.peft_worker", *common, *flag]


def run_one(cmd: list[str], timeout: int) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout}s", "cmd": " ".join(cmd[2:])}
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-1500:]
        return {"error": f"exit {proc.returncode}", "cmd": " ".join(cmd[2:]), "tail": tail}
    return json.loads(lines[-1])


def emit(row: dict, out: str) -> None:
    """Print one result as a JSON line and, with `out`, append it there as soon as it exists (a
    later configuration that crashes or times out cannot lose it)."""
    print(json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def table(rows: list[dict]) -> str:
    out = [f"{'framework':<28}{'shape':<6}{'batch':>6}{'tok/s':>10}{'step s':>9}"
           f"{'peak GiB':>10}{'MFU':>7}"]
    for r in rows:
        if "error" in r:
            out.append(f"ERROR {r['cmd']}: {r['error']}")
            continue
        name = r["framework"] + (f" [{r['variant']}]" if r.get("variant") else "")
        out.append(f"{name:<28}{r['shape']:<6}{r['batch']:>6}{r['tokens_per_s']:>10.0f}"
                   f"{r['step_s']:>9.3f}{r['peak_gib']:>10.1f}{r['mfu']:>7.1%}")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", nargs="+", default=["1b", "8b"])
    ap.add_argument("--only", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    ap.add_argument("--batch", type=int, default=0, help="0: 8 for 1b, 4 for 8b")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--jax-variant", action="append", default=[],
                    help="key=value options of benchmarks.jax_worker, repeatable")
    ap.add_argument("--timeout", type=int, default=400)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    rows = []
    for shape in args.shapes:
        for framework in args.only:
            row = run_one(command(framework, shape, args), args.timeout)
            emit(row, args.out)
            rows.append(row)
    print(table(rows))


if __name__ == "__main__":
    main()
