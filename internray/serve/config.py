"""Typed configuration of the serve stage: the engine, and the HTTP server / Serve deployment."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from internray.config import Section


class EngineConfig(Section):
    """How one model is run. The KV cache is sized from an explicit memory budget (`kv_cache_gib`,
    per tensor-parallel rank), and the engine prints what that buys: blocks, tokens, sequences."""

    model: str = Field(description="HF checkpoint directory (safetensors)")
    served_name: str | None = Field(None, description="the `model` name clients use; default: the directory name")
    tensor_parallel_size: int = Field(1, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    kv_cache_gib: float = Field(1.0, gt=0, description="KV cache memory per rank, GiB")
    kv_cache_dtype: Literal["auto", "int8"] = Field("auto", description="auto: the model's dtype; int8: codes with "
                                                    "a scale per token and head (model/kv_cache.py), 1.9x the "
                                                    "tokens of bf16 in the same memory")
    block_size: int = Field(16, ge=1, description="tokens per KV-cache block")
    max_num_seqs: int = Field(64, ge=1, description="sequences decoded together at most")
    max_num_batched_tokens: int = Field(2048, ge=16, description="tokens per step (prefill chunks included)")
    max_model_len: int | None = Field(None, ge=2, description="prompt + completion cap; default: the model's")
    enable_prefix_caching: bool = True
    compiled_cpu_kernels: bool = Field(True, description="on CPU, decode attention and fused norm/rotary/SiLU through "
                                       "kernels compiled on first use (model/cpu_kernels.py; needs a C++ compiler, "
                                       "falls back to plain PyTorch ops without one)")
    threads_per_rank: int | None = Field(None, ge=1, description="torch threads per rank on CPU; default: the CPUs this process may "
                                         "use / tensor_parallel_size")


class ServerConfig(Section):
    """The OpenAI-compatible front door and how Ray Serve scales the engine behind it."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: list[str] = Field(default_factory=list, description="accepted Bearer keys; empty: no auth")
    max_concurrent_requests: int = Field(256, ge=1, description="per model, counted by the router (several models) "
                                         "or by each replica (one model, whose replicas are the router); over it: 429")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0, description="autoscaling target per replica")
    cpus_per_replica: float = Field(1.0, ge=0)
    gpus_per_rank: float = Field(0.0, ge=0)
    cpus_per_rank: float = Field(1.0, ge=0, description="CPUs reserved per extra tensor-parallel rank")


class ServeConfig(Section):
    models: list[EngineConfig] = Field(min_length=1)
    server: ServerConfig = Field(default_factory=ServerConfig)
