"""`make demo` (examples/demo.py) end to end, shortened to a few steps: it trains, checks that
merged equals unmerged and that every export reloads, and prints samples."""
from examples import demo


def test_demo_runs_and_checks_itself(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["--steps", "8", "--eval-interval", "4", "--no-progress",
            "--metrics-file", str(out / "metrics.jsonl"), "--adapter-out", str(out / "adapter"),
            "--export-peft", str(out / "peft"), "--export-merged", str(out / "merged")]
    assert demo.main(argv) == 0
    text = capsys.readouterr().out
    for line in ("RANDOMLY initialised", "trainable params", "merged (lora_jax.merge) vs "
                 "unmerged", "PEFT adapter (export_peft -> import_peft)", "base + LoRA, sampled",
                 "demo done"):
        assert line in text, line
    assert (out / "metrics.png").is_file() and (out / "peft" / "adapter_config.json").is_file()
