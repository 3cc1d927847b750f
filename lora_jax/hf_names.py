"""Hugging Face module names of tree paths, scanned or not, and compact PEFT name patterns.

An unscanned tree's dotted module path *is* the HF module name (`model.layers.0.self_attn.q_proj`).
A scanned stack sits at its container path (`model.layers`) without an index and its leaves have a
leading layer axis; layer i's HF name is `<container>.<i>.<rest>`. lora_jax knows no model
family: the caller hands the container in (`layer_container=`, e.g.
`models.layer_container(params)`).
"""
from __future__ import annotations

import re
from typing import Iterable

from lora_jax.config import pattern_key
from lora_jax.errors import LoraError


def layer_name(path: str, layer: int, container: str) -> str:
    """`<container>.<layer>.<rest>` for a stacked module path under `container`.

    Example:
      >>> layer_name("model.layers.self_attn.q_proj", 3, "model.layers")
      'model.layers.3.self_attn.q_proj'
    """
    if not path.startswith(container + "."):
        raise LoraError(f"stacked module {path!r} is not under the layer container "
                        f"{container!r}; pass layer_container= the scanned stack's path.")
    return f"{container}.{layer}{path[len(container):]}"


def hf_names(path: str, n_layers: int | None, container: str | None) -> list[str]:
    """The HF module name(s) of a tree module: one, or one per layer of a stacked module."""
    if n_layers is None:
        return [path]
    if container is None:
        raise LoraError(f"{path!r} is a stacked (scanned) module but the layer container is "
                        "unknown; pass layer_container= the scanned stack's path (for the "
                        "bundled models: models.layer_container(params)).")
    return [layer_name(path, i, container) for i in range(n_layers)]


def split_layer_name(name: str, tree_paths: set[str]) -> tuple[str, int | None] | None:
    """Map an HF module name onto the tree: `(name, None)` if the tree has that module,
    `(stacked_path, layer)` if dropping one integer component gives a tree module, else None."""
    if name in tree_paths:
        return name, None
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            stacked = ".".join(parts[:i] + parts[i + 1:])
            if stacked in tree_paths:
                return stacked, int(part)
    return None


def _suffix_match(key: str, name: str) -> bool:
    return name == key or name.endswith("." + key)


def target_keys(chosen: Iterable[str], universe: Iterable[str]) -> list[str]:
    """Shortest dotted suffixes that, as PEFT `target_modules`, select exactly `chosen` among
    `universe` (all Linear module names of the model)."""
    return _minimal_keys(set(chosen), set(universe) | set(chosen), _suffix_match, str)


def pattern_keys(chosen: Iterable[str], universe: Iterable[str]) -> list[str]:
    """Shortest dotted suffixes that, as PEFT `rank_pattern`/`alpha_pattern` keys (regexes
    matched as `(.*\\.)?key$`), match exactly `chosen` among `universe`."""
    return _minimal_keys(set(chosen), set(universe) | set(chosen),
                         lambda key, name: pattern_key({key: 0}, name) is not None, re.escape)


def _minimal_keys(chosen: set[str], universe: set[str], match, exact) -> list[str]:
    """Greedy: for each chosen name not yet covered, its shortest suffix that matches nothing
    outside `chosen`; `exact(name)` (a key matching only `name`) if no suffix is that narrow."""
    keys = set()
    for name in sorted(chosen):
        if any(match(k, name) for k in keys):
            continue
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            key = ".".join(parts[-k:])
            if all(u in chosen for u in universe if match(key, u)):
                keys.add(key)
                break
        else:
            keys.add(exact(name))
    return sorted(keys)
