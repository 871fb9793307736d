"""kvtier_engine: a small paged-attention LLM engine that uses kvtier end to end.

Llama-family decoder (Llama, Qwen2, Mistral configs) from a local Hugging Face folder or a seeded
random preset; paged KV cache with prefix caching; continuous batching with chunked prefill and
preemption; the kvtier connector; an offline `LLM` API and an OpenAI-compatible server.
"""

from kvtier_engine.llm import LLM
from kvtier_engine.llm_engine import EngineOptions, LLMEngine, RequestOutput
from kvtier_engine.loader import load_model
from kvtier_engine.model_config import ModelConfig
from kvtier_engine.sampling import SamplingParams

__all__ = ["LLM", "EngineOptions", "LLMEngine", "ModelConfig", "RequestOutput", "SamplingParams",
           "load_model"]
