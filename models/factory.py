"""Building a model from a config, and random params for it."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layout import family
from models.parallel import NoParallelism, Parallelism


def build(config: Any, parallel: Parallelism = NoParallelism()) -> nn.Module:
    """The model of a config: `GPT2Config` -> `GPT2`, `LlamaConfig` -> `Llama`.

    Example:
      >>> model = build(LlamaConfig.tiny(scan_layers=True))
    """
    return family(config).model_cls(config, parallel)


def init_params(model: nn.Module, rng: jax.Array) -> dict:
    """Random params for `model` (HF-style init: normal(initializer_range), unit norms).

    Jitted: one compile instead of hundreds of eagerly dispatched initialisers, and no
    intermediate copies (`jax.jit(..., out_shardings=...)` of this is the sharded variant).
    """
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 1), jnp.int32))["params"])
    return init(rng)
