"""GPT-2 (`GPT2LMHeadModel`) in Flax Linen, with Hugging Face parameter paths.

Learned positions, pre-LayerNorm blocks, fused c_attn, GELU (tanh approximation, "gelu_new"),
head tied to `wte`. Parameter tree (unscanned), keys joined by "." = the HF module name:

    transformer.wte.embedding / transformer.wpe.embedding   [vocab, d] / [n_positions, d]
    transformer.h.<i>.ln_1.{scale,bias}                     [d]
    transformer.h.<i>.attn.c_attn.{kernel,bias}             [d, 3d] / [3d]   (q | k | v)
    transformer.h.<i>.attn.c_proj.{kernel,bias}             [d, d]
    transformer.h.<i>.ln_2.{scale,bias}
    transformer.h.<i>.mlp.c_fc.{kernel,bias}                [d, inner]
    transformer.h.<i>.mlp.c_proj.{kernel,bias}              [inner, d]
    transformer.ln_f.{scale,bias}
    lm_head.kernel                                          [d, vocab]  (only if untied)

HF stores these kernels as `Conv1D` weights, already [in, out]: no transpose on load.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.attention import AttentionContext, begin_forward, finish_forward
from models.attention import parallel_attend
from models.cache import KVCache
from models.chunking import chunked_mlp
from models.norms import LayerNorm
from models.options import RuntimeOptions, runtime_fields
from models.parallel import NoParallelism, Parallelism
from models.projection import embedding, projection
from models.stack import layer_stack, stacked_kv_or_none
from models.token_ids import warn_special_ids

ACTIVATIONS: dict[str, Callable] = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config(RuntimeOptions):
    """A GPT-2 shape (HF `config.json` field names) plus run-time options.

    Dropout: `embd_pdrop` and `resid_pdrop` act when `deterministic=False`; attention-probability
    dropout (`attn_pdrop`) is not applied (`jax.nn.dot_product_attention` has none).
    """

    MODEL_TYPE: ClassVar[str] = "gpt2"
    # Learned position embeddings: no position at or past `n_positions` exists.
    LEARNED_POSITIONS: ClassVar[bool] = True

    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True
    embd_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    scale_attn_weights: bool = True
    initializer_range: float = 0.02
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    pad_token_id: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.n_inner is None:
            object.__setattr__(self, "n_inner", 4 * self.n_embd)
        warn_special_ids(self)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(f"activation_function={self.activation_function!r} is not supported;"
                             f" supported: {sorted(ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def num_layers(self) -> int:
        return self.n_layer

    # The shape under family-neutral names (sharding checks, FLOPs, generation read these).

    @property
    def hidden_dim(self) -> int:
        return self.n_embd

    @property
    def n_heads(self) -> int:
        return self.n_head

    @property
    def n_kv_heads(self) -> int:
        return self.n_head

    @property
    def intermediate_dim(self) -> int:
        return self.n_inner

    @property
    def max_positions(self) -> int:
        return self.n_positions

    @property
    def kv_cache_shape(self) -> tuple[int, int, int]:
        return self.n_layer, self.n_head, self.head_dim

    @classmethod
    def tiny(cls, **kw) -> "GPT2Config":
        """2 layers, d=64, 4 heads, 128 positions, vocab 512 (covers the byte tokenizer)."""
        base = dict(vocab_size=512, n_positions=128, n_embd=64, n_layer=2, n_head=4,
                    bos_token_id=256, eos_token_id=257, pad_token_id=258)
        return cls(**{**base, **kw})

    @classmethod
    def gpt2(cls, **kw) -> "GPT2Config":
        """GPT-2 small (124M)."""
        return cls(**{**dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12,
                             n_head=12), **kw})

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], **options) -> "GPT2Config":
        """From a `config.json` dict; `options` set run-time fields (dtype, scan_layers, ...)."""
        if d.get("model_type", cls.MODEL_TYPE) != cls.MODEL_TYPE:
            raise ValueError(f"model_type {d.get('model_type')!r} is not {cls.MODEL_TYPE!r}")
        for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
            if d.get(flag):
                raise ValueError(f"GPT-2 with {flag}=true is not supported")
        names = [f.name for f in dataclasses.fields(cls) if f.name not in runtime_fields()]
        fields = {k: d[k] for k in names if k in d}
        return cls(**fields, **options)

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in runtime_fields()}
        return {"architectures": ["GPT2LMHeadModel"], "model_type": self.MODEL_TYPE,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
                "use_cache": True, "torch_dtype": torch_dtype, **out}


def _dropout(rate: float, x: jax.Array, deterministic: bool) -> jax.Array:
    return x if rate == 0.0 else nn.Dropout(rate)(x, deterministic=deterministic)


class GPT2Attention(nn.Module):
    """Multi-head self-attention with fused q|k|v. [B, T, d] -> [B, T, d]."""

    config: GPT2Config
    parallel: Parallelism

    @nn.compact
    def __call__(self, x, ctx: AttentionContext, layer_kv):
        c = self.config
        batch, length, _ = x.shape
        qkv = projection(self.parallel, c, 3 * c.n_embd, role="column", name="c_attn",
                         use_bias=True)(x)
        q, k, v = (t.reshape(batch, length, c.n_head, c.head_dim)
                   for t in jnp.split(qkv, 3, axis=-1))
        scale = 1.0 / math.sqrt(c.head_dim) if c.scale_attn_weights else 1.0
        out, layer_kv = parallel_attend(self.parallel, q, k, v, ctx, layer_kv, scale=scale,
                                        implementation=c.attention_impl)
        out = projection(self.parallel, c, c.n_embd, role="row", name="c_proj",
                         use_bias=True)(out.reshape(batch, length, c.n_embd))
        return out, layer_kv


class GPT2MLP(nn.Module):
    """c_proj(act(c_fc(x))). [B, T, d] -> [B, T, d]."""

    config: GPT2Config
    parallel: Parallelism

    @nn.compact
    def __call__(self, x):
        c = self.config
        h = projection(self.parallel, c, c.n_inner, role="column", name="c_fc", use_bias=True)(x)
        h = ACTIVATIONS[c.activation_function](h)
        return projection(self.parallel, c, c.n_embd, role="row", name="c_proj", use_bias=True)(h)


class GPT2Block(nn.Module):
    """One pre-LayerNorm block; the stack's unit (`stack.layer_stack` calling convention)."""

    config: GPT2Config
    parallel: Parallelism

    @nn.compact
    def __call__(self, x, ctx: AttentionContext, layer_kv, deterministic: bool):
        c = self.config

        def norm(name):
            return LayerNorm(c.layer_norm_epsilon, c.dtype, c.param_dtype, name=name)

        h, layer_kv = GPT2Attention(c, self.parallel, name="attn")(norm("ln_1")(x), ctx, layer_kv)
        x = x + _dropout(c.resid_pdrop, h, deterministic)
        h = chunked_mlp(GPT2MLP(c, self.parallel, name="mlp"), norm("ln_2")(x), c, self.parallel)
        x = x + _dropout(c.resid_pdrop, h, deterministic)
        return self.parallel.constrain(x, "residual"), layer_kv


class GPT2Model(nn.Module):
    """The trunk (HF `GPT2Model`, path "transformer")."""

    config: GPT2Config
    parallel: Parallelism

    def setup(self):
        c = self.config
        self.wte = embedding(c, c.vocab_size, c.n_embd)
        self.wpe = embedding(c, c.n_positions, c.n_embd)
        self.h = layer_stack(GPT2Block, c, self.parallel, c.n_layer)
        self.ln_f = LayerNorm(c.layer_norm_epsilon, c.dtype, c.param_dtype)
        self.drop = nn.Dropout(c.embd_pdrop)

    def __call__(self, input_ids, positions, ctx: AttentionContext, kv, deterministic: bool):
        """input_ids, positions [B, T] -> final hidden states [B, T, d] (normed), new kv."""
        x = self.wte(input_ids) + self.wpe(positions)
        if self.config.embd_pdrop > 0.0:
            x = self.drop(x, deterministic=deterministic)
        x = self.parallel.constrain(x, "residual")
        x, kv = self.h(x, ctx, kv, deterministic)
        return self.ln_f(x), kv

    def attend(self, h):
        """Tied head: h [B, T, d] @ wte.T -> [B, T, vocab]."""
        return self.wte.attend(h)


class GPT2(nn.Module):
    """`GPT2LMHeadModel`.

    Call: `model.apply({"params": p}, input_ids [B, T], *, positions=None [B, T],
    attention_mask=None [B, T] (1 = real token), deterministic=True, cache=None,
    return_hidden=False)` -> logits [B, T, vocab], or `(logits, cache)` with a `KVCache`.
    `deterministic=False` applies embedding/residual dropout and needs `rngs={"dropout": key}`.
    """

    config: GPT2Config
    parallel: Parallelism = NoParallelism()

    @nn.compact
    def __call__(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
                 attention_mask: jax.Array | None = None, deterministic: bool = True,
                 cache: KVCache | None = None, return_hidden: bool = False):
        c = self.config
        positions, ctx, cache_next = begin_forward(input_ids, positions, attention_mask, cache)
        trunk = GPT2Model(c, self.parallel, name="transformer")
        h, kv = trunk(input_ids, positions, ctx, stacked_kv_or_none(cache), deterministic)
        if return_hidden:
            return finish_forward(h, kv, cache_next)
        if c.tie_word_embeddings:
            logits = trunk.attend(h)
        else:
            logits = projection(self.parallel, c, c.vocab_size, role="replicated",
                                name="lm_head", use_bias=False)(h)
        return finish_forward(self.parallel.constrain(logits, "logits"), kv, cache_next)


def head_kernel(config: GPT2Config, params: Mapping) -> jax.Array:
    """The output projection [d, vocab]: `wte` transposed if tied, else `lm_head.kernel`."""
    if config.tie_word_embeddings:
        return jnp.transpose(params["transformer"]["wte"]["embedding"])
    return params["lm_head"]["kernel"]
