"""Model architectures. One decoder serves the Llama family (Llama, Qwen2, Mistral)."""
