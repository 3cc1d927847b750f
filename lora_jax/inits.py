"""Initialisations that change the base: PiSSA (`"pissa"`, `"pissa_niter_K"`) and OLoRA
(`"olora"`), as HF PEFT computes them, and their conversion back to plain LoRA for export.

PEFT's Linear weight is `W_t [out, in]`; our kernel is its transpose `W [in, out]` (GPT-2's
`Conv1D` stores `[in, out]` too, and PEFT's PiSSA transposes it to `[out, in]` first, so one rule
serves both). Per module, with `s` the adapter's scale and `r` its rank:

- PiSSA: `W = U S V^T` (float32; `pissa_niter_K`: a randomized SVD with K subspace iterations,
  the algorithm of `torch.svd_lowrank`); `A = U_r sqrt(S_r / s)`, `B = sqrt(S_r / s) V_r^T`.
- OLoRA: `W_t = Q R` (QR of PEFT's `[out, in]` weight); `A = R_r^T`, `B = Q_r^T`.

Both replace the kernel by the residual `W - s * A @ B` (float32 math, cast back to the kernel's
dtype), so the injected model computes exactly what the base did, but **the returned base is no
longer the original base**. The residual is computed from A and B as stored (in
`adapter_dtype`), so `residual_base(original, initial_adapters)` rebuilds it bit for bit (what a
resumed run does).

A trained adapter over the residual base is exported for the ORIGINAL base as PEFT's
`save_pretrained(path_initial_model_for_weight_conversion=...)` does:
`ΔW = s(A B - A0 B0) = s [A | A0] [B ; -B0]`, a plain LoRA adapter of rank 2r at the same scale
(`to_plain_lora`, `plain_lora_config`; `export_peft(..., initial_adapters=)` calls them).
"""
from __future__ import annotations

import dataclasses
import math
import re
import zlib
from typing import Mapping

import jax
import jax.numpy as jnp

from lora_jax.config import LoraConfig
from lora_jax.errors import LoraError
from lora_jax.layout import KernelLayout
from lora_jax.merge import merged_kernel
from lora_jax.tree import (LORA_A, LORA_B, LORA_SCALE, Params, has_adapter, map_modules,
                           modules_of, unwrap_variables)

PISSA, OLORA = "pissa", "olora"
_NITER = re.compile(r"pissa_niter_(\d+)")


def parse_init(init) -> tuple[str | None, int | None]:
    """`("pissa", None)`, `("pissa", K)` for `"pissa_niter_K"`, `("olora", None)`, or
    `(None, None)` for an init that leaves the base alone (True, False, "gaussian").

    Example:
      >>> parse_init("pissa_niter_4")
      ('pissa', 4)
    """
    if not isinstance(init, str):
        return None, None
    if init in (PISSA, OLORA):
        return init, None
    match = _NITER.fullmatch(init)
    return (PISSA, int(match[1])) if match else (None, None)


def is_base_changing(init) -> bool:
    """True for the inits that rewrite the kernels (PiSSA, pissa_niter_K, OLoRA)."""
    return parse_init(init)[0] is not None


def pissa_factors(w: jax.Array, rank: int, scale: jax.Array, *, niter: int | None = None,
                  key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """PiSSA's `A [..., in, r]`, `B [..., r, out]` of float32 kernels `w [..., in, out]` (leading
    axes are stacked layers, `scale` broadcasts over them): the top-r singular triplets split
    as `sqrt(S / scale)` on each side, so `scale * A @ B` is the rank-r truncated SVD of `w`.

    Example:
      >>> a, b = pissa_factors(w, 4, jnp.float32(2.0))
    """
    if niter is None:
        u, s, vt = jnp.linalg.svd(w, full_matrices=False)
        u, s, vt = u[..., :rank], s[..., :rank], vt[..., :rank, :]
    else:
        u, s, vt = randomized_svd(key, w, rank, niter)
    root = jnp.sqrt(s / jnp.asarray(scale, jnp.float32)[..., None])
    return u * root[..., None, :], root[..., :, None] * vt


def olora_factors(w: jax.Array, rank: int) -> tuple[jax.Array, jax.Array]:
    """OLoRA's `A [..., in, r]`, `B [..., r, out]` of float32 kernels `w [..., in, out]`: the QR
    of PEFT's `[out, in]` weight `w^T = Q R`, `B = Q_r^T`, `A = R_r^T` (unscaled, as PEFT).

    Example:
      >>> a, b = olora_factors(w, 4)
    """
    q, r = jnp.linalg.qr(jnp.swapaxes(w, -1, -2))
    return jnp.swapaxes(r[..., :rank, :], -1, -2), jnp.swapaxes(q[..., :, :rank], -1, -2)


def randomized_svd(key: jax.Array, w: jax.Array, rank: int, niter: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(U [..., m, r], S [..., r], V^T [..., r, n])` of `w [..., m, n]` by Halko et al.'s
    randomized range finder with `niter` subspace (power) iterations, as `torch.svd_lowrank(w,
    q=r, niter=niter)` (no oversampling). A Gaussian draw, so it equals torch's only in law; its
    error shrinks like `(S[r] / S[r-1]) ** (2 * niter + 1)`.

    Example:
      >>> u, s, vt = randomized_svd(jax.random.key(0), w, 8, niter=4)
    """
    tall = w.shape[-2] >= w.shape[-1]
    a = w if tall else jnp.swapaxes(w, -1, -2)
    ortho = lambda x: jnp.linalg.qr(x)[0]  # noqa: E731
    q = ortho(a @ jax.random.normal(key, (*a.shape[:-2], a.shape[-1], rank), jnp.float32))
    for _ in range(niter):
        q = ortho(a @ ortho(jnp.swapaxes(a, -1, -2) @ q))
    u, s, vt = jnp.linalg.svd(jnp.swapaxes(q, -1, -2) @ a, full_matrices=False)
    u = q @ u
    if not tall:  # w^T = u s vt  <=>  w = vt^T s u^T
        u, vt = jnp.swapaxes(vt, -1, -2), jnp.swapaxes(u, -1, -2)
    return u, s, vt


def base_changing_module(path: str, module: Params, leaves: Params, layout: KernelLayout,
                         config: LoraConfig, rng: jax.Array) -> Params:
    """One module after a PiSSA/OLoRA init: `leaves` (from `inject.adapter_leaves`: the rank is
    checked, the scale made) with A and B replaced, and the kernel replaced by the residual.
    Raises `LoraError` for a non-positive scale (sqrt(S / scale) needs scale > 0).
    """
    kind, niter = parse_init(config.init_lora_weights)
    kernel, scale = module["kernel"], leaves[LORA_SCALE]
    stack, ins, outs = layout.split(tuple(kernel.shape))
    rank = config.rank_for(path)
    if config.scale_for(path) <= 0:
        raise LoraError(f"{path}: init_lora_weights={config.init_lora_weights!r} needs a positive "
                        f"scale, this module's is {config.scale_for(path)} (alpha "
                        f"{config.alpha_for(path)}); use a positive lora_alpha.")
    w = kernel.astype(jnp.float32).reshape(*stack, math.prod(ins), math.prod(outs))
    if kind == PISSA:
        key = jax.random.fold_in(jax.random.fold_in(rng, zlib.crc32(path.encode())), 2)
        a, b = pissa_factors(w, rank, scale, niter=niter, key=key)
    else:
        a, b = olora_factors(w, rank)
    dtype = jnp.dtype(config.adapter_dtype)
    a = a.reshape(*stack, *ins, rank).astype(dtype)
    b = b.reshape(*stack, rank, *outs).astype(dtype)
    adapter = {**leaves, LORA_A: a, LORA_B: b}
    return {**module, **adapter, "kernel": residual_kernel(kernel, adapter)}


def residual_kernel(kernel: jax.Array, adapter: Mapping) -> jax.Array:
    """`kernel - scale * A @ B` (float32 math, the kernel's dtype): `merge`'s fold with the
    sign flipped, so that `merge` of the residual and the same adapter gives the kernel back to
    float32 rounding."""
    return merged_kernel({"kernel": kernel, LORA_A: adapter[LORA_A], LORA_B: adapter[LORA_B],
                          LORA_SCALE: -jnp.asarray(adapter[LORA_SCALE], jnp.float32)})


def residual_base(params: Mapping, initial_adapters: Mapping) -> Params:
    """The residual base a PiSSA/OLoRA `inject` returned, rebuilt from the original base and
    the initial adapters (`lora_params` of the tree right after `inject`): every adapted kernel
    becomes `kernel - scale * A0 @ B0`, bit for bit what `inject` computed. Adapter leaves of
    `params`, if any, are kept.

    Example:
      >>> base = residual_base(original_base, lj.load_adapter("run/initial_adapters", base))
    """
    tree, rewrap = unwrap_variables(params)
    initial = {p: m for p, m in modules_of(unwrap_variables(initial_adapters)[0]).items()
               if has_adapter(m)}
    missing = [p for p in initial if p not in modules_of(tree)]
    if missing:
        raise LoraError(f"residual_base: the initial adapters name modules the base lacks: "
                        f"{missing[:5]}; pass the base they were injected into.")

    def fold(path: str, module: Params) -> Params:
        if path not in initial:
            return module
        return {**module, "kernel": residual_kernel(module["kernel"], initial[path])}

    return rewrap(map_modules(tree, fold))


def to_plain_lora(params: Mapping, initial_adapters: Mapping) -> Params:
    """The adapters of a PiSSA/OLoRA-trained tree rewritten as plain LoRA for the ORIGINAL base
    (PEFT's `subtract_mutated_init`): `A' = [A | A0]` (rank 2r), `B' = [B ; -B0]`, same scale,
    so `s A' B' = s (A B - A0 B0)`, the change training made. Kernels are returned as given.

    Args:
      params: the trained tree (residual base and adapters, or just the adapters).
      initial_adapters: `lora_params` of the tree right after `inject` (before any training).

    Example:
      >>> plain = to_plain_lora(trained, initial)   # then export_peft(..., plain, ...)
    """
    tree, rewrap = unwrap_variables(params)
    initial = modules_of(unwrap_variables(initial_adapters)[0])
    problems = []

    def widen(path: str, module: Params) -> Params:
        if not has_adapter(module):
            return module
        start = initial.get(path, {})
        shapes = [jnp.shape(module[k]) for k in (LORA_A, LORA_B)]
        if not has_adapter(start) or [jnp.shape(start[k]) for k in (LORA_A, LORA_B)] != shapes:
            problems.append(f"{path}: adapter {shapes}, initial "
                            f"{[jnp.shape(start[k]) for k in (LORA_A, LORA_B) if k in start]}")
            return module
        n_stack = jnp.ndim(module[LORA_SCALE])
        a = jnp.concatenate([module[LORA_A], start[LORA_A].astype(module[LORA_A].dtype)], -1)
        b = jnp.concatenate([module[LORA_B], -start[LORA_B].astype(module[LORA_B].dtype)],
                            n_stack)
        return {**module, LORA_A: a, LORA_B: b}

    out = _map_adapter_modules(tree, widen)
    if problems:
        raise LoraError("the initial adapters do not fit the trained ones (pass lora_params of "
                        "the tree right after inject, from the same config):\n  - "
                        + "\n  - ".join(problems[:8]))
    return rewrap(out)


def plain_lora_config(config: LoraConfig) -> LoraConfig:
    """The config of `to_plain_lora`'s adapter, as PEFT rewrites it: `init_lora_weights=True`,
    ranks doubled, alphas doubled (times sqrt(2) with rsLoRA), so every scale is unchanged.

    Example:
      >>> plain_lora_config(LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"])).r
      16
    """
    factor = math.sqrt(2.0) if config.use_rslora else 2
    return dataclasses.replace(
        config, init_lora_weights=True, r=2 * config.r, lora_alpha=config.lora_alpha * factor,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: v * factor for k, v in config.alpha_pattern.items()})


def for_export(params: Mapping, config: LoraConfig | None, initial_adapters: Mapping | None
               ) -> tuple[Params, LoraConfig | None]:
    """`(params, config)` as `export_peft` writes them: converted to plain LoRA when initial
    adapters are given; a base-changing config without them is refused (its adapters are only
    right over the residual base, which PEFT's file format cannot carry)."""
    init = config.init_lora_weights if config is not None else None
    if initial_adapters is None:
        if is_base_changing(init):
            raise LoraError(
                f"export_peft: init_lora_weights={init!r} trained these adapters over a residual "
                "base (inject changed the kernels), so on the original base they are wrong. Pass "
                "initial_adapters=lora_jax.lora_params(<the tree right after inject>) to export a "
                "plain LoRA adapter of rank 2r for the original base (PEFT's "
                "path_initial_model_for_weight_conversion), or export the merged model "
                "(lora_jax.export_merged).")
        return params, config
    converted = to_plain_lora(params, initial_adapters)
    return converted, (plain_lora_config(config) if config is not None else None)


def _map_adapter_modules(tree: Mapping, fn) -> Params:
    """`map_modules` for trees with or without kernels (an adapter-only tree has none)."""
    def walk(node: Mapping, prefix: str) -> Params:
        out = {}
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                value = walk(value, path)
                if has_adapter(value):
                    value = fn(path, value)
            out[key] = value
        return out
    return walk(tree, "")
