"""Reading a compiled program's text: which collectives it runs and which array shapes it holds.

Used by the tests (LoRA adds no collective to the forward pass; no device materialises a whole
sharded kernel) and handy when a benchmark is slower than it should be:
  >>> text = jax.jit(step).lower(*args).compile().as_text()
  >>> collective_counts(text)
  {'all-gather': 4, 'all-reduce': 6, 'reduce-scatter': 4}
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re

KINDS = ("all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute")
_OP = re.compile(r"=\s*(?P<result>.*?)\s(?P<kind>" + "|".join(KINDS) + r")(?:-start)?\(")
_SHAPE = re.compile(r"\b(?:pred|[suf]\d+|bf16|f8\w*)\[([\d,]*)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction: its kind, result shapes and devices per group."""

    kind: str
    shapes: tuple[tuple[int, ...], ...]
    group_size: int | None
    line: str

    @property
    def elements(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def collectives(hlo_text: str, *, include_trivial: bool = False) -> list[Collective]:
    """Every collective in the text (async pairs counted once, at `-start`). Groups of one
    device move no data; they are dropped unless `include_trivial`."""
    found = []
    for line in hlo_text.splitlines():
        match = _OP.search(line)
        if not match:
            continue
        op = Collective(match["kind"], array_shapes(match["result"]), _group_size(line),
                        line.strip())
        if include_trivial or op.group_size != 1:
            found.append(op)
    return found


def collective_counts(hlo_text: str) -> dict[str, int]:
    """`{kind: count}` of the non-trivial collectives."""
    return dict(collections.Counter(op.kind for op in collectives(hlo_text)))


def array_shapes(text: str) -> tuple[tuple[int, ...], ...]:
    """Every array shape written in `text` (`f32[64,40]` -> (64, 40)), in order."""
    return tuple(tuple(int(d) for d in dims.split(",") if d) for dims in _SHAPE.findall(text))


def _group_size(line: str) -> int | None:
    listed = _GROUPS_LIST.search(line)
    if listed:
        return len(listed.group(1).split("}")[0].strip("{").split(","))
    iota = _GROUPS_IOTA.search(line)
    return int(iota.group(2)) if iota else None
