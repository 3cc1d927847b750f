"""Llama 3 in Flax NNX, with the Linen `models.Llama`'s parameter paths and computation.

The attribute names mirror the Hugging Face module names, so the parameter state, as a pure dict,
is the Linen Llama's unscanned tree (`nnx.List` indices in place of the "0", "1", ... keys):

    model.embed_tokens.embedding                          [vocab, d]
    model.layers.<i>.input_layernorm.scale                [d]
    model.layers.<i>.self_attn.{q,k,v,o}_proj.kernel      [in, out]   (nnx.Linear)
    model.layers.<i>.post_attention_layernorm.scale       [d]
    model.layers.<i>.mlp.{gate,up,down}_proj.kernel       [in, out]   (nnx.Linear)
    model.norm.scale                                      [d]
    lm_head.kernel                                        [d, vocab]  (absent when tied)

so `lora_jax.nnx` targets the same modules, writes the same PEFT files and trains to the same
adapters as the Linen path (tests/test_nnx_llama.py). The pure pieces are shared with
`models/` (RoPE, attention, the masks): only the modules are NNX.

`config.quantize` ("nf4" | "int8" | "fp8", with `config.quant_impl` and `config.fp8_scaling`)
stores every block projection's kernel quantised, as the Linen model does
(`models.nnx_quant.quantize`: the output head stays), so the state is the Linen quantised
model's tree and `from_linen` takes it. `config.mlp_chunk` runs each MLP over sequence chunks
with remat inside (`models.chunking.nnx_sequence_chunked`), as the Linen model does.

Not covered: KV caches and generation, `scan_layers` / `remat_policy` (the layers are an
unrolled `nnx.List`), `base_fp8` (refused) and the sharding seam (`models.parallel`).

Example:
    >>> config = models.LlamaConfig.tiny()
    >>> linen_params = models.init_params(models.build(config), jax.random.key(0))
    >>> model = from_linen(config, linen_params)
    >>> lj.nnx.inject(model, lj.LoraConfig(r=8, target_modules="all-linear"), jax.random.key(1))
    >>> logits = model(input_ids)                          # [B, T, vocab]
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import attend, begin_forward
from models.chunking import nnx_sequence_chunked
from models.layout import is_scanned, unstack_layers
from models.llama import LlamaConfig
from models.nnx_quant import quantize
from models.quant import is_quantized
from models.rope import apply_rope, inverse_frequencies, rope_angles


class RMSNorm(nnx.Module):
    """`models.norms.RMSNorm` in NNX: float32 math, the normalised value cast to the compute
    dtype before the scale multiplies it (where transformers rounds). Param: `scale` [d]."""

    def __init__(self, dim: int, config: LlamaConfig):
        self.eps, self.dtype = config.rms_norm_eps, config.dtype
        self.scale = nnx.Param(jnp.ones((dim,), config.param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * y.astype(self.dtype)


def _linear(config: LlamaConfig, d_in: int, d_out: int, use_bias: bool,
            rngs: nnx.Rngs) -> nnx.Linear:
    """A projection initialised as `models.projection` does (normal(initializer_range))."""
    return nnx.Linear(d_in, d_out, use_bias=use_bias, dtype=config.dtype,
                      param_dtype=config.param_dtype, rngs=rngs,
                      kernel_init=nnx.initializers.normal(config.initializer_range))


class Attention(nnx.Module):
    """GQA self-attention with RoPE. [B, T, d] -> [B, T, d]."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        c = self.config = config
        d, h, bias = c.hidden_size, c.head_dim, c.attention_bias
        self.q_proj = _linear(c, d, c.num_attention_heads * h, bias, rngs)
        self.k_proj = _linear(c, d, c.num_key_value_heads * h, bias, rngs)
        self.v_proj = _linear(c, d, c.num_key_value_heads * h, bias, rngs)
        self.o_proj = _linear(c, c.num_attention_heads * h, d, bias, rngs)

    def __call__(self, x: jax.Array, ctx) -> jax.Array:
        c = self.config
        batch, length, _ = x.shape

        def heads(y, n):
            return y.reshape(batch, length, n, c.head_dim)

        q = apply_rope(heads(self.q_proj(x), c.num_attention_heads), ctx.cos, ctx.sin)
        k = apply_rope(heads(self.k_proj(x), c.num_key_value_heads), ctx.cos, ctx.sin)
        v = heads(self.v_proj(x), c.num_key_value_heads)
        out, _ = attend(q, k, v, ctx, None, scale=None, implementation=c.attention_impl)
        return self.o_proj(out.reshape(batch, length, -1))


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). [B, T, d] -> [B, T, d]."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = _linear(config, d, f, bias, rngs)
        self.up_proj = _linear(config, d, f, bias, rngs)
        self.down_proj = _linear(config, f, d, bias, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """One pre-norm block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        self.mlp_chunk = config.mlp_chunk
        self.input_layernorm = RMSNorm(config.hidden_size, config)
        self.self_attn = Attention(config, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config)
        self.mlp = MLP(config, rngs)

    def __call__(self, x: jax.Array, ctx) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        h = self.post_attention_layernorm(x)
        return x + nnx_sequence_chunked(self.mlp, h, self.mlp_chunk)


class LlamaModel(nnx.Module):
    """The trunk (HF `LlamaModel`, path "model"): embeddings, layers, final norm."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        c = config
        self.embed_tokens = nnx.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype,
                                      param_dtype=c.param_dtype, rngs=rngs,
                                      embedding_init=nnx.initializers.normal(c.initializer_range))
        self.layers = nnx.List([DecoderLayer(c, rngs) for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c)

    def __call__(self, input_ids: jax.Array, ctx) -> jax.Array:
        """input_ids [B, T] -> final normed hidden states [B, T, d]."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, ctx)
        return self.norm(x)


class NnxLlama(nnx.Module):
    """`LlamaForCausalLM` in NNX: `model(input_ids [B, T], attention_mask=None [B, T])` ->
    logits [B, T, vocab] in the compute dtype, as `models.Llama` computes them (no cache).

    Args:
      config: a `models.LlamaConfig` (`scan_layers`, `remat_policy` and sharding are not used;
        `base_fp8` is refused; `quantize` stores the block projections quantised, the random
        draw quantised as the Linen `QuantDense` does, multiplied with `quant_impl` and
        `fp8_scaling`; `mlp_chunk` runs the MLPs over sequence chunks).
      rngs: `nnx.Rngs` for the random init (normal(initializer_range), unit norms).

    Example:
      >>> model = NnxLlama(models.LlamaConfig.tiny(), nnx.Rngs(0))
      >>> logits = model(jnp.array([[1, 2, 3]]))
    """

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        if config.base_fp8:
            raise ValueError("NnxLlama does not implement base_fp8; use models.Llama for it")
        self.config = config
        self.model = LlamaModel(config, rngs)
        if not config.tie_word_embeddings:
            self.lm_head = _linear(config, config.hidden_size, config.vocab_size, False, rngs)
        if config.quantize:
            quantize(self, config.quantize, impl=config.quant_impl,
                     fp8_scaling=config.fp8_scaling)

    def __call__(self, input_ids: jax.Array, *,
                 attention_mask: jax.Array | None = None) -> jax.Array:
        c = self.config
        positions, ctx, _ = begin_forward(input_ids, None, attention_mask, None)
        # The angles are computed once per call and broadcast to every layer, as in Linen.
        cos, sin = rope_angles(positions, inverse_frequencies(c.head_dim, c.rope_theta,
                                                              c.rope_scaling))
        h = self.model(input_ids, ctx.replace(cos=cos, sin=sin))
        if c.tie_word_embeddings:
            return self.model.embed_tokens.attend(h)
        return self.lm_head(h)


def from_linen(config: LlamaConfig, params: Mapping) -> NnxLlama:
    """An `NnxLlama` holding the weights of a Linen `models.Llama` params tree.

    Args:
      config: the Linen model's config.
      params: its params (`{"params": ...}` or bare; scanned trees are unstacked first). Adapter
        leaves are not taken: put adapters in with `lora_jax.nnx.inject` / `lora_jax.nnx.load`.

    Returns:
      The NNX model, weights copied by path ("0", "1", ... -> the `nnx.List` indices).

    Example:
      >>> model = from_linen(config, models.init_params(models.build(config), key))
    """
    params = params.get("params", params)
    if is_scanned(params):
        params = unstack_layers(params)
    # Build abstractly: the random init would be overwritten anyway.
    model = nnx.eval_shape(lambda: NnxLlama(config, nnx.Rngs(0)))
    state, base = nnx.state(model, nnx.Param), _base_only(params)
    expected, given = _paths(nnx.to_pure_dict(state)), _paths(base)
    if expected != given:  # a partial update would leave abstract leaves in the model
        raise ValueError(f"the params do not fit the config: missing {sorted(expected - given)[:5]}"
                         f", unexpected {sorted(given - expected)[:5]}")
    _check_formats(_formats(nnx.to_pure_dict(state)), _formats(base), config)
    nnx.replace_by_pure_dict(state, base)  # flax turns the "0", "1" keys into List indices
    nnx.update(model, state)
    return model


def to_linen(model: NnxLlama) -> dict:
    """The Linen `models.Llama` params tree (string keys, unscanned) of the model's base
    weights; adapters are left out (`lora_jax.nnx.params(model)` is the tree with them).

    Example:
      >>> logits = models.build(config).apply({"params": to_linen(model)}, input_ids)
    """
    return _base_only(_string_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param))))


def _base_only(tree: Mapping) -> dict:
    """The tree without `lora_*` leaves (the model it goes into has none)."""
    return {k: _base_only(v) if isinstance(v, Mapping) else v
            for k, v in tree.items() if not str(k).startswith("lora_")}


def _formats(tree: Mapping, prefix: str = "") -> dict[str, str]:
    """`{dotted path: format}` of the quantised leaves of a nested dict ("nf4", "int8", "fp8")."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_formats(v, f"{prefix}{k}."))
        elif is_quantized(v):
            out[f"{prefix}{k}"] = v.format
    return out


def _check_formats(expected: dict[str, str], given: dict[str, str], config: LlamaConfig) -> None:
    """A quantised tree goes only into a model built with the same `quantize` (and back)."""
    if expected != given:
        bad = sorted(p for p in expected.keys() | given.keys() if expected.get(p) != given.get(p))
        raise ValueError(f"the params' quantised kernels do not fit config.quantize="
                         f"{config.quantize!r}: at {bad[:3]} the config builds "
                         f"{expected.get(bad[0], 'a float kernel')}, the params hold "
                         f"{given.get(bad[0], 'a float kernel')}; build the config with "
                         "quantize= the params' format (or quantise a float tree after loading).")


def _paths(tree: Mapping, prefix: str = "") -> set[str]:
    """The dotted leaf paths of a nested dict."""
    out = set()
    for k, v in tree.items():
        path = f"{prefix}{k}"
        out |= _paths(v, path + ".") if isinstance(v, Mapping) else {path}
    return out


def _string_keys(tree):
    if isinstance(tree, Mapping):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree
