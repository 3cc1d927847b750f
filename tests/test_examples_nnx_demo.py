"""`python -m examples.nnx_demo`, shortened: the shipped base as an NNX Llama learns from the
demo's data through `lora_jax.nnx`, and its PEFT export gives the Linen Llama the same logits
(the demo raises SystemExit if not). 40 steps of 8 sequences measured 310 -> 239 perplexity on
the held-out sonnets (30 steps of 16: 251, at 1.7x the time); the bound, 0.95x the base, fails
if the adapters are not applied or not trained."""
from examples import nnx_demo


def test_shortened_nnx_demo_learns_and_matches_linen(tmp_path, capsys):
    argv = ["--steps", "40", "--batch-size", "8", "--out", str(tmp_path)]
    metrics = nnx_demo.run(nnx_demo.parse_args(argv))
    assert metrics["base + LoRA"]["perplexity"] < 0.95 * metrics["base"]["perplexity"], metrics
    text = capsys.readouterr().out
    assert "Linen Llama + the NNX model's PEFT export vs NNX" in text and "nnx demo done" in text
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
