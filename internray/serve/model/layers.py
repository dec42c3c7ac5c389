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

from internray.serve.model import cpu_matmul
from internray.serve.model.cpu_attention import decode_attention, prefill_attention
from internray.serve.model.kv_cache import KVCache
from internray.shm_kernel import KERNEL_LEVEL_NEEDED


@dataclass
class TPInfo:
    rank: int = 0
    size: int = 1
    shared_memory_level: int = 0
    """DeepSpeed's shared-memory all-reduce kernel's ISA level where the ranks joined it (CPU, one
    node: serve/engine/cpu_allreduce.py); 0: all-reduce through the process group."""

    def all_reduce(self, tensor: torch.Tensor) -> None:
        if KERNEL_LEVEL_NEEDED.get(tensor.dtype, 99) <= self.shared_memory_level and tensor.is_contiguous():
            torch.ops.deepspeed.inference_all_reduce_(tensor)
        else:
            dist.all_reduce(tensor)


class Linear(nn.Module):
    """y = x W^T (+ b), replicated on every rank. On CPUs the weight is reordered once for a CPU
    matmul (`pack_for_cpu`): bf16 weights, where the CPU has AVX512_BF16, into the layout of the
    engine's own kernel (model/cpu_matmul.py: 1.3-2.2x oneDNN's speed for the 1-64 rows decoding
    runs, the same for prefill's thousands); other weights into oneDNN's blocked layout (what vLLM's
    CPU backend does too), 1.3-1.8x faster than MKL's sgemm on 1-64 rows."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.tp_dim = None
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.tp_dim = None
        self.packed: torch.Tensor | None = None
        """The weight in a CPU matmul's layout: `bf16_kernel`'s if that is set, else oneDNN's."""
        self.bf16_kernel = None
        self.quantized = None
        """A `QuantizedMatmul` when the checkpoint holds this weight as integer codes (quantization.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.quantized is not None:
            return self.quantized(x, bias)
        if self.bf16_kernel is not None:
            return cpu_matmul.bf16_matmul(self.bf16_kernel, x, self.packed, None if bias is None else bias.float(),
                                          self.out_features)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
        return F.linear(x, self.weight, bias)

    def pack_for_cpu(self, batch_hint: int, keep_dense: bool, kernels=None) -> None:
        """Swap the dense weight for a CPU matmul's layout (freeing the dense copy unless another
        module shares it, as a tied lm_head shares the embedding): the compiled bf16 kernel's where
        `kernels` has it and the weight suits it, else oneDNN's (not for fp16)."""
        if cpu_matmul.usable(kernels, self.weight):
            self.packed, self.bf16_kernel = cpu_matmul.pack_bf16(self.weight.data), kernels
        elif self.weight.dtype != torch.float16 and torch.backends.mkldnn.is_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.data, batch_hint)
        else:
            return  # fp16 without the kernel: F.linear on the dense weight
        if not keep_dense:
            self.weight.data = torch.empty(0, dtype=self.weight.dtype)


class ColumnParallelLinear(Linear):
    """Output features split across ranks. Several checkpoint matrices with the same input can be
    fused into one (q/k/v, gate/up): `parts` lists their output sizes, each rank holds its shard
    of every part side by side, and one matmul computes them all."""

    def __init__(self, in_features: int, parts: list[int], bias: bool, tp: TPInfo):
        for size in parts:
            if size % tp.size:
                raise ValueError(f"{size} output features do not split over tensor parallel size {tp.size}")
        super().__init__(in_features, sum(parts) // tp.size, bias)
        self.parts = [size // tp.size for size in parts]
        for param in (p for p in (self.weight, self.bias) if p is not None):
            param.tp_dim, param.parts = 0, self.parts


class RowParallelLinear(Linear):
    """Input features split across ranks; the partial products are all-reduced before the bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool, tp: TPInfo):
        if in_features % tp.size:
            raise ValueError(f"{in_features} input features do not split over tensor parallel size {tp.size}")
        super().__init__(in_features // tp.size, out_features, bias)
        self.tp = tp
        self.weight.tp_dim = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.matmul(x, None)
        if self.tp.size > 1:
            self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias


def pack_linears_for_cpu(model: nn.Module, batch_hint: int, kernels=None) -> None:
    """Reorder every dense linear's weight for a CPU matmul (see `Linear`); weights another module
    also holds (tied embeddings) keep their dense copy. Quantized linears have kernels of their own."""
    linears = [m for m in model.modules() if isinstance(m, Linear) and m.quantized is None]
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module.parameters(recurse=False):
            owners[id(param)] = owners.get(id(param), 0) + 1
    for linear in linears:
        linear.pack_for_cpu(batch_hint, keep_dense=owners[id(linear.weight)] > 1, kernels=kernels)


class RMSNorm(nn.Module):
    """Llama's RMSNorm, computed in fp32 like the reference implementation, with the residual add
    before it folded in: forward(x, residual) -> (norm(x + residual), x + residual)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.weight.tp_dim = None
        self.eps = eps
        self.fused = None
        """The compiled CPU kernels (model/cpu_fused.py) when the model uses them."""

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused is not None:  # the sum is written into `residual` in place
            return self.fused.rms_norm(x, residual, self.weight, self.eps), x if residual is None else residual
        if residual is not None:
            x = x + residual
        if x.dtype == torch.float32:  # one fused call; same arithmetic as the reference
            return F.rms_norm(x, x.shape[-1:], self.weight, self.eps), x
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype), x


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/sin: [tokens, head_dim]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


@dataclass
class PrefillSpan:
    """One sequence's chunk in a step: tokens [start, start + length) of the flat batch, the last
    `length` of its first `context_len` tokens."""
    start: int
    length: int
    blocks: torch.Tensor  # the cache blocks holding all `context_len` tokens, the chunk's own included
    context_len: int
    mask: torch.Tensor | None  # SDPA after earlier context: [length, context_len] causal mask with the chunk's offset


@dataclass
class AttentionBatch:
    """Where this step's tokens go in the cache and what each attends to; shared by all layers."""
    slot_mapping: torch.Tensor  # [tokens]
    decode_index: torch.Tensor  # [decodes] positions in the flat batch of one-token sequences
    decode_blocks: torch.Tensor  # [decodes, max blocks] block tables (padded)
    decode_lengths: torch.Tensor  # [decodes] context lengths, the new token included
    decode_mask: torch.Tensor | None  # [decodes, 1, 1, max blocks * block size] True where a slot is real
    kernels: object | None = None  # compiled CPU kernels (model/cpu_kernels.py); None: gather + SDPA
    prefill_kernel: bool = False  # prefill chunks through `kernels` too (AVX-512, head sizes 32/64/128)
    prefills: list[PrefillSpan] = field(default_factory=list)

    @property
    def decodes_only(self) -> bool:
        """Every token of the step is a sequence's next one, in order (decode_index is 0..T-1)."""
        return len(self.decode_index) == len(self.slot_mapping)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                    batch: AttentionBatch) -> torch.Tensor:
    """Store this step's keys/values in the cache, then attend. q: [T, H, D]; k, v: [T, Hkv, D].
    Decoding sequences are one batched call: the compiled kernel where there is one (no padded copy
    of the batch's context), else a gather of their blocks and one masked SDPA. Each prefill chunk
    is its own call (causal, offset by its cached context): the compiled kernel reading the cache,
    or SDPA on the chunk's keys (after a gather of the blocks when there is earlier context)."""
    kv_cache.write(batch.slot_mapping, k, v, batch.kernels)
    if batch.kernels is not None and batch.decodes_only:  # no copies in or out
        return decode_attention(q, kv_cache, batch.decode_blocks, batch.decode_lengths, batch.kernels)
    out = torch.empty_like(q)
    if len(batch.decode_index):
        qd = q[batch.decode_index]  # [B, H, D]
        if batch.kernels is not None:
            od = decode_attention(qd, kv_cache, batch.decode_blocks, batch.decode_lengths, batch.kernels)
        else:
            kvd = kv_cache.gather(batch.decode_blocks, q.dtype)  # [B, S, 2, Hkv, D]
            kd, vd = kvd[:, :, 0].transpose(1, 2), kvd[:, :, 1].transpose(1, 2)  # [B, Hkv, S, D]
            od = F.scaled_dot_product_attention(qd.unsqueeze(2), kd, vd, attn_mask=batch.decode_mask,
                                                enable_gqa=True).squeeze(2)
        out[batch.decode_index] = od
    for span in batch.prefills:
        rows = slice(span.start, span.start + span.length)
        if batch.prefill_kernel:
            out[rows] = prefill_attention(q[rows], kv_cache, span.blocks, span.context_len, batch.kernels)
            continue
        qp = q[rows].transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
        if span.context_len == span.length:
            kp, vp = k[rows], v[rows]
        else:
            kvp = kv_cache.gather(span.blocks[None], q.dtype)[0, :span.context_len]
            kp, vp = kvp[:, 0], kvp[:, 1]
        kp, vp = kp.transpose(0, 1).unsqueeze(0), vp.transpose(0, 1).unsqueeze(0)
        op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=span.mask, is_causal=span.mask is None,
                                            enable_gqa=True)
        out[rows] = op.squeeze(0).transpose(0, 1)
    return out
