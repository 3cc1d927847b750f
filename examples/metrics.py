"""Where a run's numbers go: a JSONL file a user can plot, and a loss-curve PNG at the end."""
from __future__ import annotations

import json
import pathlib


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
        (those after its checkpoint), a fresh run (`step=0`) starts an empty file."""
        if self.path and self.path.exists():
            kept = [r for r in self.read() if r.get("step", 0) <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def read(self) -> list[dict]:
        if not self.path or not self.path.exists():
            return []
        return [json.loads(l) for l in self.path.read_text().splitlines() if l.strip()]


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
