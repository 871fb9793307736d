"""Model architectures and how to get their weights.

One decoder (`llama`) serves the Llama family (Llama, Qwen2, Mistral); `loader` builds it from a
Hugging Face folder or a seeded random preset (`presets`). The geometry itself, `ModelConfig`, is
the package's `model_config`, since the KV cache and the layers read it too.
"""
