"""One tensor-parallel rank: its model shard, its slice of the KV cache, and one forward per step.

The driver turns the scheduler's chunks into a `StepInput` of plain arrays (cheap to ship to the
other ranks through Ray); each rank builds the same tensors from it and runs the same forward, so
the only cross-rank traffic is the all-reduces inside the row-parallel linears.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from internray.serve.config import EngineConfig
from internray.serve.engine.scheduler import ScheduledChunk
from internray.serve.model.layers import AttentionBatch, PrefillSpan, TPInfo
from internray.serve.model.llama import head_dim
from internray.serve.model.loader import load_model, resolve_dtype


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def kv_block_bytes(hf_config, engine: EngineConfig) -> int:
    """Bytes one KV-cache block takes on one rank: keys + values, every layer."""
    dtype = resolve_dtype(engine.dtype, resolve_device(engine.device))
    heads = hf_config.num_key_value_heads // engine.tensor_parallel_size
    return 2 * hf_config.num_hidden_layers * engine.block_size * heads * head_dim(hf_config) * dtype.itemsize


def kv_cache_blocks(engine: EngineConfig, hf_config) -> int:
    return int(engine.kv_cache_gib * 2**30 // kv_block_bytes(hf_config, engine))


@dataclass
class StepInput:
    input_ids: np.ndarray  # [T]
    positions: np.ndarray  # [T]
    slot_mapping: np.ndarray  # [T]
    sample_index: np.ndarray  # [S] flat positions whose logits are wanted
    decode_index: np.ndarray  # [D]
    decode_slots: np.ndarray  # [D, max context]
    decode_lengths: np.ndarray  # [D]
    prefills: list[tuple[int, int, np.ndarray | None]]  # (start, length, context slots or None)


def slots_of(block_table: list[int], block_size: int, start: int, stop: int) -> np.ndarray:
    positions = np.arange(start, stop)
    return np.asarray(block_table)[positions // block_size] * block_size + positions % block_size


def prepare_step(chunks: list[ScheduledChunk], block_size: int) -> StepInput:
    ids, positions, slots, sample_index = [], [], [], []
    decode_index, decode_slots, prefills = [], [], []
    start = 0
    for chunk in chunks:
        seq, n, begin = chunk.seq, chunk.num_tokens, chunk.seq.num_computed_tokens
        ids.extend(seq.token_ids[begin:begin + n])
        positions.append(np.arange(begin, begin + n))
        slots.append(slots_of(seq.block_table, block_size, begin, begin + n))
        if n == 1 and begin > 0:
            decode_index.append(start)
            decode_slots.append(slots_of(seq.block_table, block_size, 0, begin + 1))
        else:
            context = slots_of(seq.block_table, block_size, 0, begin + n) if begin else None
            prefills.append((start, n, context))
        start += n
        if chunk.samples:
            sample_index.append(start - 1)
    lengths = np.array([len(s) for s in decode_slots], dtype=np.int64)
    padded = np.zeros((len(decode_slots), lengths.max() if len(lengths) else 0), dtype=np.int64)
    for row, s in zip(padded, decode_slots):
        row[:len(s)] = s
    return StepInput(np.asarray(ids, dtype=np.int64), np.concatenate(positions), np.concatenate(slots),
                     np.asarray(sample_index, dtype=np.int64), np.asarray(decode_index, dtype=np.int64),
                     padded, lengths, prefills)


class ModelRunner:
    def __init__(self, engine: EngineConfig, tp: TPInfo, num_blocks: int):
        if engine.threads_per_rank:
            torch.set_num_threads(engine.threads_per_rank)
        self.device = resolve_device(engine.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(tp.rank % torch.cuda.device_count())
            self.device = torch.device("cuda", torch.cuda.current_device())
        dtype = resolve_dtype(engine.dtype, self.device)
        self.model = load_model(engine.model, tp, dtype, self.device)
        attn = self.model.model.layers[0].self_attn
        shape = (num_blocks * engine.block_size, 2, attn.num_kv_heads, attn.head_dim)
        self.kv_caches = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in self.model.model.layers]

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    def attention_batch(self, step: StepInput) -> AttentionBatch:
        lengths = self._tensor(step.decode_lengths)
        width = step.decode_slots.shape[1]
        decode_mask = (torch.arange(width, device=self.device)[None] < lengths[:, None])[:, None, None]
        prefills = []
        for start, length, context in step.prefills:
            mask = None
            if context is not None:
                offset = len(context) - length
                rows = torch.arange(length, device=self.device)[:, None] + offset
                mask = torch.arange(len(context), device=self.device)[None] <= rows
                context = self._tensor(context)
            prefills.append(PrefillSpan(start, length, context, mask))
        return AttentionBatch(self._tensor(step.slot_mapping), self._tensor(step.decode_index),
                              self._tensor(step.decode_slots), decode_mask, prefills)

    def execute(self, step: StepInput) -> torch.Tensor:
        """Logits [len(step.sample_index), vocab], fp32, on the CPU."""
        logits = self.model(self._tensor(step.input_ids), self._tensor(step.positions), self.kv_caches,
                            self.attention_batch(step), self._tensor(step.sample_index))
        return logits.cpu()
