"""Merged export: fold the adapters in (`merge`) and write a plain model, as an orbax checkpoint
and as a Hugging Face directory that transformers and vLLM load without PEFT.

    <path>/orbax/   orbax checkpoint of the merged params tree (restore with `load_merged`)
    <path>/hf/      whatever the caller's `write_hf` writes (`models.hf_writer(model)`: config.json
                    + model.safetensors)

lora_jax knows no model family: how to write a Hugging Face directory is handed in, as levanter
hands in its `converter`. Both are written into `<path>.saving` and swapped in together, so an
existing export survives a crash during the new one.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import orbax.checkpoint as ocp

from lora_jax import atomic, outputs
from lora_jax.errors import LoraError
from lora_jax.merge import merge
from lora_jax.tree import Params, abstract, host_array, unwrap_variables

ORBAX_DIR, HF_DIR = "orbax", "hf"

# write_hf(directory, merged_params, dtype): writes a Hugging Face model directory.
HFWriter = Callable[[Path, Params, Any], Any]


def export_merged(path: str | Path, params: Mapping, write_hf: HFWriter | None = None, *,
                  orbax: bool = True, dtype: Any = None, overwrite: bool = False) -> Path:
    """Merge the adapters of `params` and save the plain model.

    Args:
      path: output directory; gets `orbax/` and/or `hf/`.
      params: injected params or variables (scanned or not; may be sharded).
      write_hf: `write_hf(directory, merged_params, dtype)` writes the HF directory `hf/`
        (`models.hf_writer(model)` for the bundled GPT-2 / Llama); None: no `hf/`. Called on
        the primary process only, with every leaf readable there.
      orbax: write the orbax checkpoint `orbax/`.
      dtype: passed to `write_hf` (e.g. "bfloat16" for the HF tensors; None: each leaf's own).
      overwrite: replace an earlier merged export at `path` (anything else there is refused:
        `lora_jax.outputs.check_destination`).

    Returns:
      The absolute export path.

    Example:
      >>> export_merged("out/merged", params, models.hf_writer(model), dtype="bfloat16")
      >>> # transformers: AutoModelForCausalLM.from_pretrained("out/merged/hf")
    """
    if write_hf is None and not orbax:
        raise LoraError("export_merged: nothing to write; pass write_hf= (e.g. "
                        "models.hf_writer(model)) and/or orbax=True.")
    outputs.check_destination(path, outputs.MERGED, overwrite=overwrite)
    merged = merge(unwrap_variables(params)[0])

    def write(tmp: Path) -> None:
        if orbax:
            with ocp.StandardCheckpointer() as ckptr:
                ckptr.save(tmp / ORBAX_DIR, merged)
        if write_hf is not None:
            _write_hf(tmp / HF_DIR, write_hf, merged, dtype)

    return atomic.atomic_directory(path, write, overwrite=overwrite, kind=outputs.MERGED)


def _write_hf(directory: Path, write_hf: HFWriter, merged: Params, dtype: Any) -> None:
    # The writer reads each tensor on the primary host: gather the leaves other hosts hold
    # (collectively, on every process); addressable leaves stay on device until written.
    merged = jax.tree.map(
        lambda x: x if getattr(x, "is_fully_addressable", True) else host_array(x), merged)
    if atomic.is_primary():
        write_hf(directory, merged, dtype)


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
        return ckptr.restore(directory, abstract(like))
