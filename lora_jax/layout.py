"""How a stored kernel's axes split into stacked (scanned-layer), input and output axes.

`nn.Dense` stores `[in, out]`; `nn.scan` adds leading layer axes (`[L, in, out]`);
`nn.DenseGeneral` may have several input and output axes (`[d, heads, head_dim]`). The tree alone
cannot tell `[L, in, out]` from a DenseGeneral `[in, heads, head_dim]`, so `inject` takes the
layouts from `kernel_layouts(model, ...)`, which traces the model once, abstractly; without them a
2-D kernel is a Dense and a 3-D kernel a scanned Dense. `apply` checks the layout when it runs.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from lora_jax.errors import LoraError


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """Axis counts of a stored kernel: `[*stack, *inputs, *outputs]`."""

    n_stack: int
    n_in: int
    n_out: int

    def split(self, shape: tuple[int, ...]) -> tuple[tuple, tuple, tuple]:
        """`(stack_shape, in_shape, out_shape)` of a kernel of this layout."""
        if len(shape) != self.n_stack + self.n_in + self.n_out:
            raise LoraError(f"kernel of shape {shape} does not fit layout {self}")
        a, b = self.n_stack, self.n_stack + self.n_in
        return tuple(shape[:a]), tuple(shape[a:b]), tuple(shape[b:])


def default_layout(path: str, shape: tuple[int, ...]) -> KernelLayout:
    """Dense `[in, out]`, or scanned Dense `[L, in, out]`; anything else needs `kernel_layouts`."""
    if len(shape) == 2:
        return KernelLayout(0, 1, 1)
    if len(shape) == 3:
        return KernelLayout(1, 1, 1)
    raise LoraError(
        f"cannot tell the layout of kernel {path!r} with shape {shape}: pass "
        "layouts=lora_jax.kernel_layouts(model, variables, *example_args) to inject (needed for "
        "DenseGeneral kernels and nested scans).")


def dense_input_axes(module: nn.Module, x_ndim: int) -> tuple[int, ...]:
    """The input axes a Dense/DenseGeneral contracts, as non-negative axes of its input."""
    if isinstance(module, nn.DenseGeneral):
        if getattr(module, "batch_dims", ()):
            raise LoraError(f"{'.'.join(module.path)}: DenseGeneral with batch_dims is not "
                            "supported by LoRA; drop it from target_modules.")
        axis = module.axis if isinstance(module.axis, (tuple, list)) else (module.axis,)
        return tuple(sorted(a % x_ndim for a in axis))
    return (x_ndim - 1,)


def kernel_layouts(model: nn.Module, variables: Any, *args, **kwargs) -> dict[str, KernelLayout]:
    """Trace `model.apply(variables, *args, **kwargs)` abstractly and record every Dense-like
    layer's layout, keyed by dotted module path.

    Example:
      >>> layouts = kernel_layouts(model, variables, tokens)
      >>> params = inject(variables["params"], config, rng, layouts=layouts)
    """
    found: dict[str, KernelLayout] = {}

    def record(next_fun, args_, kwargs_, context):
        module = context.module
        if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.DenseGeneral)):
            kernel = module.get_variable("params", "kernel")
            x = args_[0]
            n_in = len(dense_input_axes(module, np.ndim(x)))
            path = ".".join(str(p) for p in module.path)
            stored = _stored_ndim(variables, module.path)
            n_local = np.ndim(kernel)
            found[path] = KernelLayout(stored - n_local, n_in, n_local - n_in)
        return next_fun(*args_, **kwargs_)

    def run():
        with nn.intercept_methods(record):
            return model.apply(variables, *args, **kwargs)

    jax.eval_shape(run)
    return found


def _stored_ndim(variables: Any, module_path: tuple[str, ...]) -> int:
    node = variables["params"] if "params" in variables else variables
    for key in module_path:
        node = node[key]
    return np.ndim(node["kernel"])
