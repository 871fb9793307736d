"""Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Module and parameter names mirror Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...),
so a checkpoint loads with a plain, strict `load_state_dict`. Tokens of a forward call are a flat
`[T]` batch; where their K/V live is the attention backend's business. A backend also decides which
keys a query sees, so CacheBlend (kvtier_engine/blend.py) runs the very same layers over a subset of
rows at their true positions with a backend of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvtier_engine.layers.attention import AttentionBackend
from kvtier_engine.layers.norm import RMSNorm
from kvtier_engine.layers.rotary import RotaryEmbedding, apply_rotary
from kvtier_engine.model_config import ModelConfig


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads = config.num_heads, config.num_kv_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                backend: AttentionBackend) -> torch.Tensor:
        t = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(t, self.num_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        out = backend.attend(self.layer, q, self.keys(x, cos, sin), v)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotated K [T, Hkv, D] of the rows of x (already normed), as `forward` hands the backend."""
        return apply_rotary(self.k_proj(x).view(x.shape[0], self.num_kv_heads, self.head_dim), cos, sin)

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) [T, Hkv, D] of the rows of x (already normed): K as `keys`, V as `forward` makes it."""
        return self.keys(x, cos, sin), self.v_proj(x).view(x.shape[0], self.num_kv_heads, self.head_dim)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                backend: AttentionBackend) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, backend)
        return x + self.mlp(self.post_attention_layernorm(x))

    def keys(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """This layer's K for hidden states x, without attending: what CacheBlend's check layer scores
        (kvtier_engine/blend.py), which then runs `forward` over the rows it selects."""
        return self.self_attn.keys(self.input_layernorm(x), cos, sin)

    def keys_values(self, x: torch.Tensor, cos: torch.Tensor,
                    sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's (K, V) for hidden states x, without attending: for a blend that scores rows by
        V's deviation or K's and V's together (`BlendInput.deviation`)."""
        return self.self_attn.keys_values(self.input_layernorm(x), cos, sin)


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                backend: AttentionBackend) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions)
        for layer in self.layers:
            x = layer(x, cos, sin, backend)
        backend.advance(input_ids.shape[0])
        return self.norm(x)


class CausalLM(nn.Module):
    """`forward(input_ids [T], positions [T], backend) -> logits [T, vocab]` (float32)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor,
                      backend: AttentionBackend) -> torch.Tensor:
        return self.model(input_ids, positions, backend)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                backend: AttentionBackend) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, positions, backend))
