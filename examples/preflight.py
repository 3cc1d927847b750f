"""Every path of a training run checked before its first step, so no run is thrown away at the
end and nothing a user owns is replaced: each input directory must be one, and each output
writable and free.

For each output flag: the path's parent must be creatable and writable; an existing target needs
`--overwrite` (or `--resume`, for the files a resumed run appends to) and must be an earlier
output of the same kind; no two paths may be the same or lie inside each other, and no output
may lie in an input (the model, the data, an adapter read at start).
"""
from __future__ import annotations

import itertools
from pathlib import Path

import lora_jax as lj
from examples.cli import TrainConfig
from examples.metrics import MetricsError, is_png, read_records

DIRECTORY_OUTPUTS = (("--adapter-out", "adapter_out", lj.outputs.ADAPTER),
                     ("--export-peft", "export_peft", lj.outputs.PEFT),
                     ("--export-merged", "export_merged", lj.outputs.MERGED))


class OutputError(ValueError):
    """An input or output path that cannot be used: an output that would fail at the end of
    the run or replace a user's files, or an input directory that is not one."""


def check_inputs(cfg: TrainConfig) -> None:
    """The directories a run reads must be directories (a file or a typo is named as such)."""
    for flag, path in (("--model-path", cfg.model_path), ("--adapter-in", cfg.adapter_in),
                       ("--tokenizer", None if cfg.tokenizer == "bytes" else cfg.tokenizer)):
        if path and not Path(path).is_dir():
            what = "is a file" if Path(path).exists() else "does not exist"
            raise OutputError(f"{flag} {path} {what}; it takes a directory")


def check_outputs(cfg: TrainConfig) -> None:
    """Raise `OutputError` (or `LoraError`) naming the first output flag that cannot be written.

    Example:
      >>> check_outputs(parse_args(["--export-peft", "runs/x/peft", "--overwrite"]))
    """
    _check_disjoint(cfg)
    for flag, field, kind in DIRECTORY_OUTPUTS:
        path = getattr(cfg, field)
        if path:
            try:
                lj.outputs.check_destination(path, kind, overwrite=cfg.overwrite,
                                             flag="--overwrite")
            except lj.LoraError as err:
                raise OutputError(f"{flag}: {err}") from None
    if cfg.checkpoint_dir:
        _check_directory("--checkpoint-dir", Path(cfg.checkpoint_dir))
    if cfg.metrics_file:
        _check_appendable_file("--metrics-file", Path(cfg.metrics_file), cfg, _metrics_problem)
    if cfg.plot_path:
        _check_appendable_file("--plot", Path(cfg.plot_path), cfg,
                               lambda p: None if is_png(p) else "it is not a PNG image")


def _check_directory(flag: str, path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file; it must be a directory")
    _creatable(flag, path)


def _check_appendable_file(flag: str, path: Path, cfg: TrainConfig, problem) -> None:
    """A file the run writes (and a resumed run continues): new, or ours to replace
    (`problem(path)` is None for a file this program wrote, else what is wrong)."""
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a directory; pass a file path")
    if path.exists():
        if not (cfg.overwrite or cfg.resume):
            raise OutputError(f"{flag} {path} already exists: pass --resume to continue that "
                              "run, --overwrite to start it anew, or choose a new file")
        wrong = problem(path)
        if wrong:
            raise OutputError(f"refusing to use {flag} {path}: {wrong}; choose another path")
    _creatable(flag, path)


def _metrics_problem(path: Path) -> str | None:
    try:
        records = read_records(path)
    except MetricsError as err:
        return str(err)
    if not records and path.read_bytes().strip():
        return "it holds no metrics records, so this program did not write it"
    return None


def _creatable(flag: str, path: Path) -> None:
    try:
        lj.outputs.check_creatable(path)
    except lj.LoraError as err:
        raise OutputError(f"{flag}: {err}") from None


def _check_disjoint(cfg: TrainConfig) -> None:
    """No output equals or contains another output, or an input."""
    outs = [(flag, getattr(cfg, field)) for flag, field, _ in DIRECTORY_OUTPUTS]
    outs += [("--checkpoint-dir", cfg.checkpoint_dir), ("--metrics-file", cfg.metrics_file),
             ("--plot", cfg.plot_path)]
    outs = [(flag, Path(p).absolute()) for flag, p in outs if p]
    ins = [("--model-path", cfg.model_path), ("--data", cfg.data),
           ("--adapter-in", cfg.adapter_in), ("--tokenizer", cfg.tokenizer)]
    ins = [(flag, Path(p).absolute()) for flag, p in ins if p and p != "bytes"]
    for (f1, p1), (f2, p2) in itertools.combinations(outs, 2):
        if _overlap(p1, p2):
            raise OutputError(f"{f1} {p1} and {f2} {p2} overlap: give each output its own path "
                              "(writing one would replace the other)")
    for (fo, po), (fi, pi) in itertools.product(outs, ins):
        if _overlap(po, pi):
            raise OutputError(f"{fo} {po} overlaps the input {fi} {pi}: write outputs elsewhere")


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents
