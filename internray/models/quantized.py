"""The quantized checkpoint format: what `internray quantize` writes and the serve engine reads.

A quantized checkpoint is a plain HF directory (config.json, tokenizer, safetensors) in which each
quantized linear `X.weight` is replaced by integer codes and their scales:

- `int8`: `X.qweight` int8 [out, in] and `X.scales` [out]: symmetric, per output channel,
  w = q * scale;
- `awq-int4`: `X.qweight` uint8 [out, in] holding values 0..15, `X.scales` and `X.zeros`
  [out, in / group_size]: asymmetric per group of input channels, w = (q - 8) * scale + zero
  (the "zero point in the float domain" form that torch's int4 CPU/GPU kernels take).

config.json's `quantization_config` says so: {"quant_method": "internray", "method": ...,
"group_size": ..., "modules": [...], "calibration": {...}}. Codes are stored one per byte, not
packed two to a byte, so tensor-parallel ranks slice them like any weight; the engine packs int4
codes for its kernel when it loads them (memory is what packing saves at run time; disk is not).
Embeddings and the LM head stay in floating point, as LMDeploy and AWQ keep them.
"""
from __future__ import annotations

import torch

QUANT_METHOD = "internray"
METHODS = ("int8", "awq-int4")
QUANTIZED_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def quantization_config(config) -> dict | None:
    """The checkpoint's internray quantization settings, or None for a dense checkpoint; another
    tool's quantization (GPTQ, bitsandbytes...) is refused by name rather than misread."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != QUANT_METHOD or qc.get("method") not in METHODS:
        raise ValueError(f"quantization {qc.get('quant_method')!r}/{qc.get('method')!r} is not supported; "
                         f"quantize the dense checkpoint with `internray quantize` ({', '.join(METHODS)})")
    return qc


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dimension: (codes int8, same shape; scales, one per row) with
    w ~= codes * scales[..., None], within half a step per number. A weight [out, in] gets one
    scale per output channel; the serve engine's int8 KV cache gets one per (token, head) vector."""
    scales = w.abs().amax(dim=-1).clamp(min=1e-8) / 127
    codes = torch.round(w / scales[..., None]).clamp(-127, 127).to(torch.int8)
    return codes, scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 0..15 [out, in], scales, zeros [out, in / group_size]) with
    w ~= (codes - 8) * scale + zero per group."""
    out_features, in_features = w.shape
    if in_features % group_size:
        raise ValueError(f"{in_features} input features are not a multiple of group_size {group_size}")
    groups = w.reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-8)
    zeros = low + 8 * scales
    codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    return codes.reshape(out_features, in_features), scales, zeros


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None = None) -> torch.Tensor:
    """The float weight the codes stand for (int8 when `zeros` is None, else int4 groups)."""
    if zeros is None:
        return codes.float() * scales.float()[:, None]
    out_features, in_features = codes.shape
    groups = codes.float().reshape(out_features, scales.shape[1], -1)
    return ((groups - 8) * scales.float()[..., None] + zeros.float()[..., None]).reshape(out_features, in_features)
