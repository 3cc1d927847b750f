"""`optimizer`: an optax transform that trains adapters only and keeps no state for the rest."""
from __future__ import annotations

from typing import Mapping

import optax

from lora_jax.partition import trainable_mask
from lora_jax.tree import map_leaves

TRAIN, FREEZE = "lora", "frozen"


def optimizer(tx: optax.GradientTransformation, params: Mapping) -> optax.GradientTransformation:
    """Wrap `tx` so only `lora_a` / `lora_b` leaves of `params` are updated.

    Frozen leaves (the base, and each adapter's `lora_scale`) get exactly zero updates and no
    optimizer state: `optax.multi_transform` routes them to `set_to_zero`, whose state is empty.
    (`optax.masked` would pass their gradients through unchanged.) `params` may be the full
    injected tree or the adapter tree from `split`; pass the same structure to `init`/`update`.

    Example:
      >>> tx = optimizer(optax.adamw(1e-4), adapters)
      >>> opt_state = tx.init(adapters)
    """
    labels = map_leaves(trainable_mask(params), lambda _, train: TRAIN if train else FREEZE)
    return optax.multi_transform({TRAIN: tx, FREEZE: optax.set_to_zero()}, labels)
