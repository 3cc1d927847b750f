"""How far each FP8 recipe moves the adapter gradients from the bf16 ones (CPU or GPU).

The 100-step FP8 loss runs (`loss_parity --compare fp8`) differ from bf16 by more than 2e-2; this
asks where the difference enters, one step, no training: a small random Llama with random
adapters, the adapter gradients of the cross-entropy under several quantisation recipes of the
frozen base's matmuls, and their relative distance ||g - g_bf16|| / ||g_bf16||.

Recipes: scaling per tensor or per row (activations per token, the weight per output channel in
the forward, per input channel in the backward); the gradient GEMM in e5m2, e4m3 or bf16.

    python -m benchmarks.fp8_recipes            # hidden 256, 4 layers, a few seconds on CPU
"""
from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

import lora_jax as lj
import models.projection
from models import fp8
from models.llama import Llama, LlamaConfig
from models.loss import cross_entropy


def recipe_dot_general(rowwise: bool, grad_dtype):
    """A frozen-kernel `dot_general` for `nn.Dense` under one recipe (grad_dtype None: bf16)."""

    def scaled_dot(a, b, dtype):  # a [..., K] . b [N, K], both quantised along K
        a8, sa = fp8.quantize(a, fp8.FORWARD_DTYPE if dtype is None else dtype, rowwise)
        b8, sb = fp8.quantize(b, fp8.FORWARD_DTYPE, rowwise)
        y = fp8._last_axis_dot(a8, b8, jnp.float32)
        return y * sa * (sb.reshape(-1) if rowwise else sb)

    @jax.custom_vjp
    def matmul(x, w):
        return scaled_dot(x, w.T, None).astype(x.dtype)

    def fwd(x, w):
        return matmul(x, w), w

    def bwd(w, dy):
        if grad_dtype is None:
            dx = jnp.einsum("...n,kn->...k", dy, w.astype(dy.dtype))
        else:
            dx = scaled_dot(dy, w, grad_dtype).astype(dy.dtype)
        return dx, jnp.zeros_like(w)

    matmul.defvjp(fwd, bwd)
    return lambda lhs, rhs, *_, **__: matmul(lhs, jax.lax.stop_gradient(rhs))


# name -> (description, (rowwise, gradient dtype or None for bf16); None: models.fp8 itself)
RECIPES = {
    "tensor_e5m2": ("models.fp8 (per-tensor, e5m2 gradient)", None),
    "tensor_e4m3": ("per-tensor, e4m3 gradient", (False, fp8.FORWARD_DTYPE)),
    "row_e5m2": ("per-row, e5m2 gradient", (True, fp8.GRADIENT_DTYPE)),
    "row_e4m3": ("per-row, e4m3 gradient", (True, fp8.FORWARD_DTYPE)),
    "fwd_only": ("per-tensor forward only, bf16 gradient", (False, None)),
    "row_fwd_only": ("per-row forward only, bf16 gradient", (True, None)),
}


def use_recipe(name: str) -> None:
    """Make the models' FP8 base (`base_fp8=True`) multiply with recipe `name`, for models
    built after this call (benchmarks only: `jax_worker --variant fp8_recipe=...`)."""
    if name not in RECIPES:
        raise SystemExit(f"unknown FP8 recipe {name!r}; known: {sorted(RECIPES)}")
    spec = RECIPES[name][1]
    models.projection.fp8_dot_general = (fp8.fp8_dot_general if spec is None
                                         else recipe_dot_general(*spec))


def relative_distance(g, ref) -> float:
    num = sum(jnp.sum((a.astype(jnp.float32) - b.astype(jnp.float32)) ** 2)
              for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(ref)))
    den = sum(jnp.sum(b.astype(jnp.float32) ** 2) for b in jax.tree.leaves(ref))
    return float(jnp.sqrt(num / den))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    args = ap.parse_args()
    shape = dict(vocab_size=512, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                 num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                 max_position_embeddings=max(256, args.seq))
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, 512)

    def model(dtype=jnp.bfloat16, base_fp8=False):
        return Llama(LlamaConfig.from_hf_dict(shape, dtype=dtype, param_dtype=jnp.bfloat16,
                                              base_fp8=base_fp8))

    params = model().init(jax.random.key(0), ids)["params"]
    params = lj.inject(params, lj.LoraConfig(r=16, target_modules="all-linear",
                                             init_lora_weights="gaussian"), jax.random.key(2))
    base, adapters = lj.split(params)
    # B = 0 would zero A's gradient; a trained-looking adapter has both non-zero.
    adapters = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(3), a.shape,
                                                                   a.dtype), adapters)

    def grads(m):
        def loss(a):
            logits = lj.apply(m, {"params": lj.combine(base, a)}, ids)
            return cross_entropy(logits[:, :-1].astype(jnp.float32), ids[:, 1:])
        return jax.grad(loss)(adapters)

    reference, float32 = grads(model()), grads(model(dtype=jnp.float32))
    rows = {"float32 compute (for scale)": relative_distance(float32, reference)}
    try:
        for name, (description, _) in RECIPES.items():
            use_recipe(name)
            rows[description] = relative_distance(grads(model(base_fp8=True)), reference)
    finally:
        use_recipe("tensor_e5m2")
    print("relative distance of the adapter gradients from the bf16 run's:")
    for name, err in rows.items():
        print(f"  {name:<40} {err:.4f}")
    print(json.dumps({"shape": shape, "batch": args.batch, "seq": args.seq, "distance": rows}))


if __name__ == "__main__":
    main()
