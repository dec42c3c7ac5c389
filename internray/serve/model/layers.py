"""Tensor-parallel linears and paged attention: the only places where ranks and the KV cache show.

Column-parallel linears split output features across ranks (q/k/v heads, MLP up/gate); row-
parallel ones split input features and all-reduce their partial sums (attention output, MLP
down). Every parameter carries `tp_dim`, the dimension its checkpoint tensor is split along
(None: replicated), which is all the loader needs to know.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class TPInfo:
    rank: int = 0
    size: int = 1


class ColumnParallelLinear(nn.Module):
    """Output features split across ranks. Several checkpoint matrices with the same input can be
    fused into one (q/k/v, gate/up): `parts` lists their output sizes, each rank holds its shard
    of every part side by side, and one matmul computes them all."""

    def __init__(self, in_features: int, parts: list[int], bias: bool, tp: TPInfo):
        super().__init__()
        for size in parts:
            if size % tp.size:
                raise ValueError(f"{size} output features do not split over tensor parallel size {tp.size}")
        self.parts = [size // tp.size for size in parts]
        self.weight = nn.Parameter(torch.empty(sum(self.parts), in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(sum(self.parts)), requires_grad=False) if bias else None
        for param in (p for p in (self.weight, self.bias) if p is not None):
            param.tp_dim, param.parts = 0, self.parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPInfo):
        super().__init__()
        if in_features % tp.size:
            raise ValueError(f"{in_features} input features do not split over tensor parallel size {tp.size}")
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp.size), requires_grad=False)
        self.weight.tp_dim = 1
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.tp_dim = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.tp.size > 1:
            dist.all_reduce(y)
        return y if self.bias is None else y + self.bias


class RMSNorm(nn.Module):
    """Llama's RMSNorm, computed in fp32 like the reference implementation."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.weight.tp_dim = None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/sin: [tokens, head_dim]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


@dataclass
class PrefillSpan:
    """One sequence's chunk in a step: tokens [start, start + length) of the flat batch."""
    start: int
    length: int
    context_slots: torch.Tensor | None  # cache slots of all context tokens; None: no earlier context
    mask: torch.Tensor | None  # [length, context] causal mask with the chunk's offset


@dataclass
class AttentionBatch:
    """Where this step's tokens go in the cache and what each attends to; shared by all layers."""
    slot_mapping: torch.Tensor  # [tokens]
    decode_index: torch.Tensor  # [decodes] positions in the flat batch of one-token sequences
    decode_slots: torch.Tensor  # [decodes, max context] cache slots (padded)
    decode_mask: torch.Tensor  # [decodes, 1, 1, max context] True where a slot is real
    prefills: list[PrefillSpan] = field(default_factory=list)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                    batch: AttentionBatch) -> torch.Tensor:
    """Store this step's keys/values in the cache, then attend. q: [T, H, D]; k, v: [T, Hkv, D];
    kv_cache: [slots, 2, Hkv, D] (keys and values side by side: one copy in, one gather out).
    One batched call covers all decoding sequences; each prefill chunk is its own call (causal,
    offset by its cached context)."""
    kv_cache.index_copy_(0, batch.slot_mapping, torch.stack((k, v), 1))
    out = torch.empty_like(q)
    if len(batch.decode_index):
        qd = q[batch.decode_index].unsqueeze(2)  # [B, H, 1, D]
        kvd = kv_cache[batch.decode_slots]  # [B, S, 2, Hkv, D]
        kd, vd = kvd[:, :, 0].transpose(1, 2), kvd[:, :, 1].transpose(1, 2)  # [B, Hkv, S, D]
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=batch.decode_mask, enable_gqa=True)
        out[batch.decode_index] = od.squeeze(2)
    for span in batch.prefills:
        rows = slice(span.start, span.start + span.length)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
        if span.context_slots is None:
            kp, vp = k[rows], v[rows]
        else:
            kvp = kv_cache[span.context_slots]
            kp, vp = kvp[:, 0], kvp[:, 1]
        kp, vp = kp.transpose(0, 1).unsqueeze(0), vp.transpose(0, 1).unsqueeze(0)
        op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=span.mask, is_causal=span.mask is None,
                                            enable_gqa=True)
        out[rows] = op.squeeze(0).transpose(0, 1)
    return out
