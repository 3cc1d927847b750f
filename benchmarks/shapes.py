"""Benchmark model shapes, as Hugging Face `config.json` dicts (random weights are used)."""

LLAMA3_1B = {  # Llama-3.2-1B
    "model_type": "llama", "architectures": ["LlamaForCausalLM"],
    "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "vocab_size": 128256, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "tie_word_embeddings": True, "hidden_act": "silu",
    "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": 128001,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}

LLAMA3_8B = {  # Llama-3.1-8B
    **LLAMA3_1B,
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "head_dim": 128, "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
}

# A CPU smoke-test shape: the benchmark scripts run end to end on it in seconds.
TINY = {**LLAMA3_1B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
        "bos_token_id": 256, "eos_token_id": 257}

# A CPU experiment shape: deep and wide enough for training dynamics, minutes on CPU.
SMALL = {**LLAMA3_1B, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
         "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "vocab_size": 8192,
         "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}

LLAMA3_70B = {  # Llama-3.1-70B's shape: 80 layers, d=8192, GQA 64/8, ffn 28672
    **LLAMA3_8B,
    "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
    "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128,
}

SHAPES = {"1b": LLAMA3_1B, "8b": LLAMA3_8B, "tiny": TINY, "small": SMALL, "70b": LLAMA3_70B}
DEFAULT_BATCH = {"1b": 8, "8b": 4, "tiny": 2, "small": 4, "70b": 1}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def matmul_params(cfg: dict) -> int:
    """Parameters that take part in matmuls per token (all projections and the LM head; the
    input embedding is a gather). LoRA training costs ~4x this in FLOPs per token."""
    d, f, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q = d * cfg["num_attention_heads"] * hd
    kv = 2 * d * cfg["num_key_value_heads"] * hd
    per_layer = q + kv + q + 3 * d * f
    return n * per_layer + d * cfg["vocab_size"]


def attention_flops_per_token(cfg: dict, seq: int) -> float:
    """Causal attention, forward + input-gradient backward (~3x forward): QK^T and PV each
    2*seq*d per token, halved by causality."""
    hd = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    fwd = 2 * 2 * seq * cfg["num_attention_heads"] * hd * cfg["num_hidden_layers"] / 2
    return 3 * fwd


def flops_per_token(cfg: dict, seq: int) -> float:
    return 4 * matmul_params(cfg) + attention_flops_per_token(cfg, seq)
