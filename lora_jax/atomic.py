"""Crash-safe directory writes: build a directory beside its destination, then swap it in.

Every saver in lora_jax (adapters, PEFT exports, merged exports) writes into `<name>.saving` and
only then moves it to `<name>`. The previous `<name>` is renamed to `<name>.previous` and deleted
last, so at every instant a complete copy exists on disk: a crash leaves either the old directory,
or the new one, or (between the two renames) the old one under `<name>.previous`, which
`recover_previous` and the next save move back.

Multi-host: file-system changes happen on process 0 only, between barriers; `write` runs on every
process (orbax saves are collective; plain-file writers check `is_primary()` themselves).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import jax

from lora_jax.outputs import check_destination

SAVING, PREVIOUS = ".saving", ".previous"


def is_primary() -> bool:
    """True on the process that writes files (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait for every process (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def recover_previous(path: Path) -> bool:
    """If a save died between its two renames (`path` gone, `path.previous` complete), move the
    previous directory back. Returns True if it did."""
    previous = sibling(path, PREVIOUS)
    if path.exists() or not previous.exists():
        return False
    if is_primary():
        previous.rename(path)
    barrier(f"lora_jax.recover:{path}")
    return True


def atomic_directory(path: str | Path, write: Callable[[Path], None], *, overwrite: bool,
                     kind: str) -> Path:
    """Create directory `path` by calling `write(tmp)` and swapping `tmp` in.

    Args:
      path: the destination directory.
      write: fills a directory that does not exist yet (it creates it).
      overwrite: replace an earlier output of the same `kind` at `path`; an existing non-empty
        `path` is otherwise an error, and anything but such an output always is
        (`lora_jax.outputs.check_destination`).
      kind: what is written (`lora_jax.outputs.ADAPTER`, `PEFT`, `MERGED`).

    Returns:
      The absolute destination path.

    Example:
      >>> atomic_directory("out/adapter", save_files, overwrite=True, kind=outputs.ADAPTER)
    """
    path = Path(path).absolute()
    recover_previous(path)
    check_destination(path, kind, overwrite=overwrite)
    tmp, previous = sibling(path, SAVING), sibling(path, PREVIOUS)
    if is_primary():
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that crashed earlier
    barrier(f"lora_jax.atomic.begin:{path}")
    write(tmp)
    barrier(f"lora_jax.atomic.written:{path}")
    if is_primary():
        _swap(tmp, path, previous)
    barrier(f"lora_jax.atomic.end:{path}")
    return path


def _swap(tmp: Path, path: Path, previous: Path) -> None:
    shutil.rmtree(previous, ignore_errors=True)
    if path.exists():
        path.rename(previous)
    tmp.rename(path)
    shutil.rmtree(previous, ignore_errors=True)
