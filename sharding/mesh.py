"""The device mesh: its three axes, how to build it, and the checks that a model and a batch fit.

Axes, outermost first:
  dp    - data parallel: the batch is split, parameters are replicated
  fsdp  - fully sharded data parallel: the batch is split *and* the frozen base is stored split
          (gathered layer by layer when used)
  tp    - tensor parallel (Megatron): projections split on their features; with sequence
          parallelism the activations between blocks are split on the sequence axis too
`tp` is innermost so that its devices are neighbours (one host, NVLink): it talks every layer.
  cp    - context parallel (`sharding.context`): one long sequence split into contiguous chunks,
          attention computed as a ring. Present only when its size is > 1, between fsdp and tp
          (it too talks every layer), so meshes without it are exactly as before.

This module is the only place that spells the axis names; the rest of the package imports them.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DP, FSDP, TP = "dp", "fsdp", "tp"
AXES = (DP, FSDP, TP)
CP = "cp"
CP_AXES = (DP, FSDP, CP, TP)  # the axes of a mesh with context parallelism
BATCH_AXES = (DP, FSDP)


class MeshError(ValueError):
    """A mesh that does not fit the devices, the model or the batch; the message names the fix."""


def make_mesh(*, dp: int = 1, fsdp: int = 1, tp: int = 1,
              devices: Sequence[jax.Device] | None = None, cp: int = 1) -> Mesh:
    """A `(dp, fsdp, tp)` mesh over `devices` (default: every process's devices, `jax.devices()`).

    One size may be -1: it takes the devices the others leave. The axes are `AxisType.Auto` on
    purpose: the models are GSPMD code (sharding propagated by the compiler between our
    `shard_map` layers); `Explicit` axes would make every gather and index ask for
    `out_sharding`.

    Args:
      dp, fsdp, tp: axis sizes; their product must be the number of devices.
      devices: the devices to use, in order (tp varies fastest).
      cp: context-parallel size (`sharding.context`); the `cp` axis exists only when it is > 1.

    Returns:
      a `jax.sharding.Mesh` with axis names `("dp", "fsdp", "tp")`, or
      `("dp", "fsdp", "cp", "tp")` with cp > 1.

    Example:
      >>> mesh = make_mesh(dp=2, tp=4)          # 8 devices
      >>> mesh = make_mesh(dp=2, cp=4)          # 8 devices, sequences split in 4 chunks
    """
    devices = list(jax.devices() if devices is None else devices)
    wanted = {DP: dp, FSDP: fsdp, TP: tp}
    if cp != 1:  # named only when asked for, so the messages of other meshes do not change
        wanted[CP] = cp
    sizes = _resolve_sizes(wanted, len(devices))
    names = CP_AXES if sizes.get(CP, 1) > 1 else AXES
    shape = tuple(sizes.get(a, 1) for a in names)
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def _resolve_sizes(sizes: dict[str, int], n_devices: int) -> dict[str, int]:
    bad = {a: s for a, s in sizes.items() if not isinstance(s, int) or (s < 1 and s != -1)}
    if bad:
        raise MeshError(f"mesh sizes must be positive integers (or -1 for 'the rest'): {bad}")
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise MeshError(f"only one mesh size may be -1, got {free}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if n_devices % known:
            raise MeshError(f"cannot infer {free[0]}: {n_devices} devices are not a multiple of "
                            f"the other sizes' product {known} ({_fmt(sizes)})")
        sizes = {**sizes, free[0]: n_devices // known}
    if math.prod(sizes.values()) != n_devices:
        raise MeshError(f"mesh {_fmt(sizes)} has {math.prod(sizes.values())} devices but there "
                        f"are {n_devices}: choose sizes whose product is {n_devices} "
                        "(or set one of them to -1)")
    return sizes


def _fmt(sizes: dict[str, int]) -> str:
    return " x ".join(f"{a}={s}" for a, s in sizes.items())


def replicated(mesh: Mesh) -> NamedSharding:
    """Whole on every device: scalars, metrics, the step count."""
    return NamedSharding(mesh, P())


def axis_size(mesh: Mesh, axis: str | Sequence[str]) -> int:
    """Number of devices along one axis or the product over several (1 for an absent axis)."""
    names = (axis,) if isinstance(axis, str) else tuple(axis)
    return math.prod(dict(mesh.shape).get(a, 1) for a in names)


def axis_sizes(mesh: Mesh) -> dict[str, int]:
    """`{axis name: size}`."""
    return {a: axis_size(mesh, a) for a in mesh.axis_names}


def drop_trivial_axes(spec: P, mesh: Mesh) -> P:
    """`spec` without the mesh axes of size 1. Inside shard_map a value is then not "varying"
    over them, so its transpose does not psum over single devices (XLA keeps such no-op
    all-reduces on CPU)."""
    def keep(entry):
        names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        kept = tuple(n for n in names if axis_size(mesh, n) > 1)
        return None if not kept else kept[0] if len(kept) == 1 else kept
    return P(*(keep(e) for e in spec))


def check_model_fits(mesh: Mesh, *, hidden: int, heads: int, kv_heads: int | None = None,
                     intermediate: int | None = None, vocab: int | None = None) -> None:
    """Raise `MeshError` unless the model's dimensions split evenly over the mesh.

    Tensor parallelism splits attention heads, key/value heads, the MLP's intermediate features
    and the vocabulary over `tp`; FSDP splits the hidden features of every stored kernel over
    `fsdp`. A split inside a head would still compute the right numbers, but through resharding
    on every layer, so it is refused.

    Example:
      >>> check_model_fits(mesh, hidden=4096, heads=32, kv_heads=8, intermediate=14336,
      ...                  vocab=128256)
    """
    tp, fsdp = axis_size(mesh, TP), axis_size(mesh, FSDP)
    wanted = [("attention heads", heads, tp, TP), ("key/value heads", kv_heads, tp, TP),
              ("intermediate size", intermediate, tp, TP), ("vocab size", vocab, tp, TP),
              ("hidden size", hidden, fsdp, FSDP)]
    for what, size, parts, axis in wanted:
        if size is not None and size % parts:
            sizes = [s for _, s, _, a in wanted if a == axis and s is not None]
            raise MeshError(f"{what} {size} is not divisible by {axis}={parts}: with "
                            f"{_device_count(mesh)} devices this model allows {axis} in "
                            f"{_fitting(sizes, _device_count(mesh))}"
                            + (" (or pad the vocabulary to a multiple of it, e.g. "
                               f"{_round_up(size, parts)})" if what == "vocab size" else ""))


def check_config_fits(mesh: Mesh, config: Any) -> None:
    """`check_model_fits` with the sizes of a `models` config (`GPT2Config`, `LlamaConfig`:
    `hidden_dim`, `n_heads`, `n_kv_heads`, `intermediate_dim`, `vocab_size`).

    Example:
      >>> check_config_fits(make_mesh(tp=4), LlamaConfig.llama3_8b())
    """
    check_model_fits(mesh, hidden=config.hidden_dim, heads=config.n_heads,
                     kv_heads=config.n_kv_heads, intermediate=config.intermediate_dim,
                     vocab=config.vocab_size)


def check_batch_fits(mesh: Mesh, *, batch: int, seq: int | None = None,
                     sequence_parallel: bool = False) -> None:
    """Raise `MeshError` unless a `[batch, seq]` batch splits over the mesh: the batch over
    `dp x fsdp`, with sequence parallelism the sequence over `tp`, and with a cp axis the
    sequence over `cp`."""
    parts = axis_size(mesh, BATCH_AXES)
    if batch % parts:
        raise MeshError(f"batch {batch} is not divisible by dp x fsdp = {parts}: use a global "
                        f"batch that is a multiple of {parts} (e.g. {_round_up(batch, parts)})")
    if sequence_parallel and seq is not None:
        check_sequence_fits(mesh, seq)
    if seq is not None and axis_size(mesh, CP) > 1:
        check_context_fits(mesh, seq)


def check_sequence_fits(mesh: Mesh, seq: int) -> None:
    """Raise `MeshError` unless sequence parallelism can split `seq` tokens over `tp`."""
    tp = axis_size(mesh, TP)
    if seq % tp:
        raise MeshError(f"sequence parallelism splits the sequence over tp={tp}, but the sequence "
                        f"length {seq} is not divisible by it: pad the sequence to a multiple of "
                        f"{tp} (e.g. {_round_up(seq, tp)}) or turn sequence_parallel off")


def _device_count(mesh: Mesh) -> int:
    """The devices a layout may use: the mesh's, or all of them if there are more."""
    return max(mesh.size, jax.device_count())


def _fitting(sizes: list[int], devices: int) -> list[int]:
    """Axis sizes that divide the device count and every model dimension the axis splits."""
    return [d for d in range(1, devices + 1)
            if devices % d == 0 and all(s % d == 0 for s in sizes)]


def _round_up(n: int, k: int) -> int:
    return int(np.ceil(n / k) * k)


def check_context_fits(mesh: Mesh, seq: int, *, axis: str = CP) -> None:
    """Raise `MeshError` unless context parallelism can split `seq` tokens over `axis` (cp).

    Example:
      >>> check_context_fits(make_mesh(cp=4), 4096)
    """
    parts = axis_size(mesh, axis)
    if seq % parts:
        raise MeshError(f"context parallelism splits the sequence over {axis}={parts}, but the "
                        f"sequence length {seq} is not divisible by it: use a sequence length "
                        f"that is a multiple of {parts} (e.g. {_round_up(seq, parts)})")
