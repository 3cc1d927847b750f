"""Run-time options shared by every model config: dtypes, layer scanning, remat, attention.

They are not part of a Hugging Face `config.json`; `from_hf_dict(..., **options)` takes them as
overrides. Kept as a frozen base dataclass so every family validates them the same way.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from remat_policies import NONE as REMAT_NONE, resolve

# Policy names ("none", "full", "dots_saveable", "save_only_these_names:a,b", ...) are parsed by
# `remat_policies`, the one parser `lora_jax.remat_policy` uses too.
ATTENTION_IMPLS = (None, "xla", "cudnn")
# How a `quantize`d NF4 / int8 kernel multiplies: dequantise then GEMM ("xla"), or dequantise
# inside the GEMM (`models.quant_pallas`). "xla" stays the default until a GPU run says otherwise.
QUANT_IMPLS = ("xla", "pallas")
# How a `quantize="fp8"` kernel scales its activation and output gradient (`models.quant`): one
# amax per tensor, or one per row of the last axis. "tensor" stays the default until a GPU run
# says otherwise.
FP8_SCALINGS = ("tensor", "row")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuntimeOptions:
    """Fields every model config carries.

    Attributes:
      dtype: compute dtype of matmuls and activations (bf16 on GPU); softmax and norms always
        run in float32.
      param_dtype: dtype parameters are created and loaded in.
      scan_layers: stack the layers with `nn.scan` (leading layer axis on every layer leaf);
        compiles once per model instead of once per layer.
      remat_policy: "none" | "full" | a `jax.checkpoint_policies` name ("dots_saveable",
        "save_only_these_names:a,b", ...: see `remat_policies`) | a policy function. A "dots"
        name also keeps every value a layer names with `checkpoint_name` (`remat_policy_for`).
      attention_impl: `implementation=` of `jax.nn.dot_product_attention`: None (JAX picks),
        "xla" or "cudnn" (flash attention on GPU, bf16/fp16 only).
      base_fp8: run every projection's frozen kernel through an FP8 matmul with per-tensor
        scaling (`models.fp8`): about twice bf16's matmul rate on Hopper, for LoRA training of
        a frozen base. Parameters stay in `param_dtype`; adapters are untouched. The kernels get
        no gradient, so never use it to train base weights.
      base_fp8_skip: projection names (e.g. ("q_proj", "k_proj")) that stay in the compute
        dtype under `base_fp8`: to trade FP8 speed for accuracy where a model is sensitive, and
        to find where it is (`benchmarks.fp8_drift --fp8-skips`; on the random-weight 8B shape
        no subset removed the drift, docs/PERFORMANCE.md).
      quantize: store every block projection's frozen kernel quantised (QLoRA's base):
        "nf4" | "int8" | "fp8" (`models.quant`), or None. The kernel leaf is then a small pytree
        (codes, scales); the output head and embeddings stay in `param_dtype`. Frozen only:
        such a kernel gets no gradient.
      quant_impl: how a `quantize`d NF4 / int8 kernel multiplies: "xla" (dequantise to a
        `[in, out]` compute-dtype kernel, then a GEMM) or "pallas" (the Pallas/Triton kernels of
        `models.quant_pallas` dequantise tile by tile inside the GEMM, forward and backward;
        FP8 and shapes they do not tile keep the XLA path).
      mlp_chunk: tokens per chunk of a sequence-chunked MLP (`models.chunking`), or None: the
        MLP runs over `T / mlp_chunk` slices of the sequence one after another, forward and
        backward, so only one chunk's `[chunk, intermediate]` activations exist (14 GiB each
        for the 8B shape at 512k tokens unchunked). Same result up to rounding; for long
        context on one device (not with the tensor/sequence-parallel layers). Must divide the
        sequence length of calls longer than one chunk.
      fp8_scaling: how a `quantize="fp8"` kernel scales the activation x (forward) and the
        output gradient (backward) before their FP8 casts: "tensor" (one amax per call) or
        "row" (one amax per row of the last axis, i.e. per token: a row reduction XLA can fuse
        with the cast, the scale applied to the GEMM's output; `models.quant`). Other formats
        ignore it.
    """

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    scan_layers: bool = False
    remat_policy: str | Callable = REMAT_NONE
    attention_impl: str | None = None
    base_fp8: bool = False
    base_fp8_skip: tuple[str, ...] = ()
    quantize: str | None = None
    quant_impl: str = "xla"
    mlp_chunk: int | None = None
    fp8_scaling: str = "tensor"

    def __post_init__(self):
        # Canonical dtypes keep configs hashable and equal however the dtype was spelled.
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        remat_policy_fn(self.remat_policy)
        if isinstance(self.base_fp8_skip, str) or not all(
                isinstance(n, str) for n in self.base_fp8_skip):
            raise ValueError(f"base_fp8_skip={self.base_fp8_skip!r}: give a tuple of projection "
                             "names, e.g. ('q_proj', 'k_proj')")
        object.__setattr__(self, "base_fp8_skip", tuple(self.base_fp8_skip))
        if self.quantize is not None and self.quantize not in ("nf4", "int8", "fp8"):
            raise ValueError(f"quantize={self.quantize!r}: use 'nf4', 'int8', 'fp8' or None")
        if self.quantize is not None and self.base_fp8:
            raise ValueError("quantize and base_fp8 are two ways to run a frozen base in low "
                             "precision: choose one (quantize='fp8' stores the FP8 kernel)")
        if self.mlp_chunk is not None and (isinstance(self.mlp_chunk, bool) or not isinstance(
                self.mlp_chunk, int) or self.mlp_chunk < 1):
            raise ValueError(f"mlp_chunk={self.mlp_chunk!r}: give a positive number of tokens "
                             "per chunk (dividing the sequence length), or None for no chunking")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}: use one of "
                             f"{ATTENTION_IMPLS}")
        if self.quant_impl not in QUANT_IMPLS:
            raise ValueError(f"quant_impl={self.quant_impl!r}: use one of {QUANT_IMPLS}")
        if self.fp8_scaling not in FP8_SCALINGS:
            raise ValueError(f"fp8_scaling={self.fp8_scaling!r}: use one of {FP8_SCALINGS} "
                             "('row': one FP8 scale per token row, for quantize='fp8')")


def remat_policy_fn(policy: str | Callable) -> Callable | None:
    """The `jax.checkpoint` policy of a policy name or function (None for "none": no remat).

    Raises:
      ValueError: an unknown name, listing the valid ones (`remat_policies.resolve`).
    """
    return None if policy == REMAT_NONE else resolve(policy)


def remat_policy_for(config) -> Callable | None:
    """`remat_policy_fn` of the config's policy; a "dots" policy name also keeps every named
    value and cuDNN flash attention's forward.

    A "dots" policy means "keep matmul outputs". What a layer names with
    `jax.ad_checkpoint.checkpoint_name` is what it asks to keep whole where the dots are not
    enough: an adapted projection names its sum (two matmuls and an add, whose backward needs
    only the sum; `lora_jax.remat_policy` explains it), and the FP8 path names its output
    because `jax.checkpoint` cannot see the matmul inside its custom VJP. The names come from
    the layers, so models need not know them. cuDNN flash attention is a fused kernel, not a dot
    (`models.attention.saves_flash_attention`). A policy function is used as given.

    Example:
      >>> nn.remat(Block, policy=remat_policy_for(config))
    """
    policy = remat_policy_fn(config.remat_policy)
    if policy is None or not isinstance(config.remat_policy, str) or (
            "dots" not in config.remat_policy):
        return policy
    # Imported here: options stays importable without the model code.
    from models.attention import saves_flash_attention
    named = jax.checkpoint_policies.save_any_names_but_these()  # every named value
    return jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.save_from_both_policies(policy, named), saves_flash_attention)


def runtime_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(RuntimeOptions))
