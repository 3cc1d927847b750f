"""A quantised frozen base for Flax NNX models (QLoRA's base, the NNX form of `QuantDense`).

`quantize(model, fmt)` is module surgery, as `lora_jax.nnx.inject` is: each selected
`nnx.Linear` (default: the block projections `models.quant.quantizable` names; the output head
and embeddings stay) keeps its `kernel` Param, whose value becomes the `models.quant` pytree
(`Nf4Kernel` / `Int8Kernel` / `Fp8Kernel`), and its class is switched to `QuantLinear`, whose
`__call__` multiplies with `models.quant.quantized_matmul` (gradients reach the input only).
Paths do not move, so `nnx.state(model, nnx.Param)` as a pure dict is the Linen quantised
model's tree (`quantize_params` of the plain one), and checkpoints (`nnx.state`, orbax) carry
the codes and scales as ordinary integer / float leaves.

Why an `nnx.Param` and not a Variable type of its own: the kernel sits where the Linen
`QuantDense` keeps it (the "params" collection), so every tree function that reads the
parameters (`lora_jax.nnx.params`, the partition rules, `to_linen`) sees it there. It stays out
of training because LoRA's optimizer is built on `lora_jax.nnx.LoraParam` only (a full
fine-tune over `nnx.Param` cannot train integer codes: quantise only what is frozen).

It composes with LoRA in either order. Quantise then inject (the main path): `lj.nnx.inject`
makes `Lora` + the layer's class, whose `__call__` adds the adapter term to `QuantLinear`'s.
Inject then quantise: the LoRA layer's class `C` becomes `Quant` + `C`, a subclass of `C` and
`QuantLinear` whose method order is the same (adapter outside, quantised matmul inside). This
module knows nothing of LoRA: the switch works for any subclass of `nnx.Linear` whose
`__call__` reaches `nnx.Linear.__call__` through `super()`.

Example:
    >>> model = NnxLlama(LlamaConfig.tiny(), nnx.Rngs(0))
    >>> quantize(model, "nf4")                 # q/k/v/o/gate/up/down stored in NF4
    >>> lj.nnx.inject(model, lj.LoraConfig(r=8, target_modules="all-linear"), key)
"""
from __future__ import annotations

import types
from typing import Any, Callable

import jax
from flax import nnx

from models import quant


class QuantLinear(nnx.Linear):
    """An `nnx.Linear` whose `kernel` Param holds a quantised pytree (`models.quant`), multiplied
    by `quantized_matmul` in `quant_impl` ("xla" or "pallas") with `fp8_scaling` ("tensor" or
    "row", FP8 kernels only), as `models.quant.QuantDense` does: compute dtype the layer's
    `dtype`, else the kernel's dequantised dtype; bias added in it. Made by `quantize`, not
    constructed directly.

    Both options are plain string attributes, so NNX keeps them in the graph definition (static,
    like `use_bias`), not in the state: `nnx.state`, `lj.nnx.params` and checkpoints hold only
    the arrays, and `nnx.split` / `nnx.merge` / `nnx.jit` carry the options through."""

    quant_impl: str = "xla"
    fp8_scaling: str = "tensor"

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        if out_sharding is not None:
            raise ValueError("QuantLinear: out_sharding is not supported by the quantised matmul; "
                             "place the inputs instead.")
        kernel = self.kernel.get_value()
        dtype = self.dtype or kernel.dtype
        y = quant.quantized_matmul(inputs, kernel, dtype, self.quant_impl,
                                   fp8_scaling=self.fp8_scaling)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


_DERIVED: dict[type, type] = {}  # a subclass of nnx.Linear -> its quantised subclass


def quant_class(cls: type) -> type:
    """The class a quantised layer of class `cls` takes: `QuantLinear` for `nnx.Linear`, else
    `Quant<cls>` with bases (cls, QuantLinear), made once, so `cls`'s `__call__` (e.g. a LoRA
    layer's) runs first and its `super()` call reaches `QuantLinear`'s matmul."""
    if cls is nnx.Linear or issubclass(cls, QuantLinear):
        return QuantLinear if cls is nnx.Linear else cls
    if cls not in _DERIVED:
        _DERIVED[cls] = types.new_class(f"Quant{cls.__name__}", (cls, QuantLinear))
        _DERIVED[cls].__module__ = __name__
    return _DERIVED[cls]


def quantize(model: nnx.Module, fmt: str, *, select: Callable[[str], bool] | None = None,
             impl: str = "xla", dtype: Any = None, fp8_scaling: str = "tensor") -> nnx.Module:
    """Store the kernel of every selected `nnx.Linear` quantised in format `fmt`, in place (and
    return the model). All kernels are quantised before any layer is changed, so an error
    leaves the model as it was.

    Args:
      model: the NNX model (LoRA adapters may already be in it: they stay, and still apply).
      fmt: "nf4" | "int8" | "fp8" (`models.quant.FORMATS`; NF4 needs inputs divisible by 64).
      select: `fn(dotted module path) -> bool`; default `models.quant.quantizable` (the block
        projections; not the output head).
      impl: how NF4 / int8 multiply: "xla" (dequantise, then a GEMM) or "pallas"
        (`models.quant_pallas`), as `quantized_matmul`'s `impl`.
      dtype: the dtype the kernels dequantise to (default each kernel's own).
      fp8_scaling: how an FP8 kernel's layer scales x (forward) and the output gradient
        (backward) into FP8: "tensor" (one amax per call) or "row" (one per token row), as
        `quantized_matmul`'s `fp8_scaling`; NF4 / int8 ignore it, as `QuantDense` does.

    Returns:
      `model`, its selected kernels quantised.

    Raises:
      ValueError: an unknown format, impl or fp8_scaling; nothing selected; a selected layer
        that is not an `nnx.Linear` (`nnx.LinearGeneral`, `nnx.Einsum`, `nnx.Conv`); a kernel
        already quantised; a kernel the format cannot hold (NF4 with inputs not divisible by 64).

    Example:
      >>> quantize(model, "int8", select=lambda path: path.endswith("mlp.up_proj"))
      >>> quantize(model, "fp8", fp8_scaling="row")   # one FP8 scale per token row
    """
    if fmt is None:
        raise ValueError(f"quantize: fmt=None; use one of {quant.FORMATS}")
    quant.check_format(fmt)
    quant.check_impl(impl)
    quant.check_fp8_scaling(fp8_scaling)
    layers = _selected(model, select or quant.quantizable)
    kernels = {}
    for path, layer in layers.items():
        try:
            kernels[path] = _quantize_jit(layer.kernel.get_value(), fmt, dtype=dtype)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    for path, layer in layers.items():
        layer.kernel.set_value(kernels[path])
        layer.__class__ = quant_class(type(layer))
        layer.quant_impl = impl
        layer.fp8_scaling = fp8_scaling
    return model


# One compiled program per kernel shape: eagerly, each of the quantiser's ops is compiled and
# run on its own (NF4: seconds per shape on a CPU) and keeps its float32 temporaries alive.
_quantize_jit = jax.jit(quant.quantize, static_argnums=(1,), static_argnames=("dtype",))


def _selected(model: nnx.Module, select: Callable[[str], bool]) -> dict[str, nnx.Module]:
    """`{dotted path: nnx.Linear}` that `select` picks, every one checked quantisable."""
    out, seen = {}, []
    for path, module in nnx.iter_modules(model):
        dotted = ".".join(str(k) for k in path)
        if not hasattr(module, "kernel"):
            continue
        seen.append(dotted)
        if not select(dotted):
            continue
        if not isinstance(module, nnx.Linear):
            raise ValueError(f"{dotted}: {type(module).__name__} layers cannot be stored "
                             "quantised (only nnx.Linear: a 2-D [in, out] kernel multiplied on "
                             "the input's last axis); leave it out with select=.")
        if quant.is_quantized(module.kernel.get_value()):
            raise ValueError(f"{dotted}: its kernel is already quantised "
                             f"({type(module.kernel.get_value()).__name__}); quantise a layer "
                             "once (load the float weights to change the format).")
        out[dotted] = module
    if not out:
        raise ValueError(f"quantize: select matched no layer; the layers with a kernel are "
                         f"{seen[:12]}{' ...' if len(seen) > 12 else ''}")
    return out


def is_quantized_layer(layer: nnx.Module) -> bool:
    """True for a layer whose kernel is a quantised pytree."""
    kernel = getattr(layer, "kernel", None)
    return isinstance(kernel, nnx.Variable) and quant.is_quantized(kernel.get_value())


__all__ = ["QuantLinear", "quant_class", "quantize", "is_quantized_layer"]
