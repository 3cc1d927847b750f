"""How far each FP8 recipe moves the adapter gradients from the bf16 ones (CPU or GPU).

The 100-step FP8 loss runs (`loss_parity --compare fp8`) differ from bf16 by more than 2e-2; this
asks where the difference enters, one step, no training: a small random Llama with random
adapters, the adapter gradients of the cross-entropy under several quantisation recipes of the
frozen base's matmuls, and their relative distance ||g - g_bf16|| / ||g_bf16||.

Recipes: scaling per tensor or per row (activations per token, the weight per output channel in
the forward, per input channel in the backward); the gradient GEMM in e5m2, e4m3 or bf16.

    python -m benchmarks.fp8_recipes            # hidden 256, 4 layers, a few seconds on CPU
    # on the GPU, a benchmark shape, PEFT's B = 0 init (the first training step's gradients),
    # and the distance per projection and per layer
    python -m benchmarks.fp8_recipes --shape 8b --batch 4 --seq 512 --zero-b --by-module
"""
from __future__ import annotations

import argparse
import collections
import json

import jax
import jax.numpy as jnp

import lora_jax as lj
import models.projection
from models import fp8
from models.llama import Llama, LlamaConfig
from models.loss import cross_entropy
from benchmarks.shapes import SHAPES


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


_CURRENT_SCALING = fp8.quantize  # models.fp8's own scaled cast (amax of the tensor, each call)


def _unit_scale_cast(x, dtype, rowwise: bool = False, axes: tuple[str, ...] = ()):
    """A saturating cast with scale 1 and no amax: `models.fp8.quantize`'s signature, without
    its reduction. Numerically meaningless for small tensors (gradients underflow); it exists
    to time the FP8 step with the activation-scaling reductions removed."""
    del axes
    top = float(jnp.finfo(dtype).max)
    ones = jnp.ones(x.shape[:-1] + (1,) if rowwise else (), jnp.float32)
    return jnp.clip(x.astype(jnp.float32), -top, top).astype(dtype), ones


def use_activation_amax(mode: str) -> None:
    """Benchmarks only (`jax_worker --variant fp8_amax=...`): "current" leaves `models.fp8.quantize`
    as it is (scale = amax / fp8 max of the tensor itself, each call); "none" swaps in a
    scale-1 saturating cast with no amax, for every FP8 model traced after this call.

    Why "none": a delayed recipe (the scale from earlier steps' amax) still casts every
    activation but no longer waits for a reduction over it first; timing the step with no
    reduction at all bounds what any such recipe can gain. Its loss is not meaningful."""
    casts = {"current": _CURRENT_SCALING, "none": _unit_scale_cast}
    if mode not in casts:
        raise SystemExit(f"fp8_amax={mode!r}: use one of {sorted(casts)}")
    fp8.quantize = casts[mode]


def _factor_pairs(g, ref):
    """(path, gradient, reference) of the trained factors lora_a / lora_b (not lora_scale)."""
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g), jax.tree.leaves(ref)):
        if path[-1].key in ("lora_a", "lora_b"):
            yield path, a.astype(jnp.float32), b.astype(jnp.float32)


def relative_distance(g, ref) -> float:
    pairs = list(_factor_pairs(g, ref))
    num = sum(jnp.sum((a - b) ** 2) for _, a, b in pairs)
    den = sum(jnp.sum(b ** 2) for _, _, b in pairs)
    return float(jnp.sqrt(num / den))


def distance_by_module(g, ref) -> dict[str, list[float]]:
    """Relative distance per projection name (q_proj, ..., down_proj), one entry per layer of
    the scanned stack ([L, ...] leaves)."""
    num, den = collections.defaultdict(float), collections.defaultdict(float)
    for path, a, b in _factor_pairs(g, ref):
        name = next(k.key for k in path if getattr(k, "key", "").endswith("_proj"))
        num[name] = num[name] + jnp.sum(jnp.square(a - b), axis=(1, 2))
        den[name] = den[name] + jnp.sum(jnp.square(b), axis=(1, 2))
    return {n: [round(float(v), 4) for v in jnp.sqrt(num[n] / den[n])] for n in num}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="a benchmark shape instead of --hidden/--layers (vocabulary kept)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--zero-b", action="store_true",
                    help="PEFT's init (B = 0), as at the first training step: only B has a "
                         "gradient; default: random adapters, both A and B have one")
    ap.add_argument("--recipes", nargs="+", choices=["float32", *RECIPES],
                    default=["float32", *RECIPES],
                    help="which rows to compute (float32: the bf16 model in float32 compute)")
    ap.add_argument("--by-module", action="store_true",
                    help="also print the distance per projection and layer")
    args = ap.parse_args()
    shape = dict(vocab_size=512, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                 num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                 max_position_embeddings=max(256, args.seq))
    if args.shape:
        shape = {**SHAPES[args.shape], "max_position_embeddings": max(256, args.seq)}
    ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq), 0, shape["vocab_size"])

    def model(dtype=jnp.bfloat16, base_fp8=False):
        # Scanned: an unrolled init of a large shape compiles for minutes.
        return Llama(LlamaConfig.from_hf_dict(shape, dtype=dtype, param_dtype=jnp.bfloat16,
                                              base_fp8=base_fp8, scan_layers=True))

    params = jax.jit(model().init)(jax.random.key(0), ids)["params"]
    params = lj.inject(params, lj.LoraConfig(r=16, target_modules="all-linear",
                                             init_lora_weights="gaussian"), jax.random.key(2))
    base, adapters = lj.split(params)
    if not args.zero_b:  # B = 0 would zero A's gradient; a trained-looking adapter has both.
        adapters = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(
            jax.random.key(3), a.shape, a.dtype), adapters)
    else:
        adapters = jax.tree_util.tree_map_with_path(
            lambda p, a: jnp.zeros_like(a) if p[-1].key == "lora_b" else a,
            adapters)

    def grads(m):
        @jax.jit  # base and ids as arguments: closed over, they would be embedded as constants
        def grad_of(a, base, ids):
            def loss(a):
                logits = lj.apply(m, {"params": lj.combine(base, a)}, ids)
                return cross_entropy(logits[:, :-1].astype(jnp.float32), ids[:, 1:])
            return jax.grad(loss)(a)
        # with --zero-b, A's gradient is 0 and adds 0 to every distance
        return grad_of(adapters, base, ids)

    reference = grads(model())
    rows, modules = {}, {}

    def record(description, g):
        rows[description] = relative_distance(g, reference)
        modules[description] = distance_by_module(g, reference)

    if "float32" in args.recipes:
        record("float32 compute (for scale)", grads(model(dtype=jnp.float32)))
    try:
        for name, (description, _) in RECIPES.items():
            if name in args.recipes:
                use_recipe(name)
                record(description, grads(model(base_fp8=True)))
    finally:
        use_recipe("tensor_e5m2")
    print("relative distance of the adapter gradients from the bf16 run's:")
    for name, err in rows.items():
        print(f"  {name:<40} {err:.4f}")
        if args.by_module:
            for module, per_layer in modules[name].items():
                print(f"      {module:<10} " + " ".join(f"{d:.3f}" for d in per_layer))
    print(json.dumps({"shape": shape, "batch": args.batch, "seq": args.seq,
                      "zero_b": args.zero_b, "distance": rows,
                      **({"by_module": modules} if args.by_module else {})}))


if __name__ == "__main__":
    main()
