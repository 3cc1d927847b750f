"""Adapter checkpoints: `save_adapter` -> `load_adapter` is bit-exact,
across processes and into sharded trees (8 simulated CPU devices); bad input is a clear
`LoraError` and never destroys a saved adapter. Exact equality throughout: checkpoints store
raw bytes."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import lora_jax as lj
from lora_jax import checkpoint
from sharding import leaf_sharding, param_shardings
from tests.toy_models import DenseNet, ScanNet

REPO = Path(__file__).resolve().parents[1]
CONFIG = lj.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                       rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3.0},
                       init_lora_weights=False)


def _base(model=None, width=16):
    model = model or ScanNet(width=width)
    return model.init(jax.random.key(0), jnp.ones((2, width)))["params"]


def _injected(base, config=CONFIG, seed=1):
    return lj.inject(base, config, jax.random.key(seed))


def _assert_same_adapters(got, want):
    got, want = lj.lora_params(got), lj.lora_params(want)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize("model", [DenseNet(), ScanNet()])
def test_round_trip_is_bit_exact(tmp_path, model):
    base = _base(model)
    params = _injected(base)
    lj.save_adapter(tmp_path / "a", params, CONFIG, base_model="toy")
    _assert_same_adapters(lj.load_adapter(tmp_path / "a", base), params)        # into a base
    other = _injected(base, seed=9)
    _assert_same_adapters(lj.load_adapter(tmp_path / "a", other), params)       # over adapters
    loaded = lj.load_adapter(tmp_path / "a", {"params": base})                 # variables form
    _assert_same_adapters(loaded["params"], params)
    assert lj.adapter_config(tmp_path / "a") == CONFIG
    assert not list(tmp_path.glob("*.saving")) and not list(tmp_path.glob("*.previous"))


def test_round_trip_bfloat16_adapters(tmp_path):
    config = lj.LoraConfig(r=4, target_modules="all-linear", adapter_dtype="bfloat16",
                           init_lora_weights=False)
    base = _base(DenseNet())
    params = _injected(base, config)
    assert params["block"]["q_proj"]["lora_a"].dtype == jnp.bfloat16
    lj.save_adapter(tmp_path / "a", params, config)
    _assert_same_adapters(lj.load_adapter(tmp_path / "a", base), params)


def _mesh():
    return jax.make_mesh((2, 4), ("fsdp", "tp"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 2)  # GSPMD-style


def _shard_base(base, mesh):
    """Kernels [L, in, out] split (fsdp, tp) on (in, out); everything else replicated."""
    def place(path, x):
        spec = P(None, "fsdp", "tp") if path[-1].key == "kernel" and x.ndim == 3 else P()
        return jax.device_put(x, NamedSharding(mesh, spec))
    return jax.tree_util.tree_map_with_path(place, base)


def test_load_into_sharded_tree(tmp_path):
    mesh = _mesh()
    base = _base()
    params = _injected(base)
    lj.save_adapter(tmp_path / "a", params, CONFIG)
    sharded_base = _shard_base(base, mesh)
    # shardings= from the one adapter rule (sharding.rules): A keeps the kernel's input spec
    # and B its output spec, fsdp dropped; as a tree of the adapters or one leaf at a time.
    like = jax.eval_shape(lambda p: lj.lora_params(_injected(p)), base)
    for shardings in (param_shardings(like, mesh), leaf_sharding(mesh)):
        loaded = lj.load_adapter(tmp_path / "a", sharded_base, shardings=shardings)
        _assert_same_adapters(loaded, params)
        q = loaded["layers"]["q_proj"]
        assert q["lora_a"].sharding.spec == P(None, None, None)
        assert q["lora_b"].sharding.spec == P(None, None, "tp")
        assert q["lora_a"].sharding.mesh.shape == mesh.shape
    # Without shardings=: replicated over the kernel's devices (lora_jax derives no specs).
    loaded = lj.load_adapter(tmp_path / "a", sharded_base)
    _assert_same_adapters(loaded, params)
    q = loaded["layers"]["q_proj"]
    assert q["lora_a"].sharding == NamedSharding(mesh, P()) == q["lora_b"].sharding
    with pytest.raises(lj.LoraError, match="no entry for layers.q_proj.lora_a"):
        lj.load_adapter(tmp_path / "a", sharded_base, shardings={"layers": {}})
    # Into existing sharded adapters: their shardings are kept.
    target = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), params)
    loaded = lj.load_adapter(tmp_path / "a", target)
    _assert_same_adapters(loaded, params)
    assert loaded["layers"]["v_proj"]["lora_b"].sharding.spec == P()


SAVE_IN_CHILD = textwrap.dedent("""
    import sys, jax
    from tests import test_checkpoint as t
    mesh = t._mesh()
    params = t._injected(t._shard_base(t._base(), mesh))   # sharded adapters, saved sharded
    import lora_jax as lj
    lj.save_adapter(sys.argv[1], params, t.CONFIG, base_model="toy-scan")
""")


def test_round_trip_across_processes(tmp_path):
    out = tmp_path / "from_child"
    subprocess.run([sys.executable, "-c", SAVE_IN_CHILD, str(out)], cwd=REPO, check=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    base = _base()
    want = _injected(base)                          # same key, same values in this process
    _assert_same_adapters(lj.load_adapter(out, base), want)
    _assert_same_adapters(lj.load_adapter(out, _shard_base(base, _mesh())), want)


def test_wrong_base_model_names_each_mismatch(tmp_path):
    lj.save_adapter(tmp_path / "a", _injected(_base()), CONFIG, base_model="toy-16")
    with pytest.raises(lj.LoraError) as err:
        lj.load_adapter(tmp_path / "a", _base(width=8))
    msg = str(err.value)
    assert "layers.q_proj: the adapter fits a kernel of shape [3, 16, 16]" in msg
    assert "layers.v_proj" in msg and "toy-16" in msg and "Nothing was loaded" in msg
    with pytest.raises(lj.LoraError, match="no such module"):
        lj.load_adapter(tmp_path / "a", _base(DenseNet()))
    # Targets differ: the model has adapters on o_proj too.
    more = _injected(_base(), lj.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    with pytest.raises(lj.LoraError, match="layers.o_proj: the model has an adapter here"):
        lj.load_adapter(tmp_path / "a", more)


def test_missing_and_corrupt_checkpoints(tmp_path):
    base = _base()
    with pytest.raises(lj.LoraError, match="does not exist"):
        lj.load_adapter(tmp_path / "nope", base)
    (tmp_path / "not_ckpt").mkdir()
    with pytest.raises(lj.LoraError, match="not a readable lora_jax adapter checkpoint"):
        lj.load_adapter(tmp_path / "not_ckpt", base)
    params = _injected(base)
    for damage in ("truncate", "flip"):
        path = lj.save_adapter(tmp_path / damage, params, CONFIG)
        _damage_arrays(path, damage)
        with pytest.raises(lj.LoraError, match="corrupt"):
            lj.load_adapter(path, base)


def _damage_arrays(path: Path, how: str) -> None:
    """Damage the orbax array data files (OCDBT `d/` chunks) of the adapter item."""
    files = [f for f in (path / checkpoint.ADAPTER_ITEM).rglob("*")
             if f.is_file() and f.parent.name == "d"]
    assert files
    for f in files:
        data = bytearray(f.read_bytes())
        if how == "truncate":
            f.write_bytes(data[: len(data) // 2])
        else:  # flip one byte near the end, where the array payload lies; size unchanged
            data[-5] ^= 0xFF
            f.write_bytes(bytes(data))


def test_saving_never_loses_the_previous_adapter(tmp_path):
    base = _base()
    first, second = _injected(base, seed=1), _injected(base, seed=2)
    path = lj.save_adapter(tmp_path / "a", first, CONFIG)
    with pytest.raises(lj.LoraError, match="overwrite=True"):
        lj.save_adapter(path, second, CONFIG)
    _assert_same_adapters(lj.load_adapter(path, base), first)
    with pytest.raises(lj.LoraError, match="no lora_a"):
        lj.save_adapter(path, base, CONFIG, overwrite=True)
    _assert_same_adapters(lj.load_adapter(path, base), first)
    # A save that died between its renames: only `<path>.previous` is left; it still loads, and
    # the next save puts it back first.
    path.rename(path.with_name("a.previous"))
    _assert_same_adapters(lj.load_adapter(path, base), first)
    lj.save_adapter(path, second, CONFIG, overwrite=True)
    _assert_same_adapters(lj.load_adapter(path, base), second)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    # A save that died while writing leaves `<path>.saving` debris: ignored, then cleaned.
    (tmp_path / "a.saving").mkdir()
    _assert_same_adapters(lj.load_adapter(path, base), second)
    lj.save_adapter(path, first, CONFIG, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
