"""Every bad mesh, model shape, batch or launch setting fails early with an error that names the
problem and the fix."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from models.llama import Llama, LlamaConfig
from sharding import (DistributedConfig, MeshError, TensorParallelism, check_batch_fits,
                      check_config_fits, check_model_fits, make_mesh, param_shardings,
                      shard_batch, spec_for)
from sharding.distributed import initialize
from tests.sharding_common import mesh_of


def test_make_mesh_axes_sizes_and_types():
    mesh = make_mesh(dp=2, fsdp=2, tp=2)
    assert mesh.axis_names == ("dp", "fsdp", "tp")
    assert dict(mesh.shape) == {"dp": 2, "fsdp": 2, "tp": 2}
    assert mesh.axis_types == (AxisType.Auto,) * 3   # GSPMD code: chosen on purpose
    assert dict(make_mesh(dp=-1, tp=4).shape) == {"dp": 2, "fsdp": 1, "tp": 4}
    # tp is innermost: neighbouring devices (one host) form a tp group
    assert [d.id for d in mesh.devices[0, 0]] == [0, 1]


@pytest.mark.parametrize("sizes,message", [
    (dict(dp=2, tp=2), "has 4 devices but there are 8"),
    (dict(dp=3, tp=-1), "cannot infer tp"),
    (dict(dp=-1, tp=-1), "only one mesh size may be -1"),
    (dict(dp=0, tp=8), "positive integers"),
    (dict(dp=2.0, tp=4), "positive integers"),
])
def test_bad_mesh_sizes(sizes, message):
    with pytest.raises(MeshError, match=message):
        make_mesh(**sizes)


@pytest.mark.parametrize("dims,message", [
    (dict(heads=12), "attention heads 12 is not divisible by tp=8"),
    (dict(kv_heads=4), "key/value heads 4 is not divisible by tp=8"),
    (dict(intermediate=100), "intermediate size 100 is not divisible by tp=8"),
    (dict(vocab=50257), r"vocab size 50257 is not divisible by tp=8.*pad the vocabulary.*50264"),
])
def test_model_dims_that_tp_does_not_divide(dims, message):
    fits = dict(hidden=64, heads=16, kv_heads=8, intermediate=128, vocab=512)
    with pytest.raises(MeshError, match=message):
        check_model_fits(mesh_of(tp=8), **{**fits, **dims})


def test_hidden_size_that_fsdp_does_not_divide():
    with pytest.raises(MeshError, match="hidden size 60 is not divisible by fsdp=8"):
        check_model_fits(mesh_of(fsdp=8), hidden=60, heads=4)


def test_model_config_checked_by_its_own_field_names():
    check_config_fits(mesh_of(tp=2), LlamaConfig.tiny())          # 4 heads, 2 kv heads
    with pytest.raises(MeshError, match="key/value heads 2 is not divisible by tp=4"):
        check_config_fits(mesh_of(tp=4), LlamaConfig.tiny())


def test_parameter_that_the_mesh_does_not_divide_is_named():
    tree = {"model": {"embed_tokens": {"embedding": jax.ShapeDtypeStruct((500, 64), jnp.float32)}}}
    with pytest.raises(MeshError, match=r"model.embed_tokens.embedding has shape \(500, 64\); "
                                        r"axis 0 \(500\) is split over tp = 8"):
        param_shardings(tree, mesh_of(tp=8))


def test_batch_and_sequence_that_do_not_split():
    mesh = mesh_of(dp=4, tp=2)
    with pytest.raises(MeshError, match=r"batch 6 is not divisible by dp x fsdp = 4.*e\.g\. 8"):
        check_batch_fits(mesh, batch=6)
    with pytest.raises(MeshError, match="sequence length 9 is not divisible"):
        check_batch_fits(mesh, batch=8, seq=9, sequence_parallel=True)
    with pytest.raises(MeshError, match="batch 6"):
        shard_batch(np.zeros((6, 4), np.int32), mesh)


def test_sequence_parallel_model_refuses_an_indivisible_sequence():
    mesh = mesh_of(tp=4)
    model = Llama(LlamaConfig.tiny(num_key_value_heads=4),
                  TensorParallelism(mesh=mesh, sequence_parallel=True))
    with pytest.raises(MeshError, match="sequence length 6 is not divisible by it"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((4, 6), jnp.int32))


def test_bad_rules():
    with pytest.raises(MeshError, match="no partition rule matches"):
        spec_for("a.kernel", 2, rules=((r"^b", P()),))
    with pytest.raises(MeshError, match="has 1"):
        spec_for("a.bias", 1, rules=((r".*", P("fsdp", "tp")),))


def test_bad_role_and_mark():
    parallel = TensorParallelism(mesh=mesh_of(tp=2))
    with pytest.raises(ValueError, match="unknown parallel role 'diagonal'"):
        parallel.dense(4, role="diagonal", name="x", use_bias=False, dtype=None,
                       param_dtype=jnp.float32, kernel_init=None, bias_init=None)
    with pytest.raises(ValueError, match="unknown activation mark"):
        parallel.spec(jnp.zeros((2, 4, 8)), "hidden")


def test_distributed_config_from_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
           "JAX_PROCESS_ID": "3", "JAX_LOCAL_DEVICE_IDS": "0,1"}
    assert DistributedConfig.from_env(env) == DistributedConfig(
        coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
        local_device_ids=(0, 1))
    torchrun = {"MASTER_ADDR": "h0", "MASTER_PORT": "29500", "WORLD_SIZE": "2", "RANK": "1"}
    assert DistributedConfig.from_env(torchrun) == DistributedConfig(
        coordinator_address="h0:29500", num_processes=2, process_id=1)
    assert not DistributedConfig.from_env({}).explicit
    with pytest.raises(ValueError, match="number of processes from the environment is 'two'"):
        DistributedConfig.from_env({"JAX_NUM_PROCESSES": "two"})


def test_incomplete_or_inconsistent_distributed_config():
    with pytest.raises(ValueError, match=r"missing \['num_processes', 'process_id'\]"):
        initialize(DistributedConfig(coordinator_address="127.0.0.1:1"))
    with pytest.raises(ValueError, match=r"process_id 2 is outside \[0, 2\)"):
        initialize(DistributedConfig(coordinator_address="127.0.0.1:1", num_processes=2,
                                     process_id=2))
    assert initialize(DistributedConfig()) is False   # a lone process: nothing to join
