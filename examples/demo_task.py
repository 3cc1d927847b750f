"""The demo's two tasks, with held-out data and a number each: a style (Shakespeare's sonnets,
measured by held-out perplexity) and a skill the base cannot do (swap two words, measured by
exact-match accuracy on words never seen in training).

The base (`examples/base/`) was pretrained on the King James Bible only: it has never seen a
sonnet, nor the `Swap:` format.

    Swap: lamb and river.
    Answer: river and lamb.

The words are the base tokenizer's own whole-word tokens (over 2,000 of them): training pairs
never use the held-out eighth of them, so the adapter must learn to copy and reorder, not
memorise answers.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

SONNETS = Path(__file__).parent / "data" / "sonnets.txt"
HELD_OUT_SONNETS = 2  # the last two sonnets are never trained on
HELD_OUT_EVERY = 8  # every 8th word (alphabetically) is kept for evaluation
WORD = re.compile(r"^ [a-z]{4,}$")


def split_sonnets(path: Path = SONNETS) -> list[str]:
    """The sonnets as separate texts (the file's Roman-numeral headers and title dropped)."""
    blocks = re.split(r"\n\s*[IVXLC]+\s*\n", "\n" + path.read_text(encoding="utf-8"))
    return [b.strip() for b in blocks[1:] if b.strip()]


def swap_prompt(a: str, b: str) -> tuple[str, str]:
    """`(prompt, completion)` of one swap example."""
    return f"Swap: {a} and {b}.\nAnswer:", f" {b} and {a}.\n"


def swap_words(tokenizer: Any) -> tuple[list[str], list[str]]:
    """(training words, held-out words): the tokenizer's single-token lowercase words of four
    letters or more (decoded with their leading space), split deterministically."""
    words = sorted({text[1:] for i in range(tokenizer.vocab_size)
                    if WORD.match(text := tokenizer.decode([i]))})
    held_out = words[::HELD_OUT_EVERY]
    return [w for w in words if w not in set(held_out)], held_out


def swap_pairs(words: list[str], n: int, seed: int) -> list[tuple[str, str]]:
    """`n` ordered pairs of distinct words, drawn with a fixed seed."""
    rng = np.random.default_rng(seed)
    pairs = []
    while len(pairs) < n:
        a, b = rng.choice(len(words), 2, replace=False)
        pairs.append((words[a], words[b]))
    return pairs


def write_training_data(path: Path, words: list[str], *, swaps: int, seed: int) -> Path:
    """A JSONL of the training sonnets (`{"text"}`: loss on every token) and `swaps` swap
    examples over `words` (`{"prompt", "completion"}`: loss on the answer only), for `--data`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{"text": s} for s in split_sonnets()[:-HELD_OUT_SONNETS]]
    records += [dict(zip(("prompt", "completion"), swap_prompt(a, b)))
                for a, b in swap_pairs(words, swaps, seed)]
    order = np.random.default_rng(seed).permutation(len(records))
    path.write_text("".join(json.dumps(records[i]) + "\n" for i in order))
    return path


def held_out_perplexity(nll_fn: Callable[[list[int]], tuple[float, int]], encode,
                        eos_id: int) -> float:
    """`exp` of the mean token NLL over the held-out sonnets (each followed by EOS), given
    `nll_fn(ids) -> (sum of NLLs of ids[1:], count)`."""
    total = count = 0.0
    for text in split_sonnets()[-HELD_OUT_SONNETS:]:
        s, n = nll_fn(list(encode(text)) + [eos_id])
        total, count = total + s, count + n
    return float(np.exp(total / count))


def swap_accuracy(generate: Callable[[list[str]], list[str]], words: list[str], n: int = 40,
                  seed: int = 1) -> tuple[float, list[tuple[str, str, str]]]:
    """Exact-match accuracy of `generate(prompts) -> continuations` on `n` pairs of `words`
    (the answer is a continuation up to its first line break), and the (prompt, got, want)
    rows."""
    prompts, wants = zip(*(swap_prompt(a, b) for a, b in swap_pairs(words, n, seed)))
    rows = [(p, got.split("\n")[0], want.rstrip("\n"))
            for p, got, want in zip(prompts, generate(list(prompts)), wants)]
    return sum(got == want for _, got, want in rows) / len(rows), rows


def greedy(logits_fn: Callable[[jax.Array], jax.Array], prompts: list[list[int]],
           new_tokens: int, pad_id: int) -> list[list[int]]:
    """Greedy continuations of a batch of prompts: right-padded into one `[B, W]` array and
    `new_tokens` full forward passes of that one shape (one compile for any prompt lengths;
    causal attention never sees the padding to the right of a row's position).

    Args:
      logits_fn: `ids [B, W] -> logits [B, W, V]`.
      prompts: token ids per prompt.
      new_tokens: tokens to generate per prompt.
      pad_id: filler for the positions not yet written.

    Returns:
      The `new_tokens` ids generated for each prompt.
    """
    lengths = np.asarray([len(p) for p in prompts])
    ids = np.full((len(prompts), int(lengths.max()) + new_tokens), pad_id, np.int32)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = p
    ids, rows = jnp.asarray(ids), jnp.arange(len(prompts))
    for t in range(new_tokens):
        nxt = jnp.argmax(logits_fn(ids)[rows, lengths + t - 1], axis=-1).astype(jnp.int32)
        ids = ids.at[rows, lengths + t].set(nxt)
    out = np.asarray(ids)
    return [out[i, n:n + new_tokens].tolist() for i, n in enumerate(lengths)]


def full_float32_matmuls():
    """The demos' export checks compare logits to ~1e-5 of their size, so they run at full
    float32 precision. On a GPU, JAX's default float32 matmul precision may round the operands
    to TF32 (10 mantissa bits): merged against unmerged logits then differ by ~1e-2 (the demo on
    an H200, jax 0.11.2, 2026-12-03, against a limit of 1.4e-4), which would also hide a real
    error of that size. The CPU multiplies in float32 either way."""
    return jax.default_matmul_precision("highest")


def check_close(what: str, got, want, rtol: float) -> None:
    """Print max |got - want| against `rtol` times the largest |want| (0: bit-exact) and stop
    the demo with that line if it is over."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    diff, limit = float(np.max(np.abs(got - want))), rtol * float(np.max(np.abs(want)))
    print(f"  {what}: max |diff| = {diff:.2e} (limit {limit:.1e})")
    if diff > limit:
        raise SystemExit(f"error: {what}: max |diff| {diff:.2e} exceeds {limit:.1e}")
