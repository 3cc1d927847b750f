"""A one-minute LoRA fine-tune on a toy task, using only the core API.

A frozen random MLP is adapted, through rank-4 adapters, to imitate a teacher that differs from it
by a low-rank change of its weights. Prints the loss falling and checks merged == unmerged.

    python -m examples.toy_demo
"""
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_jax as lj


class MLP(nn.Module):
    width: int = 64

    @nn.compact
    def __call__(self, x):
        for i in range(3):
            x = jnp.tanh(nn.Dense(self.width, name=f"fc{i}")(x))
        return nn.Dense(8, name="lm_head")(x)


def main(steps: int = 300) -> None:
    start = time.perf_counter()
    model, x = MLP(), jax.random.normal(jax.random.key(0), (256, 64))
    base = model.init(jax.random.key(1), x)
    # The teacher: the same net with a rank-2 change folded into every hidden layer.
    teacher = lj.merge(lj.inject(base, lj.LoraConfig(r=2, lora_alpha=2, target_modules=r"fc\d",
                                                     init_lora_weights=False), jax.random.key(2)))
    targets = model.apply(teacher, x)

    config = lj.LoraConfig(r=4, lora_alpha=8, target_modules=r"fc\d")
    params = lj.inject(base, config, jax.random.key(3))["params"]
    print(lj.summary(params))
    frozen, adapters = lj.split(params)
    tx = lj.optimizer(optax.adam(3e-3), adapters)
    state = tx.init(adapters)

    def loss_fn(a):
        y = lj.apply(model, {"params": lj.combine(frozen, a)}, x)
        return jnp.mean((y - targets) ** 2)

    @jax.jit
    def step(a, s):
        loss, g = jax.value_and_grad(loss_fn)(a)
        updates, s = tx.update(g, s, a)
        return optax.apply_updates(a, updates), s, loss

    for i in range(steps):
        adapters, state, loss = step(adapters, state)
        if i % 50 == 0 or i == steps - 1:
            print(f"step {i:4d}  loss {float(loss):.6f}")
    params = lj.combine(frozen, adapters)
    # Compared in full float32: a GPU's default float32 matmuls round to TF32, ~1e-3 apart.
    with jax.default_matmul_precision("highest"):
        unmerged = lj.apply(model, {"params": params}, x)
        merged = model.apply({"params": lj.merge(params)}, x)
    err = float(np.max(np.abs(merged - unmerged)))
    print(f"merged vs unmerged max |diff| = {err:.2e}")
    assert err < 1e-4, "merge must reproduce the adapted model"
    print(f"done in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
