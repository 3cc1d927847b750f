"""`add_weighted_adapter`: a new named adapter combined from existing ones, as HF PEFT's
`LoraModel.add_weighted_adapter` defines it for `combination_type` "linear", "cat" and "svd".

Per module, with each adapter's scale `s_i` (alpha / r of that module) and weight `w_i`, in
PEFT's torch layout (`A [r, in]`, `B [out, r]`; ours is the transpose, the same numbers):

    linear  A = sum_i sign(w_i s_i) sqrt|w_i s_i| A_i,  B = sum_i sqrt|w_i s_i| B_i
            (every adapter of the module must have the same rank; the sign goes on A only)
    cat     A = concat_i (w_i s_i A_i) on the rank axis, B = concat_i B_i   (rank sum_i r_i)
    svd     D = sum_i w_i s_i B_i A_i; U S Vh = svd(D); B = U[:, :k] S[:k], A = Vh[:k]
            (k = svd_rank, else the largest rank among the adapters; with `svd_clamp` q both
            are clipped to +-quantile(concat(B, A), q))

The new adapter's scale is 1 (PEFT gives it `r = lora_alpha = new rank`), so its term equals
the weighted combination above. Modules holding none of the adapters get no new adapter; a
module holding some combines those (PEFT's rule). One adapter alone is always "linear". The
math runs on the host in float32, as PEFT's does on CPU; a scanned stack is combined layer by
layer (PEFT sees one module per layer).

Differences from PEFT, on purpose: an existing `adapter_name` is a `LoraError` (PEFT returns
silently), and rank checks are per module (PEFT checks each config's r and rank_pattern). If
the first adapter's config had `use_rslora=True`, PEFT's new adapter is scaled by
`new_rank / sqrt(new_rank)` instead of 1 (its config keeps the flag); lora_jax keeps 1.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np

from lora_jax import named
from lora_jax.errors import LoraError
from lora_jax.placement import replicated_over
from lora_jax.tree import LORA_A, LORA_B, LORA_SCALE, Params, host_array, nest, unwrap_variables

COMBINATIONS = ("linear", "cat", "svd")
PEFT_ONLY = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
             "magnitude_prune", "magnitude_prune_svd")


def add_weighted_adapter(params: Mapping, adapters: Sequence[str], weights: Sequence[float],
                         adapter_name: str, *, combination_type: str = "svd",
                         svd_rank: int | None = None, svd_clamp: float | None = None) -> Params:
    """Return `params` with a new adapter `adapter_name` combining `adapters` by `weights`.

    Args:
      params: a tree with the named adapters (`lora_jax.named`), or variables.
      adapters: names of the adapters to combine.
      weights: one weight per adapter (negative subtracts).
      adapter_name: the new adapter's name (not already in the tree).
      combination_type: "linear", "cat" or "svd" (PEFT's default), see the module docstring.
      svd_rank: rank of an "svd" result (default: the largest rank among `adapters`).
      svd_clamp: a quantile in (0, 1] to clip the "svd" factors at (None: no clipping).

    Returns:
      The tree with the new adapter beside the others (all unchanged).

    Example:
      >>> params = add_weighted_adapter(params, ["a", "b"], [0.7, 0.3], "ab",
      ...                               combination_type="cat")
      >>> logits = lora_jax.apply(model, {"params": params}, x, adapters=("ab",))
    """
    tree, rewrap = unwrap_variables(params)
    combination_type, names = _check_args(tree, adapters, weights, adapter_name,
                                          combination_type)
    modules = named.iter_adapter_modules(tree)
    new_rank = svd_rank or max(ad[n][LORA_A].shape[-1] for _, ad, _ in modules
                               for n in names if n in ad)
    new = {}
    for path, ads, _ in modules:
        present = [(ads[n], float(w)) for n, w in zip(names, weights) if n in ads]
        if present:
            new[path] = _combine(path, present, combination_type, new_rank, svd_clamp)
    return rewrap(named.put_adapter(tree, adapter_name, nest(new)))


def _check_args(tree, adapters, weights, adapter_name, combination_type):
    names = named.check_selection(tree, adapters)
    named.check_name(adapter_name)
    if adapter_name in named.adapter_names(tree):
        raise LoraError(f"add_weighted_adapter: the tree already holds an adapter "
                        f"{adapter_name!r}; choose a new name or delete_adapter it first.")
    if not names or len(weights) != len(names):
        raise LoraError(f"add_weighted_adapter: {len(names)} adapters and {len(weights)} "
                        "weights; pass one weight per adapter (at least one).")
    if combination_type in PEFT_ONLY:
        raise LoraError(f"combination_type={combination_type!r} is not supported by lora_jax; "
                        f"use one of {COMBINATIONS}.")
    if combination_type not in COMBINATIONS:
        raise LoraError(f"combination_type={combination_type!r}: use one of {COMBINATIONS}.")
    return ("linear" if len(names) == 1 else combination_type), names


def _combine(path: str, present, kind: str, new_rank: int, clamp) -> dict:
    """The new adapter's three leaves in one module (stacked layers combined one by one)."""
    a = [host_array(ad[LORA_A]).astype(np.float32) for ad, _ in present]
    b = [host_array(ad[LORA_B]).astype(np.float32) for ad, _ in present]
    s = [host_array(ad[LORA_SCALE]).astype(np.float32) for ad, _ in present]
    w = [weight for _, weight in present]
    n_stack = s[0].ndim
    if kind == "linear":
        ranks = {x.shape[-1] for x in a}
        if len(ranks) > 1:
            raise LoraError(f"{path}: combination_type='linear' needs one rank, the adapters "
                            f"have ranks {sorted(ranks)}; use 'cat' or 'svd'.")
        new_a, new_b = _linear(a, b, s, w, n_stack)
    elif kind == "cat":
        new_a = np.concatenate([(x * _bc(wi, x, n_stack)) * _bc(si, x, n_stack)
                                for x, si, wi in zip(a, s, w)], axis=-1)
        new_b = np.concatenate(b, axis=n_stack)
    else:
        new_a, new_b = _svd(path, a, b, s, w, n_stack, new_rank, clamp)
    out = {LORA_A: new_a, LORA_B: new_b, LORA_SCALE: np.ones(s[0].shape, np.float32)}
    return {leaf: _place(present[0][0], leaf, value) for leaf, value in out.items()}


def _bc(value, like: np.ndarray, n_stack: int) -> np.ndarray:
    """A per-layer value `[*S]` (or a number) shaped to broadcast over `like [*S, ...]`."""
    value = np.asarray(value, np.float32)
    return value.reshape(value.shape + (1,) * (like.ndim - value.ndim)) if n_stack else value


def _linear(a, b, s, w, n_stack):
    # PEFT: sqrt(|w s|) on both sides, the sign on A only (so negative weights subtract).
    ws = [np.asarray(wi, np.float64) * si.astype(np.float64) for wi, si in zip(w, s)]
    wa = [(np.sqrt(np.abs(x)) * np.where(x >= 0, 1.0, -1.0)).astype(np.float32) for x in ws]
    wb = [np.sqrt(np.abs(x)).astype(np.float32) for x in ws]
    new_a = sum(_bc(f, x, n_stack) * x for f, x in zip(wa, a))
    new_b = sum(_bc(f, x, n_stack) * x for f, x in zip(wb, b))
    return new_a, new_b


def _svd(path, a, b, s, w, n_stack, rank, clamp):
    stack, ins, outs = a[0].shape[:n_stack], a[0].shape[n_stack:-1], b[0].shape[n_stack + 1:]
    n_in, n_out = math.prod(ins), math.prod(outs)
    if rank > min(n_in, n_out):
        raise LoraError(f"{path}: svd_rank {rank} exceeds the kernel's smaller dimension "
                        f"{min(n_in, n_out)}; pass a smaller svd_rank.")
    new_a = np.zeros((*stack, n_in, rank), np.float32)
    new_b = np.zeros((*stack, rank, n_out), np.float32)
    for i in np.ndindex(*stack):
        # torch layout [out, in]: delta_i = s_i * B_i A_i, weighted and summed.
        delta = sum(np.float32(wi) * (np.float32(si[i]) * (bi[i].reshape(-1, n_out).T
                                                            @ ai[i].reshape(n_in, -1).T))
                    for ai, bi, si, wi in zip(a, b, s, w))
        u, sv, vh = np.linalg.svd(delta, full_matrices=False)
        u, vh = u[:, :rank] * sv[:rank], vh[:rank]
        if clamp is not None:
            hi = np.quantile(np.concatenate([u.ravel(), vh.ravel()]), clamp)
            u, vh = np.clip(u, -hi, hi), np.clip(vh, -hi, hi)
        new_a[i], new_b[i] = vh.T, u.T
    return new_a.reshape(*stack, *ins, rank), new_b.reshape(*stack, rank, *outs)


def _place(first: Mapping, leaf: str, value: np.ndarray) -> jax.Array:
    """Where a combined leaf goes: replicated over the devices of the first adapter's leaf
    (a sharded tree's rule places it at the next jitted step, or pass it to
    `sharding.param_shardings`)."""
    dtype = np.float32 if leaf == LORA_SCALE else np.dtype(first[leaf].dtype)
    return jax.device_put(value.astype(dtype),
                          replicated_over(getattr(first[leaf], "sharding", None)))
