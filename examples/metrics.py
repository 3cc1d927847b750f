"""Where a run's numbers go: a JSONL file a user can plot, and a loss-curve PNG at the end."""
from __future__ import annotations

import json
import logging
import pathlib

log = logging.getLogger(__name__)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class MetricsError(ValueError):
    """A metrics file that is not one this program writes (or is damaged mid-file)."""


class MetricsLog:
    """Appends one JSON object per line (`{"step": 3, "loss": 2.1, ...}`), flushed each write,
    so a crashed or running job can be plotted. Resuming appends to the same file."""

    def __init__(self, path: str | pathlib.Path | None):
        self.path = pathlib.Path(path) if path else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record) -> None:
        if self.path:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop the records of steps after `step`: a resumed run rewrites the steps it redoes
        (those after its checkpoint), a fresh run (`step=0`) starts an empty file. Only a file
        of metrics records is rewritten (`read` refuses anything else)."""
        if self.path and self.path.exists():
            kept = [r for r in self.read() if r.get("step", 0) <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def read(self) -> list[dict]:
        """The records. A torn last line (a run killed mid-write) is dropped with a warning;
        a bad line anywhere else raises `MetricsError` naming the file and line."""
        if not self.path or not self.path.exists():
            return []
        return read_records(self.path)


def read_records(path: pathlib.Path) -> list[dict]:
    """The `{"step": ...}` records of a metrics JSONL file (see `MetricsLog.read`)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise MetricsError(f"metrics file {path} is not UTF-8 text ({err.reason} at byte "
                           f"{err.start}); it is not a metrics log of this program") from err
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and "step" in record:
            records.append(record)
        elif n == len(lines):
            log.warning("%s:%d: dropped a torn last line (the run was killed mid-write)", path, n)
        else:
            raise MetricsError(f"{path}:{n}: not a metrics record ({line[:60]!r}); the file is "
                               "not a metrics log of this program, or was edited")
    return records


def is_png(path: pathlib.Path) -> bool:
    """True if `path` starts with the PNG signature (a plot this program may redraw)."""
    try:
        with path.open("rb") as f:
            return f.read(len(PNG_MAGIC)) == PNG_MAGIC
    except OSError:
        return False


def plot_loss(records: list[dict], png: str | pathlib.Path) -> bool:
    """Draw train (and eval, when present) loss against step; False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        pts = [(r["step"], r[key]) for r in records if key in r]
        if pts:
            ax.plot(*zip(*pts), label=label, marker="." if label == "eval" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True
