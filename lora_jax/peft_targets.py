"""PEFT file names of the targets beyond Dense: embedding adapters and `modules_to_save` copies.

`lora_jax.peft_io` writes and reads Dense adapters; this module names the rest, as PEFT 0.21's
`save_pretrained` writes them (per torch module `<name>`, prefix `base_model.model.`):

    <name>.lora_embedding_A          [r, V]   = lora_a.T      (an nn.Embedding target; no .weight)
    <name>.lora_embedding_B          [D, r]   = lora_b.T
    <name>.base_layer.weight         [V, D]   the frozen table, which PEFT also saves when an
                                              embedding is targeted; read back only as a check
    <name>.weight / <name>.bias               a modules_to_save copy (the wrapper's
                                              `modules_to_save.default.` part dropped)

A saved `kernel` is written as `nn.Linear`'s weight `[out, in]` (its transpose); `embedding`
and a norm's `scale` as `weight`, `bias` as is.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import numpy as np

from lora_jax.errors import LoraError
from lora_jax.tree import (EMBEDDING, LORA_A, SAVED_PREFIX, host_array, is_embedding,
                           iter_modules, saved_leaves)
from lora_jax.saved import MODULE_LEAVES

PREFIX = "base_model.model."
EMBED_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_embedding_(?P<ab>[AB])")
BASE_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.base_layer\.weight")
PLAIN_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.(?P<leaf>weight|bias)")
# Our leaf -> torch's parameter name, and whether torch stores it transposed.
TORCH_LEAF = {"kernel": ("weight", True), EMBEDDING: ("weight", False), "scale": ("weight", False),
              "bias": ("bias", False)}


def embedding_paths(tree: Mapping) -> list[str]:
    """Dotted paths of the tree's embedding modules (tables `[V, D]`, no kernel)."""
    return [p for p, m in iter_modules(tree, leaves=(EMBEDDING,)) if is_embedding(m)]


def embedding_tensors(name: str, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """PEFT's two tensors of an embedding adapter, from torch-layout `a [r, V]`, `b [D, r]`
    (a `peft_io.TorchAdapter`'s, which are `lora_a.T` and `lora_b.T`)."""
    return {f"{PREFIX}{name}.lora_embedding_A": np.ascontiguousarray(a),
            f"{PREFIX}{name}.lora_embedding_B": np.ascontiguousarray(b)}


def saved_tensors(tree: Mapping, *, fan_in_fan_out: bool,
                  head_names: tuple[str, ...]) -> tuple[dict[str, np.ndarray], list[str]]:
    """`({PEFT key: tensor}, [module names])` of every `modules_to_save` copy in the tree.

    Args:
      tree: params with `saved_*` leaves.
      fan_in_fan_out: the export's flag (GPT-2's Conv1D blocks); a saved kernel is then refused
        unless it is an output head (`head_names`), which is an `nn.Linear` in every HF family.
      head_names: the config's `output_head_names`.

    Example:
      >>> tensors, names = saved_tensors(params, fan_in_fan_out=False, head_names=("lm_head",))
    """
    tensors, names = {}, []
    for path, module in iter_modules(tree, leaves=tuple(SAVED_PREFIX + k for k in MODULE_LEAVES)):
        copies = saved_leaves(module)
        if "kernel" in copies and fan_in_fan_out and path.rsplit(".", 1)[-1] not in head_names:
            raise LoraError(f"modules_to_save {path!r}: a Conv1D (fan_in_fan_out) module's copy "
                            "has no checked PEFT layout; save Linear modules or heads only.")
        for leaf, value in copies.items():
            value = host_array(value)
            if np.ndim(value) > (2 if leaf in ("kernel", EMBEDDING) else 1):
                raise LoraError(f"modules_to_save {path!r}: {leaf} of shape {list(value.shape)} "
                                "is stacked (scanned layers) or not 2-D; PEFT saves one module "
                                "per name: unscan the model or save an unstacked module.")
            torch_name, transposed = TORCH_LEAF[leaf]
            tensors[f"{PREFIX}{path}.{torch_name}"] = np.ascontiguousarray(
                value.T if transposed else value).astype(_io_dtype(value))
        names.append(path)
    return tensors, names


def _io_dtype(x: np.ndarray) -> np.dtype:
    return x.dtype if x.dtype in (np.float16, np.float32, np.float64) else np.dtype(np.float32)


@dataclasses.dataclass
class ExtraTensors:
    """What a PEFT file holds besides Dense adapters: `{name: {"A", "B"}}` embedding pairs,
    `{name: {"weight"/"bias": tensor}}` saved copies, `{name: table}` base-table copies."""

    embeddings: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    saved: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)
    base_tables: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    tied_heads: dict[str, str] = dataclasses.field(default_factory=dict)


def split_tensors(tensors: Mapping[str, np.ndarray],
                  modules_to_save) -> tuple[dict[str, np.ndarray], ExtraTensors]:
    """`(Dense adapter tensors, ExtraTensors)` of a PEFT file; unknown keys stay with the first
    part, where `peft_io` reports them."""
    dense, extra = {}, ExtraTensors()
    for key, value in tensors.items():
        if m := EMBED_KEY.fullmatch(key):
            extra.embeddings.setdefault(m["module"], {})[m["ab"]] = value
        elif m := BASE_KEY.fullmatch(key):
            extra.base_tables[m["module"]] = value
        elif (m := PLAIN_KEY.fullmatch(key)) and ".lora_" not in key and any(
                m["module"].endswith(n) for n in modules_to_save or ()):
            extra.saved.setdefault(m["module"], {})[m["leaf"]] = value
        else:
            dense[key] = value
    return dense, extra


def drop_tied_heads(dense: dict[str, np.ndarray], extra: ExtraTensors) -> None:
    """With `ensure_weight_tying`, PEFT also saves the tied head's adapter (`lm_head.lora_A`
    = lora_embedding_B.T, `lora_B` = lora_embedding_A.T: the same storage) and its base weight,
    or a saved embedding copy again as `lm_head.weight`.
    lora_jax's tied head is the table's `attend`, so those keys are dropped here, after checking
    that they are the embedding adapter's, transposed (anything else stays and is reported)."""
    for key in [k for k in dense if PLAIN_KEY.fullmatch(k) and ".lora_" not in k]:
        # the tied head's view of a saved embedding copy (PEFT writes it under the head's name)
        if any(np.array_equal(dense[key], leaves.get("weight")) for leaves in extra.saved.values()):
            extra.tied_heads[key[len(PREFIX):].rsplit(".", 1)[0]] = "saved"
            del dense[key]
    for key in [k for k in dense if k.endswith(".lora_A.weight")]:
        name = key[len(PREFIX):-len(".lora_A.weight")]
        b_key = f"{PREFIX}{name}.lora_B.weight"
        for table, ab in extra.embeddings.items():
            if b_key in dense and {"A", "B"} <= set(ab) and np.array_equal(
                    dense[key], ab["B"].T) and np.array_equal(dense[b_key], ab["A"].T):
                del dense[key], dense[b_key]
                extra.base_tables.pop(name, None)
                extra.tied_heads[name] = table
                break


def embedding_leaves(name: str, ab: Mapping[str, np.ndarray], module: Mapping,
                     scale: np.float32) -> dict[str, np.ndarray] | str:
    """Host leaves `{lora_a [V, r], lora_b [r, D], lora_scale}` of one PEFT embedding adapter, or
    a one-line problem."""
    if set(ab) != {"A", "B"} or ab["A"].ndim != 2 or ab["B"].ndim != 2 or (
            ab["A"].shape[0] != ab["B"].shape[1]):
        return (f"{name}: embedding adapter {({k: list(v.shape) for k, v in ab.items()})}; "
                "expected lora_embedding_A [r, V] and lora_embedding_B [D, r]")
    table = tuple(np.shape(module[EMBEDDING]))
    if (ab["A"].shape[1], ab["B"].shape[0]) != table:
        return (f"{name}: lora_embedding_A {list(ab['A'].shape)} / lora_embedding_B "
                f"{list(ab['B'].shape)} do not fit the table {list(table)}")
    return {LORA_A: ab["A"].T, "lora_b": ab["B"].T, "lora_scale": np.asarray(scale, np.float32)}


def saved_leaves_from(name: str, torch_leaves: Mapping[str, np.ndarray],
                      module: Mapping) -> dict[str, np.ndarray] | str:
    """Host `saved_*` leaves of one module from PEFT's `weight` / `bias`, or a problem."""
    ours = {}
    weight_leaf = next((k for k in ("kernel", EMBEDDING, "scale") if k in module), None)
    for torch_name, value in torch_leaves.items():
        leaf = weight_leaf if torch_name == "weight" else "bias"
        if leaf is None or leaf not in module:
            return f"{name}: PEFT saves its {torch_name!r}, the model's module has no such leaf"
        value = value.T if TORCH_LEAF[leaf][1] else value
        if tuple(value.shape) != tuple(np.shape(module[leaf])):
            return (f"{name}.{torch_name}: PEFT's copy has shape {list(value.shape)} (as our "
                    f"{leaf}), the model's is {list(np.shape(module[leaf]))}")
        ours[SAVED_PREFIX + leaf] = value
    return ours


def check_base_tables(tables: Mapping[str, np.ndarray], modules: Mapping[str, Mapping]) -> list[str]:
    """PEFT saves a targeted embedding's frozen table too; it must have the model's shape (a
    different one means a resized vocabulary: another base model)."""
    problems = []
    for name, table in tables.items():
        module = modules.get(name)
        if module is None or EMBEDDING not in module:
            problems.append(f"{name}.base_layer.weight: the model has no embedding {name!r}")
        elif tuple(table.shape) != tuple(np.shape(module[EMBEDDING])):
            problems.append(f"{name}.base_layer.weight: PEFT's base table is "
                            f"{list(table.shape)}, the model's {list(np.shape(module[EMBEDDING]))}"
                            " (a resized vocabulary: load it into the model it was trained on)")
    return problems

