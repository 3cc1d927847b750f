"""benchmarks/max_fit.py without a GPU: the search on fake out-of-memory errors, the driver's
bookkeeping, and the tiny shape end to end on CPU (both frameworks, ~30 s)."""
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import max_fit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class JaxRuntimeError(RuntimeError):
    """Stands in for jax.errors.JaxRuntimeError: is_oom matches the class name and message."""


class OutOfMemoryError(RuntimeError):
    """Stands in for torch.OutOfMemoryError."""


def fake_attempt(limit: int, error=JaxRuntimeError, tried=None):
    def attempt(batch, seq):
        if tried is not None:
            tried.append(batch)
        if batch * seq > limit:
            raise error("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.50GiB.")
        return batch * seq / 1000, 0.1
    return attempt


def test_search_stops_at_first_oom():
    tried, freed = [], []
    rows = max_fit.search(max_fit.sizes([1, 2, 4, 8, 16, 32], [10]), fake_attempt(80, tried=tried),
                          on_oom=lambda: freed.append(1))
    assert tried == [1, 2, 4, 8, 16]  # nothing after the first out-of-memory
    assert [r["fits"] for r in rows] == [True] * 4 + [False]
    assert rows[-1]["oom"].startswith("RESOURCE_EXHAUSTED") and freed == [1]
    summary = max_fit.summarize(rows)
    assert summary == {"max_batch": 8, "max_seq": 10, "max_tokens": 80, "peak_gib": 0.08,
                       "oom_at": [16, 10]}


def test_search_torch_oom_and_wrapped_oom():
    rows = max_fit.search([(1, 10), (2, 10)], fake_attempt(10, error=OutOfMemoryError))
    assert max_fit.summarize(rows)["max_batch"] == 1

    def wrapped(batch, seq):  # torch.compile raises its own error "from" the OOM
        try:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except OutOfMemoryError as err:
            raise RuntimeError("BackendCompilerFailed") from err
    assert max_fit.summarize(max_fit.search([(1, 10)], wrapped))["max_batch"] == 0


@pytest.mark.parametrize("error", [ValueError("shape mismatch"),
                                   JaxRuntimeError("INTERNAL: cuDNN failed")])
def test_search_propagates_other_errors(error):
    def attempt(batch, seq):
        if batch > 1:
            raise error
        return 1.0, 0.1
    with pytest.raises(type(error)):
        max_fit.search([(1, 10), (2, 10)], attempt)


def test_sizes_and_summary_without_oom():
    # by tokens per step; equal tokens: the shorter sequence first
    assert max_fit.sizes([1, 2], [64, 32]) == [(1, 32), (2, 32), (1, 64), (2, 64)]
    rows = max_fit.search([(1, 10), (2, 10)], fake_attempt(100))
    assert max_fit.summarize(rows)["oom_at"] is None  # the limit was not reached


def test_configs_and_batch_overrides():
    args = max_fit.parse_args(["--frameworks", "jax", "peft-eager", "--jax-variant", "default",
                               "--jax-variant", "remat=nothing_saveable", "--peft-checkpointing",
                               "both", "--batches", "4", "8"])
    keys = [c["key"] for c in max_fit.configs(args)]
    assert keys == ["jax", "jax:remat=nothing_saveable", "peft-eager", "peft-eager:ckpt"]
    args = max_fit.parse_args(["--frameworks", "peft-eager:ckpt", "peft+compile"])
    assert [(c["key"], c["flags"]) for c in max_fit.configs(args)] == [
        ("peft-eager:ckpt", ["--checkpointing"]), ("peft+compile", [])]
    over = ["jax=1,2", "jax:remat=nothing_saveable=32,64"]
    assert max_fit.batches_for("jax:remat=nothing_saveable", over, [4]) == [32, 64]
    assert max_fit.batches_for("jax:remat=full", over, [4]) == [1, 2]  # the framework's list
    assert max_fit.batches_for("peft-eager", over, [4]) == [4]


def test_timeout_or_crash_keeps_the_sizes_that_fitted():
    row = {"batch": 4, "seq": 8, "fits": True, "peak_gib": 1.0, "step_s": 0.1}
    line = max_fit.ATTEMPT + json.dumps(row)
    script = f"print({line!r}, flush=True); import time; time.sleep(60)"
    rows, meta, error = max_fit.run_worker([sys.executable, "-c", script], timeout=3)
    assert rows == [row] and meta == {} and error == "timeout after 3s"

    script = f"print({line!r}, flush=True); raise ValueError('boom')"
    rows, _, error = max_fit.run_worker([sys.executable, "-c", script], timeout=30)
    assert rows == [row] and error.splitlines()[0] == "exit 1: ValueError: boom"


def test_tiny_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "fit.jsonl"
    cmd = [sys.executable, "-m", "benchmarks.max_fit", "--shape", "tiny", "--seq", "64",
           "--batches", "1", "2", "--frameworks", "jax", "peft-eager", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["framework"] for r in records] == ["lora-jax", "peft-eager"]
    for r in records:
        assert "error" not in r, r
        assert [a["batch"] for a in r["attempts"]] == [1, 2]
        assert r["max_batch"] == 2 and r["max_tokens"] == 128 and r["oom_at"] is None
        assert r["attempts"][-1]["step_s"] > 0
    assert [a["steps"] for a in records[0]["attempts"]] == [2, 2]  # lora-jax: the second timed
    assert "largest fit" in proc.stdout and "lora-jax [attn=xla]" in proc.stdout


def test_one_step_compiles_ahead_and_times_one_step_on_cpu(tmp_path):
    """--one-step: the row says one step ran, how long compiling took, and the step's loss."""
    out = tmp_path / "fit.jsonl"
    cmd = [sys.executable, "-m", "benchmarks.max_fit", "--shape", "tiny", "--seq", "64",
           "--batches", "1", "--frameworks", "jax", "--one-step", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    (attempt,) = record["attempts"]
    assert attempt["steps"] == 1 and attempt["fits"], attempt
    assert attempt["compile_s"] > 0 and attempt["step_s"] > 0 and np.isfinite(attempt["loss"])


def test_one_step_is_refused_for_pytorch():
    with pytest.raises(SystemExit):
        max_fit.parse_args(["--frameworks", "jax", "peft-eager", "--one-step"])


def documented_commands() -> list[list[str]]:
    text = max_fit.__doc__.replace("\\\n", " ")
    return [shlex.split(line.split("benchmarks.max_fit", 1)[1])
            for line in text.splitlines() if "python -m benchmarks.max_fit" in line]


def test_documented_commands_parse():
    commands = documented_commands()
    assert len(commands) == 7
    for argv in commands:
        max_fit.configs(max_fit.parse_args(argv))
    args = max_fit.parse_args(commands[1])  # the 8B comparison: each configuration's batches
    plan = {c["key"]: max_fit.batches_for(c["key"], args.batches_for, args.batches)
            for c in max_fit.configs(args)}
    assert plan == {"jax:remat=nothing_saveable": [64, 128], "jax": [8, 10, 12],
                    "peft-eager:ckpt": [16, 24, 32], "peft-eager": [4, 5, 6],
                    "peft+compile": [6, 7, 8]}
