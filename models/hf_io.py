"""Hugging Face checkpoint directories <-> (Linen model, params).

A checkpoint directory holds `config.json` and either `model.safetensors` or several shards
listed in `model.safetensors.index.json`. Tensors are read one at a time with the `safetensors`
library (memory-mapped), transposed and cast on the host, and placed on their device(s) before
the next is read, so host memory holds about one tensor (one stacked leaf when layers are
scanned), never a second copy of the model. Nothing is fetched from a hub.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from safetensors import safe_open
from safetensors.numpy import save_file

from models.errors import CheckpointError, CheckpointFileNotFoundError
from models.layout import Family, family, hf_tensor_name, is_transposed
from models.parallel import NoParallelism, Parallelism
from models.quant import is_quantized, quantizable, quantize

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

Params = dict[str, Any]
Shardings = Any  # None | Sharding | Callable[[str, tuple], Sharding | None] | tree of Shardings


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------

def read_config(path: str | os.PathLike) -> dict:
    """The `config.json` of a checkpoint directory, as a dict."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise CheckpointFileNotFoundError(f"{file}: not found; a checkpoint directory needs "
                                          "config.json beside its *.safetensors files")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: holds a JSON {type(config).__name__}, not an object with "
                              "'model_type', 'hidden_size', ...; is it a model's config.json?")
    return config


def config_from_dict(d: Mapping, *, source: str = CONFIG_FILE, **options) -> Any:
    """The family config for an HF config dict; `options` are run-time fields."""
    if "model_type" not in d:
        raise CheckpointError(f"{source}: no 'model_type' field")
    fam = family(d["model_type"])
    try:
        return fam.config_cls.from_hf_dict(d, **options)
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: cannot build a {fam.config_cls.__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------
# The tensors of a checkpoint directory
# ---------------------------------------------------------------------------------------------

class TensorIndex:
    """Where each tensor of a checkpoint lives; opens files lazily, reads one tensor at a time.

    Names are normalised to the full `*ForCausalLM` names (a bare-trunk checkpoint's
    `h.0.attn...` becomes `transformer.h.0.attn...`).
    """

    def __init__(self, directory: Path, locations: dict[str, tuple[Path, str]],
                 stack: contextlib.ExitStack):
        self.directory, self.locations, self._stack = directory, locations, stack
        self._handles: dict[Path, Any] = {}

    @classmethod
    @contextlib.contextmanager
    def open(cls, directory: str | os.PathLike, fam: Family) -> Iterator["TensorIndex"]:
        directory = Path(directory)
        with contextlib.ExitStack() as stack:
            yield cls(directory, _locate(directory, fam, stack), stack)

    def file(self, name: str) -> Path:
        return self.locations[name][0]

    def _handle(self, file: Path):
        if file not in self._handles:
            with _on_host():
                self._handles[file] = self._stack.enter_context(_open(file))
        return self._handles[file]

    def shape(self, name: str) -> tuple[int, ...]:
        file, key = self.locations[name]
        return tuple(self._handle(file).get_slice(key).get_shape())

    def read(self, name: str) -> np.ndarray:
        file, key = self.locations[name]
        with _on_host():
            try:
                return np.asarray(self._handle(file).get_tensor(key))
            except Exception as e:  # safetensors raises its own error types for corrupt data
                raise CheckpointError(f"{file}: cannot read tensor {key!r}: {e}") from e


def _locate(directory: Path, fam: Family, stack) -> dict[str, tuple[Path, str]]:
    """{normalised name: (file, key in file)} from the index, or by listing each file."""
    if not directory.is_dir():
        raise CheckpointFileNotFoundError(f"{directory}: no such checkpoint directory")
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).is_file():
                raise CheckpointFileNotFoundError(
                    f"{directory / shard}: listed in {INDEX_FILE} but not found")
        pairs = [(key, directory / shard) for key, shard in weight_map.items()]
    else:
        files = sorted(directory.glob("*.safetensors"))
        if not files:
            raise CheckpointFileNotFoundError(
                f"{directory}: no {SINGLE_FILE}, {INDEX_FILE} or other *.safetensors file")
        pairs = []
        for file in files:
            with _open(file) as f:
                pairs += [(key, file) for key in f.keys()]
    return {_normalise(fam, key): (file, key) for key, file in pairs}


def _on_host():
    """The flax framework of safetensors reads bfloat16 (the numpy one cannot); pin what it
    returns to the host CPU so a tensor never lands on an accelerator before we cast and place
    it. Without a CPU backend (JAX_PLATFORMS=cuda), the default device serves. A *local* CPU
    device: under jax.distributed, `jax.devices("cpu")[0]` belongs to process 0."""
    try:
        return jax.default_device(jax.local_devices(backend="cpu")[0])
    except RuntimeError:
        return contextlib.nullcontext()


def _open(file: Path):
    try:
        return safe_open(file, "flax")
    except Exception as e:  # a truncated or corrupt file: name it
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); the download or "
                              "copy may be incomplete") from e


def _normalise(fam: Family, key: str) -> str:
    if key.startswith((fam.base_prefix + ".", "lm_head.")):
        return key
    return f"{fam.base_prefix}.{key}"


# ---------------------------------------------------------------------------------------------
# Which tensors make each parameter leaf
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LeafSource:
    """The HF tensors of one parameter leaf: one name, or one per layer for a scanned leaf.

    hf_shape: the shape of each HF tensor (our leaf's shape, per layer, transposed if needed).
    """

    path: tuple[str, ...]
    names: tuple[str, ...]
    stacked: bool
    transposed: bool
    hf_shape: tuple[int, ...]

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def shape(self) -> tuple[int, ...]:
        """Our leaf's shape ([L, ...] when stacked)."""
        own = tuple(reversed(self.hf_shape)) if self.transposed else self.hf_shape
        return (len(self.names), *own) if self.stacked else own


def leaf_sources(model: nn.Module) -> list[LeafSource]:
    """One `LeafSource` per parameter leaf of `model` (from its abstract init, no memory)."""
    config, fam = model.config, family(model)
    container = tuple(fam.container.split("."))
    sources = []
    for path, shape in abstract_shapes(model).items():
        stacked = config.scan_layers and path[:len(container)] == container
        if stacked:
            rest = path[len(container):]
            names = tuple(hf_tensor_name((*container, str(i), *rest))
                          for i in range(config.num_layers))
            shape = shape[1:]
        else:
            names = (hf_tensor_name(path),)
        transposed = is_transposed(fam, path)
        sources.append(LeafSource(path, names, stacked, transposed,
                                  tuple(reversed(shape)) if transposed else tuple(shape)))
    return sources


def abstract_shapes(model: nn.Module) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{param path: shape} of `model`, traced abstractly."""
    ids = jnp.zeros((1, 1), jnp.int32)
    tree = jax.eval_shape(lambda: model.init(jax.random.key(0), ids))["params"]
    return {path: tuple(leaf.shape) for path, leaf in flatten_dict(_as_dict(tree)).items()}


def check_tensors(sources: list[LeafSource], index: TensorIndex, model: nn.Module) -> None:
    """Every needed tensor present with the right shape; no tensor left over."""
    fam = family(model)
    wanted = {name for src in sources for name in src.names}
    missing = sorted(wanted - set(index.locations))
    if missing:
        files = sorted({str(f) for f, _ in index.locations.values()})
        raise CheckpointError(f"{len(missing)} tensor(s) missing from {files}: {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''} (config.json says "
                              f"{model.config.num_layers} layers)")
    ignorable = [re.compile(p) for p in fam.benign_extras]
    if model.config.tie_word_embeddings:
        ignorable.append(re.compile(r"lm_head\.weight"))  # a tied copy some checkpoints keep
    extra = sorted(n for n in set(index.locations) - wanted
                   if not any(p.fullmatch(n) for p in ignorable))
    if extra:
        where = [f"{index.locations[n][1]!r} in {index.file(n)}" for n in extra[:8]]
        raise CheckpointError(f"{len(extra)} unexpected tensor(s) for a {fam.model_type} model "
                              f"of this config: {where}{' ...' if len(extra) > 8 else ''}")
    for src in sources:
        for name in src.names:
            got = index.shape(name)
            if got != src.hf_shape:
                raise CheckpointError(
                    f"{index.file(name)}: tensor {index.locations[name][1]!r} has shape {got}, "
                    f"but {CONFIG_FILE} implies {src.hf_shape} (parameter {src.dotted})")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def load_hf(path: str | os.PathLike, *, dtype: Any = jnp.float32, param_dtype: Any = None,
            scan_layers: bool = False, remat_policy: str = "none",
            attention_impl: str | None = None, base_fp8: bool = False,
            base_fp8_skip: tuple[str, ...] = (), parallel: Parallelism = NoParallelism(),
            shardings: Shardings = None, quantize: str | None = None,
            quant_impl: str = "xla") -> tuple[nn.Module, Params]:
    """Load a local HF checkpoint directory as a Linen model and its params.

    Args:
      path: directory with config.json and model.safetensors (or shards + index).
      dtype: compute dtype; param_dtype: dtype of the loaded params (default: `dtype`).
      scan_layers, remat_policy, attention_impl, base_fp8, base_fp8_skip: run-time options of
        the config (`models.options.RuntimeOptions`; base_fp8: FP8 matmuls for the frozen
        projections, except those named in base_fp8_skip).
      parallel: the `Parallelism` the model builds its projections with.
      quantize: "nf4" | "int8" | "fp8" stores every block projection's kernel quantised
        (`models.quant`, QLoRA's frozen base): each HF tensor (each layer's, when scanned) is
        read, put on its device(s) and quantised there before the next is read, so neither the
        host nor a device holds the whole model in `param_dtype` (`param_dtype` is then the
        dtype the kernels dequantise to).
      quant_impl: how the quantised kernels multiply, "xla" or "pallas" (`RuntimeOptions`).
      shardings: where each leaf goes: None (default device), one `jax.sharding.Sharding`
        for all, a tree of Shardings shaped like the params, or a function
        `(dotted_path, shape) -> Sharding | None`. Each tensor is placed as it is read.

    Returns:
      (model, params) for `model.apply({"params": params}, input_ids)`.

    Example:
      >>> model, params = load_hf("/ckpt/Llama-3.2-1B", dtype=jnp.bfloat16, scan_layers=True)
    """
    config = config_from_dict(read_config(path), source=str(Path(path) / CONFIG_FILE),
                              dtype=dtype, param_dtype=dtype if param_dtype is None
                              else param_dtype, scan_layers=scan_layers,
                              remat_policy=remat_policy, attention_impl=attention_impl,
                              base_fp8=base_fp8, base_fp8_skip=base_fp8_skip,
                              **({"quantize": quantize} if quantize else {}),
                              **({"quant_impl": quant_impl} if quant_impl != "xla" else {}))
    model = family(config).model_cls(config, parallel)
    sources = leaf_sources(model)
    with TensorIndex.open(path, family(config)) as index:
        check_tensors(sources, index, model)
        leaves = {src.path: _load_quantized(src, index, config, shardings)
                  if _is_quantized_leaf(src, config) else
                  _place(_read_leaf(src, index, config.param_dtype), _sharding_for(shardings, src))
                  for src in sources}
    return model, unflatten_dict(leaves)


def _is_quantized_leaf(src: LeafSource, config: Any) -> bool:
    return (getattr(config, "quantize", None) is not None and src.path[-1] == "kernel"
            and quantizable(".".join(src.path[:-1])))


def _load_quantized(src: LeafSource, index: TensorIndex, config: Any, shardings: Shardings):
    """One kernel leaf read tensor by tensor and quantised on its device(s): the host holds one
    layer's tensor at a time, a device one layer's float kernel (a transient of the jitted
    quantisation) beside the quantised leaves."""
    fmt, dtype = config.quantize, jnp.dtype(config.param_dtype)
    one = dataclasses.replace(src, stacked=False)
    # The float layer goes where the plain kernel would (a function or one Sharding); a tree
    # of shardings names the quantised leaves only, so the float stays on the default device.
    float_where = (_sharding_for(shardings, one) if shardings is None or callable(shardings)
                   or isinstance(shardings, jax.sharding.Sharding) else None)
    where = _quantized_shardings(shardings, one, fmt, one.shape, dtype)
    quant = _quantizer(fmt, dtype, where)  # one compile for every layer of this projection
    pieces = []
    for name in src.names:
        host = _read_leaf(dataclasses.replace(one, names=(name,)), index, jnp.float32)
        pieces.append(quant(_place(host, float_where)))
        del host
    if not src.stacked:
        return pieces[0]
    stacked_where = _quantized_shardings(shardings, src, fmt, src.shape, dtype)
    return jax.jit(lambda *p: jax.tree.map(lambda *a: jnp.stack(a), *p),
                   out_shardings=stacked_where)(*pieces)


def _quantizer(fmt: str, dtype: Any, where: Any) -> Callable:
    return jax.jit(lambda w: quantize(w, fmt, dtype=dtype), out_shardings=where)


def _quantized_shardings(shardings: Shardings, src: LeafSource, fmt: str, shape, dtype):
    """The shardings of a quantised kernel's leaves (a tree like it), or None (default device).

    A function `(dotted_path, shape)` is asked for each leaf (`kernel.codes`, ...: the
    partition rules know them); a single Sharding is used for all; a tree must hold the
    quantised kernel's shardings at the kernel's place."""
    if shardings is None:
        return None
    abstract = jax.eval_shape(lambda: quantize(jnp.zeros(shape, jnp.float32), fmt, dtype=dtype))
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda _: shardings, abstract)
    if callable(shardings):
        return jax.tree_util.tree_map_with_path(
            lambda kp, leaf: shardings(
                f"{src.dotted}.{jax.tree_util.keystr(kp, simple=True, separator='.')}",
                tuple(leaf.shape)), abstract)
    return _sharding_for(shardings, src)


def _read_leaf(src: LeafSource, index: TensorIndex, dtype: Any) -> np.ndarray:
    """The leaf on the host in `dtype`: HF tensor(s), transposed to [in, out], stacked."""
    def one(name):
        x = index.read(name)
        return np.ascontiguousarray(x.T if src.transposed else x, dtype=jnp.dtype(dtype))

    if not src.stacked:
        return one(src.names[0])
    first = one(src.names[0])
    out = np.empty((len(src.names), *first.shape), first.dtype)
    out[0] = first
    for i, name in enumerate(src.names[1:], start=1):
        out[i] = one(name)
    return out


def _sharding_for(shardings: Shardings, src: LeafSource):
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return shardings
    if callable(shardings):
        return shardings(src.dotted, src.shape)
    node = shardings
    for key in src.path:
        if not isinstance(node, Mapping) or key not in node:
            raise ValueError(f"shardings tree has no entry for {src.dotted}")
        node = node[key]
    return node


def _place(host: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
        return jnp.asarray(host)
    # Each device copies only its own slice of the host array.
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------

def save_hf(path: str | os.PathLike, model: nn.Module, params: Mapping, *, dtype: Any = None,
            max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> list[Path]:
    """Write `params` as an HF checkpoint directory that transformers loads.

    Args:
      path: the directory (created if needed).
      model: the Linen model the params belong to (its config is written as config.json).
      params: a plain tree (after `lora_jax.merge` if it held adapters), scanned or not.
      dtype: dtype of the written tensors (default: each leaf's own).
      max_shard_bytes: above this, tensors go to several files plus model.safetensors.index.json.
      overwrite: replace an earlier HF model in `path` (config.json and *.safetensors; its
        tokenizer files are kept). A directory holding anything else is refused, and without
        `overwrite` so is any non-empty directory; nothing is touched then.

    Returns:
      The files written.

    Example:
      >>> save_hf("/out/merged", model, lora_jax.merge(params))
    """
    out = Path(path)
    tree = params.get("params", params) if isinstance(params, Mapping) else params
    sources = leaf_sources(model)
    _check_tree(tree, sources)
    _prepare_directory(out, overwrite)
    tensors = [(name, src, i) for src in sources for i, name in enumerate(src.names)]
    shards = _plan_shards(tensors, tree, dtype, max_shard_bytes)
    written = [_write_shard(out / file, group, tree, dtype) for file, group in shards.items()]
    if len(shards) > 1:
        written.append(_write_index(out, shards, tree, dtype))
    torch_dtype = jnp.dtype(dtype or model.config.param_dtype).name
    written.append(_write_json(out / CONFIG_FILE, model.config.to_hf_dict(torch_dtype)))
    return written


def _check_tree(tree: Mapping, sources: list[LeafSource]) -> None:
    have = flatten_dict(_as_dict(tree))
    want = {src.path for src in sources}
    extra, missing = sorted(set(have) - want), sorted(want - set(have))
    if extra or missing:
        hint = (" Adapter leaves: fold them in with lora_jax.merge(params) first."
                if any(p[-1].startswith("lora_") for p in extra) else "")
        raise CheckpointError(f"params do not fit the model: unexpected "
                              f"{['.'.join(p) for p in extra[:6]]}, missing "
                              f"{['.'.join(p) for p in missing[:6]]}.{hint}")


def _as_dict(tree: Mapping) -> dict:
    """Plain nested dicts, which `flatten_dict` walks (it leaves other Mappings whole)."""
    return {k: _as_dict(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


# What an HF model directory may hold besides *.safetensors: overwrite replaces such a directory
# only (the tokenizer files are kept), never one holding anything else.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt")
HF_MODEL_FILES = {CONFIG_FILE, INDEX_FILE, "generation_config.json", "README.md",
                  *TOKENIZER_FILES}


def _prepare_directory(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file; save_hf writes a directory: choose another path")
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if entries and not overwrite:
        raise CheckpointError(f"{out} already holds {entries[:6]}; pass overwrite=True to "
                              "replace an earlier model there, or choose another directory")
    stray = [e for e in entries if e not in HF_MODEL_FILES and not e.endswith(".safetensors")]
    if entries and (stray or not any(e.endswith(".safetensors") for e in entries)):
        what = f"holds {stray[:6]}" if stray else "holds no *.safetensors weights"
        raise CheckpointError(f"refusing to overwrite {out}: it {what}, so it is not an earlier "
                              "Hugging Face model; choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    old = sorted(out.glob("*.safetensors")) + sorted(out.glob(INDEX_FILE))
    for file in old:  # stale shards would shadow or mix with the new ones
        file.unlink()


def _leaf(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _torch_tensor(tree: Mapping, src: LeafSource, layer: int, dtype: Any) -> np.ndarray:
    leaf = _leaf(tree, src.path)
    if is_quantized(leaf):  # a quantised base (not merged): written dequantised, as PEFT does
        leaf = (jax.tree.map(lambda a: a[layer], leaf) if src.stacked else leaf).dequantize()
    elif src.stacked:
        leaf = leaf[layer]
    if not getattr(leaf, "is_fully_addressable", True):
        raise CheckpointError(f"{src.dotted} is not fully addressable by this process; gather "
                              "it (e.g. multihost_utils.process_allgather) before save_hf")
    host = np.asarray(jax.device_get(leaf))
    host = host.T if src.transposed else host
    return np.ascontiguousarray(host, dtype=None if dtype is None else jnp.dtype(dtype))


def _nbytes(tree: Mapping, src: LeafSource, dtype: Any) -> int:
    leaf_dtype = jnp.dtype(dtype) if dtype is not None else _leaf(tree, src.path).dtype
    return int(np.prod(src.hf_shape)) * leaf_dtype.itemsize


def _plan_shards(tensors, tree, dtype, max_bytes) -> dict[str, list]:
    """Greedy, in parameter order: {file name: [(name, src, layer), ...]}."""
    groups, size = [[]], 0
    for item in tensors:
        n = _nbytes(tree, item[1], dtype)
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(item)
        size += n
    if len(groups) == 1:
        return {SINGLE_FILE: groups[0]}
    total = len(groups)
    return {f"model-{i + 1:05d}-of-{total:05d}.safetensors": g for i, g in enumerate(groups)}


def _write_shard(file: Path, group, tree, dtype) -> Path:
    tensors = {name: _torch_tensor(tree, src, layer, dtype) for name, src, layer in group}
    tmp = file.with_suffix(".tmp")
    # transformers refuses safetensors files without format metadata.
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, file)
    return file


def _write_index(out: Path, shards: Mapping[str, list], tree, dtype) -> Path:
    weight_map = {name: file for file, group in shards.items() for name, _, _ in group}
    total = sum(_nbytes(tree, src, dtype) for group in shards.values() for _, src, _ in group)
    return _write_json(out / INDEX_FILE, {"metadata": {"total_size": total},
                                          "weight_map": dict(sorted(weight_map.items()))})


def _write_json(file: Path, data: Any) -> Path:
    tmp = file.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, file)
    return file


def hf_writer(model: nn.Module) -> Callable[[Path, Mapping, Any], list[Path]]:
    """`save_hf` bound to `model`: `writer(directory, params, dtype)`, the form of writer that
    exporters taking one expect (e.g. `lora_jax.export_merged(..., write_hf=)`).

    Example:
      >>> hf_writer(model)("/out/hf", params, "bfloat16")
    """
    def write(directory: Path, params: Mapping, dtype: Any = None) -> list[Path]:
        return save_hf(directory, model, params, dtype=dtype)

    return write


def shard_names(path: str | os.PathLike) -> list[str]:
    """The safetensors files of a checkpoint directory (index order, else sorted)."""
    index = Path(path) / INDEX_FILE
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return sorted(p.name for p in Path(path).glob("*.safetensors"))

