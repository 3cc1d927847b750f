"""Nothing a user owns is lost: overwrite replaces only an earlier output of the same kind, a
resume with other settings is refused without touching the checkpoints, every output is checked
before the first step, a non-finite value stops the run and is never saved, and bad input ends
in one `error:` line (never a traceback). Each case is met where the user meets it: the CLI
(`examples.train.main`, the code `python -m examples.train` runs) or the library call."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax as lj
import models
from examples import train as train_lib
from models import GPT2Config

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--dp", "1", "--batch-size", "4", "--seq-len", "32", "--eval-interval", "0",
        "--no-progress"]


def fails(capsys, *argv, status: int = 2) -> str:
    """Run the CLI; it must return `status` and print exactly one stderr line, `error: ...`."""
    assert train_lib.main(list(argv)) == status
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes: 'nothing was touched' is this unchanged."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 4-step CLI run: checkpoints at steps 2 and 4, a metrics file, a PEFT export."""
    root = tmp_path_factory.mktemp("run")
    argv = [*FAST, "--steps", "4", "--save-every", "2", "--checkpoint-dir", str(root / "ckpt"),
            "--metrics-file", str(root / "metrics.jsonl"), "--export-peft", str(root / "peft")]
    assert train_lib.main(argv) == 0
    return root


@pytest.fixture(scope="module")
def tiny():
    model = models.build(GPT2Config.tiny())
    params = models.init_params(model, jax.random.key(0))
    config = lj.LoraConfig(r=2, target_modules="all-linear")
    return model, lj.inject(params, config, jax.random.key(1)), config


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


# ---- 1. overwrite replaces only an earlier output of the same kind ----------------------------

def test_overwrite_refuses_a_base_model_or_unrelated_files(tiny, tmp_path):
    model, params, config = tiny
    base_dir = tmp_path / "base"
    models.save_hf(base_dir, model, lj.merge(params))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    before = snapshot(tmp_path)
    for target in (base_dir, tmp_path / "mine"):
        with pytest.raises(lj.LoraError, match="refusing to overwrite"):
            lj.export_peft(target, params, config, overwrite=True)
        with pytest.raises(lj.LoraError, match="refusing to overwrite"):
            lj.save_adapter(target, params, config, overwrite=True)
        with pytest.raises(lj.LoraError, match="refusing to overwrite"):
            lj.export_merged(target, params, models.hf_writer(model), overwrite=True)
    assert snapshot(tmp_path) == before
    assert not list(tmp_path.glob("*.saving")) and not list(tmp_path.glob("*.previous"))


def test_overwrite_replaces_an_earlier_output_of_the_same_kind(tiny, tmp_path):
    model, params, config = tiny
    doubled = jax.tree.map(lambda x: x, params)
    for save, kind in ((lambda p, **k: lj.export_peft(tmp_path / "peft", p, config, **k), "peft"),
                       (lambda p, **k: lj.save_adapter(tmp_path / "ad", p, config, **k), "ad"),
                       (lambda p, **k: lj.export_merged(tmp_path / "m", p, models.hf_writer(model), **k), "m")):
        save(params)
        with pytest.raises(lj.LoraError, match="already exists"):
            save(doubled)
        save(doubled, overwrite=True)
    # a PEFT export and an adapter checkpoint are different kinds: neither replaces the other
    with pytest.raises(lj.LoraError, match="not an earlier PEFT adapter"):
        lj.export_peft(tmp_path / "ad", params, config, overwrite=True)
    with pytest.raises(lj.LoraError, match="not an earlier adapter checkpoint"):
        lj.save_adapter(tmp_path / "peft", params, config, overwrite=True)


def test_cli_overwrite_never_deletes_a_run_directory(run, tmp_path, capsys):
    """`--export-peft RUN --overwrite` where RUN holds the checkpoints and metrics."""
    run = copy_run(run, tmp_path)
    before = snapshot(run)
    err = fails(capsys, *FAST, "--steps", "2", "--export-peft", str(run), "--overwrite")
    assert "refusing to overwrite" in err and "'ckpt'" in err and "metrics.jsonl" in err
    assert snapshot(run) == before


def test_save_hf_refuses_a_directory_it_did_not_write(tiny, tmp_path):
    model, params, _ = tiny
    target = tmp_path / "hf"
    target.mkdir()
    (target / "config.json").write_text('{"mine": true}')
    for overwrite in (False, True):
        with pytest.raises(models.CheckpointError):
            models.save_hf(target, model, lj.merge(params), overwrite=overwrite)
    assert (target / "config.json").read_text() == '{"mine": true}'
    assert [p.name for p in target.iterdir()] == ["config.json"]
    models.save_hf(tmp_path / "ok", model, lj.merge(params))
    (tmp_path / "ok" / "tokenizer.json").write_text("{}")  # an HF model dir may hold these
    models.save_hf(tmp_path / "ok", model, lj.merge(params), overwrite=True)
    assert (tmp_path / "ok" / "tokenizer.json").read_text() == "{}"


# ---- 2. a resume with other settings is refused; the checkpoints are left as they are ---------

def test_resume_with_another_rank_is_refused_and_keeps_every_step(run, tmp_path, capsys):
    run = copy_run(run, tmp_path)
    ckpt = run / "ckpt"
    before = snapshot(ckpt)
    common = [*FAST, "--steps", "6", "--save-every", "2", "--checkpoint-dir", str(ckpt),
              "--metrics-file", str(run / "metrics.jsonl"), "--resume"]
    err = fails(capsys, *common, "--rank", "8", "--seed", "3")
    assert "--rank: checkpoint 16, this run 8" in err and "--seed: checkpoint 0, this run 3" in err
    assert snapshot(ckpt) == before and not list(ckpt.glob("*.corrupt*"))
    # the right flags then continue from step 4, not from step 1, and append to the metrics
    assert train_lib.main(common) == 0
    assert "restored step 4" in capsys.readouterr().out
    steps = [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_restore_into_other_shapes_is_a_mismatch_not_corruption(tmp_path):
    adapters = {"q": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.zeros((2, 4))}}
    with lj.TrainCheckpointer(tmp_path, async_save=False, settings={"--rank": 2}) as ckpt:
        ckpt.save(1, adapters=adapters, opt_state={})
    other = {"q": {"lora_a": jnp.ones((4, 3)), "lora_b": jnp.zeros((3, 4))}}
    with lj.TrainCheckpointer(tmp_path, async_save=False) as ckpt:
        with pytest.raises(lj.CheckpointMismatch, match=r"lora_a: checkpoint \[4, 2\]"):
            ckpt.restore(adapters=other, opt_state={})
    with lj.TrainCheckpointer(tmp_path, async_save=False, settings={"--rank": 3}) as ckpt:
        with pytest.raises(lj.CheckpointMismatch, match="--rank: checkpoint 2, this run 3"):
            ckpt.restore(adapters=other, opt_state={})
        assert ckpt.all_steps() == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]


def test_resume_from_no_checkpoint_says_so(tmp_path, capsys):
    argv = [*FAST, "--steps", "1", "--checkpoint-dir", str(tmp_path / "ck"), "--resume"]
    assert train_lib.main(argv) == 0
    assert "no checkpoint in" in capsys.readouterr().out


# ---- 3. every output is checked before the first step -----------------------------------------

def test_outputs_are_checked_before_training(run, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x.txt").write_text("x")
    fresh = tmp_path / "fresh_adapter"
    err = fails(capsys, *FAST, "--steps", "2", "--adapter-out", str(fresh), "--export-peft",
                str(taken))
    assert "--export-peft" in err and "already exists" in err
    assert not fresh.exists()  # the first output was not written either
    assert "compiled" not in capsys.readouterr().out  # refused before any compile
    (tmp_path / "a_file").write_text("x")
    err = fails(capsys, *FAST, "--export-peft", str(tmp_path / "a_file" / "peft"))
    assert "is a file, not a directory" in err
    err = fails(capsys, *FAST, "--export-peft", str(run / "peft"), "--adapter-out",
                str(run / "peft" / "inner"))
    assert "overlap" in err
    err = fails(capsys, *FAST, "--export-merged", str(Path(train_lib.__file__).parent / "data"))
    assert "overlaps the input --data" in err


def test_existing_metrics_file_needs_resume_or_overwrite(run, tmp_path, capsys):
    run = copy_run(run, tmp_path)
    metrics = run / "metrics.jsonl"
    before = metrics.read_bytes()
    err = fails(capsys, *FAST, "--steps", "2", "--metrics-file", str(metrics))
    assert "--metrics-file" in err and "already exists" in err
    assert metrics.read_bytes() == before
    notes = tmp_path / "notes.txt"
    notes.write_text("my own notes\n")
    err = fails(capsys, *FAST, "--steps", "2", "--metrics-file", str(notes), "--overwrite")
    assert "holds no metrics records" in err and notes.read_text() == "my own notes\n"
    assert train_lib.main([*FAST, "--steps", "2", "--metrics-file", str(metrics),
                           "--overwrite"]) == 0
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]


def test_read_only_output_directory_is_refused_before_training(tmp_path):
    """A real read-only file system (a bind mount in a private mount namespace), where even
    root cannot write: the run must end at once with one error line."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed")
    ro = tmp_path / "ro"
    ro.mkdir()
    mount = (f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} {ro} && "
             f"exec {sys.executable} -m examples.train {' '.join(FAST)} --adapter-out {ro}/a")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", mount], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if "mount" in proc.stderr and proc.returncode != 2:
        pytest.skip(f"no private read-only mount here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not writable" in errors[0] and "Traceback" not in proc.stderr
    assert "compiled" not in proc.stdout


# ---- 4. non-finite numbers: refused up front, stop the run, never saved -----------------------

@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--grad-clip", "-1"], "--grad-clip must be a finite number >= 0"),
    (["--alpha", "nan"], "--alpha must be a finite number"),
    (["--alpha", "inf"], "--alpha must be a finite number")])
def test_bad_numbers_are_refused(flags, message, capsys):
    assert message in fails(capsys, *FAST, *flags)


@pytest.mark.parametrize("alpha", [math.nan, math.inf, "16"])
def test_lora_config_refuses_non_finite_or_non_numeric_alpha(alpha):
    with pytest.raises(lj.LoraError, match="lora_alpha"):
        lj.LoraConfig(lora_alpha=alpha, target_modules=["q_proj"])


def test_a_diverging_run_stops_and_keeps_the_last_finite_checkpoint(run, tmp_path, capsys):
    run = copy_run(run, tmp_path)
    ckpt = run / "ckpt"
    before = snapshot(ckpt)
    peft = tmp_path / "new_peft"
    err = fails(capsys, *FAST, "--steps", "8", "--checkpoint-dir", str(ckpt), "--resume",
                "--lr", "1e30", "--export-peft", str(peft), status=3)
    assert re.search(r"^error: step [5-8]: loss (nan|inf)", err), err
    assert "diverged" in err and "the last checkpoint, step 4 in" in err
    assert snapshot(ckpt) == before and not peft.exists()


def test_savers_refuse_non_finite_adapters(tiny, tmp_path):
    model, params, config = tiny
    broken = jax.tree_util.tree_map_with_path(
        lambda p, x: x.at[0].set(jnp.nan) if "lora_b" in str(p[-1]) else x, params)
    for save in (lambda **k: lj.save_adapter(tmp_path / "a", broken, config, **k),
                 lambda **k: lj.export_peft(tmp_path / "p", broken, config, **k)):
        with pytest.raises(lj.LoraError, match="non-finite.*lora_b"):
            save()
        save(allow_non_finite=True)
    with lj.TrainCheckpointer(tmp_path / "ck", async_save=False) as ckpt:
        with pytest.raises(lj.LoraError, match="non-finite"):
            ckpt.save(1, adapters=lj.lora_params(broken), opt_state={})
        assert ckpt.all_steps() == []


# ---- 5. imports agree with load_adapter ---------------------------------------------------------

def test_import_peft_refuses_lora_ga_and_a_rank_change(tiny, tmp_path):
    model, params, config = tiny
    lj.export_peft(tmp_path / "r2", params, config)
    cfg_file = tmp_path / "r2" / "adapter_config.json"
    peft_config = json.loads(cfg_file.read_text())
    ga = tmp_path / "ga"
    shutil.copytree(tmp_path / "r2", ga)
    (ga / "adapter_config.json").write_text(json.dumps({**peft_config,
                                                        "init_lora_weights": "lora_ga"}))
    with pytest.raises(lj.LoraError, match="lora_ga"):
        lj.import_peft(ga, lj.split(params)[0])
    wider = lj.LoraConfig(r=4, target_modules="all-linear")
    base = lj.split(params)[0]
    rank4 = lj.inject(base, wider, jax.random.key(2))
    with pytest.raises(lj.LoraError, match="the model's adapter has shape"):
        lj.import_peft(tmp_path / "r2", rank4)
    lj.save_adapter(tmp_path / "ad2", params, config)
    with pytest.raises(lj.LoraError, match="does not fit"):
        lj.load_adapter(tmp_path / "ad2", rank4)
    assert lj.import_peft(tmp_path / "r2", base)  # into the base it loads


# ---- 6. one error line instead of a traceback -------------------------------------------------

def test_invalid_regex_target_is_one_line(capsys):
    assert "not a valid regular expression" in fails(capsys, *FAST, "--targets", "(q|v_proj")


def test_malformed_config_json_is_one_line(tmp_path, capsys):
    ckpt = tmp_path / "model"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("5")
    err = fails(capsys, *FAST, "--model-path", str(ckpt), "--tokenizer", "bytes")
    assert "config.json" in err and "not an object" in err
    (ckpt / "config.json").write_bytes(b"\xff\xfe{}")
    err = fails(capsys, *FAST, "--model-path", str(ckpt), "--tokenizer", "bytes")
    assert "config.json" in err and "not UTF-8" in err


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "holds a JSON list, not an object"),
    ('{"peft_type": "LORA", "target_modules": ["c_attn"]}', "lacks 'r', 'lora_alpha'"),
    ('{"r": "8", "lora_alpha": 16, "target_modules": ["c_attn"]}', "a LoRA rank must be"),
    ('{"r": 8, "lora_alpha": 16, "rank_pattern": [1]}', "'rank_pattern' must be an object")])
def test_malformed_adapter_config_names_the_file(tiny, tmp_path, content, message):
    _, params, config = tiny
    lj.export_peft(tmp_path / "p", params, config)
    (tmp_path / "p" / "adapter_config.json").write_text(content)
    with pytest.raises(lj.LoraError, match="adapter_config.json") as err:
        lj.import_peft(tmp_path / "p", lj.split(params)[0])
    assert message in str(err.value)


# ---- 7. clear messages ------------------------------------------------------------------------

def test_torn_metrics_tail_is_tolerated_and_a_bad_line_named(run, tmp_path, capsys):
    run = copy_run(run, tmp_path)
    metrics = run / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 5, "lo')  # killed mid-write
    common = [*FAST, "--steps", "5", "--checkpoint-dir", str(run / "ckpt"), "--metrics-file",
              str(metrics), "--resume"]
    assert train_lib.main(common) == 0
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4, 5]
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    err = fails(capsys, *common[:-1], "--steps", "6", "--resume")
    assert f"{metrics}:2" in err


def test_unreadable_tokenizer_and_input_paths_are_named(tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_bytes(b"\xff\xfe{")
    err = fails(capsys, *FAST, "--tokenizer", str(tmp_path / "tok"))
    assert "tokenizer.json: not a readable tokenizer.json" in err
    (tmp_path / "file").write_text("x")
    assert "is a file; it takes a directory" in fails(capsys, *FAST, "--model-path",
                                                      str(tmp_path / "file"))
    assert "does not exist; it takes a directory" in fails(capsys, *FAST, "--adapter-in",
                                                           str(tmp_path / "nowhere"))


def test_data_errors_name_the_file(tmp_path, capsys):
    err = fails(capsys, *FAST, "--data", str(tmp_path))
    assert "is a directory" in err
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    err = fails(capsys, *FAST, "--data", str(latin))
    assert "latin1.txt" in err and "not UTF-8" in err


def test_excluding_every_target_blames_exclude_modules():
    params = {"q_proj": {"kernel": jnp.ones((4, 4))}, "v_proj": {"kernel": jnp.ones((4, 4))}}
    config = lj.LoraConfig(target_modules=["q_proj"], exclude_modules=["q_proj"], r=2)
    with pytest.raises(lj.LoraError, match="exclude_modules=.*removes every module"):
        lj.inject(params, config, jax.random.key(0))


def test_numpy_rank_and_float_adapter_dtype():
    config = lj.LoraConfig(r=np.int64(4), lora_alpha=np.float32(8), target_modules=["q"])
    assert config.r == 4 and type(config.r) is int and config.scale_for("q") == 2.0
    json.dumps(config.to_dict())
    with pytest.raises(lj.LoraError, match="floating-point dtype"):
        lj.LoraConfig(adapter_dtype="int8", target_modules=["q"])


def test_tp_hint_lists_the_sizes_that_fit(capsys):
    err = fails(capsys, *FAST[2:], "--tp", "3", "--dp", "1")
    assert "with 8 devices this model allows tp in [1, 2, 4]" in err
