"""Crash-safe resume: 6 steps straight equal 3 steps + save + restore in a fresh
process + 3 steps, bitwise (same program, same CPU, same XLA flags: nothing may differ, and the
LoRA dropout rng, optimizer state and data position all travel through the checkpoint). A save
killed part-way, or a truncated newest checkpoint, leaves the previous one in use, and `restore`
says which step it used."""
import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax as lj
from tests.toy_models import ScanNet

REPO = Path(__file__).resolve().parents[1]
MODEL = ScanNet(width=16, n_layers=3)
CONFIG = lj.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear")


@functools.lru_cache(maxsize=None)  # one compile of the step per process
def setup():
    """Base, fresh adapters, optimizer, its state, rng and the jitted step: fixed keys."""
    base = MODEL.init(jax.random.key(0), jnp.ones((2, 16)))["params"]
    base, adapters = lj.split(lj.inject(base, CONFIG, jax.random.key(1)))
    tx = lj.optimizer(optax.adamw(1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=1e-2), adapters)
    return base, adapters, tx.init(adapters), jax.random.key(2), make_step(base, tx)


def batch(position: int):
    """Batch number `position` of a deterministic stream (what `data_position` indexes)."""
    rng = np.random.default_rng(position)
    return (rng.standard_normal((8, 16), np.float32), rng.standard_normal((8, 8), np.float32))


def make_step(base, tx):
    @jax.jit
    def step(adapters, opt_state, rng, x, y):
        rng, key = jax.random.split(rng)

        def loss_fn(a):
            out = lj.apply(MODEL, {"params": lj.combine(base, a)}, x, rngs={"dropout": key},
                           deterministic=False, lora_dropout=CONFIG.lora_dropout)
            return jnp.mean((out - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, rng, loss
    return step


def train(state, step_fn, start: int, stop: int):
    """Steps `start`..`stop-1`; batch i is consumed by step i. Returns state and losses."""
    adapters, opt_state, rng = state
    losses = []
    for i in range(start, stop):
        adapters, opt_state, rng, loss = step_fn(adapters, opt_state, rng, *batch(i))
        losses.append(float(loss).hex())
    return (adapters, opt_state, rng), losses


def run_to(directory, stop: int, save_at=(), async_save=False):
    """Resume from `directory` if it holds a checkpoint, train to `stop`, saving at `save_at`."""
    _, adapters, opt_state, rng, step_fn = setup()
    ckpt = lj.TrainCheckpointer(directory, max_to_keep=2, config=CONFIG, async_save=async_save)
    start, found = 0, ckpt.restore(adapters=adapters, opt_state=opt_state)
    if found is not None:
        adapters, opt_state, rng, start = (found.adapters, found.opt_state, found.rng,
                                           found.data_position["next_batch"])
    state, losses = (adapters, opt_state, rng), []
    for mark in sorted({s for s in save_at if start < s <= stop} | {stop}):
        state, more = train(state, step_fn, start, mark)
        losses, start = losses + more, mark
        if mark in save_at:
            ckpt.save(mark, adapters=state[0], opt_state=state[1], rng=state[2],
                      data_position={"next_batch": mark})
    ckpt.close()
    return losses, (None if found is None else found.describe())


CHILD = textwrap.dedent("""
    import json, os, signal, sys
    from tests import test_resume as t
    directory, stop, kill_at = sys.argv[1], int(sys.argv[2]), sys.argv[4]
    save_at = json.loads(sys.argv[3])
    if kill_at:
        # Die the moment orbax renames step `kill_at`'s finished temporary directory into place:
        # its files are all written, the commit is not.
        real_rename = os.rename
        def rename(src, dst, *a, **k):
            if os.path.basename(os.fspath(dst)) == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_rename(src, dst, *a, **k)
        os.rename = rename
    losses, used = t.run_to(directory, stop, save_at, async_save=True)
    print(json.dumps({"losses": losses, "used": used}))
""")


def run_child(directory, stop, save_at=(), kill_at=""):
    proc = subprocess.run([sys.executable, "-c", CHILD, str(directory), str(stop),
                           json.dumps(list(save_at)), kill_at], cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True)
    return proc


def test_resume_in_fresh_process_is_bitwise_identical(tmp_path):
    straight, _ = run_to(tmp_path / "straight", 6)
    first, used = run_to(tmp_path / "ckpt", 3, save_at=(3,))
    assert used is None and first == straight[:3]
    proc = run_child(tmp_path / "ckpt", 6)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["used"].startswith("restored step 3 from")
    assert out["losses"] == straight[3:]


def test_killed_save_leaves_previous_checkpoint(tmp_path):
    proc = run_child(tmp_path, 6, save_at=(3, 6), kill_at="6")
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-3000:])
    assert any("tmp" in p.name for p in tmp_path.iterdir())     # the unfinished step 6
    straight, _ = run_to(tmp_path / "straight", 6)
    losses, used = run_to(tmp_path, 6)
    assert used.startswith("restored step 3 from") and "skipped" not in used
    assert losses == straight[3:]
    assert not any("tmp" in p.name for p in tmp_path.iterdir())  # cleaned up


def test_truncated_newest_checkpoint_falls_back(tmp_path, caplog):
    run_to(tmp_path, 6, save_at=(3, 6))
    data = [f for f in (tmp_path / "6").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert data
    for f in data:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    _, adapters, opt_state, _, _ = setup()
    with lj.TrainCheckpointer(tmp_path) as ckpt:
        found = ckpt.restore(adapters=adapters, opt_state=opt_state)
        assert found.step == 3 and found.data_position == {"next_batch": 3}
        assert [s for s, _ in found.skipped] == [6]
        assert "skipped step 6" in found.describe()
        assert "restored step 3" in caplog.text and "skipped step 6" in caplog.text
        assert (tmp_path / "6.corrupt").is_dir() and ckpt.all_steps() == [3]
        # Training can save step 6 again.
        ckpt.save(6, adapters=found.adapters, opt_state=found.opt_state, rng=found.rng,
                  data_position={"next_batch": 6})
        ckpt.wait()
        assert ckpt.all_steps() == [3, 6]
        with pytest.raises(lj.LoraError, match="step 4"):
            ckpt.restore(adapters=adapters, opt_state=opt_state, step=4)


def test_restore_into_sharded_templates(tmp_path):
    """Restore places every array in the template's sharding (here: `lora_a` and its Adam
    moments split over 8 simulated devices on the input axis, the rest replicated)."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    _, adapters, opt_state, rng, _ = setup()
    with lj.TrainCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, adapters=adapters, opt_state=opt_state, rng=rng, data_position=[1, "a"])
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))

    def place(x):
        spec = P(None, "fsdp") if x.ndim == 3 and x.shape[1] % 8 == 0 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))

    templates = jax.tree.map(place, (adapters, opt_state))
    with lj.TrainCheckpointer(tmp_path) as ckpt:
        found = ckpt.restore(adapters=templates[0], opt_state=templates[1])
    assert found.step == 1 and found.data_position == [1, "a"]
    assert jax.random.key_impl(found.rng) == jax.random.key_impl(rng)
    np.testing.assert_array_equal(jax.random.key_data(found.rng), jax.random.key_data(rng))
    for got, want, template in zip(jax.tree.leaves((found.adapters, found.opt_state)),
                                   jax.tree.leaves((adapters, opt_state)),
                                   jax.tree.leaves(templates)):
        assert got.sharding == template.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert any(t.sharding.spec == P(None, "fsdp") for t in jax.tree.leaves(templates))
    # shardings= replaces the templates' own (here: abstract templates without any).
    shapes = jax.eval_shape(lambda t: t, (adapters, opt_state))
    shardings = jax.tree.map(lambda t: t.sharding, templates)
    with lj.TrainCheckpointer(tmp_path) as ckpt:
        found = ckpt.restore(adapters=shapes[0], opt_state=shapes[1],
                             shardings={"adapters": shardings[0], "opt_state": shardings[1]})
    assert found.step == 1
    for got, template in zip(jax.tree.leaves((found.adapters, found.opt_state)),
                             jax.tree.leaves(templates)):
        assert got.sharding == template.sharding
