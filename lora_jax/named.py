"""Several named adapters in one tree, side by side under each kernel (PEFT's adapter names).

Layout. The adapter called `"default"` is today's: `lora_a`, `lora_b`, `lora_scale` beside the
kernel, so a tree with one adapter is exactly what `inject` always made. Every other adapter sits
in a sub-dict beside the kernel under its name, with the same leaf names:

    q_proj: {kernel, lora_a, lora_b, lora_scale,                        # "default"
             lora_named: {"b": {lora_a, lora_b, lora_scale},            # "b"
                          "c": {lora_a, lora_b, lora_scale}}}           # "c"

Leaf names are unchanged, so code that decides by a leaf's own name (the optimizer mask,
`freeze_non_adapters`, `sharding.rules`' adapter specs, `lora_params`) treats named adapters as
it treats the default one. A scanned stack keeps its leading layer axis in every adapter.

Which adapters run is an argument, not state: `lora_jax.apply(..., adapters=None)` runs every
adapter in the tree, `adapters=("a", "b")` those (their terms summed, as PEFT's several active
adapters), `adapters=()` none (PEFT's `disable_adapter()`). The selection reaches the one adapter
op (`lora_jax.adapter_op.read_adapter`), so the tensor-parallel layers honour it too.

    names       adapter_names, check_selection, has_named
    transforms  select, delete_adapter, rename_adapter, isolate, put_adapter, strip, via_default
    leaves      filter_adapter_leaves, map_adapter_leaves (a leaf's owning adapter known)
    inject      inject_named (what `inject(..., adapter_name=)` does for a non-default name)

Single-adapter functions (`save_adapter`, `export_peft`, `load_adapter`, `import_peft`) take
`adapter_name=`: they run on a view of the tree in which that adapter is the default one
(`isolate` / `via_default`), so their files are exactly today's.
"""
from __future__ import annotations

import re
import zlib
from typing import Any, Callable, Iterable, Mapping

import jax

from lora_jax.errors import LoraError
from lora_jax.tree import (ADAPTER_LEAVES, DEFAULT_ADAPTER, LORA_A, NAMED, Params,
                           unwrap_variables)

NAME_RE = re.compile(r"[A-Za-z0-9_\-]+")
Leaves = dict[str, Any]  # one adapter's {lora_a, lora_b, lora_scale} in one module


# ---------------------------------------------------------------------------------------------
# one module
# ---------------------------------------------------------------------------------------------

def module_adapters(module: Mapping) -> dict[str, Leaves]:
    """`{adapter name: its leaves}` of one module dict, "default" first.

    Example:
      >>> module_adapters(params["q_proj"])
      {'default': {'lora_a': ..., 'lora_b': ..., 'lora_scale': ...}, 'b': {...}}
    """
    out = {}
    if LORA_A in module:
        out[DEFAULT_ADAPTER] = {k: module[k] for k in ADAPTER_LEAVES if k in module}
    for name, leaves in (module.get(NAMED) or {}).items():
        out[name] = dict(leaves)
    return out


def with_adapters(module: Mapping, adapters: Mapping[str, Leaves]) -> Params:
    """`module` with its adapters replaced by `adapters` (the layout above)."""
    out = {k: v for k, v in module.items() if k not in ADAPTER_LEAVES and k != NAMED}
    out.update(adapters.get(DEFAULT_ADAPTER, {}))
    named = {n: dict(leaves) for n, leaves in adapters.items() if n != DEFAULT_ADAPTER}
    if named:
        out[NAMED] = named
    return out


def _is_module(node: Mapping) -> bool:
    return (("kernel" in node and not isinstance(node["kernel"], Mapping)) or LORA_A in node
            or NAMED in node)


def map_adapter_modules(tree: Mapping, fn: Callable[[str, Params], Params],
                        prefix: str = "") -> Params:
    """Rebuild `tree`, replacing each module (a dict with a kernel or adapters; an adapter tree
    from `lora_params` has no kernels) by `fn(path, module)`; modules left empty are dropped."""
    out = {}
    for key, value in tree.items():
        if not isinstance(value, Mapping) or key == NAMED:
            out[key] = value
            continue
        path = f"{prefix}.{key}" if prefix else str(key)
        new = map_adapter_modules(value, fn, path)
        if _is_module(value):
            new = fn(path, new)
        if new or not value:
            out[key] = new
    return out


def _adapter_modules(tree: Mapping) -> dict[str, dict[str, Leaves]]:
    """`{module path: module_adapters(module)}` for modules holding any adapter."""
    found = {}

    def visit(path: str, module: Params) -> Params:
        if ads := module_adapters(module):
            found[path] = ads
        return module

    map_adapter_modules(tree, visit)
    return found


# ---------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------

def adapter_names(params: Mapping) -> tuple[str, ...]:
    """The names of the adapters in a tree (params, variables or an adapter tree), "default"
    first, then the others sorted.

    Example:
      >>> adapter_names(inject(inject(base, cfg, k1), cfg, k2, adapter_name="b"))
      ('default', 'b')
    """
    tree = unwrap_variables(params)[0]
    names = {n for ads in _adapter_modules(tree).values() for n in ads}
    return tuple(sorted(names, key=lambda n: (n != DEFAULT_ADAPTER, n)))


def has_named(params: Mapping) -> bool:
    """True if any module of the tree holds an adapter other than "default"."""
    return any(n != DEFAULT_ADAPTER for n in adapter_names(params))


def check_name(name: Any) -> str:
    """`name` if it can name an adapter (letters, digits, `_`, `-`: it becomes a dict key, an
    orbax item path and PEFT's subfolder), else a `LoraError`."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise LoraError(f"adapter name {name!r}: use letters, digits, '_' or '-' (it becomes a "
                        "tree key and, for PEFT, a folder name), e.g. 'default' or 'math_v2'.")
    return name


def check_selection(params: Mapping, adapters: str | Iterable[str]) -> tuple[str, ...]:
    """`adapters` as a tuple of names that all exist in the tree, else a `LoraError`.

    Example:
      >>> check_selection(params, "b")
      ('b',)
    """
    chosen = (adapters,) if isinstance(adapters, str) else tuple(adapters)
    present = adapter_names(params)
    unknown = [n for n in chosen if n not in present]
    if unknown:
        raise LoraError(f"adapter(s) {unknown} are not in the tree; it holds {list(present)}. "
                        "Inject them (inject(..., adapter_name=)) or load them first.")
    return chosen


def _require(params: Mapping, name: str) -> None:
    check_selection(params, (name,))


# ---------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------

def _keep_adapters(tree: Mapping, keep: Callable[[str], bool]) -> Params:
    return map_adapter_modules(tree, lambda _, m: with_adapters(
        m, {n: leaves for n, leaves in module_adapters(m).items() if keep(n)}))


def select(params: Mapping, names: str | Iterable[str]) -> Params:
    """The tree with only the adapters in `names` (others dropped), e.g. before `merge`.

    Example:
      >>> only_b = select(params, ("b",))
    """
    tree, rewrap = unwrap_variables(params)
    chosen = check_selection(tree, names)
    return rewrap(_keep_adapters(tree, lambda n: n in chosen))


def delete_adapter(params: Mapping, name: str) -> Params:
    """The tree without adapter `name` (PEFT's `delete_adapter`); the others are untouched.

    Example:
      >>> params = delete_adapter(params, "b")
    """
    tree, rewrap = unwrap_variables(params)
    _require(tree, name)
    return rewrap(_keep_adapters(tree, lambda n: n != name))


def strip(params: Mapping) -> Params:
    """The base tree: every adapter of every name removed."""
    tree, rewrap = unwrap_variables(params)
    return rewrap(_keep_adapters(tree, lambda _: False))


def rename_adapter(params: Mapping, old: str, new: str) -> Params:
    """The tree with adapter `old` called `new` (arrays shared). Renaming to "default" puts its
    leaves beside the kernel; renaming "default" moves them under `lora_named`.

    Example:
      >>> params = rename_adapter(params, "default", "math")
    """
    tree, rewrap = unwrap_variables(params)
    _require(tree, old)
    check_name(new)
    if new != old and new in adapter_names(tree):
        raise LoraError(f"rename_adapter: the tree already holds an adapter {new!r}; delete it "
                        "first or choose another name.")

    def rename(_, module):
        return with_adapters(module, {new if n == old else n: leaves
                                      for n, leaves in module_adapters(module).items()})

    return rewrap(map_adapter_modules(tree, rename))


def isolate(params: Mapping, name: str) -> Params:
    """The tree with adapter `name` as its only adapter, in the "default" place (beside the
    kernel): what single-adapter functions (save, export, merge) read. Arrays are shared.

    Example:
      >>> save_adapter("ckpt/b", isolate(params, "b"), config)
    """
    tree, rewrap = unwrap_variables(params)
    _require(tree, name)

    def view(_, module):
        leaves = module_adapters(module).get(name)
        return with_adapters(module, {DEFAULT_ADAPTER: leaves} if leaves else {})

    return rewrap(map_adapter_modules(tree, view))


def put_adapter(params: Mapping, name: str, adapter: Mapping) -> Params:
    """`params` with adapter `name` replaced by the one default adapter of `adapter` (a tree of
    `lora_a`/`lora_b`/`lora_scale` beside kernels or alone, as `lora_params` gives): its
    modules get it, the others lose `name`.

    Example:
      >>> params = put_adapter(params, "b", lora_params(trained_view))
    """
    tree, rewrap = unwrap_variables(params)
    check_name(name)
    new = {path: ads[DEFAULT_ADAPTER] for path, ads in
           _adapter_modules(unwrap_variables(adapter)[0]).items() if DEFAULT_ADAPTER in ads}
    placed = set()

    def put(path, module):
        ads = {n: leaves for n, leaves in module_adapters(module).items() if n != name}
        if path in new:
            placed.add(path)
            ads[name] = new[path]
        return with_adapters(module, ads)

    out = map_adapter_modules(tree, put)
    if missing := sorted(set(new) - placed):
        raise LoraError(f"put_adapter: modules {missing[:5]} of the adapter are not in the tree.")
    return rewrap(out)


def via_default(params: Mapping, name: str, fn: Callable[[Params], Params]) -> Params:
    """Run a single-adapter transform `fn` (e.g. a loader) on a view in which adapter `name` is
    the default and only adapter (absent if the tree lacks it), and put the default adapter of
    its result back under `name`; the tree's other adapters are untouched.

    Example:
      >>> params = via_default(params, "b", lambda view: load_adapter("ckpt/b", view))
    """
    tree, rewrap = unwrap_variables(params)
    check_name(name)
    view = isolate(tree, name) if name in adapter_names(tree) else strip(tree)
    return rewrap(put_adapter(tree, name, fn(view)))


def one_adapter(params: Mapping, adapter_name: str | None, what: str) -> tuple[str, Params]:
    """`(name, view)` for a function that writes one adapter (`what`: its name, for messages):
    `adapter_name`, or the tree's only adapter when None, and `isolate`'s view of it (the tree
    itself when that adapter is the default one and alone).

    Example:
      >>> name, view = one_adapter(params, "b", "export_peft")
    """
    tree = unwrap_variables(params)[0]
    names = adapter_names(tree)
    if adapter_name is None:
        if len(names) > 1:
            raise LoraError(f"{what}: the tree holds several adapters {list(names)}; pass "
                            "adapter_name= to choose one (export_peft_adapters writes them all "
                            "in PEFT's layout).")
        adapter_name = names[0] if names else DEFAULT_ADAPTER
    if adapter_name == DEFAULT_ADAPTER and names in ((), (DEFAULT_ADAPTER,)):
        return adapter_name, tree  # today's single-adapter tree (or none: the caller says so)
    return adapter_name, isolate(tree, adapter_name)


# ---------------------------------------------------------------------------------------------
# leaves, with the adapter each belongs to
# ---------------------------------------------------------------------------------------------

def map_adapter_leaves(tree: Mapping, fn: Callable[[str, str, Any], Any],
                       owner: str = DEFAULT_ADAPTER) -> Params:
    """`tree` with each leaf replaced by `fn(owner, key, leaf)`: `owner` is the adapter the
    leaf belongs to ("default" for leaves outside `lora_named`, base leaves included: decide
    by `key`).

    Example:
      >>> mask = map_adapter_leaves(params, lambda o, k, _: o == "b" and k in TRAINABLE_LEAVES)
    """
    out = {}
    for key, value in tree.items():
        if key == NAMED and isinstance(value, Mapping):
            out[key] = {n: map_adapter_leaves(sub, fn, n) for n, sub in value.items()}
        elif isinstance(value, Mapping):
            out[key] = map_adapter_leaves(value, fn, owner)
        else:
            out[key] = fn(owner, key, value)
    return out


def filter_adapter_leaves(tree: Mapping, keep: Callable[[str, str], bool],
                          owner: str = DEFAULT_ADAPTER) -> Params:
    """The sub-tree of leaves for which `keep(owner, key)` holds; empty dicts pruned."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            sub = (({n: s for n, v in value.items()
                     if (s := filter_adapter_leaves(v, keep, n))})
                   if key == NAMED else filter_adapter_leaves(value, keep, owner))
            if sub:
                out[key] = sub
        elif keep(owner, key):
            out[key] = value
    return out


def adapter_leaves_of(params: Mapping, name: str) -> Params:
    """The leaves of adapter `name` where they sit in the tree
    (`lora_params(..., adapter_name=)`)."""
    _require(params, name)
    return filter_adapter_leaves(params, lambda o, k: o == name and k in ADAPTER_LEAVES)


# ---------------------------------------------------------------------------------------------
# inject
# ---------------------------------------------------------------------------------------------

def inject_named(params: Mapping, name: str, rng: jax.Array,
                 inject_default: Callable[[Params, jax.Array], Params]) -> Params:
    """Add a new adapter `name` beside the tree's existing ones (`inject(..., adapter_name=)`).

    `inject_default(base_tree, key)` is the ordinary single-adapter inject; it runs on the base
    tree with `key = fold_in(rng, crc32(name))`, so adapters injected with one rng under
    different names start different (as PEFT's successive `add_adapter` calls do), and its new
    leaves are moved under `name`. A name already in the tree is refused, as PEFT refuses it.

    Example:
      >>> params = inject_named(params, "b", key, lambda t, k: inject(t, config, k))
    """
    tree, rewrap = unwrap_variables(params)
    check_name(name)
    if name in adapter_names(tree):
        raise LoraError(f"the tree already holds an adapter named {name!r}; choose another "
                        f"adapter_name, or delete_adapter(params, {name!r}) first.")
    key = jax.random.fold_in(rng, zlib.crc32(name.encode()))
    fresh = inject_default(strip(tree), key)
    new = filter_adapter_leaves(fresh, lambda _, k: k in ADAPTER_LEAVES)
    return rewrap(put_adapter(tree, name, new))


def adapter_paths(params: Mapping, name: str) -> list[str]:
    """Dotted paths of the modules holding adapter `name`."""
    return [p for p, ads in _adapter_modules(unwrap_variables(params)[0]).items() if name in ads]


def iter_adapter_modules(params: Mapping) -> list[tuple[str, dict[str, Leaves], Mapping]]:
    """`(path, module_adapters(module), module)` for every module holding an adapter."""
    found = []

    def visit(path: str, module: Params) -> Params:
        if ads := module_adapters(module):
            found.append((path, ads, module))
        return module

    map_adapter_modules(unwrap_variables(params)[0], visit)
    return found
