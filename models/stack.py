"""The stack of transformer blocks: a Python loop or `nn.scan`, with optional rematerialisation.

Unscanned, the blocks are children "0", "1", ... of a container module, so parameter paths read
`model.layers.3.self_attn.q_proj`. Scanned, the container itself is the scanned block and every
leaf gets a leading layer axis: `model.layers.self_attn.q_proj.kernel` is [L, in, out]. Layer i's
Hugging Face name is then `<container>.<i>.<rest>` (see `models.layout`).

A block is a Linen module built as `block_cls(config=..., parallel=...)` whose `__call__(x, ctx,
layer_kv, deterministic)` returns `(x, layer_kv)`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from models.options import REMAT_NONE, remat_policy_for
from models.parallel import Parallelism

# Positional index of `deterministic` in a block's __call__, counting `self` (for remat).
_DETERMINISTIC_ARGNUM = 4


def _maybe_remat(block_cls: type, config: Any, scanned: bool) -> type:
    if config.remat_policy == REMAT_NONE:
        return block_cls
    # prevent_cse only matters outside scan; inside it costs performance for nothing.
    return nn.remat(block_cls, policy=remat_policy_for(config), prevent_cse=not scanned,
                    static_argnums=(_DETERMINISTIC_ARGNUM,))


class LayerLoop(nn.Module):
    """Unscanned stack: blocks named "0" .. "L-1". kv: stacked (k, v) [L, ...] or None."""

    block_cls: type
    config: Any
    parallel: Parallelism
    num_layers: int

    @nn.compact
    def __call__(self, x, ctx, kv, deterministic):
        block_cls = _maybe_remat(self.block_cls, self.config, scanned=False)
        for i in range(self.num_layers):
            layer_kv = None if kv is None else (kv[0][i], kv[1][i])
            block = block_cls(config=self.config, parallel=self.parallel, name=str(i))
            x, layer_kv = block(x, ctx, layer_kv, deterministic)
            if kv is not None:
                kv = (kv[0].at[i].set(layer_kv[0]), kv[1].at[i].set(layer_kv[1]))
        return x, kv


def layer_stack(block_cls: type, config: Any, parallel: Parallelism, num_layers: int) -> nn.Module:
    """The module to assign (in `setup`) to the container attribute ("layers", "h").

    Its call `(x [B, T, D], ctx, kv, deterministic) -> (x, kv)` runs all blocks.
    """
    if not config.scan_layers:
        return LayerLoop(block_cls=block_cls, config=config, parallel=parallel,
                         num_layers=num_layers)
    scanned = nn.scan(
        _maybe_remat(block_cls, config, scanned=True),
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast, 0, nn.broadcast),
        length=num_layers,
    )
    return scanned(config=config, parallel=parallel)


def stacked_kv_or_none(cache) -> tuple[jax.Array, jax.Array] | None:
    return None if cache is None else (cache.k, cache.v)
