"""The loss, the train step and the eval step of the example scripts (pure functions; jitted with
explicit shardings in `examples/train.py`).

Batches arrive as `{"inputs", "targets", "mask"}`, each `[accum, micro, T]`: the micro-batch
axis first, so that every micro-batch is split over dp x fsdp by itself (no resharding).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

import lora_jax as lj
from models import cross_entropy, head_kernel
from models.fused_ce import frozen_head_cross_entropy
from sharding import vocab_parallel_cross_entropy

LossSums = Callable[..., tuple[jax.Array, jax.Array]]


def make_loss(model: Any, *, mesh: Any, sequence_parallel: bool, lora_dropout: float,
              head_adapted: bool) -> LossSums:
    """The loss of one `[B, T]` batch as a sum and a count, so micro-batches add up exactly.

    The frozen head's cross-entropy never stores logits: fused with its input gradient on one
    device (`frozen_head_cross_entropy`), split over the vocabulary on a mesh
    (`vocab_parallel_cross_entropy`). An adapter on the head itself needs the logits.

    Args:
      model: the GPT2 / Llama to train (with `TensorParallelism` on a mesh of several devices).
      mesh: the mesh; one device selects the fused single-device loss.
      sequence_parallel: whether the model's hidden states arrive split on the sequence.
      lora_dropout: the adapters' dropout rate, applied when an rng is given.
      head_adapted: an adapter sits on `lm_head` (the loss then goes through the logits).

    Returns:
      `loss_sums(adapters, base, batch, rng) -> (sum of token NLLs, token count)`; `batch`
      holds "inputs", "targets" (aligned) and "mask" `[B, T]`, and optionally "positions"
      `[B, T]` (tokens in another order, e.g. context parallelism's zig-zag); `rng=None`:
      deterministic.

    Example:
      >>> nll, n = make_loss(model, mesh=mesh, sequence_parallel=False, lora_dropout=0.0,
      ...                    head_adapted=False)(adapters, base, batch, None)
    """
    config = model.config

    def loss_sums(adapters, base, batch, rng):
        variables = {"params": lj.combine(base, adapters)}
        dropout = {} if rng is None or lora_dropout == 0.0 else dict(
            rngs={"dropout": rng}, deterministic=False, lora_dropout=lora_dropout)
        targets, mask = batch["targets"], batch["mask"]
        positions = batch.get("positions")  # given when the tokens are reordered (--cp-layout)
        if head_adapted:
            logits = lj.apply(model, variables, batch["inputs"], positions=positions, **dropout)
            mean = cross_entropy(logits, targets, mask)
        else:
            hidden = lj.apply(model, variables, batch["inputs"], return_hidden=True,
                              positions=positions, **dropout)
            head = head_kernel(config, base)
            if mesh.size == 1:
                mean = frozen_head_cross_entropy(hidden, head, targets, mask)
            else:
                mean = vocab_parallel_cross_entropy(
                    hidden, head, targets, mask, mesh=mesh, sequence_parallel=sequence_parallel,
                    chunk_size=vocab_chunk(head.shape[1], mesh.shape["tp"]))
        count = jnp.sum(mask.astype(jnp.float32))
        return mean * count, count

    return loss_sums


def vocab_chunk(vocab: int, tp: int, limit: int = 8192) -> int:
    """The largest divisor of the per-device vocabulary up to `limit` columns."""
    local = vocab // tp
    return max(c for c in range(1, min(local, limit) + 1) if local % c == 0)


def make_train_step(loss_sums: LossSums, tx: optax.GradientTransformation) -> Callable:
    """One optimizer step over `[accum, micro, T]` micro-batches, to be jitted.

    Gradients are taken for the adapters only (the base is an argument, not differentiated);
    micro-batches are summed token-weighted, so `--grad-accum k` equals one k-times-larger
    batch.

    Args:
      loss_sums: from `make_loss`.
      tx: the adapter optimizer (`examples.schedule.adapter_optimizer`).

    Returns:
      `step(adapters, opt_state, base, batch, rng) -> (adapters, opt_state, metrics)`;
      metrics: loss (mean token NLL), tokens (counted in it), grad_norm. A step whose loss or
      gradient norm is NaN/inf returns the adapters and optimizer state unchanged.

    Example:
      >>> step = jax.jit(make_train_step(loss_sums, tx), donate_argnums=(0, 1))
      >>> adapters, opt_state, metrics = step(adapters, opt_state, base, batch, key)
    """
    grad_fn = jax.value_and_grad(loss_sums, has_aux=True)

    def step(adapters, opt_state, base, batch, rng):
        def micro(carry, xs):
            grads, nll, count = carry
            mb, i = xs
            (mb_nll, mb_count), mb_grads = grad_fn(adapters, base, mb, jax.random.fold_in(rng, i))
            return (jax.tree.map(jnp.add, grads, mb_grads), nll + mb_nll, count + mb_count), None

        accum = batch["inputs"].shape[0]
        zero = (jax.tree.map(jnp.zeros_like, adapters), jnp.float32(0), jnp.float32(0))
        (grads, nll, count), _ = jax.lax.scan(micro, zero, (batch, jnp.arange(accum)))
        norm = 1.0 / jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g * norm.astype(g.dtype), grads)
        updates, new_opt_state = tx.update(grads, opt_state, adapters)
        metrics = {"loss": nll * norm, "tokens": count, "grad_norm": global_norm(grads)}
        # A non-finite loss or gradient leaves the state as it was: the loop stops the run on
        # reading these metrics, and what it holds (and may have saved) stays finite.
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        return (jax.tree.map(keep, optax.apply_updates(adapters, updates), adapters),
                jax.tree.map(keep, new_opt_state, opt_state), metrics)

    return step


def global_norm(tree: Any) -> jax.Array:
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_eval_step(loss_sums: LossSums) -> Callable:
    """`eval_step(adapters, base, batch) -> (sum of NLLs, token count)`, deterministic."""
    def eval_step(adapters, base, batch):
        sums = [loss_sums(adapters, base, jax.tree.map(lambda x: x[i], batch), None)
                for i in range(batch["inputs"].shape[0])]
        return functools.reduce(lambda a, b: (a[0] + b[0], a[1] + b[1]), sums)

    return eval_step
