"""Adapter checkpoints: `save_adapter` / `load_adapter` (orbax, adapters only, self-describing).

A checkpoint directory is an orbax composite with two items:

    adapter/   the adapter sub-tree (`lora_a`, `lora_b`, `lora_scale` leaves), sharded arrays
    lora/      JSON: format tag, the `LoraConfig`, the base-model name, each module's leaf shapes
               and dtypes, and content checksums

The scale is a leaf, so loading needs no rank or alpha. The shapes say which base kernels the
adapter fits (`lora_a [*S, *in, r]` and `lora_b [*S, r, *out]` imply a kernel `[*S, *in, *out]`),
so a wrong base model is caught by name before anything is read.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from lora_jax import atomic, fingerprint, named, outputs
from lora_jax.config import LoraConfig
from lora_jax.errors import LoraError
from lora_jax.finite import check_finite
from lora_jax.partition import combine, lora_params
from lora_jax.placement import Shardings, adapter_sharding
from lora_jax.tree import ADAPTER_LEAVES, LORA_A, LORA_B, LORA_SCALE, Params, filter_leaves
from lora_jax.tree import DEFAULT_ADAPTER, nest, unwrap_variables
from lora_jax.tree import SAVED_PREFIX, adapter_modules, is_saved_leaf

FORMAT = "lora_jax.adapter"
VERSION = 1
ADAPTER_ITEM, META_ITEM = "adapter", "lora"
log = logging.getLogger(__name__)


def save_adapter(path: str | Path, params: Mapping, config: LoraConfig, *,
                 base_model: str | None = None, overwrite: bool = False,
                 allow_non_finite: bool = False, adapter_name: str | None = None) -> Path:
    """Save the adapter sub-tree of `params` and its config as an orbax checkpoint, atomically.

    Args:
      path: destination directory (written as `<path>.saving`, then swapped in; an existing
        adapter is kept until the new one is complete).
      params: the injected params (or variables, or just `lora_params(params)`); may be sharded.
      config: the `LoraConfig` the adapters were made with (stored for reference and resume).
      base_model: a name for the base model (e.g. its HF path), stored and shown in errors.
      overwrite: replace an earlier adapter checkpoint at `path` (anything else there is
        refused: `lora_jax.outputs.check_destination`).
      allow_non_finite: write adapters holding NaN/inf (refused by default).
      adapter_name: which named adapter to save (`lora_jax.named`); None: the tree's only one.
        The name is stored, and `load_adapter` gives it back.

    Returns:
      The absolute checkpoint path.

    Example:
      >>> save_adapter("ckpt/adapter", params, config, base_model="meta-llama/Llama-3.2-1B")
      >>> params = load_adapter("ckpt/adapter", base_params)
      >>> save_adapter("ckpt/b", params, config_b, adapter_name="b")
    """
    outputs.check_destination(path, outputs.ADAPTER, overwrite=overwrite)
    adapter_name, view = named.one_adapter(params, adapter_name, "save_adapter")
    adapters = lora_params(view)
    if not adapters:
        raise LoraError("save_adapter: the tree holds no lora_a/lora_b/lora_scale leaves; "
                        "pass the injected params (lora_jax.inject).")
    if not allow_non_finite:
        check_finite(adapters, "save_adapter")
    meta = {"format": FORMAT, "version": VERSION, "config": config.to_dict(),
            "base_model": base_model, "modules": describe(adapters),
            "checksums": fingerprint.checksums(adapters)}
    if adapter_name != DEFAULT_ADAPTER:
        meta["adapter_name"] = adapter_name

    def write(tmp: Path) -> None:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            ckptr.save(tmp, ocp.args.Composite(**{ADAPTER_ITEM: ocp.args.StandardSave(adapters),
                                                  META_ITEM: ocp.args.JsonSave(meta)}))

    return atomic.atomic_directory(path, write, overwrite=overwrite, kind=outputs.ADAPTER)


def load_adapter(path: str | Path, params: Mapping, *, shardings: Shardings = None,
                 adapter_name: str | None = None) -> Params:
    """Load a `save_adapter` checkpoint into `params` (a base tree, or one with adapters).

    Every stored module must exist in `params` with the kernel shape the adapter implies, and if
    `params` already carries adapters they must be the same modules and shapes; otherwise a
    `LoraError` lists each mismatch and nothing is read. Arrays are restored straight into
    `shardings`; without them into the shardings of `params`' adapter leaves, or, where it has
    none, replicated over each kernel's devices (`lora_jax.placement`: lora_jax derives no
    specs; `sharding.param_shardings` gives the adapter rule).

    Args:
      path: a directory written by `save_adapter`.
      params: params or `{"params": ...}` variables; returned in the same form.
      shardings: where the adapter leaves go: a tree of `jax.sharding.Sharding`s shaped like the
        adapters (or the whole params), one Sharding, or a function `(dotted_path, shape) ->
        Sharding | None`, as `models.load_hf(..., shardings=)` takes.
      adapter_name: the name the loaded adapter gets in the tree (`lora_jax.named`; an
        adapter of that name is replaced, the others kept); None: the name it was saved under
        ("default" for checkpoints without one).

    Returns:
      `params` with the stored adapters (including their scales) in place.

    Example:
      >>> params = load_adapter("ckpt/adapter", base_params)
      >>> logits = lora_jax.apply(model, {"params": params}, tokens)
      >>> sharded = load_adapter("ckpt/adapter", base, shardings=param_shardings(like, mesh))
    """
    path = resolve(path)
    meta = read_meta(path)
    name = adapter_name or meta.get("adapter_name", DEFAULT_ADAPTER)
    if name != DEFAULT_ADAPTER or named.has_named(params):
        return named.via_default(params, name, lambda view: load_adapter(
            path, view, shardings=shardings, adapter_name=DEFAULT_ADAPTER))
    tree, rewrap = unwrap_variables(params)
    problems = fit_problems(meta["modules"], adapter_modules(tree))
    if problems:
        raise LoraError(f"the adapter at {path} (base model {meta.get('base_model')!r}) does not "
                        "fit this model:\n  - " + "\n  - ".join(problems) +
                        "\nLoad it into the base model it was trained on, or inject a new "
                        "adapter for this one. Nothing was loaded.")
    target = abstract_adapters(meta["modules"], adapter_modules(tree), shardings)
    restored = _restore(path, target)
    bad = fingerprint.mismatches(meta["checksums"], restored)
    if bad:
        raise LoraError(f"adapter checkpoint {path} is corrupt: contents of {bad[:5]} differ from "
                        "the checksums written at save time. Restore it from a backup or save "
                        "again.")
    base = filter_leaves(tree, lambda key: key not in ADAPTER_LEAVES)
    return rewrap(combine(base, _cast_like(restored, tree)))


def adapter_config(path: str | Path) -> LoraConfig:
    """The `LoraConfig` stored with a `save_adapter` checkpoint.

    Example:
      >>> lora_jax.apply(model, vars, x, lora_dropout=adapter_config("ckpt").lora_dropout)
    """
    return LoraConfig.from_dict(read_meta(resolve(path))["config"])


def resolve(path: str | Path) -> Path:
    """The checkpoint directory to read: `path`, or its `.previous` copy if a save died
    mid-swap (logged)."""
    path = Path(path).absolute()
    previous = atomic.sibling(path, atomic.PREVIOUS)
    if not path.exists() and previous.exists():
        log.warning("%s is missing but a complete previous copy exists (a save was interrupted); "
                    "loading %s", path, previous)
        return previous
    if not path.is_dir():
        raise LoraError(f"no adapter checkpoint at {path}: the directory does not exist. Check "
                        "the path (save_adapter writes a directory).")
    return path


def read_meta(path: Path) -> dict:
    """The JSON item of an adapter checkpoint, validated; LoraError if missing or corrupt."""
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            meta = ckptr.restore(path, ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()}))
        meta = meta[META_ITEM]
    except Exception as err:  # orbax raises many types for damaged files
        raise LoraError(f"{path} is not a readable lora_jax adapter checkpoint "
                        f"({type(err).__name__}: {str(err)[:200]}). Was it written by "
                        "save_adapter, and completely?") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LoraError(f"{path} is not a lora_jax adapter checkpoint (format tag missing). For "
                        "a PEFT directory use lora_jax.import_peft.")
    if meta.get("version", 0) > VERSION:
        raise LoraError(f"{path} was written by a newer lora_jax (format {meta['version']}); "
                        "upgrade lora_jax to load it.")
    return meta


def describe(adapters: Mapping) -> dict[str, dict]:
    """`{module_path: {leaf: {"shape": [...], "dtype": "float32"}}}` for the adapter leaves."""
    return {path: {leaf: {"shape": list(np.shape(module[leaf])),
                          "dtype": str(np.dtype(module[leaf].dtype))}
                   for leaf in module if leaf in ADAPTER_LEAVES}
            for path, module in adapter_modules(adapters).items()}


def implied_kernel_shape(record: Mapping) -> tuple[int, ...]:
    """`[*S, *in, *out]` from `lora_a [*S, *in, r]`, `lora_b [*S, r, *out]`, `lora_scale [*S]`."""
    n_stack = len(record[LORA_SCALE]["shape"])
    a, b = record[LORA_A]["shape"], record[LORA_B]["shape"]
    return tuple(a[:-1]) + tuple(b[n_stack + 1:])


def fit_problems(stored: Mapping[str, Mapping], modules: Mapping[str, Mapping]) -> list[str]:
    """One line per way the stored adapters do not fit the tree's modules."""
    problems = []
    for path, record in stored.items():
        module = modules.get(path)
        if module is None:
            problems.append(f"{path}: no such module in the model")
            continue
        problems += _saved_problems(path, record, module)
        want = implied_kernel_shape(record) if LORA_A in record else None
        if want is not None and "kernel" in module and tuple(np.shape(module["kernel"])) != want:
            problems.append(f"{path}: the adapter fits a kernel of shape {list(want)}, the model's "
                            f"kernel is {list(np.shape(module['kernel']))}")
        for leaf in ADAPTER_LEAVES:
            if leaf in module and leaf not in record and LORA_A in record:  # a DoRA model, a
                # plain checkpoint
                problems.append(f"{path}.{leaf}: the model has this leaf, the checkpoint has "
                                "not (load into the base tree, lora_jax.split(params)[0])")
                continue
            if leaf in module and leaf in record and (
                    list(np.shape(module[leaf])) != record[leaf]["shape"]):
                problems.append(f"{path}.{leaf}: checkpoint shape {record[leaf]['shape']}, model "
                                f"shape {list(np.shape(module[leaf]))}")
    extra = [p for p, m in modules.items() if LORA_A in m and p not in stored]
    problems += [f"{p}: the model has an adapter here, the checkpoint has none" for p in extra]
    return problems


def _saved_problems(path: str, record: Mapping, module: Mapping) -> list[str]:
    """A stored `modules_to_save` copy needs its original leaf, of the same shape."""
    problems = []
    for leaf in filter(is_saved_leaf, record):
        original = leaf[len(SAVED_PREFIX):]
        if original not in module:
            problems.append(f"{path}.{leaf}: the model's module has no {original!r}")
        elif list(np.shape(module[original])) != record[leaf]["shape"]:
            problems.append(f"{path}.{leaf}: checkpoint shape {record[leaf]['shape']}, the "
                            f"model's {original} is {list(np.shape(module[original]))}")
    return problems


def abstract_adapters(stored: Mapping[str, Mapping], modules: Mapping[str, Mapping],
                      shardings: Shardings = None) -> Params:
    """The restore target: `ShapeDtypeStruct`s with the dtypes and shardings to restore into."""
    out = {}
    for path, record in stored.items():
        leaves = {}
        for leaf in record:  # lora_a, lora_b, lora_scale; saved_* copies
            # The stored dtype, so checksums can be verified; `load_adapter` casts afterwards.
            shape, dtype = tuple(record[leaf]["shape"]), np.dtype(record[leaf]["dtype"])
            sharding = adapter_sharding(modules[path], leaf, path, shape, shardings)
            leaves[leaf] = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
        out[path] = leaves
    return nest(out)


def _cast_like(restored: Params, tree: Mapping) -> Params:
    """Cast restored leaves to the dtype of the adapter leaves `tree` already had, if any."""
    return {k: _cast_like(v, tree.get(k, {})) if isinstance(v, Mapping)
            else (v.astype(tree[k].dtype) if k in tree and v.dtype != tree[k].dtype else v)
            for k, v in restored.items()}


def _restore(path: Path, target: Params) -> Params:
    try:
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckptr:
            out = ckptr.restore(path, ocp.args.Composite(
                **{ADAPTER_ITEM: ocp.args.StandardRestore(target)}))
        return out[ADAPTER_ITEM]
    except Exception as err:  # truncated or damaged array files
        raise LoraError(f"adapter checkpoint {path} could not be read ({type(err).__name__}: "
                        f"{str(err)[:200]}); it is truncated or corrupt. Restore it from a backup "
                        "or save again.") from err
