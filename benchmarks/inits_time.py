"""How long PiSSA / pissa_niter_K / OLoRA initialisation takes: lora-jax's `inject` against HF
PEFT's own init (`get_peft_model`), side by side in one process, on Llama-shaped layers.

Both factorise each of a layer's 7 projection weights (float32 SVD / randomized SVD / QR) and
write the residual. Random Gaussian weights (the time of an SVD hardly depends on the spectrum).
One JSON line per row: framework, init, shape, layers, seconds (after JAX's compile; the compile
is reported apart), seconds per layer, and for lora-jax the check that the residual plus
`scale * A @ B` gives the kernel back (max relative error).

    python -m benchmarks.inits_time --shape 8b --layers 2            # one H200, < 4 minutes
    python -m benchmarks.inits_time --shape tiny --layers 1          # CPU smoke test
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp

import lora_jax as lj
from benchmarks.shapes import SHAPES, TARGETS
from lora_jax.merge import delta

INITS = ("pissa", "pissa_niter_4", "olora")


def kernel_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """`{name: (in, out)}` of one Llama layer's projections."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
            "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}


def jax_params(cfg: dict, layers: int, seed: int = 0) -> dict:
    """A scanned stack `{"layers": {name: {"kernel": [L, in, out]}}}` of N(0, 0.02) kernels."""
    keys = jax.random.split(jax.random.key(seed), len(TARGETS))
    return {"layers": {name: {"kernel": 0.02 * jax.random.normal(k, (layers, *shape))}
                       for k, (name, shape) in zip(keys, kernel_shapes(cfg).items())}}


def time_jax(cfg: dict, layers: int, init: str, rank: int) -> dict:
    params = jax_params(cfg, layers)
    config = lj.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                           init_lora_weights=init)
    run = jax.jit(lambda p: lj.inject(p, config, jax.random.key(1)))
    t0 = time.perf_counter()
    compiled = run.lower(params).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(params))  # warm
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(params))
    seconds = time.perf_counter() - t0
    worst = 0.0
    for name, module in out["layers"].items():
        back = module["kernel"] + module["lora_scale"][:, None, None] * delta(
            module["lora_a"], module["lora_b"], 3)
        ref = params["layers"][name]["kernel"]
        worst = max(worst, float(jnp.abs(back - ref).max() / jnp.abs(ref).max()))
    return {"framework": "lora-jax", "seconds": seconds, "compile_s": compile_s,
            "residual_check": worst, "device": jax.devices()[0].device_kind}


def time_peft(cfg: dict, layers: int, init: str, rank: int) -> dict:
    import peft
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, (n_in, n_out) in kernel_shapes(cfg).items():
                setattr(self, name, torch.nn.Linear(n_in, n_out, bias=False))

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[Layer() for _ in range(layers)]).to(device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                             init_lora_weights=init)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    peft.get_peft_model(model, config)
    sync()
    seconds = time.perf_counter() - t0
    return {"framework": "peft", "seconds": seconds,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--inits", nargs="+", default=list(INITS))
    ap.add_argument("--only", choices=("jax", "peft"), help="run one framework")
    args = ap.parse_args(argv)
    cfg = SHAPES[args.shape]
    for init in args.inits:
        for name, fn in (("jax", time_jax), ("peft", time_peft)):
            if args.only and args.only != name:
                continue
            row = fn(cfg, args.layers, init, args.rank)
            row.update(init=init, shape=args.shape, layers=args.layers, rank=args.rank,
                       per_layer_s=row["seconds"] / args.layers)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
