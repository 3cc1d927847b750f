"""Remat policy names: the one parser of the policy strings that configs and command lines carry.

It belongs to neither `models` nor `lora_jax` and imports neither: both use it (a model
config's `remat_policy=`, `lora_jax.remat_policy`), so a name means the same thing everywhere and
a bad one gets the same error, listing the valid ones.

    "none"                        no rematerialisation: every value saved (`everything_saveable`)
    "full"                        recompute the whole block: nothing saved (`nothing_saveable`)
    "dots_saveable", ...          a policy of `jax.checkpoint_policies`, by its name
    "save_only_these_names:a,b"   a names factory of `jax.checkpoint_policies`
                                  (`save_only_these_names`, `save_any_names_but_these`,
                                  `save_anything_except_these_names`) called with the names after
                                  ":" (none given: called with none)

The factories that need more than names (`save_from_both_policies`, the offloading ones) have no
string form: build the policy in code and pass the callable, which `resolve` returns unchanged.
"""
from __future__ import annotations

from typing import Callable

import jax

NONE, FULL = "none", "full"
NAME_FACTORIES = ("save_only_these_names", "save_any_names_but_these",
                  "save_anything_except_these_names")
# Factories whose arguments are policies or memory kinds, not names: no string spelling.
_NOT_BY_NAME = ("save_from_both_policies", "save_and_offload_only_these_names",
                "offload_dot_with_no_batch_dims")

Policy = Callable[..., bool]


def policy_names() -> tuple[str, ...]:
    """Every policy name `resolve` accepts (names factories as `factory[:name,...]`).

    Example:
      >>> "dots_saveable" in policy_names()
      True
    """
    policies = sorted(n for n in dir(jax.checkpoint_policies)
                      if not n.startswith("_") and n not in NAME_FACTORIES + _NOT_BY_NAME)
    return (NONE, FULL, *policies, *(f"{f}[:name,...]" for f in NAME_FACTORIES))


def resolve(policy: str | Policy) -> Policy:
    """The `jax.checkpoint` policy a name stands for; a callable is returned as it is.

    Args:
      policy: a name (see the module docstring) or a policy function.

    Returns:
      The policy function (`everything_saveable` for "none", `nothing_saveable` for "full").

    Raises:
      ValueError: an unknown name, with the list of valid ones.

    Example:
      >>> policy = resolve("save_only_these_names:lora_adapted_output")
      >>> block = nn.remat(Block, policy=resolve("dots_saveable"))
    """
    if callable(policy):
        return policy
    name, sep, names = policy.partition(":") if isinstance(policy, str) else (None, "", "")
    factory = getattr(jax.checkpoint_policies, name, None) if name in NAME_FACTORIES else None
    if factory is not None:
        return factory(*(n.strip() for n in names.split(",") if n.strip()))
    if not sep and name in policy_names():
        special = {NONE: "everything_saveable", FULL: "nothing_saveable"}
        return getattr(jax.checkpoint_policies, special.get(name, name))
    raise ValueError(f"remat_policy={policy!r}: not a policy of jax.checkpoint_policies, nor "
                     f"'none' or 'full'. Valid names: {', '.join(policy_names())}; or pass a "
                     "policy function.")
