"""A Llama-family decoder that reads and writes the paged KV cache.

Plain PyTorch, shaped like transformers' Llama except that q/k/v and gate/up are fused into one
matmul each (the loader maps the checkpoint's names, `FUSED` below); the tensor-parallel split
lives in the linears (model/layers.py), the cache layout in `paged_attention`.
Covers Llama, SmolLM2, InternLM3 (q/k/v/o bias from `attention_bias`) and Qwen2 (bias on q/k/v
only). Rotary embeddings come from transformers itself, so every `rope_scaling` variant it knows
(llama3, linear, yarn, dynamic NTK) matches the reference exactly (dynamic NTK: see
`rotary_embedding`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from internray.serve.model import cpu_fused
from internray.serve.model.layers import (
    AttentionBatch, ColumnParallelLinear, Linear, RMSNorm, RowParallelLinear, TPInfo, apply_rotary, paged_attention,
)

SUPPORTED = ("llama", "internlm3", "qwen2", "mistral")
FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
         "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
"""checkpoint module name -> (our fused module, part index)"""


def head_dim(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_type(config: PretrainedConfig) -> str:
    return (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")


def context_limit(config: PretrainedConfig) -> int:
    """The longest sequence the checkpoint's positions cover. Linear and YaRN checkpoints declare
    their scaled length as max_position_embeddings; dynamic NTK keeps the trained length there
    (transformers rescales past it), so its limit is that length x factor, as vLLM reads it."""
    if rope_type(config) == "dynamic":
        return int(config.max_position_embeddings * config.rope_parameters["factor"])
    return config.max_position_embeddings


def rotary_embedding(config: PretrainedConfig) -> LlamaRotaryEmbedding:
    """transformers' rotary embedding for the checkpoint's RoPE variant, with dynamic NTK frozen at
    the context limit. transformers re-derives dynamic NTK's base from the longest position of
    each forward call: in a batch of unrelated sequences one long request would shift every other
    request's rotation, and keys already cached would keep the old one. Frozen (vLLM's choice), a
    position means the same thing in every step; a full-length sequence gets exactly transformers'
    numbers, shorter ones the rotation of the longest (tested in test_serve_engine)."""
    rotary = LlamaRotaryEmbedding(config)
    if rotary.rope_type == "dynamic":
        inv_freq, rotary.attention_scaling = ROPE_INIT_FUNCTIONS["dynamic"](config, None, seq_len=context_limit(config))
        rotary.inv_freq.copy_(inv_freq)
        rotary.rope_type = "default"  # the update hook keys on the type; frequencies stay put
    return rotary


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
        q_size, kv_size = config.num_attention_heads * d, config.num_key_value_heads * d
        self.qkv_proj = ColumnParallelLinear(hidden, [q_size, kv_size, kv_size], qkv_bias, tp)
        self.o_proj = RowParallelLinear(config.num_attention_heads * d, hidden, o_bias, tp)
        self.fused = None  # compiled CPU kernels (model/cpu_fused.py), set by use_fused_cpu_ops

    def forward(self, x, cos, sin, kv_cache, batch: AttentionBatch):
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        if self.fused is not None:  # q and k rotated in place, in one pass
            self.fused.rotary_(qkv, cos, sin, self.num_heads + self.num_kv_heads, self.head_dim)
        q, k, v = (part.view(t, -1, self.head_dim) for part in qkv.split(self.qkv_proj.parts, dim=-1))
        if self.fused is None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = paged_attention(q, k, v, kv_cache, batch)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: PretrainedConfig, tp: TPInfo):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2, bias, tp)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias, tp)
        self.fused = None  # compiled CPU kernels (model/cpu_fused.py), set by use_fused_cpu_ops

    def forward(self, x):
        if self.fused is not None:
            return self.down_proj(self.fused.silu_and_mul(self.gate_up_proj(x)))
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, tp: TPInfo):
        super().__init__()
        self.self_attn = Attention(config, tp)
        self.mlp = MLP(config, tp)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, residual, cos, sin, kv_cache, batch):
        """x: the previous layer's output; residual: the stream it adds to (None in the first
        layer). Each norm performs the add before it (RMSNorm), so this returns the same pair."""
        h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(h, cos, sin, kv_cache, batch), residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, config: PretrainedConfig, tp: TPInfo):
        super().__init__()
        # uninitialized (`_weight`): the loader fills it, and a random init of SmolLM2's 49k x 576
        # table was 0.15 s of the 0.38 s the align stage's weight refresh took
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size), _freeze=True)
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
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = rotary_embedding(config)
        self.decode_kernels = None
        """The compiled CPU kernels when decode-only steps run all layers in one call of theirs
        (model/cpu_decode.py), set by use_fused_cpu_ops with `decode_weights`."""
        self.decode_weights: list[torch.Tensor] = []

    @torch.inference_mode()
    def forward(self, input_ids, positions, kv_caches, batch: AttentionBatch, sample_index):
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(x, positions[None])
        cos, sin = cos[0].to(x.dtype), sin[0].to(x.dtype)
        if self.decode_kernels is not None and batch.decodes_only and kv_caches[0].scales is None:
            x, residual = self.decode_layers(x, cos, sin, kv_caches, batch)
        else:
            residual = None
            for layer, kv_cache in zip(self.model.layers, kv_caches):
                x, residual = layer(x, residual, cos, sin, kv_cache, batch)
        x, _ = self.model.norm(x[sample_index], residual[sample_index])
        return self.lm_head(x).float()

    def decode_layers(self, x, cos, sin, kv_caches, batch: AttentionBatch):
        """Every layer of a decode-only step in one compiled call: the same kernels as the layers'
        own forward, without its Python (model/cpu_decode.py)."""
        attn, norm = self.model.layers[0].self_attn, self.model.layers[0].input_layernorm
        return self.decode_kernels.decode_layers(
            x, self.decode_weights, [cache.data for cache in kv_caches], cos, sin, batch.slot_mapping,
            batch.decode_blocks, batch.decode_lengths, attn.num_heads, attn.num_kv_heads, norm.eps,
            attn.head_dim ** -0.5)

    def use_fused_cpu_ops(self, kernels) -> bool:
        """Route norms, rotary and SiLU through the compiled CPU kernels (model/cpu_fused.py) where
        this CPU, dtype and the model's shapes allow; returns whether they are used."""
        layer = self.model.layers[0]
        if not cpu_fused.usable(kernels, self.model.embed_tokens.weight.dtype, self.config.hidden_size,
                                layer.mlp.gate_up_proj.parts[0], layer.self_attn.head_dim):
            return False
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP)):
                module.fused = kernels
        linears = [m for m in self.model.layers.modules() if isinstance(m, Linear)]
        if layer.self_attn.o_proj.tp.size == 1 and all(m.bf16_kernel is not None and m.bias is None for m in linears):
            # gathered once (building the list took 0.3 ms a step): linears are packed once, and the
            # engine swaps weights by building a new model (ModelRunner.load_weights)
            self.decode_weights = [w for block in self.model.layers for w in (
                block.input_layernorm.weight, block.self_attn.qkv_proj.packed, block.self_attn.o_proj.packed,
                block.post_attention_layernorm.weight, block.mlp.gate_up_proj.packed, block.mlp.down_proj.packed)]
            self.decode_kernels = kernels  # see decode_layers
        return True
