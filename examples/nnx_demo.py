"""The demo's fine-tune with a Flax NNX model: the shipped base as an NNX Llama, LoRA by
`lora_jax.nnx`, trained with `nnx.Optimizer`, measured on held-out data, exported as PEFT and
checked against the Linen path.

    python -m examples.nnx_demo                 # about 2 minutes on 2 CPU cores
    python -m examples.nnx_demo --steps 20
    python -m examples.nnx_demo --quantize nf4  # QLoRA: the frozen projections stored in NF4

It loads `examples/base/` (a Linen checkpoint directory) with `models.load_hf`, converts the
weights to the NNX Llama of `examples/nnx_llama.py` (same module names), injects rank-16
adapters on every linear layer, trains them on the demo's data (12 sonnets and word swaps,
`examples/demo_task.py`) with one `nnx.jit` step, and prints the held-out table of `make demo`.
Then it writes the adapter in PEFT's format from `lj.nnx.params(model)`, imports it into the
*Linen* Llama and checks both give the same logits, and checks the merged NNX model too.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm import tqdm

import lora_jax as lj
import models
from examples import demo_task
from examples.data import Batches, read_documents, tokenize
from examples.nnx_llama import from_linen
from models.quant import FORMATS, quantize_params

BASE = Path(__file__).parent / "base"
# The NNX and Linen forwards run the same float32 ops; merging reassociates x(W + sAB).
MATCH_RTOL, MERGE_RTOL = 1e-5, 1e-4


def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: dict) -> jax.Array:
    """One AdamW step on the adapters: token-weighted next-token cross-entropy."""
    def loss_fn(m):
        return models.cross_entropy(m(batch["inputs"]), batch["targets"], batch["mask"])
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, lj.nnx.LoraParam))(model)
    optimizer.update(model, grads)
    return loss


def metrics(model: nnx.Module, tok) -> dict:
    """Held-out sonnet perplexity and swap accuracy (examples.demo_task) for an NNX model."""
    logits = nnx.jit(lambda m, ids: m(ids))

    def nll(ids: list[int]) -> tuple[float, int]:
        x = jnp.asarray([ids], jnp.int32)
        logp = jax.nn.log_softmax(logits(model, x[:, :-1]).astype(jnp.float32), axis=-1)
        return -float(jnp.sum(jnp.take_along_axis(logp, x[:, 1:, None], axis=-1))), len(ids) - 1

    def generate(prompts: list[str]) -> list[str]:
        out = demo_task.greedy(functools.partial(logits, model),
                               [tok.encode(p) for p in prompts], 8, tok.pad_id or 0)
        return [tok.decode(ids) for ids in out]

    _, held_out = demo_task.swap_words(tok)
    return {"perplexity": demo_task.held_out_perplexity(nll, tok.encode, tok.eos_id),
            "swap_accuracy": demo_task.swap_accuracy(generate, held_out)[0]}


def run(args) -> dict:
    """The demo; returns the base and adapted metrics."""
    start = time.perf_counter()
    linen_model, params = models.load_hf(BASE)
    tok = models.load_tokenizer(BASE)
    if args.quantize:  # the Linen twin (the check at the end) holds the same quantised kernels
        linen_model = models.build(dataclasses.replace(linen_model.config,
                                                       quantize=args.quantize))
        params = jax.jit(quantize_params, static_argnums=1)(params, args.quantize)
    model = from_linen(linen_model.config, params)
    before = metrics(model, tok)
    lora = lj.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    lj.nnx.inject(model, lora, jax.random.key(args.seed))
    words, _ = demo_task.swap_words(tok)
    data = demo_task.write_training_data(Path(args.out) / "data.jsonl", words, swaps=3000,
                                         seed=args.seed)
    ids, weights = tokenize(read_documents(data), tok.encode, tok.eos_id)
    batches = Batches(ids, weights, batch=args.batch_size, seq_len=128, seed=args.seed)
    optimizer = nnx.Optimizer(model, optax.adamw(args.lr, weight_decay=0.0),
                              wrt=lj.nnx.LoraParam)
    step = nnx.jit(train_step)
    bar = tqdm(range(args.steps), desc="nnx lora", file=sys.stderr)
    for _ in bar:
        loss = step(model, optimizer, jax.tree.map(jnp.asarray, next(batches)))
        bar.set_postfix_str(f"loss {float(loss):.3f}")
    after = metrics(model, tok)
    print(f"\n{'held-out metric':<48}{'base':>9}{'base + LoRA':>13}")
    print(f"{'sonnets XIII-XIV: perplexity (lower is better)':<48}{before['perplexity']:>9.1f}"
          f"{after['perplexity']:>13.1f}")
    print(f"{'swap two unseen words: exact match (40 pairs)':<48}"
          f"{before['swap_accuracy']:>9.0%}{after['swap_accuracy']:>13.0%}")
    check_against_linen(model, linen_model, params, lora, tok, Path(args.out))
    print(f"\nnnx demo done in {time.perf_counter() - start:.0f}s; outputs in {args.out}/")
    return {"base": before, "base + LoRA": after}


def check_against_linen(model, linen_model, base_params, lora, tok, out: Path) -> None:
    """The NNX adapter, exported as PEFT and imported into the Linen Llama, gives the same
    logits; the merged NNX model gives the adapted logits."""
    ids = jnp.asarray([tok.encode("From fairest creatures we desire increase,")])
    peft_dir = lj.export_peft(out / "peft", lj.nnx.params(model), lora, overwrite=True,
                              **models.peft_naming(linen_model))
    with demo_task.full_float32_matmuls():
        linen = lj.apply(linen_model, {"params": lj.import_peft(peft_dir, base_params)}, ids)
        demo_task.check_close("Linen Llama + the NNX model's PEFT export vs NNX", linen,
                              model(ids), MATCH_RTOL)
        if linen_model.config.quantize == "fp8":  # unmerged, the activations are e4m3-quantised
            print("  merged NNX model: not compared (FP8 quantises activations only unmerged)")
            return
        demo_task.check_close("merged NNX model (lj.nnx.merge) vs unmerged",
                              lj.nnx.merge(model)(ids), model(ids), MERGE_RTOL)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m examples.nnx_demo", description=__doc__)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16, help="sequences of 128 tokens a step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/nnx_demo")
    ap.add_argument("--quantize", choices=FORMATS, default=None,
                    help="store the frozen block projections quantised (QLoRA's base, "
                         "models.nnx_quant); the output head and embeddings stay float")
    return ap.parse_args(argv)


if __name__ == "__main__":
    run(parse_args())
