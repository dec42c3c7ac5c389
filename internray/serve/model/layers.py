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
    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPInfo):
        super().__init__()
        if out_features % tp.size:
            raise ValueError(f"{out_features} output features do not split over tensor parallel size {tp.size}")
        self.weight = nn.Parameter(torch.empty(out_features // tp.size, in_features), requires_grad=False)
        self.weight.tp_dim = 0
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features // tp.size), requires_grad=False)
            self.bias.tp_dim = 0

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
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, batch: AttentionBatch) -> torch.Tensor:
    """Store this step's keys/values in the cache, then attend. q: [T, H, D]; k, v: [T, Hkv, D];
    caches: [slots, Hkv, D]. One batched call covers all decoding sequences; each prefill chunk is
    its own call (causal, offset by its cached context)."""
    k_cache.index_copy_(0, batch.slot_mapping, k)
    v_cache.index_copy_(0, batch.slot_mapping, v)
    out = torch.empty_like(q)
    if len(batch.decode_index):
        qd = q[batch.decode_index].unsqueeze(2)  # [B, H, 1, D]
        kd = k_cache[batch.decode_slots].transpose(1, 2)  # [B, Hkv, S, D]
        vd = v_cache[batch.decode_slots].transpose(1, 2)
        od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=batch.decode_mask, enable_gqa=True)
        out[batch.decode_index] = od.squeeze(2)
    for span in batch.prefills:
        rows = slice(span.start, span.start + span.length)
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
        if span.context_slots is None:
            kp, vp = k[rows], v[rows]
        else:
            kp, vp = k_cache[span.context_slots], v_cache[span.context_slots]
        kp, vp = kp.transpose(0, 1).unsqueeze(0), vp.transpose(0, 1).unsqueeze(0)
        op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=span.mask, is_causal=span.mask is None,
                                            enable_gqa=True)
        out[rows] = op.squeeze(0).transpose(0, 1)
    return out
