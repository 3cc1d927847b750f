"""`python -m examples.train` as two processes with four CPU devices each (--coordinator,
--num-processes, --process-id; gloo over 127.0.0.1) logs the losses one process with eight
devices logs, and writes its checkpoint, adapter and PEFT export once.

Tolerance: float32 1e-5 (the same partitioned program; only the collectives cross processes).
The embedded Llama is used: `models.load_hf` cannot yet read a checkpoint in a multi-process CPU
run (it reads tensors onto `jax.devices("cpu")[0]`, which belongs to process 0).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from examples import train as train_lib

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--model", "llama3", "--batch-size", "4", "--seq-len", "32", "--steps", "3",
         "--eval-interval", "3", "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--no-progress",
         "--dp", "2", "--fsdp", "2", "--tp", "2", "--sp"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(path):
    records = [json.loads(line) for line in open(path)]
    return [r["loss"] for r in records], [r["eval_loss"] for r in records if "eval_loss" in r]


@pytest.mark.slow
def test_two_processes_log_the_eight_device_losses(tmp_path):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    outputs = ["--metrics-file", str(tmp_path / "mp.jsonl"), "--checkpoint-dir",
               str(tmp_path / "ckpt"), "--adapter-out", str(tmp_path / "adapter"),
               "--export-peft", str(tmp_path / "peft")]
    workers = [subprocess.Popen(
        [sys.executable, "-m", "examples.train", *FLAGS, *outputs, "--coordinator",
         f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    assert train_lib.main([*FLAGS, "--metrics-file", str(tmp_path / "one.jsonl")]) == 0
    for worker in workers:
        try:
            output, _ = worker.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for w in workers:
                w.kill()
            raise
        assert worker.returncode == 0, output.decode()[-4000:]
    (got, got_eval), (want, want_eval) = _losses(tmp_path / "mp.jsonl"), \
        _losses(tmp_path / "one.jsonl")
    print(f"max |loss diff| {np.max(np.abs(np.subtract(got, want))):.2e}")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got_eval, want_eval, rtol=0, atol=1e-5)
    assert (tmp_path / "ckpt" / "3").is_dir() and (tmp_path / "adapter").is_dir()
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
