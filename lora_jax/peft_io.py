"""Hugging Face PEFT interop: `export_peft` / `import_peft` (`adapter_model.safetensors` +
`adapter_config.json`, loadable by `peft.PeftModel.from_pretrained` and vLLM).

Layout. PEFT keeps, per adapted torch module `<name>` (`model.layers.0.self_attn.q_proj`):

    base_model.model.<name>.lora_A.weight   [r, in]    = our lora_a.T   (lora_a [in, r])
    base_model.model.<name>.lora_B.weight   [out, r]   = our lora_b.T   (lora_b [r, out])

also for GPT-2's `Conv1D` modules (PEFT wraps them with nn.Linear A/B in this layout and records
`fan_in_fan_out: true`, which only changes how it merges). A scanned stack `[L, ...]` becomes L
per-layer keys `<container>.<i>.<rest>` and is restacked on import. DenseGeneral adapters are
flattened to 2-D (`[*in, r]` -> `[prod(in), r]`).

Scale. Our tree stores each adapter's scale; PEFT derives it from `r` and `lora_alpha` (per module
through `rank_pattern` / `alpha_pattern`). Export chooses, per module, the alpha whose
`alpha / r` (`alpha / sqrt(r)` with rsLoRA) rounds to the stored float32 scale exactly, preferring
the given `LoraConfig`'s alpha; the most common (r, alpha) becomes the default and the rest go to
the patterns, keyed by the shortest name suffixes that match exactly the intended modules.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from lora_jax import atomic, hf_names, inits, named, outputs
from lora_jax.config import LoraConfig
from lora_jax.errors import LoraError
from lora_jax.finite import check_finite
from lora_jax.layout import KernelLayout, default_layout
from lora_jax.partition import combine
from lora_jax.placement import Shardings, adapter_sharding
from lora_jax.tree import ADAPTER_LEAVES, LORA_A, LORA_B, LORA_SCALE, Params, filter_leaves
from lora_jax.tree import DEFAULT_ADAPTER, host_array, modules_of, nest, unwrap_variables
from lora_jax import peft_targets
from lora_jax.saved import MODULE_LEAVES
from lora_jax.tree import SAVED_PREFIX, is_embedding, is_saved_leaf, iter_modules
from lora_jax.tree import LORA_MAGNITUDE

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")
# PEFT options whose adapters are not plain LoRA on Linear weights (or that change the base).
UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)", "modules_to_save": "modules_to_save (fully "
    "trained extra modules)", "lora_bias": "LoRA bias terms", "layer_replication":
    "layer_replication", "trainable_token_indices": "trainable tokens (embedding rows)",
    "target_parameters": "target_parameters (adapters on raw parameters)", "use_qalora":
    "QA-LoRA", "alora_invocation_tokens": "activated LoRA", "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing", "kasa_config": "KaSA", "monteclora_config": "MonteCLoRA",
}
# modules_to_save loads now (lora_jax.saved, lora_jax.peft_targets); kept as its own line so the
# table above stays as it was.
UNSUPPORTED.pop("modules_to_save", None)
# Initialisations after which the adapter is only right on a *changed* base (PEFT stores the base
# change separately or expects a conversion): loading them onto the original base is wrong.
BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda", "lora_ga")
# DoRA loads and saves (`lora_jax.dora`): its magnitude is `<module>.lora_magnitude_vector [out]`.
UNSUPPORTED.pop("use_dora")
MAGNITUDE_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_magnitude_vector")


@dataclasses.dataclass(frozen=True)
class TorchAdapter:
    """One torch module's adapter: `a [r, in]`, `b [out, r]` (PyTorch layout) and its scale."""

    name: str
    a: np.ndarray
    b: np.ndarray
    scale: np.float32
    magnitude: np.ndarray | None = None  # DoRA's [out]

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def export_peft(path: str | Path, params: Mapping, config: LoraConfig | None = None, *,
                base_model_name_or_path: str | None = None, task_type: str = "CAUSAL_LM",
                layer_container: str | None = None, fan_in_fan_out: bool = False,
                uniform_scale: bool = False, overwrite: bool = False,
                allow_non_finite: bool = False, adapter_name: str | None = None,
                initial_adapters: Mapping | None = None) -> Path:
    """Write the adapters of `params` as a PEFT LoRA adapter directory, atomically.

    Args:
      path: output directory (`adapter_model.safetensors`, `adapter_config.json`).
      params: injected params or variables (scanned or not; may be sharded).
      config: the `LoraConfig` used; supplies `lora_dropout`, `use_rslora` and the preferred
        alphas. Without it: no rsLoRA, alpha = scale * r.
      base_model_name_or_path: recorded in the config (PEFT and vLLM read it).
      task_type: PEFT task type ("CAUSAL_LM").
      layer_container: path of the scanned layer stack (`models.layer_container(params)`);
        needed only for a scanned tree: lora_jax knows no model family.
      fan_in_fan_out: recorded in the config; True for models whose HF modules are `Conv1D`
        (GPT-2: `models.family(model).conv1d_prefix` is set), as PEFT itself records it. PEFT
        loads either way (it corrects the flag for Conv1D with a warning).
      uniform_scale: fold per-module scale differences into `lora_B` so that the global
        `lora_alpha / r` is every module's scale. Only for older vLLM releases, which ignore
        `rank_pattern`/`alpha_pattern`, when ranks or alphas differ between modules; vLLM 0.32
        applies the patterns per module as PEFT does (`examples/serve_vllm.md`).
      overwrite: replace an earlier PEFT adapter at `path` (anything else there is refused:
        `lora_jax.outputs.check_destination`).
      allow_non_finite: write adapters holding NaN/inf (refused by default).
      adapter_name: which named adapter to write (`lora_jax.named`), in `path` itself (PEFT's
        `load_adapter(path, adapter_name=...)` reads it); None: the tree's only adapter.
        `export_peft_adapters` writes several in PEFT's `save_pretrained` layout.
      initial_adapters: for a PiSSA / OLoRA run (`init_lora_weights` "pissa", "pissa_niter_K",
        "olora"), `lora_params` of the tree right after `inject`: the adapter is then written as
        plain LoRA of rank 2r for the ORIGINAL base, its config rewritten as PEFT's
        `path_initial_model_for_weight_conversion` does (`lora_jax.inits`). Such a run's adapter
        without them is refused (it is only right over the residual base).

    Returns:
      The absolute output path.

    Example:
      >>> export_peft("out/peft", params, config, base_model_name_or_path="meta-llama/Llama-3.2-1B")
      >>> # torch: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(...), "out/peft")
    """
    outputs.check_destination(path, outputs.PEFT, overwrite=overwrite)
    params, config = inits.for_export(params, config, initial_adapters)
    tree = named.one_adapter(params, adapter_name, "export_peft")[1]
    if not allow_non_finite:
        check_finite(filter_leaves(tree, lambda key: key in ADAPTER_LEAVES), "export_peft")
    adapters = torch_adapters(tree, layer_container)
    if not adapters:
        raise LoraError("export_peft: the tree holds no adapters; pass the injected params.")
    rslora = bool(config and config.use_rslora)
    use_dora = any(ad.magnitude is not None for ad in adapters)
    if use_dora and uniform_scale:
        raise LoraError("export_peft(uniform_scale=True) prepares an adapter for vLLM, and vLLM "
                        "cannot serve DoRA adapters (it has no magnitude vector). Serve the "
                        "merged model instead (lora_jax.export_merged / --export-merged), or "
                        "export without uniform_scale for PEFT.")
    if uniform_scale:
        adapters = _fold_scales(adapters)
    alphas = {ad.name: alpha_for(ad, rslora, config) for ad in adapters}
    universe = all_module_names(tree, layer_container)
    universe += [p for p in peft_targets.embedding_paths(tree) if p not in universe]
    peft_config = build_config(adapters, alphas, universe, config, rslora=rslora,
                               fan_in_fan_out=fan_in_fan_out, task_type=task_type,
                               base_model_name_or_path=base_model_name_or_path,
                               max_rank_default=uniform_scale)
    tensors = {}
    for ad in adapters:
        tensors[f"{PREFIX}{ad.name}.lora_A.weight"] = np.ascontiguousarray(ad.a)
        tensors[f"{PREFIX}{ad.name}.lora_B.weight"] = np.ascontiguousarray(ad.b)
        if ad.magnitude is not None:
            tensors[f"{PREFIX}{ad.name}.lora_magnitude_vector"] = np.ascontiguousarray(
                ad.magnitude)
    if use_dora:
        _check_all_dora(adapters)
        peft_config["use_dora"] = True
    _add_extra_targets(tensors, peft_config, adapters, tree, config, fan_in_fan_out)

    def write(tmp: Path) -> None:
        if atomic.is_primary():
            tmp.mkdir(parents=True)
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            (tmp / CONFIG_FILE).write_text(json.dumps(peft_config, indent=2, sort_keys=True))

    return atomic.atomic_directory(path, write, overwrite=overwrite, kind=outputs.PEFT)


def _add_extra_targets(tensors: dict, peft_config: dict, adapters: list[TorchAdapter],
                       tree: Mapping, config: LoraConfig | None, fan_in_fan_out: bool) -> None:
    """Embedding adapters under PEFT's `lora_embedding_A/B` keys; `modules_to_save` copies under
    `<name>.weight` / `.bias` and in the config (`peft_targets`)."""
    embeds = set(peft_targets.embedding_paths(tree))
    for ad in adapters:
        if ad.name in embeds:
            del tensors[f"{PREFIX}{ad.name}.lora_A.weight"], tensors[f"{PREFIX}{ad.name}.lora_B.weight"]
            tensors.update(peft_targets.embedding_tensors(ad.name, ad.a, ad.b))
    heads = tuple(config.output_head_names) if config else ("lm_head",)
    saved, names = peft_targets.saved_tensors(tree, fan_in_fan_out=fan_in_fan_out,
                                              head_names=heads)
    tensors.update(saved)
    peft_config["modules_to_save"] = names or None
    peft_config["ensure_weight_tying"] = bool(config and config.ensure_weight_tying)
    if peft_config["ensure_weight_tying"]:
        # PEFT ties the head to a saved embedding's copy and loads it under the head's name.
        for name in (n for n in names if n in embeds):
            tensors[f"{PREFIX}{heads[0]}.weight"] = tensors[f"{PREFIX}{name}.weight"]


def torch_adapters(tree: Mapping, container: str | None) -> list[TorchAdapter]:
    """Every adapter of the tree as per-torch-module `TorchAdapter`s (stacks unstacked)."""
    out = []
    for path, module in modules_of(tree).items():
        if LORA_A not in module:
            continue
        a, b, scale = (host_array(module[k]) for k in (LORA_A, LORA_B, LORA_SCALE))
        mag = host_array(module[LORA_MAGNITUDE]) if LORA_MAGNITUDE in module else None
        if scale.ndim > 1:
            raise LoraError(f"{path}: adapters with {scale.ndim} stacked axes (nested scans) "
                            "have no PEFT equivalent; unscan the model first.")
        names = hf_names.hf_names(path, scale.shape[0] if scale.ndim else None, container)
        if scale.ndim == 0:
            a, b, scale = a[None], b[None], scale[None]
            mag = None if mag is None else mag[None]
        for i, name in enumerate(names):
            rank = a.shape[-1]
            out.append(TorchAdapter(name, a[i].reshape(-1, rank).T.astype(_io_dtype(a)),
                                    b[i].reshape(rank, -1).T.astype(_io_dtype(b)),
                                    np.float32(scale[i]),
                                    None if mag is None else mag[i].reshape(-1).astype(
                                        _io_dtype(mag))))
    return out


def _check_all_dora(adapters: list[TorchAdapter]) -> None:
    """PEFT's `use_dora` is one flag for the whole adapter: every module has a magnitude or none."""
    plain = [ad.name for ad in adapters if ad.magnitude is None]
    if plain:
        raise LoraError(f"export_peft: some modules carry DoRA magnitudes and these do not: "
                        f"{plain[:5]}; PEFT's use_dora applies to every module. Inject all of "
                        "them with the same LoraConfig(use_dora=...).")


def _io_dtype(x: np.ndarray) -> np.dtype:
    # numpy-native float dtypes are written as they are; bfloat16 etc. as float32 (exact).
    return x.dtype if x.dtype in (np.float16, np.float32, np.float64) else np.dtype(np.float32)


def alpha_for(ad: TorchAdapter, rslora: bool, config: LoraConfig | None) -> float:
    """An alpha whose `alpha / r` (`/ sqrt(r)` with rsLoRA) rounds to `ad.scale` in float32:
    the config's alpha for this module if it does, else `scale * r` (exact in float64)."""
    denominator = math.sqrt(ad.rank) if rslora else ad.rank
    candidates = []
    if config is not None and config.rank_for(ad.name) == ad.rank:
        candidates.append(float(config.alpha_for(ad.name)))
    candidates.append(float(ad.scale) * denominator)
    for alpha in candidates:
        if np.float32(alpha / denominator) == ad.scale:
            return int(alpha) if alpha.is_integer() else alpha
    raise LoraError(f"{ad.name}: no alpha reproduces scale {float(ad.scale)!r} at rank "
                    f"{ad.rank}; the scale leaf is not finite?")


def _fold_scales(adapters: list[TorchAdapter]) -> list[TorchAdapter]:
    """Make every scale the most common one by rescaling B (for readers without patterns)."""
    common = collections.Counter(float(ad.scale) for ad in adapters).most_common(1)[0][0]
    common = np.float32(common)
    return [dataclasses.replace(ad, b=(ad.b * (ad.scale / common)).astype(ad.b.dtype),
                                scale=common) for ad in adapters]


def all_module_names(tree: Mapping, container: str | None) -> list[str]:
    """HF names of every kernel module of the tree (the universe targets are chosen from)."""
    names = []
    for path, module in modules_of(tree).items():
        if "kernel" not in module and LORA_A not in module:
            continue
        scale = module.get(LORA_SCALE)
        if scale is not None:
            stacked = np.ndim(scale) == 1
            n_layers = np.shape(scale)[0] if stacked else None
        else:
            stacked = container is not None and path.startswith(container + ".")
            n_layers = np.shape(module["kernel"])[0] if stacked else None
        names += hf_names.hf_names(path, n_layers, container)
    return names


def build_config(adapters: list[TorchAdapter], alphas: Mapping[str, float], universe: list[str],
                 config: LoraConfig | None, *, rslora: bool, fan_in_fan_out: bool,
                 task_type: str, base_model_name_or_path: str | None,
                 max_rank_default: bool = False) -> dict:
    """The `adapter_config.json` dict: defaults from the most common (r, alpha) (or the
    largest rank's, so that vLLM's `max_lora_rank` check on `r` covers every module), patterns
    for the rest, and only fields PEFT and vLLM understand."""
    pairs = collections.Counter((ad.rank, alphas[ad.name]) for ad in adapters)
    r, alpha = (max(pairs) if max_rank_default else pairs.most_common(1)[0][0])
    names = [ad.name for ad in adapters]
    rank_of = {ad.name: ad.rank for ad in adapters}
    return {
        "peft_type": "LORA", "task_type": task_type, "r": r, "lora_alpha": alpha,
        "target_modules": hf_names.target_keys(names, universe),
        "rank_pattern": _patterns(rank_of, r, names),
        "alpha_pattern": _patterns(alphas, alpha, names),
        "lora_dropout": config.lora_dropout if config else 0.0, "use_rslora": rslora,
        "fan_in_fan_out": fan_in_fan_out, "bias": "none", "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
        "base_model_name_or_path": base_model_name_or_path, "revision": None,
    }


def _patterns(values: Mapping[str, Any], default: Any, names: list[str]) -> dict[str, Any]:
    out = {}
    for value in sorted({v for v in values.values() if v != default}):
        chosen = [n for n in names if values[n] == value]
        out.update({key: value for key in hf_names.pattern_keys(chosen, names)})
    return out


# ---------------------------------------------------------------------------------------------
# import
# ---------------------------------------------------------------------------------------------

def import_peft(path: str | Path, params: Mapping, *, layer_container: str | None = None,
                layouts: Mapping[str, KernelLayout] | None = None,
                adapter_dtype: str = "float32", shardings: Shardings = None,
                adapter_name: str | None = None) -> Params:
    """Load a PEFT LoRA adapter directory into `params` (a base tree, or one with adapters).

    Per-layer keys are restacked for scanned trees. Each adapter's scale is PEFT's: `alpha / r`
    (or `/ sqrt(r)`), per module via `rank_pattern` / `alpha_pattern`. Unsupported PEFT features
    (DoRA, modules_to_save, bias, embeddings, ...) and adapters that do not fit `params` raise
    `LoraError` naming each problem; nothing is returned half-loaded.

    Args:
      path: a PEFT adapter directory (`adapter_config.json`, `adapter_model.safetensors`).
      params: params or variables; returned in the same form, adapters in place.
      layer_container: unused for unscanned trees; for scanned trees only needed to disambiguate.
      layouts: `kernel_layouts(...)` for DenseGeneral kernels (2-D/3-D Dense need none).
      adapter_dtype: dtype of new adapter leaves (existing leaves keep theirs).
      shardings: where the adapter leaves go, as in `load_adapter` (a tree, one Sharding or a
        function `(dotted_path, shape) -> Sharding`); default: an existing adapter leaf's
        sharding, else replicated over its kernel's devices.
      adapter_name: the name the adapter gets in the tree (`lora_jax.named`; an adapter of that
        name is replaced, the others kept); None: "default". `import_peft_adapters` reads a
        directory of several in PEFT's `save_pretrained` layout.

    Returns:
      `params` with the adapter leaves (`lora_a`, `lora_b`, `lora_scale`).

    Example:
      >>> params = import_peft("peft_adapter/", base_params)
      >>> logits = lora_jax.apply(model, {"params": params}, tokens)
    """
    if (adapter_name or DEFAULT_ADAPTER) != DEFAULT_ADAPTER or named.has_named(params):
        return named.via_default(params, adapter_name or DEFAULT_ADAPTER, lambda view: import_peft(
            path, view, layer_container=layer_container, layouts=layouts,
            adapter_dtype=adapter_dtype, shardings=shardings))
    path = Path(path)
    peft = read_peft_config(path)
    tensors = _read_weights(path)
    tensors, extra = peft_targets.split_tensors(tensors, peft.get("modules_to_save"))
    if peft.get("ensure_weight_tying"):
        peft_targets.drop_tied_heads(tensors, extra)
    pairs = _pair_keys(tensors, path)
    tree, rewrap = unwrap_variables(params)
    modules = modules_of(tree)
    placed = _place_names(pairs, modules, layer_container, path)
    leaves, problems = {}, []
    for tree_path, layers in placed.items():
        built = _module_leaves(tree_path, layers, pairs, peft, modules[tree_path], layouts,
                               adapter_dtype, shardings)
        if isinstance(built, str):
            problems.append(built)
        else:
            leaves[tree_path] = built
    placed.update(_extra_leaves(extra, peft, tree, leaves, problems, adapter_dtype, shardings))
    problems += [f"{p}: the model has an adapter here, the PEFT adapter has none"
                 for p, m in modules.items() if LORA_A in m and p not in placed]
    problems += _replaced_shapes(leaves, modules)
    if problems:
        raise LoraError(f"the PEFT adapter at {path} (base model "
                        f"{peft.get('base_model_name_or_path')!r}) does not fit this model:\n  - "
                        + "\n  - ".join(problems) + "\nLoad it into the model it was trained for.")
    base = filter_leaves(tree, lambda key: key not in ADAPTER_LEAVES)
    return rewrap(combine(base, nest(leaves)))


def _extra_leaves(extra: "peft_targets.ExtraTensors", peft: Mapping, tree: Mapping,
                  leaves: dict, problems: list, adapter_dtype: str,
                  shardings: Shardings) -> dict[str, dict[None, str]]:
    """Build the embedding adapters and `modules_to_save` copies of a PEFT file into `leaves`
    (problems into `problems`); return them as `placed` entries."""
    modules = dict(iter_modules(tree, leaves=MODULE_LEAVES))
    problems += peft_targets.check_base_tables(extra.base_tables, modules)
    placed = {}
    for name, ab in extra.embeddings.items():
        module = modules.get(name)
        if module is None or not is_embedding(module):
            problems.append(f"{name}: the PEFT adapter has an embedding adapter here, the model "
                            "has no embedding table of that name")
            continue
        built = peft_targets.embedding_leaves(name, ab, module, _peft_scale(
            peft, name, ab["A"].shape[0] if "A" in ab else None))
        if isinstance(built, str):
            problems.append(built)
            continue
        leaves[name] = _place_leaves(name, module, built, adapter_dtype, shardings)
        placed[name] = {None: name}
    for name, torch_leaves in extra.saved.items():
        module = modules.get(name)
        built = (f"{name}: modules_to_save names it, the model has no such module"
                 if module is None else peft_targets.saved_leaves_from(name, torch_leaves, module))
        if isinstance(built, str):
            problems.append(built)
            continue
        leaves[name] = {leaf: _place_array(module, leaf, name, np.asarray(
            value, np.dtype(module[leaf[len(SAVED_PREFIX):]].dtype)), shardings)
            for leaf, value in built.items()}
    problems += [f"{p}: the model has a modules_to_save copy here, the PEFT adapter has none"
                 for p, m in modules.items()
                 if any(map(is_saved_leaf, m)) and p not in extra.saved]
    return placed


def _place_array(module: Mapping, leaf: str, path: str, value: np.ndarray,
                 shardings: Shardings) -> jax.Array:
    sharding = adapter_sharding(module, leaf, path, value.shape, shardings)
    return jax.make_array_from_callback(value.shape, sharding, lambda i, v=value: v[i])


def _replaced_shapes(leaves: Mapping[str, Mapping], modules: Mapping[str, Mapping]) -> list[str]:
    """Adapters already in the tree may be replaced only by ones of the same shapes, as
    `load_adapter` requires (a different rank is a different adapter: inject into the base)."""
    problems = []
    for path, new in leaves.items():
        for leaf in (LORA_A, LORA_B):
            if leaf in modules.get(path, {}) and np.shape(modules[path][leaf]) != np.shape(new[leaf]):
                problems.append(f"{path}.{leaf}: the model's adapter has shape "
                                f"{list(np.shape(modules[path][leaf]))}, the PEFT adapter "
                                f"{list(np.shape(new[leaf]))} (load into the base tree, "
                                "lora_jax.split(params)[0], to replace it)")
    return problems


def read_peft_config(path: str | Path) -> dict:
    """`adapter_config.json` as a dict, after checking it describes plain LoRA we support."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise LoraError(f"{file} not found: a PEFT adapter directory holds {CONFIG_FILE} and "
                        f"{WEIGHTS_FILE} (save it with PeftModel.save_pretrained).")
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise LoraError(f"{file} is not UTF-8 text ({err.reason} at byte {err.start}); the file "
                        "is corrupt or not an adapter config.") from err
    except json.JSONDecodeError as err:
        raise LoraError(f"{file} is not valid JSON ({err}); the file is corrupt.") from err
    _check_config_fields(cfg, file)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoraError(f"{file}: peft_type {cfg.get('peft_type')!r}; only LORA adapters load.")
    unsupported = [label for key, label in UNSUPPORTED.items() if cfg.get(key)]
    if cfg.get("bias", "none") != "none":
        unsupported.append(f"bias={cfg['bias']!r} (trained biases)")
    init = str(cfg.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_CHANGING_INITS):
        unsupported.append(f"init_lora_weights={cfg['init_lora_weights']!r} (it also changes the "
                           "base weights; convert it to plain LoRA with PEFT's "
                           "path_initial_model_for_weight_conversion first)")
    if unsupported:
        raise LoraError(f"{file} uses PEFT features lora_jax does not support: "
                        f"{', '.join(unsupported)}. Retrain or convert to a plain LoRA adapter "
                        "(linear layers only, bias='none').")
    return cfg


def check_vllm_servable(path: str | Path) -> None:
    """Raise `LoraError` if vLLM cannot serve the PEFT adapter at `path` as an adapter: DoRA
    (vLLM has no magnitude vector; its LoRA kernels add `x A B` only). Serve the merged model.

    Example:
      >>> check_vllm_servable("runs/x/peft")    # before `vllm serve ... --lora-modules`
    """
    cfg = read_peft_config(path)
    if cfg.get("use_dora"):
        raise LoraError(f"{Path(path) / CONFIG_FILE} is a DoRA adapter (use_dora: true): vLLM "
                        "cannot serve DoRA adapters. Serve the merged model instead "
                        "(lora_jax.export_merged, or the CLI's --export-merged), which folds "
                        "the magnitude into the kernels.")


def _check_config_fields(cfg: Any, file: Path) -> None:
    """The fields lora_jax reads must be there with usable types (PEFT always writes them)."""
    if not isinstance(cfg, dict):
        raise LoraError(f"{file} holds a JSON {type(cfg).__name__}, not an object; a PEFT adapter "
                        "config is a JSON object with 'r', 'lora_alpha', 'target_modules', ...")
    missing = [key for key in ("r", "lora_alpha") if key not in cfg]
    if missing:
        raise LoraError(f"{file} lacks {', '.join(map(repr, missing))}; lora_jax needs the rank "
                        "and alpha to compute each module's scale. Add them or re-save the "
                        "adapter with PEFT.")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise LoraError(f"{file}: {key!r} must be an object of {{pattern: value}}, got "
                            f"{type(cfg[key]).__name__}.")
    try:
        _peft_scale(cfg, "x", None)
    except LoraError as err:
        raise LoraError(f"{file}: {err}") from err


def peft_lora_config(path: str | Path) -> LoraConfig:
    """A `LoraConfig` equivalent to a PEFT adapter's config (for `apply`'s dropout, re-export).

    Example:
      >>> config = peft_lora_config("peft_adapter/")
    """
    cfg = read_peft_config(path)
    return LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"],
                      modules_to_save=cfg.get("modules_to_save"),
                      ensure_weight_tying=bool(cfg.get("ensure_weight_tying", False)),
                      lora_dropout=cfg.get("lora_dropout", 0.0),
                      target_modules=cfg["target_modules"],
                      exclude_modules=cfg.get("exclude_modules"),
                      use_rslora=cfg.get("use_rslora", False),
                      rank_pattern=cfg.get("rank_pattern") or {},
                      alpha_pattern=cfg.get("alpha_pattern") or {},
                      use_dora=bool(cfg.get("use_dora", False)))


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    file = path / WEIGHTS_FILE
    if not file.is_file():
        other = sorted(p.name for p in path.glob("adapter_model.*"))
        hint = f" (found {other}: re-save with safe_serialization=True)" if other else ""
        raise LoraError(f"{file} not found{hint}.")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraError(f"{file} is not a readable safetensors file ({err}); it is truncated or "
                        "corrupt.") from err


def _pair_keys(tensors: Mapping[str, np.ndarray], path: Path) -> dict[str, dict[str, np.ndarray]]:
    """`{torch module name: {"A": [r, in], "B": [out, r]}}`; anything else is an error."""
    pairs: dict[str, dict[str, np.ndarray]] = collections.defaultdict(dict)
    unknown = []
    for key, value in tensors.items():
        mag = MAGNITUDE_KEY.fullmatch(key)
        if mag is not None and value.ndim == 1:
            pairs[mag["module"]]["M"] = value
            continue
        m = KEY.fullmatch(key)
        if m is None or value.ndim != 2:
            unknown.append(key)
        else:
            pairs[m["module"]][m["ab"]] = value
    if unknown:
        kinds = ("embedding adapters" if any("lora_embedding" in k for k in unknown)
                 else "tensors that are not 2-D lora_A/lora_B weights of Linear layers")
        raise LoraError(f"{path / WEIGHTS_FILE} holds {kinds}: {sorted(unknown)[:6]}. lora_jax "
                        "loads LoRA on Linear (Dense) layers only.")
    for name, ab in pairs.items():
        if set(ab) - {"M"} != {"A", "B"} or ab["A"].shape[0] != ab["B"].shape[1]:
            raise LoraError(f"{path / WEIGHTS_FILE}: module {name!r} has "
                            f"{ {k: v.shape for k, v in ab.items()} }; expected lora_A [r, in] "
                            "and lora_B [out, r].")
    return dict(pairs)


def _place_names(pairs: Mapping, modules: Mapping[str, Mapping], container: str | None,
                 path: Path) -> dict[str, dict[int | None, str]]:
    """`{tree module path: {layer index or None: torch module name}}`."""
    kernels = {p for p, m in modules.items() if "kernel" in m or LORA_A in m}
    placed: dict[str, dict[int | None, str]] = collections.defaultdict(dict)
    missing = []
    for name in pairs:
        where = hf_names.split_layer_name(name, kernels)
        if where is None:
            missing.append(name)
        elif container and where[1] is not None and not name.startswith(container + "."):
            missing.append(f"{name} (not under layer container {container!r})")
        else:
            placed[where[0]][where[1]] = name
    if missing:
        raise LoraError(f"the PEFT adapter at {path} targets modules this model does not have as "
                        f"Dense layers: {missing[:6]}. Model modules: {sorted(kernels)[:12]}"
                        f"{' ...' if len(kernels) > 12 else ''}")
    return dict(placed)


def _module_leaves(tree_path: str, layers: Mapping[int | None, str], pairs: Mapping,
                   peft: Mapping, module: Mapping, layouts, adapter_dtype: str,
                   shardings: Shardings = None) -> dict | str:
    """The three leaves of one tree module, or a one-line problem description."""
    stacked = None not in layers
    kernel_shape = _kernel_shape(module)
    layout = _layout(tree_path, module, kernel_shape, layouts, stacked)
    stack, ins, outs = layout.split(kernel_shape)
    if stacked and sorted(layers) != list(range(stack[0] if stack else 0)):
        return (f"{tree_path}: the PEFT adapter covers layers {sorted(layers)} of a scanned stack "
                f"of {stack[0] if stack else 0}; load it into an unscanned model instead")
    names = [layers[i] for i in sorted(layers)] if stacked else [layers[None]]
    ranks = {pairs[n]["A"].shape[0] for n in names}
    if len(ranks) > 1:
        return (f"{tree_path}: ranks {sorted(ranks)} differ between layers; a scanned stack needs "
                "one rank, load it into an unscanned model")
    rank = ranks.pop()
    want_a, want_b = (rank, math.prod(ins)), (math.prod(outs), rank)
    for n in names:
        if pairs[n]["A"].shape != want_a or pairs[n]["B"].shape != want_b:
            return (f"{n}: lora_A {list(pairs[n]['A'].shape)} / lora_B {list(pairs[n]['B'].shape)}"
                    f" do not fit the model's kernel {list(kernel_shape)} (expected lora_A "
                    f"{list(want_a)}, lora_B {list(want_b)})")
    a = np.stack([pairs[n]["A"].T.reshape(*ins, rank) for n in names])
    b = np.stack([pairs[n]["B"].T.reshape(rank, *outs) for n in names])
    scale = np.array([_peft_scale(peft, n, rank) for n in names], np.float32)
    host = {LORA_A: a, LORA_B: b, LORA_SCALE: scale}
    magnitude = _magnitudes(names, pairs, peft, outs)
    if isinstance(magnitude, str):
        return magnitude
    if magnitude is not None:
        host[LORA_MAGNITUDE] = magnitude
    if not stacked:
        host = {k: v[0] for k, v in host.items()}
    return _place_leaves(tree_path, module, host, adapter_dtype, shardings)


def _magnitudes(names: list[str], pairs: Mapping, peft: Mapping,
                outs: tuple[int, ...]) -> np.ndarray | str | None:
    """DoRA's magnitudes of the layers `names`, stacked `[L, *out]`; None for plain LoRA; a
    one-line problem when the file and `use_dora` disagree or a shape does not fit."""
    have = [n for n in names if "M" in pairs[n]]
    if not peft.get("use_dora"):
        return (f"{have[0]}: the file holds a lora_magnitude_vector but adapter_config.json has "
                "no use_dora: true; the files do not belong together") if have else None
    if len(have) != len(names):
        missing = [n for n in names if "M" not in pairs[n]]
        return (f"{missing[0]}: use_dora is true but the file has no lora_magnitude_vector for "
                "it; the adapter file is incomplete")
    for n in names:
        if pairs[n]["M"].size != math.prod(outs):
            return (f"{n}: lora_magnitude_vector {list(pairs[n]['M'].shape)} does not fit the "
                    f"kernel's {math.prod(outs)} output features")
    return np.stack([pairs[n]["M"].reshape(outs) for n in names])


def _kernel_shape(module: Mapping) -> tuple[int, ...]:
    if "kernel" in module:
        return tuple(np.shape(module["kernel"]))
    a, b, s = (np.shape(module[k]) for k in (LORA_A, LORA_B, LORA_SCALE))
    return tuple(a[:-1]) + tuple(b[len(s) + 1:])


def _layout(path: str, module: Mapping, kernel_shape, layouts, stacked: bool) -> KernelLayout:
    if LORA_A in module:
        n_stack = np.ndim(module[LORA_SCALE])
        return KernelLayout(n_stack, np.ndim(module[LORA_A]) - 1 - n_stack,
                            np.ndim(module[LORA_B]) - 1 - n_stack)
    if layouts and path in layouts:
        return layouts[path]
    if not stacked and len(kernel_shape) == 2:
        return KernelLayout(0, 1, 1)
    return default_layout(path, kernel_shape)


def _peft_scale(peft: Mapping, name: str, rank: int | None) -> np.float32:
    """PEFT's scale for module `name`, checking the file's rank against the config's (a rank of
    None checks only that the config's numbers make a `LoraConfig`)."""
    cfg = LoraConfig(r=peft["r"], lora_alpha=peft["lora_alpha"], target_modules=[name],
                     use_rslora=peft.get("use_rslora", False),
                     rank_pattern=peft.get("rank_pattern") or {},
                     alpha_pattern=peft.get("alpha_pattern") or {})
    if rank is not None and cfg.rank_for(name) != rank:
        raise LoraError(f"{name}: lora_A has rank {rank} but adapter_config.json gives "
                        f"{cfg.rank_for(name)} (r / rank_pattern); the files do not belong "
                        "together.")
    return np.float32(cfg.scale_for(name))


def _place_leaves(path: str, module: Mapping, host: Mapping[str, np.ndarray],
                  adapter_dtype: str, shardings: Shardings) -> dict:
    out = {}
    for leaf, value in host.items():
        dtype = module[leaf].dtype if leaf in module else (
            np.float32 if leaf == LORA_SCALE else np.dtype(adapter_dtype))
        sharding = adapter_sharding(module, leaf, path, value.shape, shardings)
        value = np.asarray(value, dtype)
        out[leaf] = jax.make_array_from_callback(value.shape, sharding, lambda i, v=value: v[i])
    return out


# ---------------------------------------------------------------------------------------------
# several named adapters: PEFT's save_pretrained layout
# ---------------------------------------------------------------------------------------------

def export_peft_adapters(path: str | Path, params: Mapping,
                         configs: Mapping[str, LoraConfig | None] | None = None, *,
                         overwrite: bool = False, **kwargs: Any) -> Path:
    """Write several named adapters as `PeftModel.save_pretrained` does: "default" in `path`,
    every other adapter in `path/<name>/`, each a PEFT adapter directory. Atomic as a whole.

    Args:
      path: the output directory.
      params: a tree with named adapters (`lora_jax.named`), or variables.
      configs: `{adapter name: its LoraConfig or None}`; the adapters to write (default: every
        adapter of the tree, without configs).
      overwrite: replace an earlier PEFT export at `path`.
      **kwargs: passed to `export_peft` for each adapter (`base_model_name_or_path`,
        `layer_container`, `fan_in_fan_out`, ...).

    Returns:
      The absolute output path.

    Example:
      >>> export_peft_adapters("out/peft", params, {"default": cfg_a, "b": cfg_b})
      >>> # torch: m = PeftModel.from_pretrained(base, "out/peft")
      >>> #        m.load_adapter("out/peft/b", adapter_name="b")
    """
    tree = unwrap_variables(params)[0]
    configs = dict(configs) if configs is not None else {n: None for n in named.adapter_names(tree)}
    names = named.check_selection(tree, configs)
    if not names:
        raise LoraError("export_peft_adapters: no adapters to write; pass configs= naming them.")

    def write(tmp: Path) -> None:
        if DEFAULT_ADAPTER in names:
            export_peft(tmp, tree, configs[DEFAULT_ADAPTER], adapter_name=DEFAULT_ADAPTER,
                        **kwargs)
        elif atomic.is_primary():
            tmp.mkdir(parents=True)
        for name in names:
            if name != DEFAULT_ADAPTER:
                export_peft(tmp / name, tree, configs[name], adapter_name=name, **kwargs)

    outputs.check_destination(path, outputs.PEFT, overwrite=overwrite)
    return atomic.atomic_directory(path, write, overwrite=overwrite, kind=outputs.PEFT)


def peft_adapter_dirs(path: str | Path) -> dict[str, Path]:
    """`{adapter name: directory}` of a PEFT `save_pretrained` output: "default" if `path`
    holds an adapter itself, plus every sub-folder that holds one.

    Example:
      >>> peft_adapter_dirs("out/peft")
      {'default': PosixPath('out/peft'), 'b': PosixPath('out/peft/b')}
    """
    path = Path(path)
    found = {DEFAULT_ADAPTER: path} if (path / CONFIG_FILE).is_file() else {}
    if path.is_dir():
        found.update({sub.name: sub for sub in sorted(path.iterdir())
                      if sub.is_dir() and (sub / CONFIG_FILE).is_file()})
    if not found:
        raise LoraError(f"no PEFT adapter at {path}: neither it nor a sub-folder holds "
                        f"{CONFIG_FILE} (save it with PeftModel.save_pretrained).")
    return found


def import_peft_adapters(path: str | Path, params: Mapping, **kwargs: Any) -> Params:
    """Load every adapter of a PEFT `save_pretrained` output (`path` itself as "default",
    each sub-folder under its name) into `params`, each as `import_peft(..., adapter_name=)`.

    Example:
      >>> params = import_peft_adapters("out/peft", base_params)
      >>> lora_jax.named.adapter_names(params)
      ('default', 'b')
    """
    for name, directory in peft_adapter_dirs(path).items():
        params = import_peft(directory, params, adapter_name=named.check_name(name), **kwargs)
    return params
