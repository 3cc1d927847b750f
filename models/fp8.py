"""An FP8 matmul for a *frozen* base kernel: the `dot_general` of `nn.Dense` when the model's
`base_fp8` option is on.

Why: LoRA training spends nearly all its FLOPs in the frozen base's two matmuls per projection
(forward `x @ W`, and the input gradient `dy @ W^T`); Hopper GPUs run FP8 matmuls at about
twice bf16's rate. Adapters stay in their own dtype: `lora_jax.apply` adds `x @ A @ B` beside this call.

Recipe (per-tensor current scaling; measured rates in docs/PERFORMANCE.md):
  forward   y  = (x / s_x)->e4m3  .  (W^T / s_w)->e4m3   * s_x s_w     (W^T: [out, in])
  backward  dx = (dy / s_dy)->e5m2 . (W / s_w)->e4m3     * s_dy s_w    (W:   [in, out])
Both GEMMs contract the *last* axis of both operands, the layout for which cuBLASLt's FP8 GEMM
runs at full rate (a `[K, N]` weight contracted on its first axis ran at about half). The scales
are `amax / fp8_max`, computed in float32 from the tensors themselves each call, and applied
after the GEMM. e5m2 for the gradient because gradients need range more than mantissa.

The kernel is a constant here: its cotangent is zero by construction (`stop_gradient`), so this
is for a frozen base only; a kernel you want to train must not use `base_fp8`.
The output is named `FP8_OUTPUT_NAME` (`jax.ad_checkpoint.checkpoint_name`) so a remat policy can
save it like a dot: `jax.checkpoint`'s "dots" policies do not see inside a `custom_vjp`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

FORWARD_DTYPE = jnp.float8_e4m3fn
GRADIENT_DTYPE = jnp.float8_e5m2
FP8_OUTPUT_NAME = "fp8_base_dot"
_TINY = 1e-12  # an all-zero tensor gets scale 1e-12 / max, not a division by zero


def quantize(x: jax.Array, dtype, rowwise: bool = False,
             axes: tuple[str, ...] = ()) -> tuple[jax.Array, jax.Array]:
    """Scaled cast: (x / scale) in `dtype` and the float32 scale, amax -> fp8 max. The scale is
    per tensor, or with `rowwise` per row (amax over the last axis, shape [..., 1]).

    `axes`: mesh axes (inside `shard_map`) that `x` is split over; the amax is the maximum over
    them (`pmax`), so every device scales its shard as one device scales the whole tensor."""
    amax = (jnp.max(jnp.abs(x), axis=-1, keepdims=True) if rowwise
            else jnp.max(jnp.abs(x))).astype(jnp.float32)
    if axes:
        amax = jax.lax.pmax(amax, axes)
    scale = jnp.maximum(amax, _TINY) / float(jnp.finfo(dtype).max)
    return (x.astype(jnp.float32) / scale).astype(dtype), scale


def _last_axis_dot(a: jax.Array, b: jax.Array, out_dtype) -> jax.Array:
    """a [..., K] . b [N, K] -> [..., N], accumulated by the GEMM and returned in out_dtype."""
    dims = (((a.ndim - 1,), (1,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=out_dtype)


def _rescale(y: jax.Array, scale: jax.Array) -> jax.Array:
    """The GEMM's output times the product of the operand scales, in float32, cast back."""
    return (y.astype(jnp.float32) * scale).astype(y.dtype)


@jax.custom_vjp
def _fp8_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return _forward(x, kernel)


def _forward(x, kernel):
    return _forward_with_scale(x, kernel)[0]


def _forward_with_scale(x, kernel):
    x8, sx = quantize(x, FORWARD_DTYPE)
    wt8, sw = quantize(kernel.T, FORWARD_DTYPE)
    return _rescale(_last_axis_dot(x8, wt8, x.dtype), sx * sw), sw


def _fwd(x, kernel):
    # Residuals: the kernel (a parameter: no new memory) and its scale (a scalar), so the
    # backward does not reduce over the weight again. nn.Dense gives x, kernel and y one dtype,
    # so dy's dtype is x's.
    y, sw = _forward_with_scale(x, kernel)
    return y, (kernel, sw)


def _bwd(residuals, dy):
    kernel, sw = residuals
    dy8, sdy = quantize(dy, GRADIENT_DTYPE)
    w8 = (kernel.astype(jnp.float32) / sw).astype(FORWARD_DTYPE)
    dx = _rescale(_last_axis_dot(dy8, w8, dy.dtype), sdy * sw)
    return dx, jnp.zeros_like(kernel)


_fp8_matmul.defvjp(_fwd, _bwd)


def fp8_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """Drop-in `dot_general` for `nn.Dense(dot_general=...)`: x [..., in] . kernel [in, out].

    Only Dense's contraction (last axis of x with axis 0 of a 2-D kernel) is supported; the
    kernel is treated as frozen (see the module docstring)."""
    del precision, preferred_element_type
    (lhs_contract, rhs_contract), batch = dimension_numbers
    if (tuple(lhs_contract) != (lhs.ndim - 1,) or tuple(rhs_contract) != (0,) or rhs.ndim != 2
            or any(batch)):
        raise ValueError(f"fp8_dot_general supports x[..., in] . kernel[in, out] only, got "
                         f"dimension_numbers={dimension_numbers} for shapes {lhs.shape}, "
                         f"{rhs.shape}")
    out = _fp8_matmul(lhs, jax.lax.stop_gradient(rhs))
    return checkpoint_name(out, FP8_OUTPUT_NAME)
