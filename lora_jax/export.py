"""Merged export: fold the adapters in (`merge`) and write a plain model, as an orbax checkpoint
and as a Hugging Face directory that transformers and vLLM load without PEFT.

    <path>/orbax/   orbax checkpoint of the merged params tree (restore with `load_merged`)
    <path>/hf/      config.json + model.safetensors (models.save_hf)

Both are written into `<path>.saving` and swapped in together, so an existing export survives a
crash during the new one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from lora_jax import atomic, outputs
from lora_jax.errors import LoraError
from lora_jax.merge import merge
from lora_jax.tree import Params, unwrap_variables

ORBAX_DIR, HF_DIR = "orbax", "hf"


def export_merged(path: str | Path, params: Mapping, model: Any, *, hf: bool = True,
                  orbax: bool = True, dtype: Any = None, overwrite: bool = False) -> Path:
    """Merge the adapters of `params` and save the plain model.

    Args:
      path: output directory; gets `orbax/` and/or `hf/`.
      params: injected params or variables (scanned or not; may be sharded).
      model: the `models` Linen model (GPT2 / Llama) the params belong to; its config becomes
        `hf/config.json`.
      hf / orbax: which formats to write.
      dtype: dtype of the HF tensors (e.g. "bfloat16"); default: each kernel's own.
      overwrite: replace an earlier merged export at `path` (anything else there is refused:
        `lora_jax.outputs.check_destination`).

    Returns:
      The absolute export path.

    Example:
      >>> export_merged("out/merged", params, model, dtype="bfloat16")
      >>> # transformers: AutoModelForCausalLM.from_pretrained("out/merged/hf")
    """
    if not (hf or orbax):
        raise LoraError("export_merged: nothing to write; set hf=True and/or orbax=True.")
    outputs.check_destination(path, outputs.MERGED, overwrite=overwrite)
    merged = merge(unwrap_variables(params)[0])

    def write(tmp: Path) -> None:
        if orbax:
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(tmp / ORBAX_DIR, merged)
        if hf:
            _save_hf(tmp / HF_DIR, model, merged, dtype)

    return atomic.atomic_directory(path, write, overwrite=overwrite, kind=outputs.MERGED)


def _save_hf(directory: Path, model: Any, merged: Params, dtype: Any) -> None:
    from models import save_hf  # models/ knows HF names and config.json; lora_jax does not
    # save_hf reads each tensor on the writing host: gather sharded leaves other hosts hold.
    if any(not getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(merged)):
        from jax.experimental import multihost_utils
        merged = jax.tree.map(
            lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)), merged)
    if atomic.is_primary():
        save_hf(directory, model, merged, dtype=dtype)


def load_merged(path: str | Path, like: Any = None) -> Params:
    """Restore the orbax part of an `export_merged` directory.

    Args:
      path: the export directory.
      like: optional tree of arrays / `ShapeDtypeStruct`s giving shapes, dtypes and shardings.

    Example:
      >>> params = load_merged("out/merged", jax.eval_shape(lambda: params))
    """
    directory = Path(path).absolute() / ORBAX_DIR
    if not directory.is_dir():
        raise LoraError(f"{directory} not found: export_merged(..., orbax=True) writes it.")
    with ocp.StandardCheckpointer() as ckptr:
        if like is None:
            return ckptr.restore(directory)
        return ckptr.restore(directory, jax.tree.map(_abstract, like))


def _abstract(x: Any) -> jax.ShapeDtypeStruct:
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None))
