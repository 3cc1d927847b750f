"""`inject`: add `lora_a` / `lora_b` / `lora_scale` leaves beside every matched kernel."""
from __future__ import annotations

import math
import zlib
from typing import Mapping

import jax
import jax.numpy as jnp

from lora_jax import dora, inits
from lora_jax.config import ALL_LINEAR, LoraConfig, matches_modules, pattern_key
from lora_jax.errors import LoraError
from lora_jax import named
from lora_jax.layout import KernelLayout, default_layout
from lora_jax.tree import LORA_MAGNITUDE
from lora_jax.tree import (LORA_A, LORA_B, LORA_SCALE, Params, has_adapter, iter_modules,
                           map_modules, unwrap_variables)
from lora_jax.tree import DEFAULT_ADAPTER
from lora_jax.tree import EMBEDDING, is_embedding
from lora_jax.embedding import embedding_adapter_leaves
from lora_jax.saved import MODULE_LEAVES, saved_copies, select_saved


def inject(params: Mapping, config: LoraConfig, rng: jax.Array, *,
           layouts: Mapping[str, KernelLayout] | None = None,
           adapter_name: str | None = None) -> Params:
    """Return `params` with LoRA adapter leaves beside each kernel that `config` targets.

    For a kernel `[*S, *in, *out]` (S: stacked layer axes of `nn.scan`) it adds
    `lora_a [*S, *in, r]`, `lora_b [*S, r, *out]` and `lora_scale [*S]` (float32, not trainable).
    B is zero (with the default init), so the model's output is unchanged. Each adapter's random
    draw is keyed by `fold_in(rng, crc32(path))`: the same `rng` gives the same adapters on every
    host and device and whatever other modules are targeted.

    With `init_lora_weights` "pissa", "pissa_niter_K" or "olora" (`lora_jax.inits`) the
    adapters come from an SVD / QR of each kernel and the kernel is replaced by the residual
    `W - scale * A @ B`: the returned base is NOT the original base. Keep
    `lora_params(<the result>)` to export the trained adapter for the original base
    (`export_peft(..., initial_adapters=)`).

    Args:
      params: a Linen params tree, or variables `{"params": ...}` (returned in the same form).
      config: the `LoraConfig`.
      rng: a PRNG key.
      layouts: optional `{path: KernelLayout}` from `kernel_layouts`; needed for DenseGeneral.
      adapter_name: None or "default": the adapter beside the kernel (as always). Another name
        adds a new adapter beside the tree's existing ones, under `lora_named/<name>`
        (`lora_jax.named`), drawn from `fold_in(rng, crc32(name))`; a name already in the tree
        is refused.

    Example:
      >>> params = inject(params, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]), key)
      >>> params = inject(params, other_config, key, adapter_name="b")   # a second adapter
    """
    if adapter_name is not None and named.check_name(adapter_name) != DEFAULT_ADAPTER:
        return named.inject_named(params, adapter_name, rng,
                                  lambda base, key: inject(base, config, key, layouts=layouts))
    tree, rewrap = unwrap_variables(params)
    # Embedding tables are targets too (by name; "all-linear" skips them, as PEFT's does).
    modules = dict(iter_modules(tree, leaves=("kernel", EMBEDDING)))
    targets = select_targets(modules, config)
    _check_patterns(config, targets)
    saved = select_saved(dict(iter_modules(tree, leaves=MODULE_LEAVES)), config, targets)
    layouts = dict(layouts or {})

    def add(path: str, module: Params) -> Params:
        if path in saved:
            module = {**module, **saved_copies(module)}
        if path not in targets:
            return module
        if is_embedding(module):
            if config.use_dora:
                raise LoraError(f"use_dora=True and {path!r} is an embedding table: DoRA is for "
                                "Dense kernels here; leave the embedding out of target_modules "
                                "or train it without DoRA.")
            return {**module, **embedding_adapter_leaves(path, tuple(module[EMBEDDING].shape),
                                                         config, rng)}
        layout = layouts.get(path) or default_layout(path, tuple(module["kernel"].shape))
        leaves = adapter_leaves(path, module["kernel"].shape, layout, config, rng)
        _check_quantized(path, module["kernel"], config)
        if inits.is_base_changing(config.init_lora_weights):  # PiSSA / OLoRA: kernel rewritten
            module = inits.base_changing_module(path, module, leaves, layout, config, rng)
            leaves = {k: module[k] for k in leaves}
        if config.use_dora:  # the norm of the adapted weight (with PiSSA: the original kernel)
            leaves = with_magnitude(module["kernel"], leaves, layout, config)
        return {**module, **leaves}

    return rewrap(map_modules(tree, add, leaves=MODULE_LEAVES))


def select_targets(modules: Mapping[str, Mapping], config: LoraConfig) -> list[str]:
    """Dotted paths of the kernels `config` targets; errors if none, or if one already has LoRA."""
    paths = list(modules)
    if config.target_modules == ALL_LINEAR:
        heads = tuple(config.output_head_names)
        chosen = [p for p in paths if p.rsplit(".", 1)[-1] not in heads
                  and not is_embedding(modules[p])]
    else:
        chosen = [p for p in paths if matches_modules(config.target_modules, p)]
    kept = [p for p in chosen if not matches_modules(config.exclude_modules, p)]
    if chosen and not kept:
        raise LoraError(f"exclude_modules={config.exclude_modules!r} removes every module that "
                        f"target_modules={config.target_modules!r} matched ({chosen[:6]}"
                        f"{' ...' if len(chosen) > 6 else ''}): nothing is left to adapt. "
                        "Narrow exclude_modules or widen target_modules.")
    chosen = kept
    if not chosen:
        listing = "\n  ".join(paths) or "(none: the tree holds no 'kernel' leaves)"
        raise LoraError(f"target_modules={config.target_modules!r} matched no Dense kernel. "
                        f"Module paths in this tree:\n  {listing}")
    already = [p for p in chosen if has_adapter(modules[p])]
    if already:
        raise LoraError(f"these modules already carry LoRA adapters: {already[:5]}. Inject into "
                        "the base tree (lora_jax.split(params)[0]) or merge(params) first.")
    return chosen


def _check_patterns(config: LoraConfig, targets: list[str]) -> None:
    for name, pattern in (("rank_pattern", config.rank_pattern),
                          ("alpha_pattern", config.alpha_pattern)):
        for key in pattern:
            if not any(pattern_key({key: 0}, p) for p in targets):
                raise LoraError(f"{name} key {key!r} matches none of the targeted modules: "
                                f"{targets[:8]}{' ...' if len(targets) > 8 else ''}")


def adapter_leaves(path: str, kernel_shape: tuple[int, ...], layout: KernelLayout,
                   config: LoraConfig, rng: jax.Array) -> Params:
    """The three adapter leaves for one kernel."""
    stack, ins, outs = layout.split(tuple(kernel_shape))
    fan_in, fan_out = math.prod(ins), math.prod(outs)
    rank = config.checked_rank(path, fan_in, fan_out)
    dtype = jnp.dtype(config.adapter_dtype)
    key_a, key_b = jax.random.split(jax.random.fold_in(rng, zlib.crc32(path.encode())))
    a = init_a(config.init_lora_weights, key_a, (*stack, *ins, rank), fan_in, rank, dtype)
    if config.init_lora_weights is False:  # test-only: a non-trivial B
        b = jax.random.normal(key_b, (*stack, rank, *outs), dtype) / math.sqrt(rank)
    else:
        b = jnp.zeros((*stack, rank, *outs), dtype)
    scale = jnp.full(stack, config.scale_for(path), jnp.float32)
    return {LORA_A: a, LORA_B: b, LORA_SCALE: scale}


def with_magnitude(kernel: jax.Array, leaves: Params, layout: KernelLayout,
                   config: LoraConfig) -> Params:
    """`leaves` plus DoRA's `lora_magnitude [*S, *out]`, initialised as PEFT does (the norm of
    each output feature's adapted weight column; `lora_jax.dora.magnitude_leaf`). Always
    float32, whatever `adapter_dtype`: its values are O(1) norms whose training updates are
    ~1e-4 relative, below bfloat16's resolution (PEFT keeps it float32 too)."""
    magnitude = dora.magnitude_leaf(kernel, leaves, layout.n_stack, jnp.float32)
    return {**leaves, LORA_MAGNITUDE: magnitude}


def init_a(scheme, key, shape, fan_in: int, rank: int, dtype) -> jax.Array:
    """PEFT's A init. Kaiming-uniform with a=sqrt(5) on a `[r, in]` weight is U(±1/sqrt(in))."""
    if scheme == "gaussian":
        return (jax.random.normal(key, shape, jnp.float32) / rank).astype(dtype)
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def _check_quantized(path: str, kernel, config: LoraConfig) -> None:
    """A quantised frozen kernel (NF4 / int8 / FP8: a pytree with `dequantize`, from
    `models.quant`) takes plain LoRA; the variants that read or rewrite the kernel do not."""
    if not hasattr(kernel, "dequantize"):
        return
    if config.use_dora:
        raise LoraError(f"{path!r} has a quantised kernel: DoRA's weight norm over a quantised "
                        "base is not supported; use plain LoRA, or load the base unquantised.")
    if inits.is_base_changing(config.init_lora_weights):
        raise LoraError(f"{path!r} has a quantised kernel: init_lora_weights="
                        f"{config.init_lora_weights!r} rewrites the kernel, which a quantised "
                        "base cannot hold; use the default init, or load the base unquantised.")
