"""Serving with vLLM (opt-in): vLLM's greedy tokens with an adapter from `export_peft` equal
PEFT's, and the merged export served as a plain model gives the same tokens.

Skipped unless LORA_JAX_VLLM_PYTHON names a python that can `import vllm` (vLLM runs in a
subprocess with it, tests/vllm_worker.py, so this environment needs no vLLM). See
examples/serve_vllm.md for what was run and with which versions. The model is a tiny random
Llama built and written by this project (head_dim 32: vLLM's CPU attention has no smaller head
size), with a BPE tokenizer beside it; float32 on both sides, prompts given as token ids.
"""
from __future__ import annotations

import os
import subprocess

import pytest

VLLM_PYTHON = os.environ.get("LORA_JAX_VLLM_PYTHON")
if not VLLM_PYTHON:
    pytest.skip("set LORA_JAX_VLLM_PYTHON to a python with vLLM to run the vLLM serving tests",
                allow_module_level=True)

import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

import lora_jax as lj  # noqa: E402
import models  # noqa: E402

WORKER = Path(__file__).with_name("vllm_worker.py")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [[5, 17, 42, 99, 7], [200, 3, 3, 150], [77, 88, 99, 111, 222, 33, 44], [12]]
NEW_TOKENS = 12
MAX_LORA_RANK = 8  # vLLM accepts 1, 8, 16, 32, ... for --max-lora-rank
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# name -> LoraConfig fields; export keeps the patterns unless uniform_scale (the last one).
ADAPTERS = {
    "plain": dict(r=8, lora_alpha=16),
    "patterns": dict(r=8, lora_alpha=16, rank_pattern={"o_proj": 2, "up_proj": 4},
                     alpha_pattern={"v_proj": 48, "down_proj": 2}),
    "patterns_rslora": dict(r=8, lora_alpha=16, use_rslora=True,
                            rank_pattern={"k_proj": 1, "gate_proj": 4},
                            alpha_pattern={"q_proj": 40, "up_proj": 3}),
}


def _vllm_ok() -> bool:
    try:
        return subprocess.run([VLLM_PYTHON, "-c", "import vllm"], capture_output=True,
                              timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def write_tokenizer(directory: Path) -> None:
    """The generation tests' byte-level BPE tokenizer (300 ids, <s> </s> <pad> = 0 1 2), with
    the tokenizer class vLLM's loader asks for."""
    from tests.test_models_generate import _write_tokenizer

    _write_tokenizer(directory)
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "pad_token": "<pad>"}))


def run_vllm(tmp: Path, tag: str, model: Path, loras: dict | None = None) -> dict:
    job = {"model": str(model), "max_tokens": NEW_TOKENS, "prompts": PROMPTS,
           "max_lora_rank": MAX_LORA_RANK, "loras": {k: str(v) for k, v in (loras or {}).items()}}
    (tmp / f"{tag}.json").write_text(json.dumps(job))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([VLLM_PYTHON, str(WORKER), str(tmp / f"{tag}.json"),
                           str(tmp / f"{tag}.out.json")], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, (f"vLLM ({tag}) failed:\n{proc.stdout[-3000:]}\n"
                                  f"{proc.stderr[-6000:]}")
    result = json.loads((tmp / f"{tag}.out.json").read_text())
    print(f"vLLM {result['vllm']} (torch {result['torch']}), {tag}: {result['seconds']} s")
    return result


def greedy(torch_model, scalings: float | None = None) -> tuple[list[list[int]], float]:
    """Greedy tokens (full recompute per step, float32) and the smallest top-1/top-2 logit gap
    on the way. `scalings`: force every LoRA module's scale to this value (what a server that
    ignores rank_pattern / alpha_pattern computes)."""
    import torch

    if scalings is not None:
        for m in torch_model.modules():
            if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling:
                m.scaling["default"] = scalings
    tokens, gap = [], np.inf
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = list(prompt)
            for _ in range(NEW_TOKENS):
                logits = torch_model(torch.tensor([ids])).logits[0, -1].double().numpy()
                top2 = np.sort(logits)[-2:]
                gap = min(gap, top2[1] - top2[0])
                ids.append(int(np.argmax(logits)))
            tokens.append(ids[len(prompt):])
    return tokens, float(gap)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Base checkpoint + tokenizer, three PEFT exports (+ one with uniform_scale), the merged
    export of the patterned adapter, and vLLM's tokens for all of them (two engine starts)."""
    if not _vllm_ok():
        pytest.skip(f"LORA_JAX_VLLM_PYTHON={VLLM_PYTHON} cannot import vllm")
    tmp = tmp_path_factory.mktemp("vllm")
    config = models.LlamaConfig.tiny(hidden_size=128, intermediate_size=256, bos_token_id=0,
                                     eos_token_id=1, pad_token_id=2)
    model = models.build(config)
    base = models.init_params(model, jax.random.key(0))
    models.save_hf(tmp / "base", model, base)
    write_tokenizer(tmp / "base")
    exports, configs, params = {}, {}, {}
    for i, (name, fields) in enumerate(ADAPTERS.items()):
        configs[name] = lj.LoraConfig(target_modules=TARGETS, init_lora_weights=False, **fields)
        params[name] = lj.inject(base, configs[name], jax.random.key(10 + i))
        exports[name] = lj.export_peft(tmp / name, params[name], configs[name],
                                       base_model_name_or_path=str(tmp / "base"),
                                       **models.peft_naming(model))
    exports["patterns_uniform"] = lj.export_peft(tmp / "patterns_uniform", params["patterns"],
                                                 configs["patterns"], uniform_scale=True,
                                                 **models.peft_naming(model))
    merged = lj.export_merged(tmp / "merged", params["patterns"], models.hf_writer(model),
                              orbax=False)
    for f in TOKENIZER_FILES:  # the merged directory holds weights and config.json only
        shutil.copy(tmp / "base" / f, merged / "hf" / f)
    lora_run = run_vllm(tmp, "lora", tmp / "base", exports)
    merged_run = run_vllm(tmp, "merged", merged / "hf")
    return dict(tmp=tmp, exports=exports, lora=lora_run, merged=merged_run)


@pytest.fixture(scope="module")
def peft_tokens(served):
    """PEFT's greedy tokens for the base and every export, plus for each patterned adapter
    the tokens with one global scale (patterns ignored)."""
    import peft
    import torch
    import transformers

    def base_model():
        return transformers.AutoModelForCausalLM.from_pretrained(
            served["tmp"] / "base", dtype=torch.float32, attn_implementation="eager").eval()

    out, gaps = {}, {}
    out["base"], gaps["base"] = greedy(base_model())
    for name, path in served["exports"].items():
        out[name], gaps[name] = greedy(peft.PeftModel.from_pretrained(base_model(), path).eval())
        if name in ("patterns", "patterns_rslora"):
            cfg = json.loads((path / "adapter_config.json").read_text())
            pm = peft.PeftModel.from_pretrained(base_model(), path).eval()
            rank = cfg["r"] ** 0.5 if cfg["use_rslora"] else cfg["r"]
            out[f"{name}/ignored"], _ = greedy(pm, scalings=cfg["lora_alpha"] / rank)
    print("smallest top-1/top-2 logit gap on PEFT's greedy paths:", gaps)
    # float32 on both sides differs by ~1e-6 in the logits: ties would make the test meaningless
    assert min(gaps.values()) > 1e-4
    return out


def test_vllm_lora_tokens_equal_peft(served, peft_tokens):
    got = served["lora"]["tokens"]
    assert got["base"] == peft_tokens["base"]
    for name in served["exports"]:
        assert got[name] == peft_tokens[name], name
        assert got[name] != peft_tokens["base"], f"{name}: the adapter changes nothing"


def test_vllm_applies_rank_and_alpha_patterns(served, peft_tokens):
    """The patterned exports (uniform_scale=False) really need per-module scales: one global
    scale gives other tokens, and vLLM gives PEFT's, not those."""
    for name in ("patterns", "patterns_rslora"):
        cfg = json.loads((served["exports"][name] / "adapter_config.json").read_text())
        assert cfg["rank_pattern"] and cfg["alpha_pattern"], cfg
        assert peft_tokens[f"{name}/ignored"] != peft_tokens[name]
        assert served["lora"]["tokens"][name] == peft_tokens[name]
    # uniform_scale (for servers that ignore the patterns) gives the same tokens as well.
    assert served["lora"]["tokens"]["patterns_uniform"] == peft_tokens["patterns"]


def test_merged_export_served_plainly(served, peft_tokens):
    assert served["merged"]["tokens"]["base"] == peft_tokens["patterns"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q", "-s"]))
