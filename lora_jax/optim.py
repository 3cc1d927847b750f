"""`optimizer`: an optax transform that trains adapters only and keeps no state for the rest,
optionally with LoRA+'s larger learning rate for B."""
from __future__ import annotations

from typing import Mapping

import jax
import optax

from lora_jax.errors import LoraError
from lora_jax.partition import trainable_mask
from lora_jax.tree import LORA_B, map_leaves

TRAIN, FREEZE = "lora", "frozen"


def optimizer(tx: optax.GradientTransformation, params: Mapping, *,
              loraplus_ratio: float | None = None,
              adapter_name: str | None = None) -> optax.GradientTransformation:
    """Wrap `tx` so only `lora_a` / `lora_b` leaves of `params` are updated.

    Frozen leaves (the base, and each adapter's `lora_scale`) get exactly zero updates and no
    optimizer state: `optax.multi_transform` routes them to `set_to_zero`, whose state is empty.
    (`optax.masked` would pass their gradients through unchanged.) `params` may be the full
    injected tree or the adapter tree from `split`; pass the same structure to `init`/`update`.

    Args:
      tx: the optax transform of the adapters (e.g. `optax.adamw(2e-4)`).
      params: the tree it will update.
      loraplus_ratio: LoRA+ (Hayou et al. 2024, PEFT's `create_loraplus_optimizer`): B learns
        at `loraplus_ratio` times A's learning rate. Applied as a factor on B's final update,
        which for Adam(W), SGD and other optimizers whose update is proportional to the learning
        rate equals a per-group learning rate (decoupled weight decay scales with it, as in
        PEFT's groups); a global clip inside `tx` still sees every gradient. (PEFT's separate
        embedding rate, `loraplus_lr_embedding`, is not modelled: an embedding adapter's
        `lora_b` gets the same ratio as every other B.)
      adapter_name: train only this named adapter (`lora_jax.named`); the others get zero
        updates and no state, like the base.

    Example:
      >>> tx = optimizer(optax.adamw(1e-4), adapters)
      >>> opt_state = tx.init(adapters)
      >>> tx = optimizer(optax.adamw(1e-4), adapters, loraplus_ratio=16)   # LoRA+
    """
    labels = map_leaves(trainable_mask(params, adapter_name=adapter_name),
                        lambda _, train: TRAIN if train else FREEZE)
    wrapped = optax.multi_transform({TRAIN: tx, FREEZE: optax.set_to_zero()}, labels)
    if loraplus_ratio is None:
        return wrapped
    return optax.chain(wrapped, scale_lora_b(params, loraplus_ratio))


def scale_lora_b(params: Mapping, ratio: float) -> optax.GradientTransformation:
    """Multiply the updates of every `lora_b` leaf by `ratio` (stateless): LoRA+'s B rate.

    Example:
      >>> tx = optax.chain(optax.adam(1e-4), scale_lora_b(adapters, 16.0))
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
        raise LoraError(f"loraplus_ratio={ratio!r}: use a positive number (LoRA+ suggests 16).")
    is_b = map_leaves(params, lambda key, _: key == LORA_B)

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, b: u * ratio if b else u, updates, is_b), state

    return optax.GradientTransformation(lambda _: optax.EmptyState(), update)
