"""`summary`: how many parameters train, in total and per target module name."""
from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Mapping

from lora_jax.tree import (LORA_A, LORA_B, LORA_SCALE, NAMED, count, filter_leaves,
                           iter_modules)
from lora_jax.tree import EMBEDDING, saved_leaves
from lora_jax.tree import LORA_MAGNITUDE


@dataclasses.dataclass(frozen=True)
class Summary:
    trainable: int
    total: int
    per_target: dict[str, int]

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        lines = [f"trainable params: {self.trainable:,} || all params: {self.total:,} || "
                 f"trainable%: {self.percent:.4f}"]
        lines += [f"  {name:<24} {n:>14,}" for name, n in sorted(self.per_target.items())]
        return "\n".join(lines)


def summary(params: Mapping) -> Summary:
    """Trainable (adapter A and B) and total scalar counts, and adapter scalars per module name
    (the last path component, e.g. `q_proj`; embedding tables included). `lora_scale` leaves
    count in neither. A `modules_to_save` copy counts as trainable under `<name> (saved)`; the
    copy and the frozen original both count in the total, as PEFT counts them.

    Example:
      >>> print(summary(params))
      trainable params: 1,024 || all params: 125,440 || trainable%: 0.8163
    """
    per_target: Counter[str] = Counter()
    for path, module in iter_modules(params.get("params", params), leaves=("kernel", EMBEDDING)):
        if LORA_A in module:
            per_target[path.rsplit(".", 1)[-1]] += module[LORA_A].size + module[LORA_B].size
            if LORA_MAGNITUDE in module:  # DoRA's trained magnitude, as PEFT counts it
                per_target[path.rsplit(".", 1)[-1]] += module[LORA_MAGNITUDE].size
        for leaves in (module.get(NAMED) or {}).values():  # named adapters (lora_jax.named)
            per_target[path.rsplit(".", 1)[-1]] += leaves[LORA_A].size + leaves[LORA_B].size
    tree = params.get("params", params)
    for path, module in iter_modules(tree, leaves=("saved_kernel", "saved_embedding",
                                                   "saved_scale", "saved_bias")):
        per_target[f"{path.rsplit('.', 1)[-1]} (saved)"] += count(saved_leaves(module))
    total = count(filter_leaves(params.get("params", params), lambda key: key != LORA_SCALE))
    return Summary(trainable=sum(per_target.values()), total=total, per_target=dict(per_target))
