"""One vLLM process for the end-to-end tests: `python vllm_run.py MODEL_DIR PROMPTS_JSON [KVTIER_YAML]`
runs `vllm.LLM` on the prompts (lists of token ids; greedy, 12 tokens each), with kvtier's connector
when a kvtier config is given, and prints one JSON line: each prompt's generated token ids and the
prompt tokens vLLM did not compute (`num_cached_tokens`: kvtier's loads; vLLM's own prefix cache is
off). Run as a script, in the venv that has vLLM (`make vllm-venv`)."""

import json
import os
import sys


def main() -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: the machine has 24
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig

    model, prompts = sys.argv[1], json.loads(open(sys.argv[2]).read())
    kwargs = {}
    if len(sys.argv) > 3:
        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="KvtierConnector", kv_connector_module_path="kvtier_vllm", kv_role="kv_both",
            kv_connector_extra_config={"kvtier_config": sys.argv[3]})
    llm = LLM(model=model, dtype="float32", skip_tokenizer_init=True, max_model_len=2048,
              enable_prefix_caching=False, enforce_eager=True, **kwargs)
    params = SamplingParams(max_tokens=12, temperature=0, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    print("RESULT " + json.dumps({"tokens": [list(o.outputs[0].token_ids) for o in outs],
                                  "cached": [o.num_cached_tokens for o in outs]}), flush=True)


if __name__ == "__main__":
    main()
