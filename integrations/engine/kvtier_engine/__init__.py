"""kvtier_engine: a small paged-attention LLM engine that uses kvtier end to end.

Llama-family decoder (Llama, Qwen2, Mistral configs) from a llama GGUF file (the named model
`smollm2-135m-instruct` among them), a local Hugging Face folder or a seeded random preset; paged
KV cache with prefix caching; continuous batching with chunked prefill and preemption; the kvtier
connector; an offline `LLM` API and an OpenAI-compatible server.

Layout (one concept per module):

    model_config.py  ModelConfig: the decoder's geometry, read by the KV cache, layers and models
    sampling.py tokenizer.py detokenize.py request.py chat_template.py
                     SamplingParams and sample(); text in and out; one request's state; chat
                     messages rendered with the model's template (sandboxed jinja2)
    block_pool.py scheduler.py
                     the scheduler side: paged blocks with prefix caching; continuous batching
    kv_cache.py model_runner.py
                     the worker side: paged KV memory; one forward pass per SchedulerOutput
    llm_engine.py engine_metrics.py llm.py progress.py
                     LLMEngine (add_request, step, abort) and its metrics; the offline LLM.generate()
    layers/          attention (torch reference, Triton kernel on GPU), RMSNorm, rotary embeddings
    models/          the Llama-family decoder (llama), loading GGUF files (gguf, gguf_file), folders
                     and random presets
    serving/         `kvtier_engine serve`: cli, server (FastAPI app), engine_loop (the engine on
                     its own thread), openai_protocol, openai_chat (chat completions), choices
                     (prompt lists and n > 1), http_protocol
    demo.py          `make demo` (`python -m kvtier_engine.demo`)

Dependencies: layers/ and models/ read only `model_config` and `kv_cache` from the core;
`model_runner` and `llm_engine` put them to work. Nothing outside serving/ (and `__main__`) imports
serving/, and only serving/ imports the HTTP stack (FastAPI, starlette, uvicorn).
"""

from kvtier_engine.llm import LLM
from kvtier_engine.llm_engine import EngineOptions, LLMEngine, RequestOutput
from kvtier_engine.model_config import ModelConfig
from kvtier_engine.models.loader import load_model
from kvtier_engine.sampling import SamplingParams

__all__ = ["LLM", "EngineOptions", "LLMEngine", "ModelConfig", "RequestOutput", "SamplingParams",
           "load_model"]
