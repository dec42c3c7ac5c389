"""Model shapes by name, so a config says `model.preset: 7b` instead of a dozen numbers.

Every preset is the InternLM3 architecture (transformers' `InternLM3Config`, which runs on the
Llama implementation): RMSNorm, rotary positions, grouped-query attention without biases, a
SwiGLU MLP and an untied output head. Presets fix only the shape; the vocabulary comes from the
tokenizer the data stage trained, and special-token ids and RoPE settings are overrides.
"""
from __future__ import annotations

import dataclasses
import difflib

from transformers import InternLM3Config, PretrainedConfig

# Names are approximate sizes with an InternLM-sized vocabulary (92k-128k tokens); with the data
# stage's small vocabularies the embeddings shrink and everything else stays.
PRESETS: dict[str, dict[str, int]] = {
    # Unit tests: builds and runs a forward in milliseconds.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, head_dim=16),
    # Integration runs: ~10M parameters with the data stage's default 8,192-token vocabulary.
    "debug": dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=768, head_dim=32),
    "0.5b": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=2816, head_dim=128),
    # InternLM2-1.8B's shape (internlm/internlm2-1_8b config.json; InternLM2 technical report).
    "1.8b": dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=8,
                 intermediate_size=8192, head_dim=128),
    # InternLM3-8B-Instruct's shape (internlm/internlm3-8b-instruct config.json, also the defaults of
    # transformers' InternLM3Config): 8.8B parameters with its 128,512-token vocabulary, 7.75B of
    # them outside the embeddings. That checkpoint also sets rope_theta=5e7 and dynamic RoPE scaling (factor 6.0)
    # for its 32k context; pass `rope_parameters` to reproduce it.
    "7b": dict(hidden_size=4096, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=2,
               intermediate_size=10240, head_dim=128),
    # InternLM2-20B's shape (internlm/internlm2-20b config.json; InternVL's 20B language model).
    "20b": dict(hidden_size=6144, num_hidden_layers=48, num_attention_heads=48, num_key_value_heads=8,
                intermediate_size=16384, head_dim=128),
}

# Training from scratch at a few thousand tokens of context: InternLM2's base, no scaling.
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 1_000_000.0}


def model_config(preset: str, vocab_size: int, max_position_embeddings: int = 4096,
                 **overrides) -> PretrainedConfig:
    """An `InternLM3Config` of the named shape; `overrides` may change any config field.

    Special-token ids default to None rather than InternLM3's own (1, 2, 2), which would be wrong
    for any other tokenizer: pass `bos_token_id`, `eos_token_id` and `pad_token_id` from yours.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    _check_fields(overrides)
    fields = dict(PRESETS[preset], vocab_size=vocab_size, max_position_embeddings=max_position_embeddings,
                  rope_parameters=dict(DEFAULT_ROPE), bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return InternLM3Config(**(fields | overrides))


def parameter_count(config: PretrainedConfig) -> int:
    """Exact parameter count of a Llama-family causal LM with this config, without building it.

    Lets the planner size memory and FLOPs for a 20B model on a laptop.
    """
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    attention = hidden * q_width + 2 * hidden * kv_width + q_width * hidden
    if config.attention_bias:
        attention += q_width + 2 * kv_width + hidden
    mlp = 3 * hidden * config.intermediate_size
    if config.mlp_bias:
        mlp += 2 * config.intermediate_size + hidden
    layer = attention + mlp + 2 * hidden  # two RMSNorm weights
    embeddings = config.vocab_size * hidden
    head = 0 if config.tie_word_embeddings else config.vocab_size * hidden
    return embeddings + config.num_hidden_layers * layer + hidden + head


def _check_fields(overrides: dict) -> None:
    """InternLM3Config stores unknown keyword arguments silently; a typo must fail instead."""
    known = {f.name for f in dataclasses.fields(InternLM3Config)} | set(InternLM3Config.attribute_map)
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown model config field {key!r}{hint}")
