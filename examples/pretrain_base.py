"""Pretrain the small base model that `make demo` fine-tunes: a 4.5M-parameter Llama-3-shaped
model on the King James Bible, written as a Hugging Face directory (bf16 safetensors, config,
BPE tokenizer) to `examples/base/`.

The corpus: the King James Version (1611; public domain: its copyright expired long ago) as
Debian's `bible-kjv-text` package ships it, printed by that package's `bible` program:

    apt-get install bible-kjv && bible Gen1:1-Rev22:21 > kjv_raw.txt
    python -m examples.pretrain_base --corpus kjv_raw.txt          # a few minutes on one GPU

Full-parameter training with this project's own `models.Llama` and optax AdamW (no LoRA here):
a byte-level BPE tokenizer (4,096 ids) is trained on the corpus with the `tokenizers` library,
the verses are packed into rows of `--seq-len` tokens, the last 2% of the token stream is held
out, and the loss goes to `--metrics-file` (JSONL) and a PNG beside it. Same flags, same corpus,
same result: every random draw comes from `--seed`.

The one long function is the training loop, in banner sections: corpus, tokenizer, model, step,
loop, save.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import models
from examples.metrics import MetricsLog, plot_loss
from models import LlamaConfig

HERE = Path(__file__).parent
DEFAULT_OUT = HERE / "base"
EOS = "<|endoftext|>"
# A verse header of `bible`'s output ("Genesis 1"), and a verse number ("  12 And ...").
CHAPTER = re.compile(r"^\S.* \d+$")
VERSE = re.compile(r"^\s+\d+\s+")


def base_config(vocab_size: int, **options) -> LlamaConfig:
    """The shipped base: 4 layers, d=256, GQA 4:2, SwiGLU 768, tied embeddings (4.5M params).

    Example:
      >>> base_config(4096).hidden_size
      256
    """
    return LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=768,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=1024, rope_theta=10000.0,
                       tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                       pad_token_id=0, **options)


def chapters(raw: str) -> list[str]:
    """The chapters of a `bible Gen1:1-Rev22:21` dump, one string each with one verse per line
    (verse numbers and chapter headers dropped, wrapped lines joined), so the model learns
    line breaks too."""
    out: list[list[str]] = []
    for line in raw.splitlines():
        if CHAPTER.match(line):
            out.append([])
        elif VERSE.match(line) and out:
            out[-1].append(VERSE.sub("", line).strip())
        elif line.strip() and out and out[-1]:
            out[-1][-1] += " " + line.strip()
    return ["\n".join(chapter) for chapter in out if chapter]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2's scheme: any text encodes) with `EOS` as id 0."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def token_stream(tok, texts: list[str]) -> np.ndarray:
    """Every chapter's ids followed by EOS, concatenated."""
    eos = tok.token_to_id(EOS)
    ids = [i for enc in tok.encode_batch(texts) for i in (*enc.ids, eos)]
    return np.asarray(ids, np.int32)


def rows(stream: np.ndarray, seq_len: int) -> np.ndarray:
    """`[n, seq_len + 1]` windows (inputs and shifted targets), cut without overlap."""
    n = (len(stream) - 1) // seq_len
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[idx]


def make_step(model, tx):
    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch[:, :-1])
        return models.cross_entropy(logits, batch[:, 1:], jnp.ones(batch[:, 1:].shape, bool))

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)

    return step, jax.jit(loss_fn)


def held_out_loss(eval_loss, params, val_rows: np.ndarray, batch: int = 64) -> float:
    """Mean token loss over the held-out rows (equal-sized chunks but the last)."""
    losses = [float(eval_loss(params, jnp.asarray(val_rows[j:j + batch])))
              for j in range(0, len(val_rows), batch)]
    return float(np.mean(losses))


def pretrain(args) -> Path:
    """Run the pretraining as configured by `parse_args`; returns the output directory."""
    # ---- corpus ----------------------------------------------------------------------------
    texts = chapters(Path(args.corpus).read_text(encoding="utf-8"))
    if len(texts) < 1000:
        raise SystemExit(f"error: {args.corpus} holds {len(texts)} chapters; expected the whole "
                         "`bible Gen1:1-Rev22:21` dump (1,189 chapters)")
    # ---- tokenizer -------------------------------------------------------------------------
    tok = train_tokenizer(texts, args.vocab)
    stream = token_stream(tok, texts)
    n_val = int(len(stream) * args.val_fraction)
    train_rows, val_rows = rows(stream[:-n_val], args.seq_len), rows(stream[-n_val:],
                                                                      args.seq_len)
    print(f"corpus: {len(texts):,} chapters, {len(stream):,} tokens (vocab {tok.get_vocab_size()})"
          f"; {len(train_rows):,} train rows, {len(val_rows):,} held-out rows of {args.seq_len}")
    # ---- model -----------------------------------------------------------------------------
    config = base_config(tok.get_vocab_size(), dtype=jnp.dtype(args.dtype))
    model = models.build(config)
    params = models.init_params(model, jax.random.key(args.seed))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"model: Llama, {n_params / 1e6:.2f}M parameters, {jax.devices()[0].platform}")
    # ---- step ------------------------------------------------------------------------------
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, args.steps,
                                                  args.lr * 0.1)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1))
    opt_state = tx.init(params)
    step, eval_loss = make_step(model, tx)
    # ---- loop ------------------------------------------------------------------------------
    log = MetricsLog(args.metrics_file)
    log.truncate_after(0)
    rng = np.random.default_rng(args.seed)
    order = np.concatenate([rng.permutation(len(train_rows))
                            for _ in range(math.ceil(args.steps * args.batch / len(train_rows)))])
    bar = tqdm(range(1, args.steps + 1), desc="pretrain", file=sys.stderr)
    start = time.perf_counter()
    for i in bar:
        batch = jnp.asarray(train_rows[order[(i - 1) * args.batch:i * args.batch]])
        params, opt_state, loss, norm = step(params, opt_state, batch)
        if i % args.log_every == 0 or i == args.steps:
            record = dict(step=i, loss=float(loss), grad_norm=float(norm),
                          tokens_per_s=i * args.batch * args.seq_len /
                          (time.perf_counter() - start))
            if i % args.eval_every == 0 or i == args.steps:
                record["eval_loss"] = held_out_loss(eval_loss, params, val_rows)
            log.write(**record)
            bar.set_postfix_str(f"loss {record['loss']:.3f} | "
                                f"{record['tokens_per_s']:,.0f} tok/s")
    # ---- save ------------------------------------------------------------------------------
    out = Path(args.out)
    models.save_hf(out, model, params, dtype="bfloat16", overwrite=args.overwrite)
    save_tokenizer(tok, out)
    if args.metrics_file:
        plot_loss(log.read(), Path(args.metrics_file).with_suffix(".png"))
    final = log.read()[-1]
    print(f"saved {out}: train loss {final['loss']:.3f}, held-out {final['eval_loss']:.3f}")
    return out


def save_tokenizer(tok, out: Path) -> None:
    """tokenizer.json plus the special-token names that transformers and vLLM read."""
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOS, "eos_token": EOS,
         "pad_token": EOS, "model_max_length": 1024}, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS}, indent=2))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m examples.pretrain_base",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="the `bible Gen1:1-Rev22:21` dump")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier base there")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--val-fraction", type=float, default=0.02)
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype (float32 on CPU)")
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--metrics-file", default=str(HERE / "data" / "base_pretrain.jsonl"))
    return ap.parse_args(argv)


def main(argv=None) -> int:
    pretrain(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
