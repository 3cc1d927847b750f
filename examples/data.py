"""Training data for the example scripts: text or JSONL in, packed fixed-length batches out.

* A `.txt` file is one document; a `.jsonl` file has one object per line, either `{"text": ...}`
  or `{"prompt": ..., "completion": ...}` (the loss is then taken on the completion only).
* Documents are tokenised, joined with an end-of-text id and packed into rows of `seq_len + 1`
  tokens; each row gives `inputs = row[:-1]`, `targets = row[1:]` and a loss mask.
* `Batches` is a deterministic, resumable iterator: its whole state is one integer (`position`),
  saved in the training checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable, Sequence

import numpy as np

Encode = Callable[[str], Sequence[int]]


class DataError(ValueError):
    """A data file that is missing, empty or malformed; the message names the file and line."""


def read_documents(path: str | pathlib.Path) -> list[tuple[str, str]]:
    """`[(prompt, completion)]` pairs; plain text has an empty prompt (loss on every token)."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise DataError(f"--data {str(path)!r} is a directory; pass one .txt or .jsonl file.")
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist; pass --data a .txt or .jsonl "
                        "file (default: the embedded examples/data/sonnets.txt).")
    text = read_text(path, "data file")
    if path.suffix != ".jsonl":
        if not text.strip():
            raise DataError(f"data file {str(path)!r} is empty")
        return [("", text)]
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            docs.append(_jsonl_record(path, n, line))
    if not docs:
        raise DataError(f"data file {str(path)!r} holds no records")
    return docs


def read_text(path: pathlib.Path, what: str) -> str:
    """The UTF-8 text of `path`; a `DataError` naming the file and the byte if it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{what} {str(path)!r} is not UTF-8 text ({err.reason} at byte "
                        f"{err.start}); convert it to UTF-8.") from err


def _jsonl_record(path, n: int, line: str) -> tuple[str, str]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{n}: not valid JSON ({err.msg})") from err
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        return "", obj["text"]
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and \
            isinstance(obj.get("completion"), str):
        return obj["prompt"], obj["completion"]
    raise DataError(f"{path}:{n}: each JSONL line needs a 'text' field, or 'prompt' and "
                    "'completion' fields")


def tokenize(docs: list[tuple[str, str]], encode: Encode, eos_id: int) -> tuple[np.ndarray,
                                                                                np.ndarray]:
    """One token stream and a same-length 0/1 array: 1 where the token is a loss target."""
    ids, weights = [], []
    for prompt, completion in docs:
        p, c = list(encode(prompt)) if prompt else [], list(encode(completion))
        ids += p + c + [eos_id]
        weights += [0] * len(p) + [1] * (len(c) + 1)
    return np.asarray(ids, np.int32), np.asarray(weights, np.float32)


@dataclasses.dataclass
class Batches:
    """Packed `[batch, seq_len]` batches drawn in a fixed shuffled order, epoch after epoch.

    `position` counts batches served; setting it (from a checkpoint) resumes exactly.

    With `shift_each_epoch` (default) each epoch after the first cuts its rows at a new random
    offset into the stream: on small data run for many epochs, fixed cuts would show every
    token at the same position in the same window each time, and a model with learned
    positions then memorises (window, position) pairs instead of the text.
    """

    ids: np.ndarray
    weights: np.ndarray
    batch: int
    seq_len: int
    seed: int = 0
    position: int = 0
    shift_each_epoch: bool = True

    def __post_init__(self):
        room = self.seq_len - 1 if self.shift_each_epoch else 0   # for the largest offset
        n_rows = max(len(self.ids) - 1 - room, 0) // self.seq_len
        if n_rows < self.batch:
            raise DataError(f"the data has {len(self.ids)} tokens: too few for one batch of "
                            f"{self.batch} x {self.seq_len}; lower --batch-size/--seq-len or "
                            "give more text.")
        self.n_rows = n_rows
        self.per_epoch = n_rows // self.batch

    def _rows(self, epoch: int) -> tuple[np.ndarray, int]:
        """This epoch's row order and the offset its rows are cut at."""
        rng = np.random.default_rng([self.seed, epoch])
        offset = int(rng.integers(self.seq_len)) if self.shift_each_epoch and epoch else 0
        return rng.permutation(self.n_rows), offset

    def batch_at(self, position: int) -> dict[str, np.ndarray]:
        epoch, i = divmod(position, self.per_epoch)
        order, offset = self._rows(epoch)
        rows = order[i * self.batch:(i + 1) * self.batch]
        starts = offset + rows[:, None] * self.seq_len + np.arange(self.seq_len + 1)[None]
        tokens, w = self.ids[starts], self.weights[starts]
        return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": w[:, 1:]}

    def __next__(self) -> dict[str, np.ndarray]:
        out = self.batch_at(self.position)
        self.position += 1
        return out

    def __iter__(self):
        return self


def fixed_batches(ids: np.ndarray, weights: np.ndarray, batch: int,
                  seq_len: int) -> list[dict[str, np.ndarray]]:
    """Every packed row exactly once, in order, `batch` rows at a time; the last batch is
    padded with rows whose mask is 0. For evaluation: the mean loss over them does not depend
    on the batch size (nor, so, on the mesh or the gradient accumulation)."""
    n_rows = (len(ids) - 1) // seq_len
    if n_rows < 1:
        raise DataError(f"{len(ids)} held-out tokens make no row of {seq_len} + 1 tokens")
    starts = np.arange(n_rows)[:, None] * seq_len + np.arange(seq_len + 1)[None]
    tokens, w = ids[starts], weights[starts]
    pad = -n_rows % batch
    tokens = np.concatenate([tokens, np.zeros((pad, seq_len + 1), tokens.dtype)])
    w = np.concatenate([w, np.zeros((pad, seq_len + 1), w.dtype)])
    return [{"inputs": tokens[i:i + batch, :-1], "targets": tokens[i:i + batch, 1:],
             "mask": w[i:i + batch, 1:]} for i in range(0, n_rows + pad, batch)]
