"""What an output path may hold before lora_jax writes there, and what overwrite may replace.

Every saver writes a directory of one *kind*: an adapter checkpoint (`save_adapter`), a PEFT
adapter (`export_peft`) or a merged model (`export_merged`). Overwriting replaces only an earlier
output of the same kind, recognised by its contents; anything else at the path (a base model, a
run directory holding checkpoints and metrics, a folder of unrelated files) is refused with a
`LoraError` that names what is there, and nothing is touched. The check runs before any work, so
a caller (the training CLI) can also run it before training starts.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

from lora_jax.errors import LoraError

ADAPTER, PEFT, MERGED = "adapter checkpoint", "PEFT adapter", "merged export"

# Entries an output of each kind may hold at its top level: anything else is a user's file.
_ORBAX_ENTRIES = {"_CHECKPOINT_METADATA", "_METADATA", "_sharding", "commit_success.txt",
                  "manifest.ocdbt", "array_metadatas", "d", "descriptor"}
_ADAPTER_ENTRIES = _ORBAX_ENTRIES | {"adapter", "lora"}
_PEFT_ENTRIES = {"adapter_config.json", "adapter_model.safetensors", "adapter_model.bin",
                 "README.md"}
_MERGED_ENTRIES = {"orbax", "hf"}
_HF_MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json",
                   "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "README.md"}


def check_destination(path: str | os.PathLike, kind: str, *, overwrite: bool,
                      flag: str = "overwrite=True") -> Path:
    """Check that an output of `kind` may be written at `path`, before any work is done.

    Allowed: a path that does not exist (its nearest existing ancestor must be a writable
    directory), an empty directory, or, with `overwrite`, an earlier output of the same kind.

    Args:
      path: the output directory.
      kind: `ADAPTER`, `PEFT` or `MERGED`.
      overwrite: whether an earlier output of the same kind may be replaced.
      flag: how the caller spells "overwrite" in messages (`--overwrite` in the CLI).

    Returns:
      The absolute path.

    Raises:
      LoraError: naming what is at `path` and what to do instead.

    Example:
      >>> check_destination("out/peft", PEFT, overwrite=True)
    """
    path = Path(path).absolute()
    if not path.exists():
        check_creatable(path)
        return path
    if not path.is_dir():
        raise LoraError(f"{path} is a file, not a directory; a {kind} is a directory: choose "
                        "another path.")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        check_creatable(path)
        return path
    if not overwrite:
        raise LoraError(f"{path} already exists and is not empty ({listing(entries)}); pass "
                        f"{flag} to replace an earlier {kind}, or choose a new directory.")
    problem = RECOGNISERS[kind](path, set(entries))
    if problem:
        raise LoraError(f"refusing to overwrite {path}: it is not an earlier {kind} ({problem}). "
                        "Overwrite replaces only an output of the same kind; choose another "
                        "directory.")
    check_creatable(path)
    return path


def check_creatable(path: str | os.PathLike) -> None:
    """Raise `LoraError` unless `path` (or an entry beside it) can be created: its nearest
    existing ancestor is a directory this process can write to (probed with a real file, since
    permission bits do not show a read-only file system)."""
    path = Path(path).absolute()
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise LoraError(f"cannot create {path}: {ancestor} is a file, not a directory.")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lora_jax_probe", dir=ancestor)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise LoraError(f"cannot write {path}: {ancestor} is not writable "
                        f"({err.strerror or err}).") from err


def listing(entries: list[str], limit: int = 6) -> str:
    """`'a', 'b', ... (12 entries)` for messages."""
    shown = ", ".join(repr(e) for e in entries[:limit])
    return shown + (f", ... ({len(entries)} entries)" if len(entries) > limit else "")


def _unknown(entries: set[str], allowed: set[str]) -> str | None:
    extra = sorted(entries - allowed)
    return f"it holds {listing(extra)}" if extra else None


def _adapter_problem(path: Path, entries: set[str]) -> str | None:
    extra = _unknown(entries, _ADAPTER_ENTRIES)
    if extra:
        return extra
    if "lora" not in entries:
        return "no 'lora' metadata item"
    return None


def _peft_problem(path: Path, entries: set[str]) -> str | None:
    # PEFT's save_pretrained of several adapters puts each non-default one in a sub-folder.
    subs = {e for e in entries if (path / e).is_dir() and (path / e / "adapter_config.json")
            .is_file() and not _peft_problem(path / e, {p.name for p in (path / e).iterdir()})}
    if subs and "adapter_config.json" not in entries:
        return _unknown(entries - subs, set())
    entries = entries - subs
    extra = _unknown(entries, _PEFT_ENTRIES)
    if extra:
        return extra
    try:
        config = json.loads((path / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no readable adapter_config.json"
    if not isinstance(config, dict) or "peft_type" not in config:
        return "adapter_config.json has no peft_type"
    return None


def _merged_problem(path: Path, entries: set[str]) -> str | None:
    extra = _unknown(entries, _MERGED_ENTRIES)
    if extra:
        return extra
    hf = path / "hf"
    if hf.is_dir():
        files = {p.name for p in hf.iterdir()}
        if not ("config.json" in files and any(f.endswith(".safetensors") for f in files)):
            return "hf/ is not a model directory"
        stray = [f for f in files if f not in _HF_MODEL_FILES and not f.endswith(".safetensors")]
        if stray:
            return f"hf/ holds {listing(sorted(stray))}"
    orbax = path / "orbax"
    if orbax.is_dir() and not (orbax / "_CHECKPOINT_METADATA").exists():
        return "orbax/ is not an orbax checkpoint"
    return None


RECOGNISERS: dict[str, Callable[[Path, set[str]], str | None]] = {
    ADAPTER: _adapter_problem, PEFT: _peft_problem, MERGED: _merged_problem}
