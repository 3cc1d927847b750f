"""LoRA for Flax NNX models: the same adapters, scales and files as the Linen path.

NNX has no `intercept_methods`, so the forward is changed by *module surgery* on the graph:
`inject` adds three variables to each targeted `nnx.Linear` / `nnx.LinearGeneral` / `nnx.Einsum`
object, beside its `kernel` and under the Linen names (`lora_a` and `lora_b` as `LoraParam`,
`lora_scale` as a frozen `LoraScale`), and switches the object's class to a subclass
(`LoraLinear`, `LoraLinearGeneral`, `LoraEinsum`) whose `__call__` adds the adapter term through the one adapter op
(`lora_jax.adapter_op`). Parameter paths do not move, the model's code is not touched, and the
objects survive `nnx.split` / `nnx.merge`, `nnx.jit` and the NNX transforms. With
`lora_dropout > 0`, `inject(..., rngs=)` also adds an `nnx.Dropout` (`lora_dropout`), switched by
`model.train()` / `model.eval()` as NNX dropout is.

    nnx.state(model, lj.nnx.LoraParam)       the adapters' trainable leaves, nothing else
    nnx.Optimizer(model, tx, wrt=lj.nnx.LoraParam)
    lj.nnx.params(model)                     the Linen-form tree: every file function works on it
    lj.nnx.adapters(model)                   its adapter sub-tree (TrainCheckpointer's adapters=)

Placing a model on a mesh by the partition rules is the `sharding` package's
(`sharding.shard_nnx`); this module knows no mesh axes.

`params(model)` is the model's parameters as the nested dict a Linen model of the same names
has (string keys, `lora_*` leaves beside each kernel), so `save_adapter`, `export_peft` and
friends write the same files as for a Linen model with the same weights; `load(model, tree)`
puts adapters from such a tree (from `load_adapter` or `import_peft`, which takes
`layouts=layouts(model)` for `LinearGeneral` kernels) into the model.

`nnx.Einsum` layers are adapted too (`LoraEinsum`): the einsum string says which kernel axes are
contracted with the input (the adapter's input axes) and which reach the output; the kernel must
be ordered `[*in, *out]` (contracted axes first) as `KernelLayout` assumes, and the adapter term
is put in the output's axis order. Einsums with kernel axes that are batch axes (in input, kernel
and output) or summed away, or with `...` in the kernel operand, are refused by name.

DoRA (`LoraConfig(use_dora=True)`): the magnitude `lora_magnitude` is a `LoraParam` beside A and
B, and the layer's output is rescaled as in the Linen path (`lora_jax.dora`); `nnx.Einsum`
layers refuse it.

A quantised frozen base (`models.nnx_quant.quantize`: the kernel Param holds a `models.quant`
pytree, the layer a subclass of `nnx.Linear` that multiplies with it) takes adapters in either
order: a layer of a subclass of the NNX classes gets `Lora<its class>` (`lora_class`), whose
`__call__` adds the adapter term to its own forward. `merge` dequantises, adds the delta in
float32 and writes a plain kernel in the dequantised dtype, as `lora_jax.merge` does, and the
layer becomes a plain `nnx.Linear`. DoRA and kernel-rewriting inits are refused over a
quantised kernel, as on the Linen path. This module reads such a kernel by duck type only
(`dequantize`, `.shape`, `.dtype`): it does not import `models`.

Not yet: LoRA dropout draws equal to the Linen path's.
"""
from __future__ import annotations

import types
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax.adapter_op import add_delta, compute_dtype, lora_delta, name_output, refuse_mixed
from lora_jax.config import LoraConfig
from lora_jax.config import ALL_LINEAR, matches_modules
from lora_jax.errors import LoraError
from lora_jax.finite import check_finite
from lora_jax import dora
from lora_jax.inject import _check_patterns, _check_quantized, adapter_leaves, select_targets
from lora_jax.inject import with_magnitude
from lora_jax.inits import base_changing_module, is_base_changing
from lora_jax.layout import KernelLayout, default_layout
from lora_jax.merge import merged_kernel
from lora_jax.tree import ADAPTER_LEAVES, LORA_A, LORA_SCALE, Params, modules_of
from lora_jax.tree import LORA_MAGNITUDE


class LoraParam(nnx.Param):
    """`lora_a` / `lora_b`: the trained leaves (a `Param`, so parameter filters see them)."""


class LoraScale(nnx.Variable):
    """`lora_scale`: alpha / r (or alpha / sqrt(r)), frozen: not a `Param`, never trained."""


def adapted_output(layer: nnx.Module, x: jax.Array, y: jax.Array,
                   in_axes: tuple[int, ...]) -> jax.Array:
    """`y + scale * (dropout(x) @ A) @ B` for a LoRA-carrying layer, through the adapter op
    (DoRA's rescaled term when the layer carries a `lora_magnitude`)."""
    dtype = compute_dtype(layer.dtype, x, kernel_of(layer))
    dropout = getattr(layer, "lora_dropout", None)
    x_in = x if dropout is None else dropout(x)
    refuse_mixed("Flax NNX layers")
    delta = lora_delta(x_in, layer.lora_a[...], layer.lora_b[...], layer.lora_scale[...],
                       in_axes, dtype)
    if hasattr(layer, LORA_MAGNITUDE):
        delta = _dora_term(layer, x_in if dropout is not None else None, y, delta, in_axes,
                           dtype)
    return name_output(add_delta(y, delta))


def _dora_term(layer: nnx.Module, dropped: jax.Array | None, y: jax.Array, delta: jax.Array,
               in_axes: tuple[int, ...], dtype) -> jax.Array:
    """DoRA's addition to an NNX layer's output, by the rule of `adapter_op.dora_delta`."""
    kernel, a, b = kernel_of(layer), layer.lora_a[...], layer.lora_b[...]
    if is_quantized(kernel):
        raise LoraError(f"{type(layer).__name__}: DoRA's weight norm over a quantised kernel is "
                        "not supported (as on the Linen path); use plain LoRA, or quantise "
                        "before inject (which then refuses DoRA by name).")
    magnitude = getattr(layer, LORA_MAGNITUDE)[...]
    dora.check_magnitude(type(layer).__name__, magnitude, kernel.shape[len(in_axes):])
    g = dora.factor(magnitude, dora.weight_norm_sq(kernel, a, b, layer.lora_scale[...]))
    if dropped is None:
        bias = getattr(layer, "bias", None)
        base = y if bias is None else y - bias[...].astype(y.dtype)
    else:
        base = jnp.tensordot(dropped.astype(dtype), kernel.astype(dtype),
                             axes=(in_axes, tuple(range(len(in_axes)))))
    return dora.output_term(base, delta, g, dtype)


def _check_dora_layer(path: str, layer: nnx.Module) -> None:
    if isinstance(layer, nnx.Einsum):
        raise LoraError(f"{path}: DoRA on nnx.Einsum layers is not supported (their output axes "
                        "may be permuted against the kernel's); exclude it (exclude_modules) or "
                        "use plain LoRA.")


class LoraLinear(nnx.Linear):
    """An `nnx.Linear` carrying `lora_a [in, r]`, `lora_b [r, out]`, `lora_scale []`."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return adapted_output(self, x, super().__call__(x), (x.ndim - 1,))


class LoraLinearGeneral(nnx.LinearGeneral):
    """An `nnx.LinearGeneral` carrying `lora_a [*in, r]`, `lora_b [r, *out]`, `lora_scale []`."""

    def __call__(self, x: jax.Array) -> jax.Array:
        axis = self.axis if isinstance(self.axis, (tuple, list)) else (self.axis,)
        in_axes = tuple(sorted(a % x.ndim for a in axis))
        return adapted_output(self, x, super().__call__(x), in_axes)


class EinsumRoles(NamedTuple):
    """An `nnx.Einsum` string read as a linear map of its input (`...` expanded).

    Attributes:
      x: the input operand's letters, one per input axis.
      kernel: the kernel operand's letters, `[*in, *out]`.
      out: the output's letters.
      n_in: how many leading kernel letters are contracted with the input.
    """

    x: str
    kernel: str
    out: str
    n_in: int

    @property
    def in_letters(self) -> str:
        return self.kernel[:self.n_in]

    @property
    def out_letters(self) -> str:
        return self.kernel[self.n_in:]


def einsum_roles(einsum_str: str, path: str = "<einsum>", x_ndim: int | None = None
                 ) -> EinsumRoles:
    """Read `einsum_str` ('btd,dnh->btnh') as input x kernel -> output, and check that LoRA can
    adapt it: every kernel axis is either contracted with the input (not in the output) or an
    output axis (not in the input), contracted axes first (`[*in, *out]`), and every input axis
    is either contracted or kept. `x_ndim` expands a `...` in the input and output (none is
    allowed in the kernel operand). Raises `LoraError` naming `path` and the string otherwise.

    Example:
      >>> einsum_roles("btd,dnh->btnh")
      EinsumRoles(x='btd', kernel='dnh', out='btnh', n_in=1)
    """
    spec = einsum_str.replace(" ", "")

    def refuse(why: str) -> LoraError:
        return LoraError(f"{path}: nnx.Einsum {spec!r} cannot take a LoRA adapter: {why}; "
                         "exclude it (exclude_modules).")

    if spec.count(",") != 1 or spec.count("->") != 1:
        raise refuse("it must have exactly two operands and an explicit '->' output")
    lhs, out = spec.split("->")
    x, kernel = lhs.split(",")
    if "." in kernel:
        raise refuse("'...' in the kernel operand")
    if "..." in x:
        if x_ndim is None:
            x_ndim = len(x) - 3  # no broadcast axes: enough to check the kernel's roles
        n_ellipsis = x_ndim - (len(x) - 3)
        free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in spec][:n_ellipsis]
        x, out = x.replace("...", "".join(free)), out.replace("...", "".join(free))
    if "." in x + out or len(set(x)) != len(x) or len(set(kernel)) != len(kernel) \
            or len(set(out)) != len(out):
        raise refuse("repeated letters, or '...' not in both the input and the output")
    roles = ["in" if c in x and c not in out else "out" if c in out and c not in x else
             "batch" if c in x and c in out else "summed" for c in kernel]
    if "batch" in roles or "summed" in roles:
        bad = [c for c, r in zip(kernel, roles) if r in ("batch", "summed")]
        raise refuse(f"kernel axes {bad} are batch axes (in the input and the output) or summed "
                     "away; only contracted and output axes are supported")
    n_in = roles.count("in")
    if roles != ["in"] * n_in + ["out"] * (len(kernel) - n_in):
        raise refuse(f"the kernel's axes must be ordered [*in, *out] (contracted with the input "
                     f"first, then output axes), as KernelLayout assumes; here they are {roles}")
    if n_in == 0 or n_in == len(kernel):
        raise refuse("the kernel needs at least one contracted and one output axis")
    dropped = [c for c in x if c not in kernel and c not in out]
    if dropped:
        raise refuse(f"input axes {dropped} are summed away outside the kernel")
    if set(out) != set(x) - set(kernel[:n_in]) | set(kernel[n_in:]):
        raise refuse("the output has letters from neither operand")
    return EinsumRoles(x, kernel, out, n_in)


class LoraEinsum(nnx.Einsum):
    """An `nnx.Einsum` carrying `lora_a [*in, r]`, `lora_b [r, *out]`, `lora_scale []`, where
    `in` / `out` are the kernel's contracted / output axes (`einsum_roles`)."""

    def __call__(self, inputs: jax.Array, einsum_str: str | None = None,
                 out_sharding=None) -> jax.Array:
        spec = self.einsum_str if einsum_str is None else einsum_str
        y = super().__call__(inputs, einsum_str, out_sharding)
        roles = einsum_roles(spec, type(self).__name__, inputs.ndim)
        if self.lora_a[...].ndim != roles.n_in + 1:
            raise LoraError(f"nnx.Einsum {spec!r} contracts {roles.n_in} kernel axes, but the "
                            f"adapter was made for {self.lora_a[...].ndim - 1}")
        # x with its contracted axes last, in the kernel's order (lora_a's), then the one op
        kept = [c for c in roles.x if c not in roles.in_letters]
        order = [roles.x.index(c) for c in kept + list(roles.in_letters)]
        x = jnp.transpose(inputs, order)
        n = roles.n_in
        dtype = compute_dtype(self.dtype, inputs, kernel_of(self))
        dropout = getattr(self, "lora_dropout", None)
        x_in = x if dropout is None else dropout(x)
        refuse_mixed("Flax NNX layers")
        delta = lora_delta(x_in, self.lora_a[...], self.lora_b[...], self.lora_scale[...],
                           tuple(range(x.ndim - n, x.ndim)), dtype)
        # delta is [*kept, *out letters]; put it in the output's order
        have = "".join(kept) + roles.out_letters
        delta = jnp.transpose(delta, [have.index(c) for c in roles.out])
        return name_output(add_delta(y, delta))


LORA_CLASSES = {nnx.Linear: LoraLinear, nnx.LinearGeneral: LoraLinearGeneral,
                nnx.Einsum: LoraEinsum}
BASE_CLASSES = {v: k for k, v in LORA_CLASSES.items()}
_DERIVED: dict[type, type] = {}  # a subclass of a base class -> its LoRA subclass
_UNDERIVED: dict[type, type] = {}  # and back


def lora_class(cls: type) -> type:
    """The class a layer of class `cls` takes when it carries an adapter: `LoraLinear` (...) for
    the three NNX classes, `cls` itself when it already adds the adapter term, and for a
    subclass of one of them (a quantised base, `models.nnx_quant.QuantLinear`, or a user's
    layer) `Lora<cls>` with bases (LoraLinear, cls), made once: the adapter's `__call__` runs
    first and its `super()` call reaches `cls`'s own forward."""
    if cls in LORA_CLASSES:
        return LORA_CLASSES[cls]
    if issubclass(cls, tuple(BASE_CLASSES)):
        return cls
    if cls not in _DERIVED:
        lora = next(LORA_CLASSES[base] for base in LORA_CLASSES if issubclass(cls, base))
        _DERIVED[cls] = types.new_class(f"Lora{cls.__name__}", (lora, cls))
        _DERIVED[cls].__module__ = __name__
        _UNDERIVED[_DERIVED[cls]] = cls
    return _DERIVED[cls]


def plain_class(cls: type, quantized: bool) -> type:
    """The class a merged layer of LoRA class `cls` goes back to: the plain NNX class when its
    kernel was quantised (the merged kernel is a plain array, which a quantised layer's matmul
    cannot take), else the class it had before `inject` (`lora_class` inverted)."""
    if quantized or cls not in BASE_CLASSES and cls not in _UNDERIVED:
        return next(base for base in LORA_CLASSES if issubclass(cls, base))
    return BASE_CLASSES.get(cls) or _UNDERIVED[cls]


def kernel_of(layer: nnx.Module) -> Any:
    """The layer's kernel: an array, or a quantised pytree (`models.quant`, duck-typed by its
    `dequantize`), which a Variable's `[...]` cannot index."""
    return layer.kernel.get_value()


def is_quantized(kernel: Any) -> bool:
    """True for a quantised kernel pytree (it has `dequantize`, as `lora_jax.tree` reads it)."""
    return hasattr(kernel, "dequantize")


def inject(model: nnx.Module, config: LoraConfig, rng: jax.Array, *,
           rngs: nnx.Rngs | None = None) -> nnx.Module:
    """Add LoRA adapters to every `nnx.Linear` / `nnx.LinearGeneral` / `nnx.Einsum` that `config`
    targets, in place (and return the model).

    The adapter values are `lora_jax.inject`'s for the same dotted paths, kernel shapes, config
    and `rng`: a model written in NNX and one written in Linen with the same names get the same
    adapters. Stacked layers (`nnx.vmap` / `nnx.scan` over layers: kernels `[L, in, out]`) get
    stacked adapters. With a PiSSA / OLoRA `init_lora_weights` each targeted layer's kernel is
    replaced by the residual (`lora_jax.inits`): the model's base is no longer the original.

    Args:
      model: the NNX model.
      config: the `LoraConfig` (targets, ranks, alphas, rsLoRA, init, dtype).
      rng: the adapters' PRNG key.
      rngs: `nnx.Rngs` with a `dropout` stream; needed when `config.lora_dropout > 0`.

    Returns:
      `model`, with adapters.

    Example:
      >>> model = lj.nnx.inject(model, lj.LoraConfig(r=8, target_modules=["q_proj"]), key)
      >>> nnx.state(model, lj.nnx.LoraParam)       # the adapters, nothing else
    """
    _refuse_beyond_linear(model, config)
    layers = adaptable(model)
    view = {path: _module_view(layer) for path, layer in layers.items()}
    targets = select_targets(view, config)
    _check_patterns(config, targets)
    if config.lora_dropout > 0 and rngs is None:
        raise LoraError("lora_dropout > 0: pass inject(..., rngs=nnx.Rngs(dropout=key)) for the "
                        "dropout stream (model.train() / model.eval() switch it).")
    for path in targets:
        layer = layers[path]
        kernel = kernel_of(layer)
        _check_quantized(path, kernel, config)  # DoRA / PiSSA / OLoRA need a float kernel
        leaves = adapter_leaves(path, kernel.shape, layout_of(path, layer), config, rng)
        if is_base_changing(config.init_lora_weights):  # PiSSA / OLoRA: the kernel is rewritten
            module = base_changing_module(path, {"kernel": kernel}, leaves,
                                          layout_of(path, layer), config, rng)
            layer.kernel[...] = module.pop("kernel")
            leaves = module
        if config.use_dora:
            _check_dora_layer(path, layer)  # before the norm is computed for nothing
            leaves = with_magnitude(kernel_of(layer), leaves, layout_of(path, layer), config)
        _attach(layer, leaves)
        if config.lora_dropout > 0:
            layer.lora_dropout = nnx.Dropout(config.lora_dropout, rngs=rngs)
    return model


def _refuse_beyond_linear(model: nnx.Module, config: LoraConfig) -> None:
    """Embedding adapters and modules_to_save exist for Linen trees only (`lora_jax.inject`):
    refuse them here rather than silently leave a named target out."""
    if config.modules_to_save:
        raise LoraError(f"modules_to_save={list(config.modules_to_save)}: not supported for NNX "
                        "models; train those modules with your own nnx.Param filter, or use "
                        "the Linen path (lora_jax.inject / lora_jax.apply).")
    if config.target_modules == ALL_LINEAR:
        return
    embeds = [".".join(str(k) for k in path) for path, m in nnx.iter_modules(model)
              if isinstance(m, nnx.Embed)]
    named = [p for p in embeds if matches_modules(config.target_modules, p)]
    if named:
        raise LoraError(f"target_modules names the embedding(s) {named}: LoRA on embeddings is "
                        "supported for Linen models (lora_jax.inject / apply), not NNX; drop "
                        "them from target_modules.")


def adaptable(model: nnx.Module) -> dict[str, nnx.Module]:
    """`{dotted path: layer}` for every `nnx.Linear` / `nnx.LinearGeneral` / `nnx.Einsum` of the
    model (an Einsum's string is checked when it is targeted: `layout_of`)."""
    out = {}
    for path, module in nnx.iter_modules(model):
        dotted = ".".join(str(k) for k in path)
        if isinstance(module, (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)):
            out[dotted] = module
    return out


def layout_of(path: str, layer: nnx.Module) -> KernelLayout:
    """How the layer's kernel splits into stacked, input and output axes."""
    shape = tuple(kernel_of(layer).shape)
    if isinstance(layer, nnx.Einsum):
        if layer.einsum_str is None:
            raise LoraError(f"{path}: nnx.Einsum without an einsum_str at construction cannot "
                            "take a LoRA adapter (its axes are unknown until called); exclude "
                            "it (exclude_modules).")
        roles = einsum_roles(layer.einsum_str, path)
        n_stack = len(shape) - len(roles.kernel)
        if n_stack < 0:
            raise LoraError(f"{path}: kernel of shape {shape} has fewer axes than nnx.Einsum "
                            f"{layer.einsum_str!r} names")
        return KernelLayout(n_stack, roles.n_in, len(roles.kernel) - roles.n_in)
    if isinstance(layer, nnx.LinearGeneral):
        if layer.batch_axis:
            raise LoraError(f"{path}: LinearGeneral with batch_axis is not supported by LoRA; "
                            "exclude it (exclude_modules).")
        n_in, n_out = len(layer.in_features), len(layer.out_features)
        return KernelLayout(len(shape) - n_in - n_out, n_in, n_out)
    return default_layout(path, shape)


def layouts(model: nnx.Module) -> dict[str, KernelLayout]:
    """`{dotted path: KernelLayout}` of every adaptable layer: what `import_peft(...,
    layouts=)` needs for `LinearGeneral` kernels (the NNX form of `lora_jax.kernel_layouts`).

    Example:
      >>> tree = lj.import_peft("peft/", lj.nnx.params(model), layouts=lj.nnx.layouts(model))
    """
    return {path: layout_of(path, layer) for path, layer in adaptable(model).items()}


def params(model: nnx.Module) -> Params:
    """The model's parameters (adapters included, `lora_scale` too) as the nested dict, string
    keys, that a Linen model with the same module names has: the form `save_adapter`,
    `export_peft`, `merge` and the other tree functions take.

    Example:
      >>> lj.export_peft("out/peft", lj.nnx.params(model), config)
    """
    state = nnx.state(model, (nnx.Param, LoraScale))
    return _string_keys(nnx.to_pure_dict(state))


def adapters(model: nnx.Module) -> Params:
    """The adapter sub-tree of `params(model)` (`lora_a`, `lora_b`, `lora_scale` leaves): what
    `save_adapter` and `TrainCheckpointer.save(adapters=)` take, and `load` puts back.

    Example:
      >>> ckpt.save(step, adapters=lj.nnx.adapters(model), opt_state=nnx.state(optimizer))
    """
    from lora_jax.partition import lora_params
    return lora_params(params(model))


def load(model: nnx.Module, tree: Mapping) -> nnx.Module:
    """Put the adapters of a Linen-form tree (from `load_adapter` / `import_peft` on
    `params(model)`) into the model, in place: existing adapters are replaced (same shapes),
    missing ones attached; a model adapter the tree lacks is an error.

    Example:
      >>> lj.nnx.load(model, lj.load_adapter("ckpt/adapter", lj.nnx.params(model)))
    """
    refuse_named(tree)
    layers, stored = adaptable(model), modules_of(tree)
    with_adapters = {p: m for p, m in stored.items() if LORA_A in m}
    missing = [p for p, layer in layers.items() if hasattr(layer, LORA_A)
               and p not in with_adapters]
    unknown = [p for p in with_adapters if p not in layers]
    if missing or unknown:
        raise LoraError(f"the tree does not fit the model: adapters in the model but not the "
                        f"tree: {missing[:5]}; in the tree but no such layer: {unknown[:5]}")
    for path, module in with_adapters.items():
        _attach(layers[path], {k: module[k] for k in ADAPTER_LEAVES if k in module})
    return model


def refuse_named(tree: Mapping) -> None:
    """NNX layers hold one adapter each: a tree with several named adapters is refused."""
    from lora_jax.named import adapter_names
    names = adapter_names(tree)
    if len(names) > 1 or (names and names[0] != "default"):
        raise LoraError(f"lora_jax.nnx layers hold one adapter, the tree holds {list(names)}. "
                        "Choose one: lora_jax.named.isolate(tree, name) puts it in the default "
                        "place (or use the Linen path, which runs several by name).")


def merge(model: nnx.Module, *, check_finite_values: bool = True) -> nnx.Module:
    """A plain copy of the model: each kernel `+ scale * A @ B` (float32 math, its own dtype),
    adapters and LoRA classes gone. The model passed in is not changed.

    Example:
      >>> plain = lj.nnx.merge(model)          # runs at the base model's cost
    """
    merged = nnx.clone(model)
    for path, layer in adaptable(merged).items():
        if not hasattr(layer, LORA_A):
            continue
        base = kernel_of(layer)
        module = {"kernel": base, **{k: getattr(layer, k)[...]
                                     for k in ADAPTER_LEAVES if hasattr(layer, k)}}
        kernel = merged_kernel(module)  # a quantised base: dequantised, + delta, in its dtype
        if check_finite_values:
            check_finite({path: kernel}, "lora_jax.nnx.merge")
        layer.kernel.set_value(kernel)
        for name in (*ADAPTER_LEAVES, "lora_dropout"):
            if hasattr(layer, name):
                delattr(layer, name)
        layer.__class__ = plain_class(type(layer), is_quantized(base))
    return merged


def _module_view(layer: nnx.Module) -> dict:
    """The dict `select_targets` reads: the kernel, and the adapters if the layer has them."""
    view = {"kernel": kernel_of(layer)}
    view.update({k: getattr(layer, k)[...] for k in ADAPTER_LEAVES if hasattr(layer, k)})
    return view


def _attach(layer: nnx.Module, leaves: Mapping[str, Any]) -> None:
    """Set (or replace, same shapes) the adapter variables and make the layer a LoRA layer."""
    if LORA_MAGNITUDE in leaves:
        _check_dora_layer(type(layer).__name__, layer)
    for name in ADAPTER_LEAVES:
        if name not in leaves:  # an optional leaf (DoRA's magnitude) this adapter lacks
            continue
        value = jnp.asarray(leaves[name])
        if hasattr(layer, name):
            if getattr(layer, name)[...].shape != value.shape:
                raise LoraError(f"{name} of shape {value.shape} does not fit the layer's "
                                f"{getattr(layer, name)[...].shape}")
            getattr(layer, name)[...] = value.astype(getattr(layer, name)[...].dtype)
        else:
            setattr(layer, name, (LoraScale if name == LORA_SCALE else LoraParam)(value))
    layer.__class__ = lora_class(type(layer))


def _string_keys(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


__all__ = ["LoraParam", "LoraScale", "LoraLinear", "LoraLinearGeneral", "LoraEinsum",
           "EinsumRoles", "einsum_roles", "inject", "adaptable", "lora_class", "plain_class",
           "kernel_of", "is_quantized",
           "layout_of", "layouts", "params", "adapters", "load", "merge"]
