"""Run a tokenwise sub-module over sequence chunks, so only one chunk's intermediates exist.

At long context the MLP is the largest thing a layer builds: its gate, up and product
activations are `[B, T, intermediate]` each (14 GiB apiece for the 8B shape at 512k tokens in
bf16), against `[B, T, hidden]` (4 GiB) for everything else. The MLP treats every token on its
own, so it can run over `T / chunk` slices of the sequence one after another: a Linen `nn.scan`
over the chunks, the parameters broadcast (the same kernels, read-only, in every step), with
`nn.remat` inside so the backward pass also rebuilds one chunk's intermediates at a time
instead of keeping all of them. The result is the same function: chunking changes only the
order of the work (and so float rounding, not the maths).

The scanned module is the caller's own, so its parameters keep their paths
(`model.layers.3.mlp.gate_proj.kernel`) and `lora_jax.apply`'s interceptor still adds each
projection's adapter inside the loop (it sees the broadcast `lora_a` / `lora_b` in the scope).

`nnx_sequence_chunked` is the same loop for a Flax NNX module (the NNX Llama's MLP):
`nnx.scan` over the chunks with `nnx.remat` inside, the module's parameters broadcast and its
RNG state carried.
"""
from __future__ import annotations

import flax.linen as nn
import jax
from flax import nnx

from models.parallel import NoParallelism


def check_chunk(length: int, chunk: int, *, option: str = "mlp_chunk") -> int:
    """The number of chunks of `length` tokens; raises when `chunk` does not divide it.

    Args:
      length: the sequence length of the call.
      chunk: tokens per chunk (positive).
      option: the option's name, for the message.

    Example:
      >>> check_chunk(8192, 2048)
      4
    """
    if length % chunk:
        divisors = [d for d in (chunk // 2, chunk // 4, chunk * 2) if d and length % d == 0]
        hint = f" (e.g. {divisors[0]})" if divisors else ""
        raise ValueError(f"{option}={chunk} does not divide the sequence length {length}: pick a "
                         f"chunk that divides every sequence length you run{hint}, pad the "
                         f"sequence to a multiple of {chunk}, or set {option}=None")
    return length // chunk


def sequence_chunked(module: nn.Module, x: jax.Array, chunk: int | None) -> jax.Array:
    """`module(x)` computed over chunks of `chunk` tokens of x's sequence axis (axis 1).

    `module` must be tokenwise (each output token depends only on the same input token) and
    take and return `[B, T, ...]`. A call of at most `chunk` tokens (decoding, short prompts)
    runs unchunked: it is a single chunk anyway.

    Args:
      module: an unbound Linen module built in the caller's compact scope (its name is the
        parameters' path), e.g. `LlamaMLP(c, parallel, name="mlp")`.
      x: [B, T, D] input.
      chunk: tokens per chunk, or None for one call over the whole sequence.

    Returns:
      [B, T, D_out], equal to `module(x)` up to float rounding.

    Raises:
      ValueError: `chunk` does not divide T (`check_chunk`).

    Example:
      >>> mlp = LlamaMLP(c, parallel, name="mlp")
      >>> y = sequence_chunked(mlp, h, c.mlp_chunk)
    """
    def body(mdl, carry, x_chunk):
        return carry, mdl(x_chunk)

    def over_chunks(xs, n):
        # prevent_cse=False: inside a scan, CSE cannot merge the recomputation into the
        # forward. Parameters are broadcast (one set for every chunk); "dropout" is split so
        # each chunk draws its own LoRA dropout mask.
        scan = nn.scan(nn.remat(body, prevent_cse=False), variable_broadcast="params",
                       split_rngs={"params": False, "dropout": True}, in_axes=1, out_axes=1,
                       length=n)
        return scan(module, None, xs)[1]

    return _by_chunks(module, x, chunk, over_chunks)


def _by_chunks(module, x: jax.Array, chunk: int | None, over_chunks) -> jax.Array:
    """The frame both chunked loops share: `module(x)` when the call is one chunk at most,
    else `over_chunks(xs [B, n, chunk, ...], n) -> ys [B, n, chunk, ...]` reshaped back."""
    length = x.shape[1]
    if not chunk or length <= chunk:
        return module(x)
    n = check_chunk(length, chunk)
    ys = over_chunks(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), n)
    return ys.reshape(x.shape[0], length, *ys.shape[3:])


def nnx_sequence_chunked(module: nnx.Module, x: jax.Array, chunk: int | None) -> jax.Array:
    """`module(x)` over chunks of `chunk` tokens of x's sequence axis, for an NNX module: what
    `sequence_chunked` does for a Linen one, under the same contract (tokenwise module,
    `[B, T, ...]` in and out, calls of at most `chunk` tokens unchunked, `check_chunk`'s error).

    The module's parameters (LoRA adapters and quantised kernels included) are broadcast: one
    copy, read by every chunk, their gradients summed over the chunks. Its RNG state (an
    adapter's `nnx.Dropout` stream) is carried from chunk to chunk, so each chunk draws its own
    dropout mask, as the Linen loop splits "dropout"; the stream advances once per chunk.

    It is an NNX transform, so it takes only Variables of the trace it runs in: train with
    `nnx.jit` / `nnx.value_and_grad`, or, with plain JAX transforms over `nnx.split` state,
    rebuild the module inside the transformed function (`nnx.merge(..., copy=True)`): a module
    merged inside `jax.grad` from Variables made outside it fails with NNX's "different trace
    level" error.

    Example:
      >>> y = nnx_sequence_chunked(layer.mlp, h, config.mlp_chunk)
    """
    def body(mdl, x_chunk):
        return mdl(x_chunk)

    def over_chunks(xs, n):
        # As in `sequence_chunked`: remat inside the scan (prevent_cse=False is safe there),
        # so the backward pass rebuilds one chunk's intermediates at a time.
        state_axes = nnx.StateAxes({nnx.RngState: nnx.Carry, ...: None})
        return nnx.scan(nnx.remat(body, prevent_cse=False), in_axes=(state_axes, 1),
                        out_axes=1, length=n)(module, xs)

    return _by_chunks(module, x, chunk, over_chunks)


def chunked_mlp(mlp: nn.Module, x: jax.Array, config, parallel) -> jax.Array:
    """A block's MLP call under `config.mlp_chunk` (`sequence_chunked`; unchunked when None).

    Raises:
      NotImplementedError: `mlp_chunk` with the tensor/sequence-parallel layers, whose
        activations are split over the sequence axis that the chunks would cut again.
    """
    chunk = getattr(config, "mlp_chunk", None)
    if chunk and not isinstance(parallel, NoParallelism):
        raise NotImplementedError(
            f"mlp_chunk={chunk} is not supported with {type(parallel).__name__} yet: it is for "
            "long context on one device (or dp/FSDP through GSPMD); set mlp_chunk=None")
    return sequence_chunked(mlp, x, chunk)
