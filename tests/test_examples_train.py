"""`python -m examples.train` end to end on tiny checkpoints, a few steps each: sharded runs log
the single-device losses, resume continues the same run, exports reload to the trained model,
and a saved adapter can be loaded and trained on.

The runs call `examples.train.main` / `train` in-process (the same code the module entry point
runs; `tests/test_examples_cli.py` also runs the real entry point once). Models are tiny HF
directories written with `models.save_hf` (GPT-2: 2 layers, d=64, 4 heads; Llama: 2 layers,
d=64, 4 heads / 2 kv heads), tokenised with bytes; every run has 4 sequences of 32 tokens.
"""
import json

import jax
import numpy as np
import pytest

import lora_jax as lj
import models
from examples import train as train_lib
from examples.cli import parse_args
from models import GPT2Config, LlamaConfig

# float32 parity, absolute on losses of ~6: sharding and micro-batching reorder sums (psums of
# partial products, a vocabulary-parallel log-sum-exp instead of the fused one), each of at most
# a few thousand terms, which moves a loss by ~1e-6; 1e-5 is the project's float32 bar.
LOSS_ATOL = 1e-5
STEPS = 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny random GPT-2 and Llama-3 HF directories (config.json + model.safetensors)."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, config in (("gpt2", GPT2Config.tiny()), ("llama3", LlamaConfig.tiny())):
        model = models.build(config)
        models.save_hf(root / name, model, models.init_params(model, jax.random.key(0)))
        out[name] = str(root / name)
    return out


def flags(ckpt, tmp, *extra, steps=STEPS):
    return ["--model-path", ckpt, "--tokenizer", "bytes", "--batch-size", "4", "--seq-len",
            "32", "--steps", str(steps), "--eval-interval", "2", "--rank", "4", "--alpha", "8",
            "--lr", "1e-2", "--no-progress", "--metrics-file", str(tmp / "metrics.jsonl"),
            *extra]


def run(args):
    assert train_lib.main(args) == 0


def records(path):
    return [json.loads(line) for line in open(path)]


def losses(path, key="loss"):
    return np.array([r[key] for r in records(path) if key in r])


def test_sharded_runs_log_the_single_device_losses(checkpoints, tmp_path):
    """tp=2 with sequence parallelism, and dp=2 x tp=2 with two micro-batches per step, against
    one device: every train and eval loss in the metrics file within 1e-5."""
    layouts = {"single": ["--dp", "1"], "tp2_sp": ["--dp", "1", "--tp", "2", "--sp"],
               "dp2_tp2_accum2": ["--dp", "2", "--tp", "2", "--grad-accum", "2"]}
    logs = {}
    for name, layout in layouts.items():
        (tmp_path / name).mkdir()
        run(flags(checkpoints["gpt2"], tmp_path / name, *layout))
        logs[name] = tmp_path / name / "metrics.jsonl"
    ref, ref_eval = losses(logs["single"]), losses(logs["single"], "eval_loss")
    assert len(ref) == STEPS and len(ref_eval) == 2 and ref[-1] < ref[0]
    for name in ("tp2_sp", "dp2_tp2_accum2"):
        got, got_eval = losses(logs[name]), losses(logs[name], "eval_loss")
        print(f"{name}: max |loss diff| {np.max(np.abs(got - ref)):.2e}, "
              f"eval {np.max(np.abs(got_eval - ref_eval)):.2e}")
        np.testing.assert_allclose(got, ref, rtol=0, atol=LOSS_ATOL)
        np.testing.assert_allclose(got_eval, ref_eval, rtol=0, atol=LOSS_ATOL)
    first = records(logs["single"])[0]
    assert {"step", "loss", "tokens_per_s", "mfu", "grad_norm"} <= set(first)
    assert (tmp_path / "single" / "metrics.png").stat().st_size > 0


def test_resume_continues_the_interrupted_run(checkpoints, tmp_path):
    """Stopped after 2 of 4 steps and resumed: the metrics file ends up with the uninterrupted
    run's losses, exactly (same programs, same data position, restored optimizer state)."""
    (tmp_path / "whole").mkdir()
    run(flags(checkpoints["llama3"], tmp_path / "whole", "--dp", "1"))
    parted = flags(checkpoints["llama3"], tmp_path, "--dp", "1", "--checkpoint-dir",
                   str(tmp_path / "ckpt"), "--save-every", "1")
    run(parted + ["--stop-after", "2"])
    assert len(losses(tmp_path / "metrics.jsonl")) == 2
    run(parted + ["--resume"])
    np.testing.assert_array_equal(losses(tmp_path / "metrics.jsonl"),
                                  losses(tmp_path / "whole" / "metrics.jsonl"))
    np.testing.assert_array_equal(losses(tmp_path / "metrics.jsonl", "eval_loss"),
                                  losses(tmp_path / "whole" / "metrics.jsonl", "eval_loss"))
    assert [r["step"] for r in records(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_exports_reload_to_the_trained_model(checkpoints, tmp_path):
    """--adapter-out (orbax), --export-peft and --export-merged, checked against the trained
    params: adapters bit-exact, the merged HF model's logits within float32 merge rounding."""
    cfg = parse_args(flags(checkpoints["gpt2"], tmp_path, "--dp", "1", "--adapter-out",
                           str(tmp_path / "adapter"), "--export-peft", str(tmp_path / "peft"),
                           "--export-merged", str(tmp_path / "merged"), steps=2))
    out = train_lib.train(cfg)
    base, adapters = lj.split(out.params)
    ids = np.asarray([list(b"Shall I compare thee to a summer's day?")])
    want = np.asarray(lj.apply(out.model, {"params": out.params}, ids))
    for restored in (lj.load_adapter(tmp_path / "adapter", base),
                     lj.import_peft(tmp_path / "peft", base)):
        jax.tree.map(np.testing.assert_array_equal, lj.split(restored)[1], adapters)
    peft_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert (peft_config["r"], peft_config["lora_alpha"]) == (4, 8)
    assert peft_config["base_model_name_or_path"] == checkpoints["gpt2"]
    merged_model, merged = models.load_hf(tmp_path / "merged" / "hf")
    got = np.asarray(merged_model.apply({"params": merged}, ids))
    # Merging reorders one sum per layer: float32 ulps relative to logits of ~1.
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    assert not np.allclose(want, np.asarray(out.model.apply({"params": base}, ids)))


def test_load_an_adapter_and_continue(checkpoints, tmp_path):
    """--adapter-in starts from a trained adapter (its rank wins over --rank) and trains on; the
    first loss is the trained adapter's, below the base model's."""
    (tmp_path / "a").mkdir()
    run(flags(checkpoints["gpt2"], tmp_path / "a", "--dp", "1", "--adapter-out",
              str(tmp_path / "adapter"), "--eval-interval", "0"))
    cfg = parse_args(flags(checkpoints["gpt2"], tmp_path, "--dp", "1", "--adapter-in",
                           str(tmp_path / "adapter"), "--rank", "8", "--eval-interval", "0",
                           steps=2))
    out = train_lib.train(cfg)
    assert out.lora_config.r == 4
    q = out.params["transformer"]["h"]["0"]["attn"]["c_attn"]
    assert q["lora_a"].shape == (64, 4)
    before, after = losses(tmp_path / "a" / "metrics.jsonl"), losses(tmp_path / "metrics.jsonl")
    assert after[0] < before[0] - 0.1, (before, after)


def test_prompt_completion_jsonl_counts_completion_tokens_only(checkpoints, tmp_path):
    data = tmp_path / "qa.jsonl"
    lines = [{"prompt": f"Question {i}: what rhymes with day? ", "completion": "May."}
             for i in range(60)]
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run(flags(checkpoints["gpt2"], tmp_path, "--dp", "1", "--data", str(data),
              "--eval-interval", "0", steps=2))
    for record in records(tmp_path / "metrics.jsonl"):
        # 5 completion tokens (+ EOS) of every ~40-token record: ~15% of the 128 positions.
        assert 0 < record["tokens"] < 0.3 * 4 * 32
