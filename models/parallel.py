"""The one seam between the models and `sharding/`: how a model builds its linear layers.

Models never name mesh axes. They ask a `Parallelism` for each projection, saying only what role
it plays in a Megatron layout, and mark a few activation boundaries. The default builds plain
`nn.Dense` and marks nothing, so a model without parallelism is ordinary Linen code. The sharding
package supplies a tensor/sequence-parallel implementation with the *same parameter tree*
(`kernel` `[in, out]`, optional `bias`), so checkpoints and LoRA adapters do not depend on the
layout.

Roles:
  "column"     - output features split over tensor-parallel devices (q/k/v, gate/up, c_attn, c_fc)
  "row"        - input features split; the partial products are summed (o_proj, down_proj, c_proj)
  "replicated" - not split (e.g. a small head)
Activation marks (`constrain`):
  "residual"   - the residual stream between blocks, [batch, seq, hidden]
  "logits"     - the output logits, [batch, seq, vocab]
Optional attention (`models.attention.parallel_attend`): a parallelism with a method
`attention(q, k, v, ctx, layer_kv, *, scale, implementation)` computes attention itself (context
parallelism's ring over sequence chunks, `sharding.context`); without one, `attend` runs.
"""
from __future__ import annotations

from typing import Any, Callable, Literal, Protocol

import flax.linen as nn
import jax

Role = Literal["column", "row", "replicated"]
Mark = Literal["residual", "logits"]


class Parallelism(Protocol):
    def dense(self, features: int, *, role: Role, name: str, use_bias: bool, dtype: Any,
              param_dtype: Any, kernel_init: Callable, bias_init: Callable,
              dot_general: Callable | None = None) -> nn.Module: ...
    # An implementation that stores frozen kernels quantised also takes `quant=` (a
    # `models.quant` format) in `dense`; `models.projection` passes it only for block
    # projections of a `quantize=` model, and builds `QuantDense` itself for `NoParallelism`.
    # With a model's `quant_impl` other than "xla" it also passes `quant_impl=` (how each
    # device multiplies its shard: `models.quant.quantized_matmul`'s impl).

    def constrain(self, x: jax.Array, mark: Mark) -> jax.Array: ...


class NoParallelism:
    """Single-device default: plain `nn.Dense`, no sharding constraints."""

    def dense(self, features, *, role, name, use_bias, dtype, param_dtype, kernel_init, bias_init,
              dot_general=None):
        del role
        return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                        kernel_init=kernel_init, bias_init=bias_init, name=name,
                        dot_general=dot_general)

    def constrain(self, x, mark):
        del mark
        return x

    def __hash__(self):
        return hash(type(self))

    def __eq__(self, other):
        return type(other) is type(self)
