"""What `jax.checkpoint` should keep of an adapted layer: its output, not its two halves.

A "dots" policy (`dots_saveable`, ...) saves every matmul output. An adapted layer computes
`y = x @ W + (x @ A) @ B`, so such a policy keeps *two* full-width tensors per layer, `x @ W` and
`(x @ A) @ B`, to recompute their sum in the backward pass: twice the activation memory of the
base model for nothing, because the backward only ever needs the sum (and the rank-r `x @ A` for
B's gradient). `lora_jax.adapter_op` names both values (for `lora_jax.apply` and the sharded
layers alike); `remat_policy` adds the names to a policy, and the unneeded halves are then
neither saved nor recomputed. Policy names are parsed by `remat_policies.resolve`, the parser the
models' `remat_policy=` option uses too.
"""
from __future__ import annotations

from typing import Callable

import jax

from lora_jax.adapter_op import SAVED_NAMES
from remat_policies import resolve


def remat_policy(policy: str | Callable, *extra_names: str) -> Callable:
    """`policy` (a name `remat_policies.resolve` accepts, or a policy) that also saves adapted
    outputs, the rank-r adapter activations and any `extra_names`.

    Use it with the "dots" policies; with `nothing_saveable` it would turn a pure-recompute
    policy into one that keeps every projection output. "save_only_these_names" keeps the
    adapted outputs and nothing else.

    Args:
      policy: "dots_saveable", "full", "save_only_these_names:my_name", ... or a callable.
      *extra_names: further `checkpoint_name`s to save.

    Returns:
      A `jax.checkpoint` policy.

    Raises:
      ValueError: an unknown policy name; the message lists the valid ones.

    Example:
      >>> block = nn.remat(Block, policy=lora_jax.remat_policy("dots_saveable"))
    """
    names = jax.checkpoint_policies.save_only_these_names(*SAVED_NAMES, *extra_names)
    return jax.checkpoint_policies.save_from_both_policies(resolve(policy), names)
