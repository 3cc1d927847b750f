"""`make demo`: LoRA on the embedded GPT-2-shaped model and the embedded sonnets, end to end.

Fine-tunes with `examples.train` (progress bar, metrics JSONL, loss plot, orbax adapter, PEFT
export, merged export), then checks what was written: merged == unmerged (in memory and
reloaded from the HF export), the orbax adapter and the PEFT adapter reload to the same model,
and prints a generated sample before and after. Outputs go to runs/demo/.

    python -m examples.demo                    # ~2 minutes on 2 CPU cores
    python -m examples.demo --steps 50         # any train flag overrides the demo's
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax as lj
import models
from examples import train as train_lib
from examples.cli import run_cli

OUT = "runs/demo"
DEMO_FLAGS = [
    "--model", "gpt2", "--dp", "1", "--steps", "300", "--eval-interval", "50",
    "--rank", "16", "--alpha", "32", "--targets", "all-linear", "--lr", "1e-2",
    "--batch-size", "8", "--seq-len", "128", "--seed", "0",
    "--metrics-file", f"{OUT}/metrics.jsonl", "--adapter-out", f"{OUT}/adapter",
    "--export-peft", f"{OUT}/peft", "--export-merged", f"{OUT}/merged", "--overwrite",
]
PROMPT = "Shall I compare thee"
SAMPLING = dict(temperature=0.8, top_p=0.95, rng=jax.random.key(0))
# Merging reorders sums (x(W + sAB) against xW + s(xA)B): float32 rounding, a few ulps per
# layer, relative to the logits' size. 1e-5 of the largest logit is ~100x that and far below a
# real error (a wrong scale or a lost adapter changes logits by O(1)).
MERGE_RTOL = 1e-5

def demo(cfg) -> None:
    start = time.perf_counter()
    print("lora-jax demo: LoRA fine-tuning of a GPT-2-shaped model (4 layers, d=128, byte "
          "tokenizer)\non Shakespeare's sonnets (examples/data/sonnets.txt, public domain, "
          "9 KB; the last 10% held out).\nThe base model is RANDOMLY initialised and frozen: "
          "only the rank-16 adapters on its linear\nlayers train, so expect the loss to fall "
          "from ~9.5 to ~3 nats per byte, not English.\n")
    result = train_lib.train(cfg)
    loss_table(result.records)
    check_exports(result)
    show_samples(result)
    print(f"\ndemo done in {time.perf_counter() - start:.0f}s; outputs in "
          f"{Path(cfg.metrics_file).parent}/")


def main(argv: list[str] | None = None) -> int:
    return run_cli(demo, DEMO_FLAGS + list(sys.argv[1:] if argv is None else argv))


def loss_table(records: list[dict]) -> None:
    first, last = records[0], records[-1]
    print(f"\ntraining loss: {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} "
          f"at step {last['step']}")
    for r in records:
        if "eval_loss" in r:
            print(f"  step {r['step']:4d}   train {r['loss']:.3f}   held-out {r['eval_loss']:.3f}")
    assert last["loss"] < first["loss"] - 1.0, "the loss did not fall"


def check_exports(result: train_lib.Trained) -> None:
    """Merged == unmerged; each saved form reloads to the same model."""
    model, params, out = result.model, result.params, result.outputs
    ids = jnp.asarray([result.tokenizer.encode(
        "From fairest creatures we desire increase,\nThat thereby beauty's rose might never die")])
    base = lj.split(params)[0]
    adapted = lj.apply(model, {"params": params}, ids)
    merged = model.apply({"params": lj.merge(params)}, ids)
    report("merged (lora_jax.merge) vs unmerged", merged, adapted, MERGE_RTOL)
    _, from_hf = models.load_hf(out["merged"] / "hf")
    report("merged HF export (save_hf -> load_hf) vs unmerged",
           model.apply({"params": from_hf}, ids), adapted, MERGE_RTOL)
    from_orbax = lj.apply(model, {"params": lj.load_adapter(out["adapter"], base)}, ids)
    report("orbax adapter (save_adapter -> load_adapter) vs trained", from_orbax, adapted, 0.0)
    from_peft = lj.apply(model, {"params": lj.import_peft(out["peft"], base)}, ids)
    report("PEFT adapter (export_peft -> import_peft) vs trained", from_peft, adapted, 0.0)
    peft = lj.peft_lora_config(out["peft"])
    print(f"  PEFT adapter_config.json: r={peft.r}, lora_alpha={peft.lora_alpha}, "
          f"target_modules={list(peft.target_modules)}")


def report(what: str, got: jax.Array, want: jax.Array, rtol: float) -> None:
    """Max |got - want| against `rtol` times the largest |want| (0: bit-exact)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    diff, limit = float(np.max(np.abs(got - want))), rtol * float(np.max(np.abs(want)))
    print(f"  {what}: max |diff| = {diff:.2e} (limit {limit:.1e})")
    assert diff <= limit, what


def show_samples(result: train_lib.Trained) -> None:
    """Greedy and sampled continuations, from the random base alone and with the adapters."""
    base = lj.split(result.params)[0]
    for name, params in (("random base", base), ("base + LoRA", result.params)):
        for how, kwargs in (("greedy", {}), ("sampled", SAMPLING)):
            text = train_lib.sample(result.model, params, result.tokenizer, PROMPT, 120, **kwargs)
            print(f"\n{name}, {how}:\n  {PROMPT}{text}".replace("\n", "\n  "))


if __name__ == "__main__":
    sys.exit(main())
