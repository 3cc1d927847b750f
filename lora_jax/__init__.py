"""lora-jax: LoRA for JAX/Flax as a pure parameter-tree transform.

    config   LoraConfig
    create   inject, kernel_layouts, KernelLayout
    select   lora_params, split, combine, trainable_mask
    train    optimizer, apply, LoraModel, remat_policy
    op       lora_delta (the whole adapter op, for layers that add their own, is
             `lora_jax.adapter_op`)
    finish   merge, summary
    save     save_adapter, load_adapter, adapter_config, TrainCheckpointer, Restored,
             CheckpointMismatch, check_destination (what overwrite may replace)
    export   export_peft, import_peft, peft_lora_config, export_merged, load_merged,
             check_vllm_servable (DoRA adapters are refused)
    mixed    stack_adapters, unstack_adapter, adapter_index (each batch row its own adapter:
             apply(..., adapter_index=))
    nnx      lora_jax.nnx: inject, merge, params, load for Flax NNX models (same files)
    named    several adapters by name: adapter_names, delete_adapter, rename_adapter,
             add_weighted_adapter, export_peft_adapters, import_peft_adapters (the rest,
             select / isolate / put_adapter, in `lora_jax.named`); inject/apply/merge/save/
             load/export/import and the optimizer take adapter names
    inits    lora_jax.inits: PiSSA / OLoRA (base-changing inits); residual_base, to_plain_lora
"""
from lora_jax import inits, named, nnx, outputs
from lora_jax.named import adapter_names, delete_adapter, rename_adapter
from lora_jax.weighted import add_weighted_adapter
from lora_jax.checkpoint import adapter_config, load_adapter, save_adapter
from lora_jax.config import LoraConfig
from lora_jax.errors import LoraError
from lora_jax.export import export_merged, load_merged
from lora_jax.adapter_op import lora_delta
from lora_jax.forward import LoraModel, apply
from lora_jax.inject import inject
from lora_jax.inits import residual_base, to_plain_lora
from lora_jax.layout import KernelLayout, kernel_layouts
from lora_jax.merge import merge
from lora_jax.mixed import adapter_index, stack_adapters, unstack_adapter
from lora_jax.optim import optimizer
from lora_jax.peft_io import export_peft, import_peft, peft_lora_config
from lora_jax.peft_io import export_peft_adapters, import_peft_adapters
from lora_jax.peft_io import check_vllm_servable
from lora_jax.partition import combine, lora_params, split, trainable_mask
from lora_jax.remat import remat_policy
from lora_jax.summary import Summary, summary
from lora_jax.outputs import check_destination
from lora_jax.train_state import CheckpointMismatch, Restored, TrainCheckpointer

__all__ = [
    "LoraConfig", "LoraError",
    "inject", "kernel_layouts", "KernelLayout",
    "lora_params", "split", "combine", "trainable_mask",
    "optimizer", "apply", "lora_delta", "LoraModel", "remat_policy",
    "merge", "summary", "Summary",
    "save_adapter", "load_adapter", "adapter_config", "TrainCheckpointer", "Restored",
    "CheckpointMismatch", "check_destination", "outputs", "nnx",
    "inits", "residual_base", "to_plain_lora",
    "export_peft", "import_peft", "peft_lora_config", "export_merged", "load_merged",
    "named", "adapter_names", "delete_adapter", "rename_adapter", "add_weighted_adapter",
    "export_peft_adapters", "import_peft_adapters",
    "check_vllm_servable",
    "stack_adapters", "unstack_adapter", "adapter_index",
]
