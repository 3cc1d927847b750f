"""`TensorParallelism`: the sharding package's side of the `models/parallel.py` seam."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sharding.layers import (ColumnParallelDense, ReplicatedDense, RowParallelDense,
                             activation_spec)
from sharding.mesh import TP, axis_size

_LAYERS = {"column": ColumnParallelDense, "row": RowParallelDense, "replicated": ReplicatedDense}


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorParallelism:
    """Megatron tensor parallelism (optionally sequence-parallel) over a `make_mesh` mesh.

    Pass it to a model in place of `NoParallelism`: projections become shard_map layers with
    `nn.Dense`'s parameter tree, the residual stream and logits get sharding constraints.

    Args:
      mesh: a `(dp, fsdp, tp)` mesh from `sharding.make_mesh`.
      sequence_parallel: split the residual stream on the sequence over tp between blocks
        (all-gather before column layers, reduce-scatter after row layers); norms, dropout and
        residual adds then touch 1/tp of the tokens per device. Needs seq % tp == 0.
      collective_matmul: with `sequence_parallel`, run each column layer's all-gather and row
        layer's reduce-scatter as a ring of ppermutes overlapped with the base matmul's chunks
        (`sharding.collective_matmul`; plain kernels without FSDP only, others keep the plain
        collectives). Results equal the plain path up to float summation order.

    The parameter tree is `NoParallelism`'s, so create parameters with the plain model (any
    dummy batch) and the rules' shardings; tracing the parallel model needs a batch that splits
    (and, with SP, a sequence divisible by tp). LoRA dropout is `lora_jax.apply`'s
    (`lora_dropout=`, `deterministic=False`): the layers read it from there.

    Example:
      >>> mesh = make_mesh(dp=2, tp=4)
      >>> params = init_sharded(Llama(config).init, key, jnp.zeros((1, 8), jnp.int32), mesh=mesh)
      >>> model = Llama(config, TensorParallelism(mesh=mesh, sequence_parallel=True))
      >>> logits = lora_jax.apply(model, params, ids)      # ids split with shard_batch
    """

    mesh: Mesh
    sequence_parallel: bool = False
    collective_matmul: bool = False

    def __post_init__(self):
        if self.collective_matmul and not self.sequence_parallel:
            raise ValueError("collective_matmul overlaps sequence parallelism's all-gather and "
                             "reduce-scatter with the matmuls: it needs sequence_parallel=True")

    def dense(self, features, *, role, name, use_bias, dtype, param_dtype, kernel_init,
              bias_init, dot_general=None, quant=None, quant_impl="xla",
              fp8_scaling="tensor") -> nn.Module:
        """The role's shard_map layer; `quant` stores its frozen kernel quantised
        (`models.quant` format: each device multiplies its shard, see `sharding.quantized`),
        `quant_impl` says how ("xla", or "pallas": the fused kernel on each local shard);
        `fp8_scaling` ("tensor" | "row") is how an FP8 one scales its activations."""
        if dot_general is not None:
            raise NotImplementedError(
                "base_fp8 (a custom dot_general) is not supported by the tensor-parallel layers; "
                "use it with data parallelism / FSDP (tp=1), or set base_fp8=False")
        if role not in _LAYERS:
            raise ValueError(f"unknown parallel role {role!r}: use one of {sorted(_LAYERS)}")
        return _LAYERS[role](features, mesh=self.mesh, sequence_parallel=self.sequence_parallel,
                             use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                             kernel_init=kernel_init, bias_init=bias_init, name=name,
                             quant=quant, quant_impl=quant_impl,
                             collective_matmul=self.collective_matmul,
                             fp8_scaling=fp8_scaling)

    def constrain(self, x: jax.Array, mark: str) -> jax.Array:
        """Pin an activation's layout: "residual" [B, S, D] is split on batch (and on S under
        sequence parallelism); "logits" [B, S, V] on batch and on V when tp divides it."""
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.spec(x, mark)))

    def spec(self, x: jax.Array, mark: str) -> P:
        if mark == "residual":
            return activation_spec(self.mesh, x.shape, seq_split=self.sequence_parallel)
        if mark == "logits":
            split = x.shape[-1] % axis_size(self.mesh, TP) == 0
            return activation_spec(self.mesh, x.shape, feature_split=split)
        raise ValueError(f"unknown activation mark {mark!r}: use 'residual' or 'logits'")
