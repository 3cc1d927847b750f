"""How much a quantised frozen base changes a TRAINED model: forward drift and LoRA loss curves.

The model is `examples/base/` (a small Llama pretrained on the King James Bible by this project),
so its weights have trained structure, unlike the random-weight benchmark shapes. For each
format (nf4, int8, fp8) against the unquantised base (float32 compute):

  drift   held-out text (the demo's two held-out sonnets): mean next-token loss and the relative
          L2 error of the logits, ||logits_q - logits|| / ||logits||;
  curves  the demo's fine-tune (`examples.demo` task: sonnets + word swaps, r=16 on all linear
          layers, AdamW 3e-3, batch 16 x 128, seed 0) for --steps steps through `examples.train`
          with `--quantize`, the per-step training loss against the unquantised run's.

One JSON line per format; CPU is enough (about 2 minutes per curve on 2 cores).

    python -m benchmarks.quant_accuracy --steps 100 --out benchmarks/results/quant_accuracy.jsonl
"""
import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import models
from examples import demo_task
from examples import train as train_lib
from models.quant import quantize_params

BASE = str(Path(__file__).resolve().parent.parent / "examples" / "base")
FORMATS = ("nf4", "int8", "fp8")


def held_out_ids(tokenizer) -> jnp.ndarray:
    text = "\n\n".join(demo_task.split_sonnets()[-demo_task.HELD_OUT_SONNETS:])
    ids = tokenizer.encode(text)
    return jnp.asarray(ids[:512], jnp.int32)[None]


def forward_drift(fmt: str, ids) -> dict:
    """Loss and logits of the base with its block projections in `fmt`, against float32."""
    dense, params = models.load_hf(BASE, dtype=jnp.float32)
    quant_model = models.build(dataclasses.replace(dense.config, quantize=fmt))
    qparams = quantize_params(params, fmt)
    ref = dense.apply({"params": params}, ids)
    got = quant_model.apply({"params": qparams}, ids)
    loss = lambda logits: float(models.cross_entropy(logits, ids, shift=True))  # noqa: E731
    return {"loss_base": loss(ref), "loss_quant": loss(got),
            "logits_rel_err": float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))}


def loss_curve(fmt: str | None, steps: int, work: Path) -> list[float]:
    tokenizer = models.load_tokenizer(BASE)
    words, _ = demo_task.swap_words(tokenizer)
    data = demo_task.write_training_data(work / "data.jsonl", words, swaps=400, seed=0)
    metrics = work / f"metrics_{fmt or 'base'}.jsonl"
    flags = ["--model-path", BASE, "--data", str(data), "--dp", "1", "--steps", str(steps),
             "--eval-interval", "0", "--rank", "16", "--alpha", "32", "--targets", "all-linear",
             "--lr", "3e-3", "--batch-size", "16", "--seq-len", "128", "--seed", "0",
             "--metrics-file", str(metrics), "--no-progress"]
    if fmt:
        flags += ["--quantize", fmt]
    assert train_lib.main(flags) == 0
    return [r["loss"] for r in map(json.loads, open(metrics)) if "loss" in r]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--formats", nargs="+", default=list(FORMATS))
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    ids = held_out_ids(models.load_tokenizer(BASE))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base_curve = np.array(loss_curve(None, args.steps, Path(tmp)))
        for fmt in args.formats:
            curve = np.array(loss_curve(fmt, args.steps, Path(tmp)))
            gap = np.abs(curve - base_curve)
            row = {"format": fmt, **forward_drift(fmt, ids), "steps": args.steps,
                   "final_loss_base": float(base_curve[-1]), "final_loss_quant": float(curve[-1]),
                   "max_abs_loss_gap": float(gap.max()),
                   "mean_abs_loss_gap_last10": float(gap[-10:].mean()),
                   "curve_base": base_curve.round(4).tolist(), "curve_quant": curve.round(4).tolist()}
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
