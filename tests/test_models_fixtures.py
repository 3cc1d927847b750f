"""Tiny random Hugging Face checkpoints for the models tests (no tests here).

Every checkpoint is made by transformers itself (PyTorch, CPU, float32, eager attention) and
written with `save_pretrained`, so the files are exactly what a real checkpoint looks like.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

import models

transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()

VOCAB = 96
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def hf_llama(directory: Path, *, tie: bool = False, kv_heads: int = 2, scaling: bool = True,
             seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
    """A 2-layer Llama (d=32, 4 heads of 8) saved in `directory`; returns the torch model."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=8,
                  max_position_embeddings=128, rope_theta=10000.0, rms_norm_eps=1e-5,
                  tie_word_embeddings=tie, bos_token_id=0, eos_token_id=1, pad_token_id=2,
                  rope_scaling=dict(LLAMA3_SCALING) if scaling else None)
    config = transformers.LlamaConfig(**{**fields, **overrides})
    config._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(config).eval()
    _randomise_norms(model)
    model.save_pretrained(directory)
    return model


def hf_gpt2(directory: Path, *, tie: bool = True, seed: int = 0,
            **overrides) -> transformers.GPT2LMHeadModel:
    """A 2-layer GPT-2 (d=32, 4 heads) saved in `directory`; returns the torch model."""
    torch.manual_seed(seed)
    fields = dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                  bos_token_id=0, eos_token_id=1, tie_word_embeddings=tie)
    config = transformers.GPT2Config(**{**fields, **overrides})
    config._attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(config).eval()
    if not tie:  # an untied head must differ from wte, or the test proves nothing
        with torch.no_grad():
            model.lm_head.weight.copy_(torch.randn_like(model.lm_head.weight) * 0.02)
    _randomise_norms(model)
    model.save_pretrained(directory)
    return model


def _randomise_norms(model: torch.nn.Module) -> None:
    """Norm weights start at 1 and biases at 0; perturb them so a wrong mapping shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)


def tiny_config(family: str, **overrides):
    """The package's tiny preset with this module's vocabulary and special ids."""
    preset = models.LlamaConfig.tiny if family == "llama" else models.GPT2Config.tiny
    return preset(**{"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 2, **overrides})


def random_ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, VOCAB, size=(batch, length)).astype(np.int32)


def torch_forward(model, ids: np.ndarray, mask: np.ndarray | None = None, labels=None):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long),
                     attention_mask=None if mask is None else torch.tensor(mask),
                     labels=None if labels is None else torch.tensor(labels, dtype=torch.long))


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref| (a relative error that is not fooled by tiny entries)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
