"""The optimizer of the example scripts: AdamW on the adapters only, with a learning-rate
schedule and optional global-norm clipping."""
from __future__ import annotations

from typing import Any

import optax

import lora_jax as lj


def learning_rate(name: str, peak: float, steps: int, warmup: int) -> optax.Schedule:
    """Linear warmup from 0 to `peak` over `warmup` steps, then `name`: "cosine" (to 0 at
    `steps`), "linear" (to 0 at `steps`) or "constant".

    Example:
      >>> learning_rate("cosine", 1e-3, steps=100, warmup=10)(10)
      Array(0.001, dtype=float32, weak_type=True)
    """
    decay_steps = max(steps - warmup, 1)
    after = {"cosine": optax.cosine_decay_schedule(peak, decay_steps),
             "linear": optax.linear_schedule(peak, 0.0, decay_steps),
             "constant": optax.constant_schedule(peak)}[name]
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def adapter_optimizer(adapters: Any, *, lr: float, schedule: str, steps: int, warmup: int,
                      weight_decay: float, grad_clip: float,
                      loraplus_ratio: float | None = None) -> optax.GradientTransformation:
    """AdamW (and clipping when `grad_clip` > 0) for the `lora_a`/`lora_b` leaves of
    `adapters`; other leaves get no update and no state (`lora_jax.optimizer`); with
    `loraplus_ratio`, B learns that many times faster (LoRA+)."""
    tx = optax.adamw(learning_rate(schedule, lr, steps, warmup), weight_decay=weight_decay)
    if grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(grad_clip), tx)
    return lj.optimizer(tx, adapters, loraplus_ratio=loraplus_ratio)
