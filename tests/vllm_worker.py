"""Greedy generation with vLLM, run by tests/test_vllm_serving.py in a subprocess with the python
named by LORA_JAX_VLLM_PYTHON (so the project's own environment needs no vLLM). Not a test.

    python tests/vllm_worker.py JOB.json OUT.json

JOB: {"model": DIR, "max_tokens": N, "prompts": [[ids...], ...], "max_lora_rank": R or null,
      "loras": {"name": ADAPTER_DIR, ...}, "max_model_len": L (optional, default 256)}.  With "loras" the engine runs with enable_lora and
each prompt is generated once without an adapter ("base") and once per adapter.
OUT: {"vllm": VERSION, "torch": VERSION, "seconds": S, "tokens": {"base"|name: [[ids...], ...]}}.
Prompts are token ids (no tokenizer round trip); decoding is greedy, float32, EOS ignored.
"""
import json
import sys
import time


def main(job_file: str, out_file: str) -> None:
    job = json.loads(open(job_file).read())
    start = time.time()
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    loras = job.get("loras") or {}
    kwargs = dict(enable_lora=True, max_lora_rank=job["max_lora_rank"], max_loras=1) if loras \
        else {}
    llm = LLM(model=job["model"], dtype="float32", max_model_len=job.get("max_model_len", 256),
              seed=0, enforce_eager=True, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], ignore_eos=True,
                            detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]

    def generate(request=None):
        outs = llm.generate(prompts, params, lora_request=request, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    tokens = {"base": generate()}
    for i, (name, path) in enumerate(loras.items(), start=1):
        tokens[name] = generate(LoRARequest(name, i, path))
    result = {"vllm": vllm.__version__, "torch": torch.__version__,
              "seconds": round(time.time() - start, 1), "tokens": tokens}
    with open(out_file, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
