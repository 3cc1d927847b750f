"""GPT-2 and Llama 3 in Flax Linen, with Hugging Face parameter names, checkpoints and generation.

    models     GPT2, GPT2Config, Llama, LlamaConfig, RopeScaling, build, init_params
    weights    load_hf, save_hf, hf_writer, read_config, config_from_dict, CheckpointError
    layout     layer_container, peft_naming, is_scanned, stack_layers, unstack_layers, hf_tensor_name,
               family, FAMILIES
    decode     generate, generate_text, KVCache, init_cache
    text       load_tokenizer, HFTokenizer, ByteTokenizer
    loss       cross_entropy, chunked_cross_entropy, head_kernel
    seam       Parallelism, NoParallelism (models/parallel.py: how sharding builds projections)

Parameter paths. Unscanned, the params dict keys joined with "." are the HF module name plus a
leaf: `params["model"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"]` is HF
`model.layers.0.self_attn.q_proj.weight` transposed (kernels are [in, out]; GPT-2's Conv1D
weights already are, so they are stored as they are). Leaves: `kernel`, `bias`, `embedding`
(`embed_tokens`, `wte`, `wpe`), `scale` (norms; LayerNorm also `bias`).

Scanned (`scan_layers=True`), the stack lives at the container path with no layer index and every
leaf below it has a leading layer axis: `params["model"]["layers"]["self_attn"]["q_proj"]
["kernel"]` is [L, in, out]. The HF name of layer i is `<container>.<i>.<rest>`
(`model.layers.3.self_attn.q_proj`), where:

    >>> layer_container(params)                                     # or a config / model
    'model.layers'                                                  # GPT-2: 'transformer.h'

Model call: `model.apply({"params": p}, input_ids, *, positions=None, attention_mask=None,
deterministic=True, cache=None, return_hidden=False)` -> logits [B, T, V] in the compute
dtype, or `(logits, new_cache)` when a `KVCache` is passed.

Example:
    >>> model, params = load_hf("/ckpt/llama", dtype=jnp.bfloat16, scan_layers=True)
    >>> loss = cross_entropy(model.apply({"params": params}, ids), ids, shift=True)
    >>> out = generate(model, params, ids, max_new_tokens=32)
"""
from models.cache import KVCache, init_cache
from models.errors import CheckpointError, CheckpointFileNotFoundError
from models.factory import build, init_params
from models.generate import generate, generate_text
from models.gpt2 import GPT2, GPT2Config
from models.hf_io import (TOKENIZER_FILES, config_from_dict, hf_writer, load_hf, read_config,
                          save_hf)
from models.layout import (FAMILIES, family, hf_tensor_name, is_scanned, layer_container,
                           peft_naming, stack_layers, unstack_layers)
from models.llama import Llama, LlamaConfig
from models.loss import chunked_cross_entropy, cross_entropy
from models.parallel import NoParallelism, Parallelism
from models.rope import RopeScaling
from models.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


def head_kernel(config, params):
    """The output projection [d, vocab] of a model's params (tied: the embedding transposed)."""
    from models import gpt2, llama
    module = {"gpt2": gpt2, "llama": llama}[family(config).model_type]
    return module.head_kernel(getattr(config, "config", config), params)


__all__ = [
    "GPT2", "GPT2Config", "Llama", "LlamaConfig", "RopeScaling", "build", "init_params",
    "load_hf", "save_hf", "hf_writer", "TOKENIZER_FILES", "read_config", "config_from_dict",
    "CheckpointError", "CheckpointFileNotFoundError",
    "layer_container", "peft_naming", "is_scanned", "stack_layers", "unstack_layers",
    "hf_tensor_name", "family", "FAMILIES",
    "generate", "generate_text", "KVCache", "init_cache",
    "load_tokenizer", "HFTokenizer", "ByteTokenizer",
    "cross_entropy", "chunked_cross_entropy", "head_kernel",
    "Parallelism", "NoParallelism",
]
