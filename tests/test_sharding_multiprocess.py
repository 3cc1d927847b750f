"""Two processes with four CPU devices each (jax.distributed over 127.0.0.1) train a tiny Llama
with dp=2 x tp=4 and sequence parallelism, and get the losses one process with eight devices
gets. The same `train_losses` runs in both; run as a script, this file is one worker process.

Tolerance: float32 1e-5, as elsewhere; the two runs execute the same partitioned program, only
the collectives travel through gloo between processes instead of within one.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

N_PROCESSES, LOCAL_DEVICES, STEPS, B, S = 2, 4, 3, 8, 16
ROOT = Path(__file__).resolve().parents[1]


def train_losses(mesh) -> list[float]:
    """Init base, adapters and optimizer state sharded, then STEPS jitted, donated steps."""
    import jax
    import numpy as np
    import optax

    import lora_jax as lj
    from models.llama import Llama, LlamaConfig
    from models.loss import cross_entropy
    from sharding import (TensorParallelism, from_process_local, param_shardings, process_rows,
                          replicated)
    from tests.sharding_common import FAST

    config = LlamaConfig.tiny(num_key_value_heads=4, scan_layers=True)
    lora = lj.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (B, S), np.int32)

    def init_params(key):
        params = Llama(config).init(key, ids)["params"]
        return lj.split(lj.inject(params, lora, jax.random.fold_in(key, 1)))

    key = jax.random.key(0)
    tx = lj.optimizer(optax.adam(1e-3, eps=1e-3), jax.eval_shape(init_params, key)[1])

    def init(key):
        """Base, adapters and optimizer state in one program, each leaf born sharded."""
        base, adapters = init_params(key)
        return base, adapters, tx.init(adapters)

    shardings = param_shardings(jax.eval_shape(init, key), mesh)
    base, adapters, opt_state = jax.jit(init, out_shardings=shardings).lower(key).compile(
        compiler_options=FAST)(key)
    model = Llama(config, TensorParallelism(mesh=mesh, sequence_parallel=True))

    def step(adapters, opt_state, base, ids):
        loss, grads = jax.value_and_grad(
            lambda a: cross_entropy(lj.apply(model, {"params": lj.combine(base, a)}, ids), ids,
                                    shift=True))(adapters)
        updates, opt_state = tx.update(grads, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    out_shardings = (shardings[1], shardings[2], replicated(mesh))
    # The multi-host input path: each process reads only the rows its devices hold. One batch,
    # seen STEPS times: the loss must fall.
    batch = from_process_local(ids[process_rows(mesh, B)], mesh)
    compiled = jax.jit(step, donate_argnums=(0, 1), out_shardings=out_shardings).lower(
        adapters, opt_state, base, batch).compile(compiler_options=FAST)
    losses = []
    for _ in range(STEPS):
        adapters, opt_state, loss = compiled(adapters, opt_state, base, batch)
        losses.append(float(loss))  # replicated: readable in every process
    return losses


def _worker(process_id: int, port: int, out: Path) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL_DEVICES}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")   # as tests/conftest.py
    from sharding import DistributedConfig, initialize, make_mesh
    assert initialize(DistributedConfig(coordinator_address=f"127.0.0.1:{port}",
                                        num_processes=N_PROCESSES, process_id=process_id))
    assert jax.device_count() == N_PROCESSES * LOCAL_DEVICES
    mesh = make_mesh(dp=2, tp=4)
    # tp groups stay inside a process; dp crosses between them
    assert {d.process_index for d in mesh.devices[0].flat} == {0}
    losses = train_losses(mesh)
    out.write_text(json.dumps({"process": jax.process_index(), "losses": losses}))
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ != "__main__":
    import pytest

    @pytest.mark.slow
    def test_two_processes_train_like_one_process_with_eight_devices(tmp_path):
        import numpy as np

        from tests.sharding_common import TOL, mesh_of

        port, env = _free_port(), {**os.environ, "PYTHONPATH": str(ROOT)}
        workers = [subprocess.Popen([sys.executable, __file__, str(i), str(port),
                                     str(tmp_path / f"p{i}.json")], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                   for i in range(N_PROCESSES)]
        expected = train_losses(mesh_of(dp=2, tp=4))   # meanwhile, one process, 8 devices
        for worker in workers:
            try:
                output, _ = worker.communicate(timeout=240)
            except subprocess.TimeoutExpired:
                for w in workers:
                    w.kill()
                raise
            assert worker.returncode == 0, output.decode()[-4000:]
        for i in range(N_PROCESSES):
            got = json.loads((tmp_path / f"p{i}.json").read_text())
            assert got["process"] == i
            np.testing.assert_allclose(got["losses"], expected, **TOL)
        assert expected[-1] < expected[0]   # it trains
else:
    _worker(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
