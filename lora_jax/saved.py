"""`modules_to_save`: modules trained in full beside the adapters, as in HF PEFT.

PEFT wraps such a module in a `ModulesToSaveWrapper` holding the frozen original and a trainable
copy, runs the copy, and saves only the copy (`base_model.model.<name>.weight`, without the
wrapper's `modules_to_save.default` part). Here the copy is a leaf beside each original leaf of
the module dict, prefixed `saved_`:

    lm_head: {kernel (frozen), saved_kernel (trained)}
    model.embed_tokens: {embedding (frozen), saved_embedding (trained)}

`saved_*` leaves count as adapter leaves (`tree.ADAPTER_LEAVES` / `TRAINABLE_LEAVES` hold them),
so `lora_params`, `split`, `trainable_mask`, `optimizer`, the checkpoints and
`freeze_non_adapters` carry and train them with no change. `apply` runs the model on
`tree.use_saved(params)` (the copies in place of the originals) and `merge` keeps the copies.

On a model whose head is tied to its embedding (the head is `nn.Embed.attend`, there is no
`lm_head` kernel), a saved copy of the embedding serves the lookup; the head reads the original
table (PEFT's default: its tied `lm_head` keeps the original weight) or, with
`ensure_weight_tying`, the copy (PEFT then ties its head to the copy). `merge` has one table to
write: the copy, so a merged tied model's head is the copy's in both cases.
"""
from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp

from lora_jax.config import LoraConfig, matches_modules
from lora_jax.errors import LoraError
from lora_jax.tree import SAVED_PREFIX, Params, has_adapter, is_saved_leaf

# Module leaves a copy is made of; anything else in the dict (adapters) is not part of the module.
MODULE_LEAVES = ("kernel", "bias", "embedding", "scale")


def select_saved(modules: Mapping[str, Mapping], config: LoraConfig,
                 targets: list[str]) -> list[str]:
    """Dotted paths of the modules `config.modules_to_save` names (suffix match, as PEFT).

    Raises `LoraError` when a name matches nothing (listing the modules there are), when a
    module is also a LoRA target, or when it already holds a copy.

    Example:
      >>> select_saved(dict(iter_modules(params, leaves=MODULE_LEAVES)), config, targets)
      ['lm_head']
    """
    names = config.modules_to_save or ()
    chosen = [p for p in modules if any(matches_modules([n], p) for n in names)]
    unmatched = [n for n in names if not any(matches_modules([n], p) for p in modules)]
    if unmatched:
        listing = "\n  ".join(modules)
        raise LoraError(f"modules_to_save {unmatched} matched no module (a tied output head has "
                        "no module of its own: save the embedding instead). Module paths in "
                        f"this tree:\n  {listing}")
    both = [p for p in chosen if p in targets or has_adapter(modules[p])]
    if both:
        raise LoraError(f"{both} are both LoRA targets and modules_to_save; a fully trained "
                        "module needs no adapter: drop it from target_modules (or "
                        "exclude_modules it).")
    again = [p for p in chosen if any(is_saved_leaf(k) for k in modules[p])]
    if again:
        raise LoraError(f"{again} already hold modules_to_save copies; inject into the base tree "
                        "(lora_jax.split(params)[0]).")
    return chosen


def saved_copies(module: Mapping) -> Params:
    """`{saved_<leaf>: copy}` for each module leaf (kernel, bias, embedding, norm scale).

    The copy keeps the original's dtype and sharding (PEFT deep-copies the module)."""
    return {SAVED_PREFIX + k: jnp.array(v, copy=True) for k, v in module.items()
            if k in MODULE_LEAVES and not isinstance(v, Mapping)}
