"""Paged Llama-family forward (InternLM3, Llama, SmolLM2, Qwen2-style) with tensor-parallel layers."""
