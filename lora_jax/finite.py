"""Refusing non-finite adapters: a NaN or inf in an adapter is never saved or exported.

A diverged run's adapters hold NaN; writing them would replace a good earlier file with a useless
one. Savers call `check_finite` first, which names the offending leaves.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.errors import LoraError
from lora_jax.tree import dotted

_all_finite = jax.jit(lambda tree: jax.tree.map(lambda x: jnp.isfinite(x).all(), tree))


def non_finite_leaves(tree: Any) -> list[str]:
    """Dotted paths of the floating-point leaves of `tree` holding NaN or inf.

    Example:
      >>> non_finite_leaves({"q": {"lora_a": jnp.array([1.0, jnp.nan])}})
      ['q.lora_a']
    """
    floats = jax.tree.map(lambda x: x if jnp.issubdtype(x.dtype, jnp.inexact) else None, tree)
    flags = jax.device_get(_all_finite(floats))
    return [dotted(path) for path, ok in jax.tree_util.tree_flatten_with_path(flags)[0]
            if not bool(ok)]


def check_finite(tree: Any, what: str) -> None:
    """Raise `LoraError` naming each leaf of `tree` that holds NaN or inf.

    Args:
      tree: the adapters about to be written.
      what: the action, for the message (e.g. "save_adapter").
    """
    bad = non_finite_leaves(tree)
    if bad:
        raise LoraError(f"{what}: refusing to write non-finite adapters: {bad[:5]}"
                        f"{' ...' if len(bad) > 5 else ''} hold NaN or inf (the training "
                        "diverged?). Nothing was written; earlier files are untouched. Pass "
                        "allow_non_finite=True to write them anyway.")
