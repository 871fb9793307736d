"""kvtier_engine: a small paged-attention LLM engine that uses kvtier end to end.

This milestone holds the model side: Llama-family decoder (Llama, Qwen2, Mistral configs), loading
a local Hugging Face folder or a seeded random preset, and a reference attention backend.
"""

from kvtier_engine.loader import load_model
from kvtier_engine.model_config import ModelConfig

__all__ = ["ModelConfig", "load_model"]
