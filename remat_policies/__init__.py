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

    "offload_layer_input[:f]"     recompute each layer, keeping its input in pinned host memory
                                  (a fraction f of its tokens; the rest stays on the device):
                                  `offload_layer_input`, read by `models.stack`

The factories that need more than names (`save_from_both_policies`, the offloading ones, whose
one named use is `offload_layer_input`) have no string form: build the policy in code and pass
the callable, which `resolve` returns unchanged.
"""
from __future__ import annotations

import os
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
    return (NONE, FULL, *policies, *(f"{f}[:name,...]" for f in NAME_FACTORIES),
            f"{OFFLOAD_LAYER_INPUT}[:fraction]")


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
    if offload_fraction(policy) is not None:
        return offload_layer_input()
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


# -- offloading the layer boundaries ------------------------------------------------------------
#
# Under full recomputation a layer keeps only its input for the backward pass: one [B, T, D]
# value per layer, 4 GiB for the 8B shape at 512k tokens in bf16, 128 GiB for its 32 layers.
# `offload_layer_input` moves that value to pinned host memory as the forward pass makes it and
# brings it back for the layer's backward. The stack (`models.stack`) names the input inside the
# rematerialised layer with the two names below: the first `round(f * T)` tokens as
# LAYER_INPUT_HOST (offloaded), the rest as LAYER_INPUT_DEVICE (kept on the device). Splitting by
# tokens rather than by layers works the same in a scanned stack, whose layers all share one
# policy, and lets the boundaries be divided between device and host memory in any proportion.

OFFLOAD_LAYER_INPUT = "offload_layer_input"
LAYER_INPUT_HOST = "layer_input_offloaded"
LAYER_INPUT_DEVICE = "layer_input_on_device"


def offload_fraction(policy) -> float | None:
    """The fraction of each layer input's tokens an `offload_layer_input[:f]` policy offloads
    (1.0 without ":f"); None for any other policy.

    Raises:
      ValueError: f is not a number in [0, 1].

    Example:
      >>> offload_fraction("offload_layer_input:0.5"), offload_fraction("full")
      (0.5, None)
    """
    if not isinstance(policy, str):
        return None
    name, sep, value = policy.partition(":")
    if name != OFFLOAD_LAYER_INPUT:
        return None
    if not sep:
        return 1.0
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"remat_policy={policy!r}: the part after ':' is the fraction of each "
                         "layer input's tokens to offload to host memory, a number in [0, 1] "
                         f"(e.g. '{OFFLOAD_LAYER_INPUT}:0.5'); without it all is offloaded")
    return fraction


def offload_layer_input(dst: str = "pinned_host") -> Policy:
    """Save nothing but a layer's named input: its offloaded part in `dst` memory, the rest on
    the device; recompute everything else (the names are set by `models.stack`).

    Give a model config the *name* (`remat_policy="offload_layer_input:0.5"`), not this
    function: the name is what tells the stack to name its layers' inputs (and how to split
    them); with the function alone nothing is named, so nothing is saved or offloaded.

    Example:
      >>> block = nn.remat(Block, policy=offload_layer_input())
    """
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[LAYER_INPUT_DEVICE],
        names_which_can_be_offloaded=[LAYER_INPUT_HOST],
        offload_src="device", offload_dst=dst)


HOST_MEMORY_LIMIT_ENV = "XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"


def allow_pinned_host_memory(policy, fraction: float = 0.9) -> str | None:
    """For an `offload_layer_input` policy: let XLA's pinned host memory pool on GPU grow to
    `fraction` of this machine's RAM, unless `XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB` is set already.
    Returns the limit in effect (GB, as a string), or None for a policy that offloads nothing.

    Why: XLA caps that pool (`xla_gpu_host_bfc`) at 64 GB unless told otherwise, below what long
    contexts offload (the 8B shape at 393,216 tokens with `offload_layer_input:0.75` asks for
    72 GiB and fails with "RESOURCE_EXHAUSTED: Out of host memory" without this; measured on
    one H200, docs/PERFORMANCE.md). XLA reads the variable when its GPU backend starts: call
    this before the first computation or `jax.devices()`.

    Example:
      >>> allow_pinned_host_memory("offload_layer_input:0.75")   # before JAX touches the GPU
    """
    if offload_fraction(policy) is None:
        return None
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return os.environ.setdefault(HOST_MEMORY_LIMIT_ENV, str(max(1, int(fraction * ram_gb))))
