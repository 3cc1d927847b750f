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


def build(shape: str, compile_: bool, rank: int, device: str = "cuda", dora: bool = False,
          bnb4: bool = False, grad_ckpt: bool = False):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**{k: v for k, v in SHAPES[shape].items() if k != "model_type"})
    cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    if bnb4:
        quantize_linear_4bit(model, device)
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                             lora_dropout=0.0, use_dora=dora))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                            betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    fwd = torch.compile(model) if compile_ else model
    return model, fwd, opt


def quantize_linear_4bit(model, device: str) -> None:
    """QLoRA's base (bitsandbytes): every decoder projection becomes a `Linear4bit` (NF4, block 64,
    double-quantised absmax, bf16 compute), quantised as its weight moves to `device`; the
    embeddings, norms and LM head stay bf16 (as `BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bf16)`
    leaves them; `prepare_model_for_kbit_training`'s float32 upcast is not applied)."""
    import bitsandbytes as bnb
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if not isinstance(child, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(child.in_features, child.out_features,
                                      bias=child.bias is not None, compute_dtype=torch.bfloat16,
                                      compress_statistics=True, quant_type="nf4", device="meta")
                q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                             compress_statistics=True, quant_type="nf4",
                                             blocksize=64).to(device)
                setattr(parent, name, q)
                del child
    if device == "cuda":
        torch.cuda.empty_cache()


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
    ap.add_argument("--bnb4", action="store_true",
                    help="QLoRA: NF4 (double quant) bitsandbytes base, bf16 compute")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    args = ap.parse_args()
    torch.manual_seed(0)
    model, fwd, opt = build(args.shape, args.compile, args.rank, args.device, dora=args.dora,
                            bnb4=args.bnb4, grad_ckpt=args.grad_ckpt)
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
        "framework": ("peft+compile" if args.compile else "peft-eager")
        + ("+dora" if args.dora else "")
        + ("+bnb-nf4" if args.bnb4 else "") + ("+ckpt" if args.grad_ckpt else ""),
        "shape": args.shape,
        "batch": args.batch, "seq": args.seq, "step_s": dt, "tokens_per_s": tps,
        "peak_gib": (torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else 0.0),
        "mfu": tps * flops_per_token(SHAPES[args.shape], args.seq) / PEAK_BF16,
        "loss": float(loss), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
