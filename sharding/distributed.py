"""Several processes, one program: `jax.distributed.initialize` from flags or the environment.

The same training code runs one process per host (all its GPUs) or one per GPU: after
`initialize`, `jax.devices()` lists every process's devices, `make_mesh` spans them all, and each
process feeds only the rows of the batch that its devices hold (`sharding.batch`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax

# Our variables first, then torchrun's, so a `torchrun`-style launcher works unchanged.
_ENV = {
    "coordinator_address": ("JAX_COORDINATOR_ADDRESS",),
    "num_processes": ("JAX_NUM_PROCESSES", "WORLD_SIZE"),
    "process_id": ("JAX_PROCESS_ID", "RANK"),
    "local_device_ids": ("JAX_LOCAL_DEVICE_IDS",),
}
# Schedulers whose variables `jax.distributed.initialize()` reads by itself.
_MANAGED = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "KUBERNETES_SERVICE_HOST", "TPU_WORKER_ID")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """Where the coordinator is and who this process is.

    Attributes:
      coordinator_address: "host:port" of process 0's coordination service.
      num_processes: number of processes in the job.
      process_id: this process's index in [0, num_processes).
      local_device_ids: the local devices this process drives (e.g. one GPU each), or None
        for all of them.
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "DistributedConfig":
        """Read `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` (or `WORLD_SIZE`),
        `JAX_PROCESS_ID` (or `RANK`) and `JAX_LOCAL_DEVICE_IDS` ("0,1"); with torchrun's
        `MASTER_ADDR`/`MASTER_PORT` as the coordinator when no JAX address is given."""
        env = os.environ if environ is None else environ
        get = lambda field: next((env[k] for k in _ENV[field] if env.get(k)), None)  # noqa: E731
        address = get("coordinator_address")
        if address is None and env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
            address = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
        ids = get("local_device_ids")
        return cls(coordinator_address=address,
                   num_processes=_int(get("num_processes"), "number of processes"),
                   process_id=_int(get("process_id"), "process id"),
                   local_device_ids=None if ids is None else tuple(int(i) for i in ids.split(",")))

    @property
    def explicit(self) -> bool:
        return self.coordinator_address is not None or (self.num_processes or 1) > 1


def _int(value: str | None, what: str) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the {what} from the environment is {value!r}, not an integer") from None


def initialize(config: DistributedConfig | None = None) -> bool:
    """Join the job if there is one; returns True when running with several processes.

    Uses `config`, else `DistributedConfig.from_env()`; with neither set but a known scheduler
    (SLURM, Open MPI, Kubernetes, Cloud TPU) detected, lets JAX find its peers. A lone process
    without any of these is left as it is. Call it before anything touches a device.

    Example (two processes on one machine, four CPU devices each):
      >>> initialize(DistributedConfig(coordinator_address="127.0.0.1:12345",
      ...                              num_processes=2, process_id=int(sys.argv[1])))
    """
    config = DistributedConfig.from_env() if config is None else config
    if _already_initialized():
        return jax.process_count() > 1
    if config.explicit:
        _check(config)
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes, process_id=config.process_id,
            local_device_ids=list(config.local_device_ids) if config.local_device_ids else None)
    elif any(os.environ.get(k) for k in _MANAGED):
        jax.distributed.initialize()
    else:
        return False
    return jax.process_count() > 1


def _check(config: DistributedConfig) -> None:
    missing = [name for name in ("coordinator_address", "num_processes", "process_id")
               if getattr(config, name) is None]
    if missing:
        raise ValueError(f"multi-process run is missing {missing}: set them (flags, or "
                         "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    if not 0 <= config.process_id < config.num_processes:
        raise ValueError(f"process_id {config.process_id} is outside [0, "
                         f"{config.num_processes})")


def _already_initialized() -> bool:
    is_init = getattr(jax.distributed, "is_initialized", None)
    return bool(is_init and is_init())

