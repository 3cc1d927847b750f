"""`make demo`: LoRA teaches a small pretrained model a style and a skill, end to end.

The base (`examples/base/`, 4.2M parameters, pretrained on the King James Bible by
`examples/pretrain_base.py`) has never seen a sonnet nor the `Swap:` task. Rank-16 adapters on
its linear layers are fine-tuned with `examples.train` (progress bar, metrics JSONL, loss plot,
orbax adapter, PEFT export, merged export) on 12 of Shakespeare's sonnets and 400 word swaps;
then the demo measures both on held-out data, base against adapted (held-out sonnets'
perplexity; swap accuracy on words never trained on), prints greedy samples side by side, and
checks what was written: merged == unmerged (in memory and reloaded from the HF export), and the
orbax and PEFT adapters reload to the same model. Outputs go to runs/demo/.

    python -m examples.demo                    # about 3 minutes on 2 CPU cores
    python -m examples.demo --steps 20         # any train flag overrides the demo's
"""
from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import lora_jax as lj
import models
from examples import demo_task
from examples import train as train_lib
from examples.cli import run_cli

OUT = "runs/demo"
BASE = str(Path(__file__).parent / "base")
DEMO_FLAGS = [
    "--model-path", BASE, "--data", f"{OUT}/data.jsonl", "--dp", "1", "--steps", "200",
    "--eval-interval", "0", "--rank", "16", "--alpha", "32", "--targets", "all-linear",
    "--lr", "3e-3", "--batch-size", "16", "--seq-len", "128", "--seed", "0",
    "--metrics-file", f"{OUT}/metrics.jsonl", "--adapter-out", f"{OUT}/adapter",
    "--export-peft", f"{OUT}/peft", "--export-merged", f"{OUT}/merged", "--overwrite",
]
SWAPS = 3000  # training examples of the swap task
SONNET_PROMPT = "Shall I compare thee to a summer's day?\n"
# Merging reorders sums (x(W + sAB) against xW + s(xA)B): float32 rounding, a few ulps per
# layer, relative to the logits' size. 1e-5 of the largest logit is ~100x that and far below a
# real error (a wrong scale or a lost adapter changes logits by O(1)).
MERGE_RTOL = 1e-5


def demo(cfg) -> dict:
    """Train, measure, check the exports, show samples; returns the before/after metrics."""
    start = time.perf_counter()
    print("lora-jax demo: a 4.2M-parameter Llama pretrained on the King James Bible "
          "(examples/base/)\nlearns Shakespeare's sonnets (a style) and to swap two words "
          "(a skill) through rank-16\nadapters on its linear layers; the base stays frozen.\n")
    words, _ = demo_task.swap_words(models.load_tokenizer(cfg.model_path))
    demo_task.write_training_data(Path(cfg.data), words, swaps=SWAPS, seed=cfg.seed)
    result = train_lib.train(cfg)
    loss_line(result.records)
    metrics = measure(result)
    check_exports(result)
    show_samples(result)
    print(f"\ndemo done in {time.perf_counter() - start:.0f}s; outputs in "
          f"{Path(cfg.metrics_file).parent}/")
    return metrics


def main(argv: list[str] | None = None) -> int:
    return run_cli(demo, DEMO_FLAGS + list(sys.argv[1:] if argv is None else argv))


def loss_line(records: list[dict]) -> None:
    first, last = records[0], records[-1]
    print(f"\ntraining loss: {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} "
          f"at step {last['step']}")


def measure(result: train_lib.Trained) -> dict:
    """Held-out perplexity on the sonnets and swap accuracy, base and adapted, as a table."""
    model, tok = result.model, result.tokenizer
    _, held_out_words = demo_task.swap_words(tok)
    logits = jax.jit(lambda params, ids: lj.apply(model, {"params": params}, ids))
    rows = {}
    for name, params in (("base", lj.split(result.params)[0]), ("base + LoRA", result.params)):
        ppl = demo_task.held_out_perplexity(functools.partial(nll, logits, params), tok.encode,
                                            tok.eos_id)
        accuracy, _ = demo_task.swap_accuracy(
            functools.partial(generate, logits, params, tok), held_out_words)
        rows[name] = {"perplexity": ppl, "swap_accuracy": accuracy}
    base, tuned = rows["base"], rows["base + LoRA"]
    print(f"\n{'held-out metric':<48}{'base':>9}{'base + LoRA':>13}")
    print(f"{'sonnets XIII-XIV: perplexity (lower is better)':<48}{base['perplexity']:>9.1f}"
          f"{tuned['perplexity']:>13.1f}")
    print(f"{'swap two unseen words: exact match (40 pairs)':<48}"
          f"{base['swap_accuracy']:>9.0%}{tuned['swap_accuracy']:>13.0%}")
    return rows


def generate(logits, params, tok, prompts: list[str], new_tokens: int = 8) -> list[str]:
    """Greedy continuations of a batch of prompts, decoded."""
    out = demo_task.greedy(functools.partial(logits, params),
                           [tok.encode(p) for p in prompts], new_tokens, tok.pad_id or 0)
    return [tok.decode(ids) for ids in out]


def nll(logits, params, ids: list[int]) -> tuple[float, int]:
    """Sum of the token NLLs of `ids[1:]` given the prefix (adapters honoured), and the count."""
    x = jnp.asarray([ids], jnp.int32)
    logp = jax.nn.log_softmax(logits(params, x[:, :-1]).astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, x[:, 1:, None], axis=-1)
    return -float(jnp.sum(picked)), len(ids) - 1


def check_exports(result: train_lib.Trained) -> None:
    """Merged == unmerged; each saved form reloads to the same model."""
    model, params, out = result.model, result.params, result.outputs
    ids = jnp.asarray([result.tokenizer.encode(
        "From fairest creatures we desire increase,\nThat thereby beauty's rose might never die")])
    base = lj.split(params)[0]
    check = demo_task.check_close
    with demo_task.full_float32_matmuls():
        adapted = lj.apply(model, {"params": params}, ids)
        merged = model.apply({"params": lj.merge(params)}, ids)
        check("merged (lora_jax.merge) vs unmerged", merged, adapted, MERGE_RTOL)
        _, from_hf = models.load_hf(out["merged"] / "hf")
        check("merged HF export (save_hf -> load_hf) vs unmerged",
              model.apply({"params": from_hf}, ids), adapted, MERGE_RTOL)
        from_orbax = lj.apply(model, {"params": lj.load_adapter(out["adapter"], base)}, ids)
        check("orbax adapter (save_adapter -> load_adapter) vs trained", from_orbax, adapted, 0.0)
        from_peft = lj.apply(model, {"params": lj.import_peft(out["peft"], base)}, ids)
        check("PEFT adapter (export_peft -> import_peft) vs trained", from_peft, adapted, 0.0)
    peft = lj.peft_lora_config(out["peft"])
    print(f"  PEFT adapter_config.json: r={peft.r}, lora_alpha={peft.lora_alpha}, "
          f"target_modules={list(peft.target_modules)}")


def show_samples(result: train_lib.Trained) -> None:
    """Greedy continuations of a sonnet's first line and of a held-out swap, side by side."""
    base = lj.split(result.params)[0]
    _, held_out_words = demo_task.swap_words(result.tokenizer)
    swap, _ = demo_task.swap_prompt(*demo_task.swap_pairs(held_out_words, 1, 7)[0])
    for prompt, tokens in ((SONNET_PROMPT, 40), (swap, 8)):
        print("\n" + "-" * 78 + f"\nprompt: {prompt!r}")
        for name, params in (("base", base), ("base + LoRA", result.params)):
            text = train_lib.sample(result.model, params, result.tokenizer, prompt, tokens)
            print(f"  {name + ':':<13}{text!r}")


if __name__ == "__main__":
    sys.exit(main())
