"""sharding: meshes, partition rules and tensor/sequence-parallel layers (the only package that
knows mesh axis names).

    mesh         make_mesh, replicated, axis_size(s), drop_trivial_axes, MeshError,
                 check_model_fits, check_config_fits, check_batch_fits, DP, FSDP, TP
    rules        DEFAULT_RULES, spec_for, param_specs, param_shardings, leaf_sharding,
                 shard_params, init_sharded
    nnx          nnx_shardings, shard_nnx (lora_jax.nnx models placed by the same rules)
    layers       ColumnParallelDense, RowParallelDense, ReplicatedDense,
                 column_parallel, row_parallel
    models seam  TensorParallelism
    context      ring_attention, ContextParallelism (sequence split over cp), CP,
                 check_context_fits, zigzag_order (load-balanced causal layout)
    loss         vocab_parallel_cross_entropy, shift_labels
    input        batch_sharding, shard_batch, from_process_local, process_rows
    processes    DistributedConfig, initialize
    inspection   collectives, collective_counts (compiled HLO text)
"""
from sharding.context import ContextParallelism, ring_attention, zigzag_order
from sharding.batch import batch_sharding, from_process_local, process_rows, shard_batch
from sharding.distributed import DistributedConfig, initialize
from sharding.hlo import collective_counts, collectives
from sharding.loss import shift_labels, vocab_parallel_cross_entropy
from sharding.layers import (ColumnParallelDense, ReplicatedDense, RowParallelDense,
                             column_parallel, row_parallel)
from sharding.mesh import (AXES, BATCH_AXES, DP, FSDP, TP, MeshError, axis_size, axis_sizes,
                           check_batch_fits, drop_trivial_axes,
                           check_config_fits, check_model_fits, make_mesh, replicated)
from sharding.mesh import CP, check_context_fits
from sharding.nnx_rules import nnx_shardings, shard_nnx
from sharding.parallelism import TensorParallelism
from sharding.rules import (DEFAULT_RULES, init_sharded, leaf_sharding, param_shardings,
                            param_specs, shard_params, spec_for)

__all__ = [
    "make_mesh", "replicated", "axis_size", "axis_sizes", "drop_trivial_axes",
    "check_model_fits", "check_config_fits", "check_batch_fits", "MeshError",
    "DP", "FSDP", "TP", "AXES", "BATCH_AXES",
    "DEFAULT_RULES", "spec_for", "param_specs", "param_shardings", "leaf_sharding",
    "shard_params", "init_sharded", "nnx_shardings", "shard_nnx",
    "ColumnParallelDense", "RowParallelDense", "ReplicatedDense", "column_parallel",
    "row_parallel",
    "TensorParallelism",
    "vocab_parallel_cross_entropy", "shift_labels",
    "batch_sharding", "shard_batch", "from_process_local", "process_rows",
    "DistributedConfig", "initialize",
    "collectives", "collective_counts",
    "ring_attention", "ContextParallelism", "CP", "check_context_fits", "zigzag_order",
]
