"""Llama 3 / 3.1 / 3.2 (`LlamaForCausalLM`) in Flax Linen, with Hugging Face parameter paths.

GQA attention with RoPE (optionally Llama 3.1 scaled), RMSNorm, SwiGLU MLP, tied or untied head.
Parameter tree (unscanned), keys joined by "." = the HF module name:

    model.embed_tokens.embedding                          [vocab, d]
    model.layers.<i>.input_layernorm.scale                [d]
    model.layers.<i>.self_attn.{q,k,v,o}_proj.kernel      [in, out]
    model.layers.<i>.post_attention_layernorm.scale       [d]
    model.layers.<i>.mlp.{gate,up,down}_proj.kernel       [in, out]
    model.norm.scale                                      [d]
    lm_head.kernel                                        [d, vocab]   (absent when tied)
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.attention import AttentionContext, begin_forward, finish_forward
from models.attention import parallel_attend
from models.cache import KVCache
from models.chunking import chunked_mlp
from models.norms import RMSNorm
from models.options import RuntimeOptions, runtime_fields
from models.parallel import NoParallelism, Parallelism
from models.projection import embedding, projection
from models.rope import RopeScaling, apply_rope, inverse_frequencies, rope_angles
from models.stack import layer_stack, stacked_kv_or_none
from models.token_ids import warn_special_ids


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig(RuntimeOptions):
    """A Llama-3-family shape (HF `config.json` field names) plus run-time options.

    Example:
      >>> LlamaConfig.from_hf_dict(json.load(open("config.json")), dtype=jnp.bfloat16)
    """

    MODEL_TYPE: ClassVar[str] = "llama"
    # RoPE: positions past `max_position_embeddings` compute (with degraded quality).
    LEARNED_POSITIONS: ClassVar[bool] = False

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    max_position_embeddings: int = 8192
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        warn_special_ids(self)
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    # The shape under family-neutral names (sharding checks, FLOPs, generation read these).

    @property
    def hidden_dim(self) -> int:
        return self.hidden_size

    @property
    def n_heads(self) -> int:
        return self.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return self.num_key_value_heads

    @property
    def intermediate_dim(self) -> int:
        return self.intermediate_size

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings

    @property
    def kv_cache_shape(self) -> tuple[int, int, int]:
        """(layers, kv_heads, head_dim) of a KV cache."""
        return self.num_hidden_layers, self.num_key_value_heads, self.head_dim

    # -- presets -----------------------------------------------------------------------------

    @classmethod
    def tiny(cls, **kw) -> "LlamaConfig":
        """2 layers, d=64, GQA 4:2, llama3 rope scaling, vocab 512 (covers the byte tokenizer)."""
        base = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    rope_theta=10000.0, rope_scaling=RopeScaling(
                        factor=8.0, original_max_position_embeddings=32),
                    bos_token_id=256, eos_token_id=257, pad_token_id=258)
        return cls(**{**base, **kw})

    @classmethod
    def llama3_1b(cls, **kw) -> "LlamaConfig":
        """Llama-3.2-1B: 16 layers, d=2048, GQA 32:8, tied embeddings, llama3 scaling x32."""
        base = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=64, max_position_embeddings=131072, tie_word_embeddings=True,
                    rope_scaling=RopeScaling(factor=32.0), bos_token_id=128000,
                    eos_token_id=128001)
        return cls(**{**base, **kw})

    @classmethod
    def llama3_8b(cls, **kw) -> "LlamaConfig":
        """Llama-3-8B: 32 layers, d=4096, GQA 32:8, untied, no rope scaling, 8k context."""
        base = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                    max_position_embeddings=8192, bos_token_id=128000, eos_token_id=128001)
        return cls(**{**base, **kw})

    @classmethod
    def llama31_8b(cls, **kw) -> "LlamaConfig":
        """Llama-3.1-8B: the 8B shape with llama3 rope scaling x8 and a 128k context."""
        return cls.llama3_8b(**{"rope_scaling": RopeScaling(factor=8.0),
                                "max_position_embeddings": 131072, **kw})

    # -- Hugging Face config.json ------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **options) -> "LlamaConfig":
        """From a `config.json` dict (transformers 4.x `rope_theta`/`rope_scaling` or 5.x
        `rope_parameters`); `options` set run-time fields (dtype, scan_layers, ...)."""
        if d.get("model_type", cls.MODEL_TYPE) != cls.MODEL_TYPE:
            raise ValueError(f"model_type {d.get('model_type')!r} is not {cls.MODEL_TYPE!r}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={d['hidden_act']!r} is not supported (Llama uses 'silu')")
        rope = d.get("rope_parameters") or {}
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        fields = dict(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=RopeScaling.from_hf(d.get("rope_scaling") or rope),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias", False), mlp_bias=d.get("mlp_bias", False),
            initializer_range=d.get("initializer_range", 0.02),
            bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"))
        return cls(**fields, **options)

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict:
        """A `config.json` dict that transformers 4.45+ and 5.x both read."""
        skip = {"rope_scaling", *runtime_fields()}
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in skip}
        out["eos_token_id"] = (list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
                               else self.eos_token_id)
        out["rope_scaling"] = None if self.rope_scaling is None else self.rope_scaling.to_hf()
        return {"architectures": ["LlamaForCausalLM"], "model_type": self.MODEL_TYPE,
                "hidden_act": "silu", "attention_dropout": 0.0, "pretraining_tp": 1,
                "use_cache": True, "torch_dtype": torch_dtype, **out}


class LlamaAttention(nn.Module):
    """GQA self-attention. [B, T, d] -> [B, T, d]."""

    config: LlamaConfig
    parallel: Parallelism

    @nn.compact
    def __call__(self, x, ctx: AttentionContext, layer_kv):
        c = self.config
        batch, length, _ = x.shape
        n, kv, h = c.num_attention_heads, c.num_key_value_heads, c.head_dim

        def proj(features, name):
            return projection(self.parallel, c, features, role="column", name=name,
                              use_bias=c.attention_bias)(x)

        q = proj(n * h, "q_proj").reshape(batch, length, n, h)
        k = proj(kv * h, "k_proj").reshape(batch, length, kv, h)
        v = proj(kv * h, "v_proj").reshape(batch, length, kv, h)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        out, layer_kv = parallel_attend(self.parallel, q, k, v, ctx, layer_kv, scale=None,
                                        implementation=c.attention_impl)
        out = projection(self.parallel, c, c.hidden_size, role="row", name="o_proj",
                         use_bias=c.attention_bias)(out.reshape(batch, length, n * h))
        return out, layer_kv


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). [B, T, d] -> [B, T, d]."""

    config: LlamaConfig
    parallel: Parallelism

    @nn.compact
    def __call__(self, x):
        c = self.config

        def proj(features, role, name):
            return projection(self.parallel, c, features, role=role, name=name,
                              use_bias=c.mlp_bias)

        gate = proj(c.intermediate_size, "column", "gate_proj")(x)
        up = proj(c.intermediate_size, "column", "up_proj")(x)
        return proj(c.hidden_size, "row", "down_proj")(nn.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    """One pre-norm block; the stack's unit (`stack.layer_stack` calling convention)."""

    config: LlamaConfig
    parallel: Parallelism

    @nn.compact
    def __call__(self, x, ctx: AttentionContext, layer_kv, deterministic: bool):
        del deterministic  # Llama checkpoints train without dropout
        c = self.config

        def norm(name):
            return RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name=name)

        h, layer_kv = LlamaAttention(c, self.parallel, name="self_attn")(
            norm("input_layernorm")(x), ctx, layer_kv)
        x = x + h
        x = x + chunked_mlp(LlamaMLP(c, self.parallel, name="mlp"),
                            norm("post_attention_layernorm")(x), c, self.parallel)
        return self.parallel.constrain(x, "residual"), layer_kv


class LlamaModel(nn.Module):
    """The trunk (HF `LlamaModel`, path "model"): embeddings, layers, final norm."""

    config: LlamaConfig
    parallel: Parallelism

    def setup(self):
        c = self.config
        self.embed_tokens = embedding(c, c.vocab_size, c.hidden_size)
        self.layers = layer_stack(LlamaDecoderLayer, c, self.parallel, c.num_hidden_layers)
        self.norm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)

    def __call__(self, input_ids, ctx: AttentionContext, kv, deterministic: bool):
        """input_ids [B, T] -> final hidden states [B, T, d] (normed), new stacked kv."""
        x = self.parallel.constrain(self.embed_tokens(input_ids), "residual")
        x, kv = self.layers(x, ctx, kv, deterministic)
        return self.norm(x), kv

    def attend(self, h):
        """Tied head: h [B, T, d] @ embed_tokens.T -> [B, T, vocab]."""
        return self.embed_tokens.attend(h)


class Llama(nn.Module):
    """`LlamaForCausalLM`.

    Call: `model.apply({"params": p}, input_ids [B, T], *, positions=None [B, T],
    attention_mask=None [B, T] (1 = real token), deterministic=True, cache=None,
    return_hidden=False)` -> logits [B, T, vocab] in the compute dtype, or `(logits, cache)`
    when a `KVCache` is given; `return_hidden=True` gives the final normed hidden states
    [B, T, d] instead of logits (for `loss.chunked_cross_entropy`).
    """

    config: LlamaConfig
    parallel: Parallelism = NoParallelism()

    @nn.compact
    def __call__(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, deterministic: bool = True,
                 cache: KVCache | None = None, return_hidden: bool = False):
        c = self.config
        positions, ctx, cache_next = begin_forward(input_ids, positions, attention_mask, cache)
        cos, sin = rope_angles(positions, inverse_frequencies(c.head_dim, c.rope_theta,
                                                              c.rope_scaling))
        trunk = LlamaModel(c, self.parallel, name="model")
        h, kv = trunk(input_ids, ctx.replace(cos=cos, sin=sin), stacked_kv_or_none(cache),
                      deterministic)
        if return_hidden:
            return finish_forward(h, kv, cache_next)
        if c.tie_word_embeddings:
            logits = trunk.attend(h)
        else:
            logits = projection(self.parallel, c, c.vocab_size, role="replicated",
                                name="lm_head", use_bias=False)(h)
        return finish_forward(self.parallel.constrain(logits, "logits"), kv, cache_next)


def head_kernel(config: LlamaConfig, params: Mapping) -> jax.Array:
    """The output projection [d, vocab]: `lm_head.kernel`, or the embedding transposed if tied."""
    if config.tie_word_embeddings:
        return jnp.transpose(params["model"]["embed_tokens"]["embedding"])
    return params["lm_head"]["kernel"]
