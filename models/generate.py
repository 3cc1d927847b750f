"""Text generation: greedy or temperature / top-p sampling, with or without a KV cache.

Prompts are left-padded: `prompt_mask` [B, P] is 1 on real tokens and 0 on the padding that
precedes them, so every row's last prompt token sits in the last column. Positions count real
tokens only (as transformers does), so a padded row generates what it would alone.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.cache import init_cache
from models.token_ids import check_generation_ids


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """[B, T] positions counting only real tokens (padding gets 0)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """Keep the smallest set of most likely tokens whose probability reaches `top_p`; the rest
    get -inf. logits [B, V]."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    sorted_probs = jnp.sort(probs, axis=-1)[:, ::-1]
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    kept = jnp.where(mass_before < top_p, sorted_probs, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    return jnp.where(probs >= threshold, logits, -jnp.inf)


def pick_token(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """Next token [B] from logits [B, V]: argmax when temperature == 0, else a sample."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        scaled = top_p_filter(scaled, top_p)
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)


def generate(model: nn.Module, params: Any, prompt_ids: jax.Array, *, max_new_tokens: int,
             prompt_mask: jax.Array | None = None, temperature: float = 0.0, top_p: float = 1.0,
             rng: jax.Array | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int = 0, use_cache: bool = True,
             apply_fn: Callable | None = None, apply_kwargs: Any = None) -> jax.Array:
    """Extend `prompt_ids` [B, P] by `max_new_tokens` tokens; returns [B, P + max_new_tokens].

    After a row emits an `eos_token_id` it is filled with `pad_token_id`. `use_cache=False`
    re-runs the whole sequence every step (a reference for the cached path). `apply_fn`
    replaces `model.apply`, e.g. `functools.partial(lora_jax.apply, model)` for un-merged
    adapters. `params` is the params tree (not `{"params": ...}`). `apply_kwargs`, a dict of
    arrays, is passed to every `apply_fn` call (prefill and each decode step) as traced
    arguments, e.g. `{"adapter_index": idx}` for per-row adapters.

    Example:
      >>> out = generate(model, params, ids, max_new_tokens=20, temperature=0.8, top_p=0.9,
      ...                rng=jax.random.key(0), eos_token_id=tok.eos_id)
    """
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    mask = (jnp.ones_like(prompt_ids) if prompt_mask is None
            else jnp.asarray(prompt_mask, jnp.int32))
    config = model.config
    if config.LEARNED_POSITIONS and prompt_ids.shape[1] + max_new_tokens > config.max_positions:
        raise ValueError(f"prompt ({prompt_ids.shape[1]}) + max_new_tokens ({max_new_tokens}) "
                         f"exceeds max_positions={config.max_positions}, the model's learned "
                         "positions")
    check_generation_ids(config.vocab_size, eos_token_id=eos_token_id,
                         pad_token_id=pad_token_id)
    if temperature > 0.0 and rng is None:
        raise ValueError("sampling (temperature > 0) needs rng=jax.random.key(...)")
    eos = (() if eos_token_id is None else (int(eos_token_id),) if isinstance(eos_token_id, int)
           else tuple(int(e) for e in eos_token_id))
    run = _generate_cached if use_cache else _generate_uncached
    # None (not the bound method, which compares by identity) lets equal models share a compile.
    return run(model, apply_fn, params, prompt_ids, mask,
               jax.random.key(0) if rng is None else rng, dict(apply_kwargs or {}),
               max_new_tokens=max_new_tokens,
               temperature=float(temperature), top_p=float(top_p), eos=eos, pad=pad_token_id)


def _finish_step(tokens, done, tok, column, eos, pad):
    """Write this step's token (pad once finished) and update the finished flags."""
    tok = jnp.where(done, pad, tok)
    tokens = jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, column))
    if eos:
        done = done | jnp.isin(tok, jnp.asarray(eos, jnp.int32))
    return tokens, done


_STATIC = ("model", "apply_fn", "max_new_tokens", "temperature", "top_p", "eos", "pad")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_cached(model, apply_fn, params, prompt, mask, rng, extra, *, max_new_tokens,
                     temperature, top_p, eos, pad):
    apply_fn = functools.partial(apply_fn or model.apply, **extra)
    batch, length = prompt.shape
    cache = init_cache(model.config, batch, length + max_new_tokens)
    positions = positions_from_mask(mask)
    logits, cache = apply_fn({"params": params}, prompt, positions=positions,
                             attention_mask=mask, cache=cache)
    tokens = jnp.concatenate([prompt, jnp.full((batch, max_new_tokens), pad, jnp.int32)], 1)
    first = pick_token(logits[:, -1], jax.random.fold_in(rng, 0), temperature, top_p)

    def step(i, carry):
        tokens, tok, cache, pos, done = carry
        tokens, done = _finish_step(tokens, done, tok, length + i, eos, pad)
        logits, cache = apply_fn({"params": params}, tok[:, None], positions=pos[:, None],
                                 cache=cache)
        nxt = pick_token(logits[:, 0], jax.random.fold_in(rng, i + 1), temperature, top_p)
        return tokens, nxt, cache, pos + 1, done

    carry = (tokens, first, cache, positions[:, -1] + 1, jnp.zeros((batch,), bool))
    # The last step's forward pass is wasted; it keeps the loop body uniform.
    return jax.lax.fori_loop(0, max_new_tokens, step, carry)[0]


@functools.partial(jax.jit, static_argnames=_STATIC)
def _generate_uncached(model, apply_fn, params, prompt, mask, rng, extra, *, max_new_tokens,
                       temperature, top_p, eos, pad):
    apply_fn = functools.partial(apply_fn or model.apply, **extra)
    batch, length = prompt.shape
    tokens = jnp.concatenate([prompt, jnp.full((batch, max_new_tokens), pad, jnp.int32)], 1)
    full_mask = jnp.concatenate([mask, jnp.ones((batch, max_new_tokens), jnp.int32)], 1)
    positions = positions_from_mask(full_mask)

    def step(i, carry):
        tokens, done = carry
        logits = apply_fn({"params": params}, tokens, positions=positions,
                          attention_mask=full_mask)
        last = jax.lax.dynamic_index_in_dim(logits, length + i - 1, axis=1, keepdims=False)
        tok = pick_token(last, jax.random.fold_in(rng, i), temperature, top_p)
        return _finish_step(tokens, done, tok, length + i, eos, pad)

    return jax.lax.fori_loop(0, max_new_tokens, step, (tokens, jnp.zeros((batch,), bool)))[0]


def generate_text(model: nn.Module, params: Any, tokenizer: Any, prompt: str, *,
                  max_new_tokens: int = 64, **kwargs) -> str:
    """Generate from one text prompt and decode only the new tokens."""
    ids = jnp.asarray([tokenizer.encode(prompt)], jnp.int32)
    kwargs.setdefault("eos_token_id", tokenizer.eos_id)
    kwargs.setdefault("pad_token_id", tokenizer.pad_id if tokenizer.pad_id is not None else 0)
    out = generate(model, params, ids, max_new_tokens=max_new_tokens, **kwargs)
    new = [int(t) for t in out[0, ids.shape[1]:]]
    if tokenizer.eos_id is not None and tokenizer.eos_id in new:
        new = new[:new.index(tokenizer.eos_id)]
    return tokenizer.decode(new)
