"""The model side of the example scripts: which config, which tokenizer, the frozen base placed
on the mesh, the LoRA config from the flags, and FLOPs per token for MFU.

The embedded defaults are small GPT-2- and Llama-3-shaped configs with random weights and the
byte-level tokenizer, so every script runs on a fresh CPU machine with nothing downloaded.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp

import lora_jax as lj
import models
from examples.cli import TrainConfig
from lora_jax.tree import iter_modules
from models import GPT2Config, LlamaConfig

FAMILY_OF_FLAG = {"gpt2": "gpt2", "llama3": "llama"}
BYTES = "bytes"
EMBEDDED_INIT_STD = 0.2


def embedded_config(name: str, **options) -> Any:
    """The embedded default of `--model`: 4 layers, d=128, vocab 512 (bytes 0-255, then BOS 256,
    EOS 257, PAD 258: `models.ByteTokenizer`). Random weights; `options` are run-time fields.

    The weights are drawn with std 0.2 rather than GPT-2's 0.02: the frozen (tied) head then has
    a usable logit range. With 0.02, `logit = ln_f(h) . e_v` is at most |h||e_v| = 128 * 0.02 =
    2.6 whatever the adapters do (the final norm fixes |h|), and the loss stalls near 5.5 nats;
    with 0.2 LoRA alone takes the sonnets from 9.5 to ~2.9 (held out too) in 300 steps.

    Example:
      >>> embedded_config("gpt2").n_embd
      128
    """
    special = dict(vocab_size=512, bos_token_id=256, eos_token_id=257, pad_token_id=258,
                   initializer_range=EMBEDDED_INIT_STD)
    if name == "gpt2":
        return GPT2Config(n_positions=1024, n_embd=128, n_layer=4, n_head=4, **special,
                          **options)
    return LlamaConfig(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                       rope_theta=500000.0, tie_word_embeddings=False, **special, **options)


def runtime_options(cfg: TrainConfig) -> dict:
    dtype = jnp.dtype(cfg.dtype)
    return dict(dtype=dtype, param_dtype=dtype, scan_layers=cfg.scan_layers,
                remat_policy=cfg.remat, attention_impl=cfg.attention,
                **({"quantize": cfg.quantize} if getattr(cfg, "quantize", None) else {}),
                **({"quant_impl": cfg.quant_impl}
                   if getattr(cfg, "quant_impl", "xla") != "xla" else {}),
                **({"mlp_chunk": cfg.mlp_chunk} if getattr(cfg, "mlp_chunk", None) else {}),
                **({"fp8_scaling": cfg.fp8_scaling}
                   if getattr(cfg, "fp8_scaling", "tensor") != "tensor" else {}))


def model_config(cfg: TrainConfig) -> tuple[Any, str]:
    """(model config, a name for the base model) from `--model` / `--model-path`."""
    if cfg.model_path is None:
        name = cfg.model or "gpt2"
        return embedded_config(name, **runtime_options(cfg)), f"embedded-random-{name}"
    source = Path(cfg.model_path) / "config.json"
    config = models.config_from_dict(models.read_config(cfg.model_path), source=str(source),
                                     **runtime_options(cfg))
    family = models.family(config).model_type
    if cfg.model is not None and FAMILY_OF_FLAG[cfg.model] != family:
        raise ValueError(f"--model {cfg.model} but {source} is a {family!r} checkpoint: drop "
                         "--model or pass the matching one")
    return config, os.path.abspath(cfg.model_path)


def training_config(config: Any) -> Any:
    """The config the model trains with: the frozen base's own dropout off (GPT-2's embedding and
    residual dropout), so only `--dropout` (LoRA's) is random. Same parameter tree."""
    if isinstance(config, GPT2Config):
        return dataclasses.replace(config, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    return config


def tokenizer_for(cfg: TrainConfig) -> Any:
    """`--tokenizer`, else the model directory's tokenizer.json, else bytes for the embedded
    model; a real checkpoint without tokenizer.json must say which one to use."""
    choice = cfg.tokenizer
    if choice is None:
        if cfg.model_path is None:
            return models.ByteTokenizer()
        if not (Path(cfg.model_path) / "tokenizer.json").is_file():
            raise ValueError(f"{cfg.model_path} has no tokenizer.json: pass --tokenizer <dir "
                             "with tokenizer.json> or --tokenizer bytes")
        choice = cfg.model_path
    return models.ByteTokenizer() if choice == BYTES else models.load_tokenizer(choice)


def check_vocab(tokenizer: Any, config: Any) -> None:
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model's "
                         f"vocabulary is {config.vocab_size}: use the model's own tokenizer")


# ---------------------------------------------------------------------------------------------
# LoRA targets


def module_paths(params: Mapping) -> list[str]:
    """Dotted paths of every module holding a `kernel` or an `embedding` table (the Dense and
    Embed layers LoRA can target)."""
    return [path for path, _ in iter_modules(params, leaves=("kernel", "embedding"))]


def check_targets(targets: str | tuple[str, ...], paths: list[str]) -> None:
    """Every listed name must match some module (PEFT's suffix rule); regexes and "all-linear"
    are checked by `lora_jax.inject` itself."""
    if isinstance(targets, str):
        return
    missing = [t for t in targets if not any(p == t or p.endswith("." + t) for p in paths)]
    if missing:
        names = sorted({p.rsplit(".", 1)[-1] for p in paths})
        raise lj.LoraError(f"--targets {','.join(missing)}: no such linear module in this model; "
                           f"its linear and embedding modules are {', '.join(names)} (or use all-linear, or a "
                           "regex on the full path)")


def lora_config(cfg: TrainConfig) -> lj.LoraConfig:
    return lj.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                         target_modules=cfg.targets, use_rslora=cfg.rslora,
                         modules_to_save=getattr(cfg, "modules_to_save", None),
                         init_lora_weights=True if cfg.init == "default" else cfg.init,
                         use_dora=cfg.dora)


def head_has_adapter(params: Mapping) -> bool:
    """LoRA on an untied output head (`lm_head` listed in --targets), or a modules_to_save copy
    (of the head, or of an embedding a tied head reads): the loss then needs the logits."""
    saved = any(str(getattr(path[-1], "key", "")).startswith("saved_")
                for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])
    return "lora_a" in params.get("lm_head", {}) or saved


# ---------------------------------------------------------------------------------------------
# FLOPs for MFU


def flops_per_token(config: Any, abstract_params: Mapping, seq_len: int) -> float:
    """Training FLOPs per token of LoRA: ~4 x the matmul parameters (forward 2N, input gradients
    2N; the frozen weights need no weight gradients, the adapters' are negligible) plus causal
    attention (QK^T and PV, forward and backward ~3x forward)."""
    kernels = sum(module["kernel"].size for _, module in iter_modules(abstract_params))
    if config.tie_word_embeddings:  # the head is the embedding, used as a matmul
        kernels += config.vocab_size * config.hidden_dim
    attention = 3 * (2 * 2 * seq_len * config.n_heads * config.head_dim * config.num_layers / 2)
    return 4.0 * kernels + attention
