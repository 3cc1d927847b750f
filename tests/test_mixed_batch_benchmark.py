"""`benchmarks.mixed_batch --tiny` runs end to end on CPU and prints the rows the GPU run
records (the figures themselves are GPU-only: docs/PERFORMANCE.md)."""
import json

from benchmarks import mixed_batch


def rows_of(capsys, argv):
    mixed_batch.main(argv)
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]


def test_tiny_benchmark_prints_generation_training_and_peft_rows(capsys):
    rows = rows_of(capsys, ["--tiny", "--methods", "auto", "--train-methods", "ragged",
                            "--no-peft"])
    modes = {(r["bench"], r["mode"]) for r in rows}
    assert modes == {("generate", "one"), ("generate", "mixed-auto"),
                     ("generate_ratio", "mixed-auto"), ("train", "one"),
                     ("train", "mixed-ragged"), ("train_ratio", "mixed-ragged")}
    for r in rows:
        assert "error" not in r, r
        assert r.get("gen_s", 1) > 0 and r.get("step_s", 1) > 0 and r.get("ratio_vs_one", 1) > 0
    peft = rows_of(capsys, ["--tiny", "--framework", "peft"])
    assert [(r["framework"], r["mode"]) for r in peft] == [("peft-eager", "one"),
                                                          ("peft-eager", "mixed")]
