"""Named model shapes with seeded random weights (`random:<name>`), for tests, demos and GPU benchmarks.

Random weights give meaningless text but real compute and real KV: exactly what a KV-cache layer
needs to be measured. The 1b and 8b presets have the shapes of Llama-3.2-1B and Llama-3.1-8B.
"""

from __future__ import annotations

from kvtier_engine.model_config import ModelConfig

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}

PRESETS: dict[str, ModelConfig] = {
    # Tests: a forward pass in milliseconds; vocab covers the byte-level tokenizer.
    "llama-tiny": ModelConfig(
        model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=16384),
    # The demo on 2 CPU cores: a 4K-token prefill in seconds, so a cache hit is plainly visible.
    "llama-small": ModelConfig(
        model_type="llama", vocab_size=32000, hidden_size=512, intermediate_size=1536, num_layers=8,
        num_heads=8, num_kv_heads=2, head_dim=64, rope_theta=500000.0, max_position_embeddings=32768,
        tie_word_embeddings=True),
    "llama-1b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16,
        num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}, max_position_embeddings=131072,
        tie_word_embeddings=True),
    "llama-8b": ModelConfig(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, max_position_embeddings=131072),
}
