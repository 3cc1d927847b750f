"""Every projection of every model is built here, through the `Parallelism` seam."""
from __future__ import annotations

from typing import Any

import flax.linen as nn

from models.fp8 import fp8_dot_general
from models.parallel import NoParallelism, Parallelism, Role
from models.quant import QuantDense


def projection(parallel: Parallelism, config: Any, features: int, *, role: Role, name: str,
               use_bias: bool) -> nn.Module:
    """A Dense-like layer [..., in] -> [..., features] with `kernel` [in, features] (and `bias`),
    initialised like Hugging Face (normal(initializer_range), zero bias).

    With `config.base_fp8` the block projections multiply in FP8; the output head ("replicated")
    stays in the compute dtype, as FP8 recipes keep it: logits over a large vocabulary are where
    quantisation error hurts the loss most. Projections named in `config.base_fp8_skip` stay in
    the compute dtype too."""
    if getattr(config, "quantize", None) and role != "replicated":
        return quantized_projection(parallel, config, features, name=name, use_bias=use_bias,
                                    role=role)
    fp8 = config.base_fp8 and role != "replicated" and name not in config.base_fp8_skip
    return parallel.dense(features, role=role, name=name, use_bias=use_bias, dtype=config.dtype,
                          param_dtype=config.param_dtype,
                          kernel_init=nn.initializers.normal(config.initializer_range),
                          bias_init=nn.initializers.zeros,
                          dot_general=fp8_dot_general if fp8 else None)


def quantized_projection(parallel: Parallelism, config: Any, features: int, *, name: str,
                         use_bias: bool, role: Role) -> nn.Module:
    """A block projection whose frozen kernel is stored in `config.quantize`'s format: without
    parallelism `models.quant.QuantDense` (dp and FSDP then shard its leaves by the kernel's
    rules, GSPMD); otherwise the parallelism's layer of that role, asked with `quant=` (the
    tensor-parallel shard_map layers multiply each device's shard of the quantised kernel, with
    `config.quant_impl` and `config.fp8_scaling`, each asked only when not its default)."""
    if not isinstance(parallel, NoParallelism):
        return parallel.dense(features, role=role, name=name, use_bias=use_bias,
                              dtype=config.dtype, param_dtype=config.param_dtype,
                              kernel_init=nn.initializers.normal(config.initializer_range),
                              bias_init=nn.initializers.zeros, quant=config.quantize,
                              **_non_default_options(config))
    return QuantDense(features, quant=config.quantize, name=name, use_bias=use_bias,
                      **_options(config),
                      dtype=config.dtype, param_dtype=config.param_dtype,
                      kernel_init=nn.initializers.normal(config.initializer_range),
                      bias_init=nn.initializers.zeros)


# Options a quantised projection layer takes, with their defaults (a config that predates an
# option, or a model family without it, gets the default).
LAYER_OPTION_DEFAULTS = {"quant_impl": "xla", "fp8_scaling": "tensor"}


def _options(config: Any) -> dict:
    """`{option: the config's value or its default}` for each of `LAYER_OPTION_DEFAULTS`."""
    return {k: getattr(config, k, default) for k, default in LAYER_OPTION_DEFAULTS.items()}


def _non_default_options(config: Any) -> dict:
    """`quant_impl=` / `fp8_scaling=` for a parallelism's layer, each only when the config asks
    for a non-default value (so a parallelism that does not know an option is asked with it only
    when it matters)."""
    return {k: v for k, v in _options(config).items()
            if v != LAYER_OPTION_DEFAULTS[k]}


def embedding(config: Any, num: int, features: int) -> nn.Embed:
    """An embedding table [num, features] (leaf `embedding`), looked up in the compute dtype.

    Built in a parent's `setup`, where the attribute name gives the module its name."""
    return nn.Embed(num, features, dtype=config.dtype, param_dtype=config.param_dtype,
                    embedding_init=nn.initializers.normal(config.initializer_range))
