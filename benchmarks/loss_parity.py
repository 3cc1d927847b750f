"""Loss parity on the GPU: lora-jax against PyTorch + PEFT, bf16, from identical weights.

PyTorch builds a random-weight Llama of the chosen shape, wraps it with PEFT (r=16 on all seven
projections) and saves both with `save_pretrained`; lora-jax loads the same files with
`models.load_hf` and `lora_jax.import_peft`. Both then train the adapters for `--steps` AdamW
steps on the same batches (a small pool, cycled, so the loss falls), and the per-step relative
loss difference is reported against the seed's bf16 threshold of 1e-2.

    python -m benchmarks.loss_parity --shape 1b --steps 100 --out parity.json

`--compare fp8` instead trains lora-jax twice from one random init, bf16 base against the FP8
frozen base (`base_fp8`), with the same batches (no PyTorch), against a 2e-2 threshold:

    python -m benchmarks.loss_parity --compare fp8 --shape 8b --steps 100
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from benchmarks.shapes import SHAPES, TARGETS

BETAS, EPS, WD = (0.9, 0.999), 1e-8, 0.0


def batches(shape: str, batch: int, seq: int, pool: int = 4, seed: int = 0,
            data: str = "pool", steps: int = 0) -> np.ndarray:
    """[n, batch, seq] token ids; step i trains on batch i % n.

    "pool": `pool` batches of uniform random tokens, cycled. The only thing to learn is the pool
    itself, so the loss falls fast and then to ~0 (memorisation): a harsh test, where a small
    phase shift between two runs is a large relative difference.
    "markov": a fresh batch every step (n = steps) from a fixed random Markov chain over 1,024
    tokens with 4 successors each: a language-like task that cannot be memorised, whose loss
    falls towards the chain's entropy (~1 nat) the way a fine-tuning loss falls."""
    vocab = SHAPES[shape]["vocab_size"]
    rng = np.random.default_rng(seed)
    if data == "pool":
        return rng.integers(0, vocab, (pool, batch, seq), dtype=np.int64)
    states, fanout = min(1024, vocab), 4
    tokens = rng.choice(vocab, states, replace=False)           # which ids the chain uses
    successors = rng.integers(0, states, (states, fanout))
    probs = rng.dirichlet(np.ones(fanout), states)
    cumulative = probs.cumsum(axis=1)
    out = np.empty((steps * batch, seq), dtype=np.int64)
    state = rng.integers(0, states, steps * batch)
    for t in range(seq):
        out[:, t] = tokens[state]
        pick = (rng.random(len(state))[:, None] > cumulative[state]).sum(axis=1)
        state = successors[state, np.minimum(pick, fanout - 1)]
    return out.reshape(steps, batch, seq)


def data_for(args) -> np.ndarray:
    return batches(args.shape, args.batch, args.seq, data=args.data, steps=args.steps)


def torch_part(args, workdir: str) -> list[float]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(**{k: v for k, v in SHAPES[args.shape].items() if k != "model_type"})
    cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(args.device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model.save_pretrained(os.path.join(workdir, "base"), safe_serialization=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                             lora_dropout=0.0))
    model.save_pretrained(os.path.join(workdir, "adapter"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                            betas=BETAS, eps=EPS, weight_decay=WD)
    data = torch.from_numpy(data_for(args)).to(args.device)
    losses = []
    for step in range(args.steps):
        ids = data[step % len(data)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def jax_part(args, workdir: str) -> list[float]:
    import jax
    import jax.numpy as jnp
    import optax

    import lora_jax as lj
    from models import head_kernel, load_hf
    from models.fused_ce import frozen_head_cross_entropy

    model, params = load_hf(os.path.join(workdir, "base"), dtype=jnp.bfloat16,
                            param_dtype=jnp.bfloat16, scan_layers=True,
                            remat_policy="dots_saveable")
    params = lj.import_peft(os.path.join(workdir, "adapter"), params)
    base, adapters = lj.split(params)
    tx = lj.optimizer(optax.adamw(args.lr, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD),
                      adapters)
    opt_state = tx.init(adapters)
    cfg = model.config

    def loss_fn(a, ids):
        hidden = lj.apply(model, {"params": lj.combine(base, a)}, ids, return_hidden=True)
        return frozen_head_cross_entropy(hidden, head_kernel(cfg, base), ids, shift=True)

    @jax.jit
    def step(a, s, ids):
        loss, g = jax.value_and_grad(loss_fn)(a, ids)
        updates, s = tx.update(g, s, a)
        return optax.apply_updates(a, updates), s, loss

    data = jnp.asarray(data_for(args), jnp.int32)
    losses = []
    for i in range(args.steps):
        adapters, opt_state, loss = step(adapters, opt_state, data[i % len(data)])
        losses.append(float(loss))
    return losses


def jax_random_part(args, fp8: bool) -> list[float]:
    """lora-jax from `benchmarks.jax_worker`'s random init (the same for both base dtypes)."""
    import jax
    import jax.numpy as jnp
    import optax

    import lora_jax as lj
    from benchmarks import jax_worker
    attn = "cudnn" if args.device == "cuda" else "xla"  # cuDNN flash attention is GPU-only
    opts = jax_worker.parse_variant([f"fp8={int(fp8)}", f"attn={attn}",
                                     f"fp8_recipe={args.fp8_recipe}", f"init={args.init}",
                                     f"fp8_skip={args.fp8_skip}"])
    cfg, model, base, adapters = jax_worker.build(args.shape, opts, args.batch, args.seq)
    tx = lj.optimizer(optax.adamw(args.lr, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=WD),
                      adapters)
    opt_state = tx.init(adapters)
    step = jax_worker.make_step(cfg, model, tx, opts)
    data = jnp.asarray(data_for(args), jnp.int32)
    losses = []
    for i in range(args.steps):
        adapters, opt_state, loss = step(adapters, opt_state, base, data[i % len(data)])
        losses.append(float(loss))
    return losses


PARTS = {"torch": torch_part, "jax": jax_part,
         "jax-bf16": lambda args, _: jax_random_part(args, fp8=False),
         "jax-fp8": lambda args, _: jax_random_part(args, fp8=True)}
COMPARISONS = {"peft": (("torch", "jax"), 1e-2), "fp8": (("jax-bf16", "jax-fp8"), 2e-2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-4,
                    help="1e-3 memorises the pool: the loss falls to ~0.01, where a relative "
                         "difference measures bf16 noise, not the implementation")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--data", choices=("pool", "markov"), default="pool",
                    help="pool: 4 random batches cycled (memorised); markov: a fresh batch each "
                         "step from a fixed Markov chain (see batches())")
    ap.add_argument("--compare", choices=sorted(COMPARISONS), default="peft",
                    help="peft: lora-jax against PyTorch + PEFT (threshold 1e-2); fp8: lora-jax "
                         "bf16 base against the FP8 frozen base (threshold 2e-2)")
    ap.add_argument("--fp8-recipe", default="tensor_e5m2",
                    help="with --compare fp8: the quantisation recipe (benchmarks.fp8_recipes)")
    ap.add_argument("--init", choices=("hf", "scaled"), default="hf",
                    help="with --compare fp8: the random init (benchmarks.jax_worker's init=): hf "
                         "is transformers' normal(0.02); scaled divides o_proj/down_proj by "
                         "sqrt(2 L) (Megatron's scaled init)")
    ap.add_argument("--fp8-skip", default="",
                    help="with --compare fp8: projections kept in bf16, joined by '+' "
                         "(e.g. q_proj+k_proj; the model option base_fp8_skip)")
    ap.add_argument("--part", choices=("both", *PARTS), default="both")
    ap.add_argument("--workdir", default="")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="lora_parity_")
    if args.part != "both":
        print(json.dumps(PARTS[args.part](args, workdir)))
        return
    (ref_part, test_part), threshold = COMPARISONS[args.compare]
    # Each framework in its own process, so neither holds GPU memory the other needs.
    common = [sys.executable, "-m", "benchmarks.loss_parity", "--shape", args.shape, "--batch",
              str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--lr",
              str(args.lr), "--device", args.device, "--data", args.data, "--fp8-recipe",
              args.fp8_recipe, "--init", args.init, "--fp8-skip", args.fp8_skip,
              "--workdir", workdir]
    results = {}
    for part in (ref_part, test_part):
        out = subprocess.run(common + ["--part", part], capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{part} part failed:\n{out.stderr[-3000:]}")
        results[part] = json.loads(out.stdout.strip().splitlines()[-1])
    t, j = np.array(results[ref_part]), np.array(results[test_part])
    rel = np.abs(j - t) / np.abs(t)
    for i in list(range(0, args.steps, max(1, args.steps // 10))) + [args.steps - 1]:
        print(f"step {i:4d}  {ref_part} {t[i]:.5f}  {test_part} {j[i]:.5f}  rel {rel[i]:.2e}")
    summary = {"compare": args.compare, "data": args.data, "fp8_recipe": args.fp8_recipe,
               "init": args.init, "fp8_skip": args.fp8_skip,
               "shape": args.shape, "lr": args.lr, "batch": args.batch, "seq": args.seq,
               "steps": args.steps, "max_rel_diff": float(rel.max()),
               "mean_rel_diff": float(rel.mean()), "first_loss": [float(t[0]), float(j[0])],
               "last_loss": [float(t[-1]), float(j[-1])], "threshold": threshold,
               "pass": bool(rel.max() < threshold), ref_part: t.tolist(), test_part: j.tolist()}
    print(json.dumps({k: v for k, v in summary.items() if k not in (ref_part, test_part)}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f)


if __name__ == "__main__":
    main()
