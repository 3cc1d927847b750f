"""Serve the demo's exported adapter with vLLM and check its greedy tokens equal lora-jax's.

After `make demo` (which writes runs/demo/peft), with a python that has vLLM (see
examples/serve_vllm.md for the CPU build):

    LORA_JAX_VLLM_PYTHON=/path/to/vllm-venv/bin/python python -m examples.check_vllm_demo

It generates 8 greedy tokens for six held-out swap prompts and a sonnet prompt, base and
adapted, with lora-jax (`lora_jax.apply` over the re-imported PEFT adapter, float32) and with
vLLM (`tests/vllm_worker.py`: the base directory plus `--enable-lora`, float32), and prints
whether every token agrees. Exit status 0 only if all do.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

import lora_jax as lj
import models
from examples import demo_task

ROOT = Path(__file__).resolve().parents[1]
BASE, PEFT = ROOT / "examples" / "base", ROOT / "runs" / "demo" / "peft"
NEW_TOKENS = 8


def ours(prompts: list[list[int]]) -> dict[str, list[list[int]]]:
    """lora-jax's greedy tokens, base and with the demo's PEFT adapter."""
    model, base = models.load_hf(BASE)
    adapted = lj.import_peft(PEFT, base)
    logits = jax.jit(lambda p, x: lj.apply(model, {"params": p}, x))
    return {name: demo_task.greedy(lambda x, p=params: logits(p, x), prompts, NEW_TOKENS, 0)
            for name, params in (("base", base), ("demo", adapted))}


def vllm(prompts: list[list[int]], python: str) -> dict:
    """vLLM's greedy tokens (a subprocess with the vLLM python), base and with the adapter."""
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"model": str(BASE), "max_tokens": NEW_TOKENS,
                                   "prompts": prompts, "max_lora_rank": 16,
                                   "loras": {"demo": str(PEFT)}}))
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        subprocess.run([python, str(ROOT / "tests" / "vllm_worker.py"), str(job), str(out)],
                       check=True, env=env, capture_output=True)
        return json.loads(out.read_text())


def main() -> int:
    python = os.environ.get("LORA_JAX_VLLM_PYTHON")
    if not python or not PEFT.is_dir():
        print("error: set LORA_JAX_VLLM_PYTHON to a python with vLLM, and run `make demo` first "
              f"(it writes {PEFT})", file=sys.stderr)
        return 2
    lj.check_vllm_servable(PEFT)  # a DoRA adapter (--dora) is refused here, by name
    tok = models.load_tokenizer(BASE)
    _, held_out = demo_task.swap_words(tok)
    texts = [demo_task.swap_prompt(a, b)[0] for a, b in demo_task.swap_pairs(held_out, 6, 1)]
    prompts = [tok.encode(t) for t in [*texts, "Shall I compare thee to a summer's day?\n"]]
    want, got = ours(prompts), vllm(prompts, python)
    same = {name: got["tokens"][name] == want[name] for name in want}
    print(f"vLLM {got['vllm']}: {len(prompts)} prompts x {NEW_TOKENS} greedy tokens; "
          + ", ".join(f"{name} {'equal' if ok else 'DIFFERENT'}" for name, ok in same.items()))
    for text, ids in zip(texts[:2], got["tokens"]["demo"]):
        print(f"  {text!r} -> {tok.decode(ids)!r}")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
