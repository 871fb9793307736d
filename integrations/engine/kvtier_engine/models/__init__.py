"""Model architectures and how to get their weights.

One decoder (`llama`) serves the Llama family (Llama, Qwen2, Mistral); `loader` builds it from a
Hugging Face folder, a llama.cpp GGUF file or named model (`gguf_file` opens the file, `gguf` maps
its metadata and tensors), or a seeded random preset (`presets`). The geometry itself,
`ModelConfig`, is the package's `model_config`, since the KV cache and the layers read it too.
"""
