"""A Llama-family decoder that reads and writes the paged KV cache.

Plain PyTorch, shaped like transformers' Llama so checkpoint names map one to one; the tensor-
parallel split lives in the linears (model/layers.py), the cache layout in `paged_attention`.
Covers Llama, SmolLM2, InternLM3 (q/k/v/o bias from `attention_bias`) and Qwen2 (bias on q/k/v
only). Rotary embeddings come from transformers itself, so every `rope_scaling` variant it knows
(llama3, dynamic, linear, yarn) matches the reference exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from internray.serve.model.layers import (
    AttentionBatch, ColumnParallelLinear, RMSNorm, RowParallelLinear, TPInfo, apply_rotary, paged_attention,
)

SUPPORTED = ("llama", "internlm3", "qwen2", "mistral")


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_supported(config: PretrainedConfig, tp_size: int) -> None:
    """Refuse, naming the field, what this forward cannot run exactly."""
    if config.model_type not in SUPPORTED:
        raise ValueError(f"model_type {config.model_type!r} is not served (supported: {', '.join(SUPPORTED)})")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", config.model_type == "mistral"):
        raise ValueError("sliding-window attention is not supported by this engine")
    for field in ("num_attention_heads", "num_key_value_heads"):
        if getattr(config, field) % tp_size:
            raise ValueError(f"{field}={getattr(config, field)} does not split over tensor parallel size {tp_size}")


class Attention(nn.Module):
    def __init__(self, config: PretrainedConfig, tp: TPInfo):
        super().__init__()
        d, hidden = head_dim(config), config.hidden_size
        self.num_heads = config.num_attention_heads // tp.size
        self.num_kv_heads = config.num_key_value_heads // tp.size
        self.head_dim = d
        qkv_bias = config.model_type == "qwen2" or getattr(config, "attention_bias", False)
        o_bias = config.model_type != "qwen2" and getattr(config, "attention_bias", False)
        self.q_proj = ColumnParallelLinear(hidden, config.num_attention_heads * d, qkv_bias, tp)
        self.k_proj = ColumnParallelLinear(hidden, config.num_key_value_heads * d, qkv_bias, tp)
        self.v_proj = ColumnParallelLinear(hidden, config.num_key_value_heads * d, qkv_bias, tp)
        self.o_proj = RowParallelLinear(config.num_attention_heads * d, hidden, o_bias, tp)

    def forward(self, x, cos, sin, k_cache, v_cache, batch: AttentionBatch):
        t = x.shape[0]
        q = apply_rotary(self.q_proj(x).view(t, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(self.k_proj(x).view(t, self.num_kv_heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, k_cache, v_cache, batch)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: PretrainedConfig, tp: TPInfo):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_proj = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias, tp)
        self.up_proj = ColumnParallelLinear(config.hidden_size, config.intermediate_size, bias, tp)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias, tp)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, tp: TPInfo):
        super().__init__()
        self.self_attn = Attention(config, tp)
        self.mlp = MLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, k_cache, v_cache, batch):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, tp: TPInfo):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.embed_tokens.weight.tp_dim = None
        self.layers = nn.ModuleList(DecoderLayer(config, tp) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """forward(input_ids [T], positions [T], kv caches, batch, sample_index) -> logits [S, vocab] at
    the sampled positions only (the lm_head is the largest matmul; prefill chunks skip it)."""

    def __init__(self, config: PretrainedConfig, tp: TPInfo = TPInfo()):
        super().__init__()
        check_supported(config, tp.size)
        self.config = config
        self.model = LlamaModel(config, tp)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight.requires_grad_(False)
        self.lm_head.weight.tp_dim = None
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = LlamaRotaryEmbedding(config)

    @torch.inference_mode()
    def forward(self, input_ids, positions, kv_caches, batch: AttentionBatch, sample_index):
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(x, positions[None])
        cos, sin = cos[0].to(x.dtype), sin[0].to(x.dtype)
        for layer, (k_cache, v_cache) in zip(self.model.layers, kv_caches):
            x = layer(x, cos, sin, k_cache, v_cache, batch)
        x = self.model.norm(x[sample_index])
        return self.lm_head(x).float()
