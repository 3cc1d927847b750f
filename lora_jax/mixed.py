"""Mixed batches: N adapters stacked on an adapter axis, each batch row running its own.

    stack_adapters(params, adapters)      N adapter trees -> one tree, leaves on an adapter axis
    unstack_adapter(params, i, template)  adapter i back as an ordinary single-adapter tree
    adapter_index(names, rows)            row names ("__base__" / None = base) -> int32 [batch]

The stacked form keeps the leaf names and puts the adapter axis right after the stack axes
`*S` (the scanned layer axis stays leading, so `nn.scan` slices it as before):

    lora_a      [*S, N, *in, r]     r = the largest rank; smaller ones are zero-padded (exact:
    lora_b      [*S, N, r, *out]        padded columns of A meet zero rows of B, and both get
    lora_scale  [*S, N]                 zero gradients, so they stay zero while training)

`lora_jax.apply(model, {"params": stacked}, x, adapter_index=idx)` runs row i with adapter
`idx[i]` (-1: the base only); the adapter op recognises a stacked layer by A's extra axis
(see `lora_jax.adapter_op.is_stacked`). Because the leaf names are the
ordinary ones, `split` / `combine` / `trainable_mask` / `optimizer` / checkpoints carry a stacked
tree as they carry one adapter, so the N adapters train together (each only from its rows).
Export goes one adapter at a time: `export_peft(dir, unstack_adapter(p, i, template), cfg_i)`.

Names: this module orders adapters by position (a Mapping's order); `adapter_index` is the
hook that turns per-row names into positions, for callers that keep adapters by name.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from lora_jax.errors import LoraError
from lora_jax.partition import combine, lora_params, split
from lora_jax.tree import LORA_A, LORA_B, LORA_SCALE, Params, has_adapter, modules_of, nest

BASE = "__base__"  # PEFT's name for a row that runs no adapter


def _as_list(adapters: Sequence | Mapping) -> list[Mapping]:
    items = list(adapters.values()) if isinstance(adapters, Mapping) else list(adapters)
    if not items:
        raise LoraError("stack_adapters needs at least one adapter tree.")
    return items


def _adapter_modules(tree: Mapping, which: int) -> dict[str, Mapping]:
    mods = {p: m for p, m in modules_of(lora_params(tree)).items() if has_adapter(m)}
    if not mods:
        raise LoraError(f"adapter {which} holds no lora_a / lora_b leaves: pass trees from "
                        "lora_jax.inject / lora_params / import_peft.")
    return mods


def _stack_module(path: str, mods: list[Mapping]) -> Params:
    """One module's N adapters on an adapter axis after its stack axes, ranks zero-padded."""
    s = np.ndim(mods[0][LORA_SCALE])
    rank = max(m[LORA_A].shape[-1] for m in mods)
    shapes = {(m[LORA_A].shape[:-1], m[LORA_B].shape[:s] + m[LORA_B].shape[s + 1:],
               np.shape(m[LORA_SCALE])) for m in mods}
    if len(shapes) > 1:
        raise LoraError(f"the adapters of {path!r} do not fit each other (lora_a without rank, "
                        f"lora_b without rank, lora_scale): {sorted(shapes)}; stack only "
                        "adapters made for the same base model and layout.")

    def pad(x, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, rank - x.shape[axis])
        return jnp.pad(x, widths)

    return {LORA_A: jnp.stack([pad(m[LORA_A], -1) for m in mods], axis=s),
            LORA_B: jnp.stack([pad(m[LORA_B], s) for m in mods], axis=s),
            LORA_SCALE: jnp.stack([jnp.asarray(m[LORA_SCALE]) for m in mods], axis=s)}


def stack_adapters(params: Mapping, adapters: Sequence | Mapping) -> Params:
    """Put N adapters, all on the same target modules, on an adapter axis beside the kernels.

    Args:
      params: the base tree (any adapter leaves in it are replaced).
      adapters: N adapter trees (`lora_params(...)`, injected trees or `import_peft` results),
        a sequence or a name -> tree mapping (its order gives the indices). Ranks and scales
        may differ.

    Returns:
      `params` with `lora_a [*S, N, *in, r_max]`, `lora_b [*S, N, r_max, *out]`,
      `lora_scale [*S, N]` beside each targeted kernel.

    Example:
      >>> stacked = stack_adapters(base, [lora_params(p0), lora_params(p1)])
      >>> logits = lj.apply(model, {"params": stacked}, ids, adapter_index=jnp.array([1, 0]))
    """
    per_adapter = [_adapter_modules(t, i) for i, t in enumerate(_as_list(adapters))]
    paths = set(per_adapter[0])
    for i, mods in enumerate(per_adapter[1:], 1):
        if set(mods) != paths:
            raise LoraError(f"adapter {i} targets other modules than adapter 0: only in 0: "
                            f"{sorted(paths - set(mods))[:5]}, only in {i}: "
                            f"{sorted(set(mods) - paths)[:5]}. Stacked adapters must share "
                            "their target modules.")
    base = split(params)[0]
    kernels = modules_of(base)
    missing = sorted(p for p in paths if p not in kernels)
    if missing:
        raise LoraError(f"adapter modules {missing[:5]} have no kernel in params: pass the "
                        "base tree the adapters were made for.")
    stacked = {p: _stack_module(p, [mods[p] for mods in per_adapter]) for p in sorted(paths)}
    return combine(base, nest(stacked))


def unstack_adapter(params: Mapping, i: int, template: Mapping | None = None) -> Params:
    """Adapter `i` of a stacked tree as an ordinary single-adapter tree (for export, merge).

    Args:
      params: a tree from `stack_adapters` (trained or not).
      i: the adapter's position.
      template: that adapter's original tree (or any tree of its shapes); its ranks undo the
        zero padding. Without it every module keeps the stacked (largest) rank, which computes
        the same but exports a larger PEFT file.

    Example:
      >>> lj.export_peft(out, unstack_adapter(stacked, 1, template=adapters[1]), config_1)
    """
    ranks = ({} if template is None else
             {p: m[LORA_A].shape[-1] for p, m in _adapter_modules(template, i).items()})
    base, adapters = split(params)
    out = {}
    for path, m in modules_of(adapters).items():
        s = np.ndim(m[LORA_SCALE]) - 1
        n = m[LORA_SCALE].shape[s] if s >= 0 else 0
        if not 0 <= i < n:
            raise LoraError(f"{path!r} holds {n} stacked adapters, so there is no adapter {i}"
                            + ("" if s >= 0 else " (it is not a stacked tree)") + ".")
        r = ranks.get(path, m[LORA_A].shape[-1])
        out[path] = {LORA_A: jnp.take(m[LORA_A], i, axis=s)[..., :r],
                     LORA_B: jnp.take(m[LORA_B], i, axis=s)[(slice(None),) * s + (slice(0, r),)],
                     LORA_SCALE: jnp.take(m[LORA_SCALE], i, axis=s)}
    return combine(base, nest(out))


def adapter_index(names: Sequence[str], rows: Sequence[Any]) -> jnp.ndarray:
    """The int32 `[batch]` index `lora_jax.apply(..., adapter_index=)` takes, from row names.

    Args:
      names: the stacked adapters' names in stacking order (e.g. `list(mapping)`).
      rows: one entry per batch row: an adapter name, or `"__base__"` / None for the base.

    Example:
      >>> adapter_index(["math", "code"], ["code", "__base__", "math"])
      Array([ 1, -1,  0], dtype=int32)
    """
    position = {name: k for k, name in enumerate(names)}
    unknown = sorted({str(r) for r in rows if r not in position and r not in (BASE, None)})
    if unknown:
        raise LoraError(f"rows name unknown adapters {unknown}; the stacked ones are "
                        f"{list(names)} (use {BASE!r} or None for a base-only row).")
    return jnp.asarray([position.get(r, -1) for r in rows], jnp.int32)
