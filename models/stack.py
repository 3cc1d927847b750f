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
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from models.options import REMAT_NONE, remat_policy_for
from models.parallel import Parallelism
from remat_policies import LAYER_INPUT_DEVICE, LAYER_INPUT_HOST, offload_fraction

# Positional index of `deterministic` in a block's __call__, counting `self` (for remat).
_DETERMINISTIC_ARGNUM = 4


def name_layer_input(x: jax.Array, fraction: float) -> jax.Array:
    """x [B, T, D] with its first `round(fraction * T)` tokens named LAYER_INPUT_HOST and the
    rest LAYER_INPUT_DEVICE, for an `offload_layer_input` policy (`remat_policies`).

    Only inside a rematerialised function do the names mean anything; the value is unchanged.
    """
    length = x.shape[1]
    offloaded = round(fraction * length)
    if offloaded == length:
        return checkpoint_name(x, LAYER_INPUT_HOST)
    if offloaded == 0:
        return checkpoint_name(x, LAYER_INPUT_DEVICE)
    return jnp.concatenate([checkpoint_name(x[:, :offloaded], LAYER_INPUT_HOST),
                            checkpoint_name(x[:, offloaded:], LAYER_INPUT_DEVICE)], axis=1)


def _with_named_input(block_cls: type, fraction: float) -> type:
    """`block_cls` whose call first names its input (`name_layer_input`); same parameters."""

    class NamedInput(block_cls):
        def __call__(self, x, ctx, layer_kv, deterministic):
            return super().__call__(name_layer_input(x, fraction), ctx, layer_kv, deterministic)

    NamedInput.__name__ = NamedInput.__qualname__ = f"{block_cls.__name__}NamedInput"
    return NamedInput


def _maybe_remat(block_cls: type, config: Any, scanned: bool) -> type:
    if config.remat_policy == REMAT_NONE:
        return block_cls
    fraction = offload_fraction(config.remat_policy)
    if fraction is not None:  # the policy saves the layer input by these names, nothing else
        block_cls = _with_named_input(block_cls, fraction)
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
