"""Training-state checkpoints for resumable LoRA fine-tuning, on an orbax `CheckpointManager`.

Each step directory holds two items:

    state/   {"adapters": ..., "opt_state": ...}: sharded arrays (megabytes: adapters only)
    meta/    JSON: step, data position, the rng key's data and impl, the LoraConfig, checksums

Orbax writes every step into a temporary directory and renames it when complete, so a process
killed mid-save leaves only a temporary directory, which is ignored (and cleaned up by the next
manager). `restore` goes from the newest step down, verifies each candidate's checksums, and
moves any unreadable one aside to `<step>.corrupt` so training can save that step again; it says
which step it used and why it skipped others.

A checkpoint that is intact but does not fit (the run's settings or the adapters' shapes differ
from those stored with it) is *not* corruption: `restore` refuses with a `LoraError` naming each
difference and leaves every step as it is.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lora_jax import atomic, fingerprint
from lora_jax.config import LoraConfig
from lora_jax.errors import LoraError
from lora_jax.finite import check_finite
from lora_jax.tree import abstract, dotted

FORMAT = "lora_jax.train_state"
STATE_ITEM, META_ITEM = "state", "meta"
CORRUPT = ".corrupt"
log = logging.getLogger(__name__)


class CheckpointMismatch(LoraError):
    """An intact checkpoint made with other settings or shapes than the run resuming it."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """What `TrainCheckpointer.restore` found.

    Attributes:
      step: the step of the checkpoint used (the step that was *completed* when it was saved).
      adapters / opt_state: restored arrays, in the template's shardings.
      rng: the saved PRNG key (typed if a typed key was saved), or None.
      data_position: the JSON value given to `save`.
      path: the step directory read.
      skipped: `(step, reason)` for each newer checkpoint that could not be used.
    """

    step: int
    adapters: Any
    opt_state: Any
    rng: Any
    data_position: Any
    path: Path
    skipped: tuple[tuple[int, str], ...] = ()

    def describe(self) -> str:
        text = f"restored step {self.step} from {self.path}"
        for step, reason in self.skipped:
            text += f"; skipped step {step}: {reason}"
        return text


class TrainCheckpointer:
    """Save and restore adapters, optimizer state, step, rng and data position; keep the last N.

    Args:
      directory: root of the step directories (created if missing).
      max_to_keep: how many of the newest checkpoints to keep.
      config: a `LoraConfig` stored with each step (for reference and `save_adapter` later).
      async_save: write in a background thread (call `wait()` or `close()` before exiting).
      settings: a flat JSON-able dict of what must not change across a resume (rank, model,
        batch size, data, ...); stored with each step and compared by `restore`.

    Example:
      >>> ckpt = TrainCheckpointer("run/ckpt", max_to_keep=3)
      >>> found = ckpt.restore(adapters=adapters, opt_state=opt_state)   # None on a fresh run
      >>> if found: adapters, opt_state, start = found.adapters, found.opt_state, found.step
      >>> ...
      >>> ckpt.save(step, adapters=adapters, opt_state=opt_state, rng=rng, data_position=pos)
      >>> ckpt.close()
    """

    def __init__(self, directory: str | Path, *, max_to_keep: int = 3,
                 config: LoraConfig | None = None, async_save: bool = True,
                 settings: Mapping[str, Any] | None = None):
        self.directory = Path(directory).absolute()
        self.config = config
        self.settings = None if settings is None else dict(settings)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler(),
                           META_ITEM: ocp.JsonCheckpointHandler()})

    def save(self, step: int, *, adapters: Any, opt_state: Any, rng: Any = None,
             data_position: Any = None, force: bool = False) -> bool:
        """Start saving the state after `step` completed steps; returns False if the manager
        skipped it (an existing step, unless `force`). `data_position` must be JSON-able.
        Non-finite adapters or optimizer state raise `LoraError`: a diverged state is never
        saved over the good ones."""
        state = {"adapters": adapters, "opt_state": opt_state}
        check_finite(state, f"TrainCheckpointer.save(step {step})")
        meta = {"format": FORMAT, "step": int(step), "data_position": data_position,
                "rng": _rng_to_json(rng), "checksums": fingerprint.checksums(state),
                "shapes": shapes(state), "settings": self.settings,
                "config": None if self.config is None else self.config.to_dict()}
        _check_json(meta)
        return self._manager.save(int(step), force=force, args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}))

    def restore(self, *, adapters: Any, opt_state: Any, step: int | None = None,
                shardings: Mapping[str, Any] | None = None) -> Restored | None:
        """Restore the newest readable checkpoint (or exactly `step`) into the templates'
        shapes, dtypes and shardings; None if there is no checkpoint at all.

        Args:
          adapters / opt_state: templates: arrays or `jax.ShapeDtypeStruct`s (e.g. from
            `jax.eval_shape`), with the shardings to restore into (a leaf without one goes to
            the first local device).
          step: a specific step; then an unreadable checkpoint is an error, not skipped.
          shardings: `{"adapters": tree, "opt_state": tree}` of `jax.sharding.Sharding`s shaped
            like the templates (e.g. `sharding.param_shardings` of each), replacing theirs;
            either key may be left out.
        """
        self.wait()
        steps = [step] if step is not None else sorted(self._manager.all_steps(), reverse=True)
        target = {"adapters": abstract(adapters), "opt_state": abstract(opt_state)}
        for name, tree in (shardings or {}).items():
            if name not in target:
                raise LoraError(f"restore: shardings key {name!r}; use 'adapters' / 'opt_state'")
            target[name] = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                target[name], tree)
        skipped = []
        for candidate in steps:
            try:
                meta = self._read_meta(candidate)
                self._check_fits(candidate, meta, target)
                found = self._restore_step(candidate, meta, target, tuple(skipped))
            except CheckpointMismatch:
                raise  # intact, but not this run's: never moved aside
            except Exception as err:  # any unreadable step: report, move aside, try older
                if step is not None:
                    raise LoraError(f"checkpoint step {step} in {self.directory} is unreadable: "
                                    f"{_short(err)}") from err
                skipped.append((candidate, _short(err)))
                self._quarantine(candidate)
                continue
            (log.warning if skipped else log.info)("%s", found.describe())
            return found
        if skipped:
            raise LoraError(f"no readable checkpoint in {self.directory}: " +
                            "; ".join(f"step {s}: {r}" for s, r in skipped))
        return None

    def _read_meta(self, step: int) -> dict:
        out = self._manager.restore(step, args=ocp.args.Composite(
            **{META_ITEM: ocp.args.JsonRestore()}))
        meta = out[META_ITEM]
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise LoraError("not a lora_jax training-state checkpoint")
        return meta

    def _check_fits(self, step: int, meta: Mapping, target: Mapping) -> None:
        """Refuse (without touching the files) a checkpoint made with other settings or
        shapes; checkpoints written before these were stored are compared by shape only."""
        where = f"checkpoint step {step} in {self.directory}"
        stored = meta.get("settings")
        if self.settings is not None and stored is not None:
            diffs = [f"{key}: checkpoint {stored.get(key)!r}, this run {value!r}"
                     for key, value in self.settings.items() if stored.get(key) != value]
            if diffs:
                raise CheckpointMismatch(
                    f"{where} was made with other settings:\n  - " + "\n  - ".join(diffs) +
                    "\nResume with the settings it was made with, or start a new run in "
                    "another directory. The checkpoints are intact and were left as they are.")
        if meta.get("shapes") is not None:
            diffs = shape_differences(meta["shapes"], shapes(target))
            if diffs:
                raise CheckpointMismatch(
                    f"{where} holds a state of other shapes than this run's:\n  - " +
                    "\n  - ".join(diffs[:6]) + "\nResume with the LoRA and model settings it "
                    "was made with. The checkpoints are intact and were left as they are.")

    def _restore_step(self, step: int, meta: Mapping, target: Mapping,
                      skipped: tuple) -> Restored:
        """The arrays of `step` (its meta item already read and checked by `_read_meta`),
        verified against the stored checksums."""
        out = self._manager.restore(step, args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardRestore(target)}))
        state = out[STATE_ITEM]
        bad = fingerprint.mismatches(meta["checksums"], state)
        if bad:
            raise LoraError(f"checksum mismatch in {bad[:3]} (corrupt files)")
        return Restored(step=int(meta["step"]), adapters=state["adapters"],
                        opt_state=state["opt_state"], rng=_rng_from_json(meta["rng"]),
                        data_position=meta["data_position"],
                        path=self.directory / str(step), skipped=skipped)

    def _quarantine(self, step: int) -> None:
        """Rename an unreadable step to `<step>.corrupt` (kept for inspection), so the manager
        neither lists it nor refuses to save that step again."""
        src = self.directory / str(step)
        if atomic.is_primary() and src.exists():
            dst = src.with_name(src.name + CORRUPT)
            n = 1
            while dst.exists():
                dst, n = src.with_name(f"{src.name}{CORRUPT}{n}"), n + 1
            src.rename(dst)
        atomic.barrier(f"lora_jax.quarantine:{src}")
        self._manager.reload()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def wait(self) -> None:
        """Block until a background save has been committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Finish pending saves and release the manager."""
        self._manager.close()

    def __enter__(self) -> "TrainCheckpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shapes(tree: Any) -> dict[str, list]:
    """`{"adapters/q/lora_a": [shape, dtype]}` for every array leaf of a state tree."""
    return {dotted(path, "/"): [list(np.shape(x)), str(np.dtype(x.dtype))]
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shape_differences(stored: Mapping[str, list], wanted: Mapping[str, list]) -> list[str]:
    """One line per leaf that is missing, extra or of another shape/dtype."""
    out = []
    for key in sorted(set(stored) | set(wanted)):
        if key not in wanted:
            out.append(f"{key}: in the checkpoint, not in this run")
        elif key not in stored:
            out.append(f"{key}: in this run, not in the checkpoint")
        elif list(stored[key]) != list(wanted[key]):
            out.append(f"{key}: checkpoint {stored[key][0]} {stored[key][1]}, this run "
                       f"{wanted[key][0]} {wanted[key][1]}")
    return out


def _rng_to_json(rng: Any) -> dict | None:
    """Key data as ints plus the impl name (typed keys) or None (raw uint32 keys)."""
    if rng is None:
        return None
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
        impl = str(jax.random.key_impl(rng))
        data = jax.random.key_data(rng)
    else:
        impl, data = None, rng
    data = np.asarray(jax.device_get(data))
    return {"impl": impl, "dtype": str(data.dtype), "shape": list(data.shape),
            "data": data.reshape(-1).tolist()}


def _rng_from_json(record: dict | None) -> Any:
    if record is None:
        return None
    data = jnp.asarray(np.asarray(record["data"], record["dtype"]).reshape(record["shape"]))
    return data if record["impl"] is None else jax.random.wrap_key_data(data, impl=record["impl"])


def _check_json(meta: dict) -> None:
    try:
        json.dumps(meta)
    except TypeError as err:
        raise LoraError(f"TrainCheckpointer.save: data_position must be JSON-serialisable (ints, "
                        f"strings, lists, dicts): {err}") from err


def _short(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
