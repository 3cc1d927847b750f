"""The PyTorch + HF PEFT side of the benchmark: one configuration per process.

Run by `benchmarks/lora_vs_peft.py`; prints one JSON line. Random-weight Llama of the given
shape, bf16, sdpa attention, LoRA r=16 on all seven projections, AdamW on the adapters.
"""
import argparse
import json
import statistics
import time

import torch

from benchmarks.shapes import SHAPES, TARGETS, flops_per_token

PEAK_BF16 = 790e12  # measured bf16 matmul rate of one H200 (device/KINDS.md)


def build(shape: str, compile_: bool, rank: int, device: str = "cuda", dora: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**{k: v for k, v in SHAPES[shape].items() if k != "model_type"})
    cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                             lora_dropout=0.0, use_dora=dora))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    fwd = torch.compile(model) if compile_ else model
    return model, fwd, opt


def train_step(fwd, opt, ids):
    """One AdamW step on the next-token loss of `ids` [B, T]; returns the loss (max_fit uses it)."""
    loss = fwd(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--device", default="cuda", help="cpu: smoke test only")
    ap.add_argument("--dora", action="store_true", help="PEFT's DoRA (use_dora=True)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, fwd, opt = build(args.shape, args.compile, args.rank, args.device, args.dora)
    vocab = SHAPES[args.shape]["vocab_size"]
    ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device)

    def step():
        return train_step(fwd, opt, ids)

    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    sync()
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    tokens = args.batch * args.seq
    tps = tokens / dt
    print(json.dumps({
        "framework": ("peft+compile" if args.compile else "peft-eager") + (
            "+dora" if args.dora else ""), "shape": args.shape,
        "batch": args.batch, "seq": args.seq, "step_s": dt, "tokens_per_s": tps,
        "peak_gib": (torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0),
        "mfu": tps * flops_per_token(SHAPES[args.shape], args.seq) / PEAK_BF16,
        "loss": float(loss), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
