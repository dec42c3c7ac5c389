"""One tensor-parallel rank: its model shard, its slice of the KV cache, and one forward per step.

The driver turns the scheduler's chunks into a `StepInput` of plain arrays (cheap to ship to the
other ranks through Ray); each rank builds the same tensors from it and runs the same forward, so
the only cross-rank traffic is the all-reduces inside the row-parallel linears.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from internray.serve.config import EngineConfig
from internray.serve.engine.scheduler import ScheduledChunk
from internray.serve.model import cpu_kernels
from internray.serve.model.cpu_attention import PREFILL_HEAD_SIZES
from internray.serve.model.layers import (
    AttentionBatch,
    PrefillSpan,
    TPInfo,
    pack_linears_for_cpu,
)
from internray.serve.model.kv_cache import KVCache, bytes_per_token_head
from internray.serve.model.llama import head_dim
from internray.serve.model.loader import load_model, resolve_dtype


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def kv_bytes_per_token(hf_config, engine: EngineConfig) -> int:
    """Bytes one token's keys and values (and int8 scales) take in the cache of one rank, every layer."""
    dtype = resolve_dtype(engine.dtype, resolve_device(engine.device))
    heads = hf_config.num_key_value_heads // engine.tensor_parallel_size
    per_head = bytes_per_token_head(head_dim(hf_config), dtype, engine.kv_cache_dtype == "int8")
    return hf_config.num_hidden_layers * heads * per_head


def kv_cache_blocks(engine: EngineConfig, hf_config) -> int:
    return int(engine.kv_cache_gib * 2**30 // (kv_bytes_per_token(hf_config, engine) * engine.block_size))


@dataclass
class StepInput:
    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T]
    sample_index: np.ndarray  # [S] flat positions whose logits are wanted, chunk by chunk: prompt-scoring rows, then the sampled one
    decode_index: np.ndarray  # [D]
    decode_blocks: np.ndarray  # [D, max blocks] block tables, zero-padded
    decode_lengths: np.ndarray  # [D] context lengths
    prefills: list[tuple[int, int, np.ndarray, int]]  # (start, length, blocks of the whole context, context length)


def slots_of(block_table: list[int], block_size: int, start: int, stop: int) -> np.ndarray:
    positions = np.arange(start, stop)
    return np.asarray(block_table)[positions // block_size] * block_size + positions % block_size


def prepare_step(chunks: list[ScheduledChunk], block_size: int) -> StepInput:
    ids, positions, slots, sample_index = [], [], [], []
    decode_index, decode_tables, decode_lengths, prefills = [], [], [], []
    start = 0
    for chunk in chunks:
        seq, n, begin = chunk.seq, chunk.num_tokens, chunk.seq.num_computed_tokens
        ids.extend(seq.token_ids[begin:begin + n])
        positions.append(np.arange(begin, begin + n))
        slots.append(slots_of(seq.block_table, block_size, begin, begin + n))
        if n == 1 and begin > 0:
            decode_index.append(start)
            decode_tables.append(seq.block_table[:begin // block_size + 1])
            decode_lengths.append(begin + 1)
        else:
            prefills.append((start, n, np.asarray(seq.block_table[:-(-(begin + n) // block_size)]), begin + n))
        sample_index.extend(range(start, start + chunk.prompt_logprob_rows))  # see LLMEngine.step
        start += n
        if chunk.samples:
            sample_index.append(start - 1)
    tables = np.zeros((len(decode_tables), max(map(len, decode_tables), default=0)), dtype=np.int64)
    for row, table in zip(tables, decode_tables):
        row[:len(table)] = table
    return StepInput(np.asarray(ids, dtype=np.int64), np.concatenate(positions), np.concatenate(slots),
                     np.asarray(sample_index, dtype=np.int64), np.asarray(decode_index, dtype=np.int64),
                     tables, np.asarray(decode_lengths, dtype=np.int64), prefills)


class ModelRunner:
    def __init__(self, engine: EngineConfig, tp: TPInfo, num_blocks: int):
        self.threads = engine.threads_per_rank or max(len(os.sched_getaffinity(0)) // engine.tensor_parallel_size, 1)
        self.device = resolve_device(engine.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(tp.rank % torch.cuda.device_count())
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.engine_config, self.tp = engine, tp
        dtype = self.dtype = resolve_dtype(engine.dtype, self.device)
        self._use_threads()  # loading runs parallel regions too: one team of the right size from the start
        self.kernels = None
        if self.device.type == "cpu" and engine.compiled_cpu_kernels:
            self.kernels = cpu_kernels.load()
        self.model = self._load()
        attn = self.model.model.layers[0].self_attn
        self.prefill_kernel = (self.kernels is not None and self.kernels.has_avx512()
                               and attn.head_dim in PREFILL_HEAD_SIZES)
        self.block_size = engine.block_size
        self.kv_caches = [KVCache.allocate(num_blocks, engine.block_size, attn.num_kv_heads, attn.head_dim, dtype,
                                           self.device, int8=engine.kv_cache_dtype == "int8")
                          for _ in self.model.model.layers]

    def _load(self, weights: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
        model = load_model(self.engine_config.model, self.tp, self.dtype, self.device, weights)
        if self.device.type == "cpu":
            pack_linears_for_cpu(model, self.engine_config.max_num_seqs, self.kernels)
        model.use_fused_cpu_ops(self.kernels)
        return model

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Swap in new weights (HF names), e.g. a policy after a training step. The model is
        rebuilt rather than written in place: packed CPU linears keep no dense copy to write to."""
        self._use_threads()  # a rank actor may call this on another thread than its steps'
        self.model = self._load(weights)

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    def attention_batch(self, step: StepInput) -> AttentionBatch:
        lengths = self._tensor(step.decode_lengths)
        decode_mask = None
        if self.kernels is None:
            width = step.decode_blocks.shape[1] * self.block_size
            decode_mask = (torch.arange(width, device=self.device)[None] < lengths[:, None])[:, None, None]
        prefills = []
        for start, length, blocks, context_len in step.prefills:
            mask = None
            if not self.prefill_kernel and context_len > length:
                rows = torch.arange(length, device=self.device)[:, None] + (context_len - length)
                mask = torch.arange(context_len, device=self.device)[None] <= rows
            prefills.append(PrefillSpan(start, length, self._tensor(blocks), context_len, mask))
        return AttentionBatch(self._tensor(step.slot_mapping), self._tensor(step.decode_index),
                              self._tensor(step.decode_blocks), lengths, decode_mask, self.kernels,
                              self.prefill_kernel, prefills)

    def _use_threads(self) -> None:
        """OpenMP thread counts belong to the calling thread, which would otherwise start from Ray
        workers' OMP_NUM_THREADS=1."""
        if self.device.type == "cpu" and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def execute(self, step: StepInput) -> torch.Tensor:
        """Logits [len(step.sample_index), vocab], fp32, on the CPU."""
        self._use_threads()
        logits = self.model(self._tensor(step.input_ids), self._tensor(step.positions), self.kv_caches,
                            self.attention_batch(step), self._tensor(step.sample_index))
        return logits.cpu()
