"""Bad flags and inputs end `python -m examples.train` with one line, `error: ...`, on stderr and
exit status 2, never a traceback; the flag parser's own rules."""
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import lora_jax as lj
import models
from examples import train as train_lib
from examples.cli import TrainConfig, check, one_line, parse_args, parse_targets
from models import GPT2Config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 checkpoint (4 heads), and an adapter saved for a wider GPT-2 (d=32 vs 64)."""
    root = tmp_path_factory.mktemp("cli")
    model = models.build(GPT2Config.tiny())
    models.save_hf(root / "gpt2", model, models.init_params(model, jax.random.key(0)))
    other = models.init_params(models.build(GPT2Config.tiny(n_embd=32)), jax.random.key(1))
    config = lj.LoraConfig(r=2, target_modules="all-linear")
    lj.save_adapter(root / "other_adapter", lj.inject(other, config, jax.random.key(2)), config,
                    base_model="tiny-gpt2-d32")
    return root


def fails(capsys, *argv) -> str:
    """Run the CLI; it must return 2 and print exactly one line, `error: ...`, on stderr."""
    assert train_lib.main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_bad_flags_give_one_line_errors(gpt2_dir, capsys, tmp_path):
    base = ["--model-path", str(gpt2_dir / "gpt2"), "--tokenizer", "bytes", "--dp", "1",
            "--batch-size", "4", "--seq-len", "32", "--no-progress"]
    err = fails(capsys, *base, "--targets", "q_proj,c_attn")
    assert "q_proj" in err and "c_attn, c_fc, c_proj" in err
    err = fails(capsys, *base[:-5], "--dp", "1", "--tp", "8", "--no-progress")
    assert "attention heads 4 is not divisible by tp=8" in err
    err = fails(capsys, *base, "--data", str(tmp_path / "missing.txt"))
    assert "missing.txt" in err and "does not exist" in err
    err = fails(capsys, *base, "--adapter-in", str(gpt2_dir / "other_adapter"))
    assert "does not fit this model" in err and "tiny-gpt2-d32" in err
    err = fails(capsys, *base, "--adapter-in", str(tmp_path / "nowhere"))
    assert "nowhere does not exist" in err
    assert "--resume needs --checkpoint-dir" in fails(capsys, *base, "--resume")
    assert "--model llama3" in fails(capsys, *base, "--model", "llama3")
    assert "no tokenizer.json" in fails(capsys, *base[:2], "--dp", "1")
    err = fails(capsys, *base, "--tp", "3", "--dp", "1", "--sp")
    assert "3 devices" in err or "divisible" in err


def test_the_module_entry_point_prints_no_traceback(tmp_path):
    """The real `python -m examples.train`, in a fresh process."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "examples.train", "--data",
                           str(tmp_path / "nope.txt")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: data file {str(tmp_path / 'nope.txt')!r} does not exist; pass --data a .txt "
        "or .jsonl file (default: the embedded examples/data/sonnets.txt)."]


def test_parse_flags():
    cfg = parse_args(["--targets", "q_proj, v_proj", "--rank", "4", "--sp", "--tp", "2"])
    assert cfg.targets == ("q_proj", "v_proj") and cfg.rank == 4 and cfg.sp
    assert parse_targets("all-linear") == "all-linear"
    assert parse_targets(r".*\.(q|v)_proj") == r".*\.(q|v)_proj"
    assert TrainConfig(metrics_file="runs/a/m.jsonl").plot_path == "runs/a/m.png"
    for bad, message in ((dict(batch_size=6, grad_accum=4), "not divisible"),
                         (dict(sp=True), "needs --tp > 1"),
                         (dict(rank=0), "--rank must be >= 1"),
                         (dict(num_processes=2), "--coordinator")):
        with pytest.raises(ValueError, match=message):
            check(TrainConfig(**bad))


def test_one_line():
    message = "the adapter does not fit:\n  - a: shape\n  - b: shape\nLoad it elsewhere."
    assert one_line(message) == "the adapter does not fit: a: shape; b: shape; Load it elsewhere."
    long = "bad:\n" + "\n".join(f"  - m{i}" for i in range(50))
    assert "more" in one_line(long) and "\n" not in one_line(long)


def test_every_documented_command_line_parses():
    """The `python -m examples.train ...` lines of the README and the usage guide are valid."""
    import re
    import shlex
    for doc in (ROOT / "README.md", ROOT / "docs" / "lora_usage.md"):
        text = doc.read_text().replace("\\\n", " ")
        commands = re.findall(r"^\s*python -m examples\.train(.*)$", text, re.M)
        for command in commands:
            parse_args(shlex.split(command.split("#")[0]))
        assert doc.name == "README.md" or len(commands) >= 3
