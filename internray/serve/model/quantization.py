"""Quantized linears in the engine: the checkpoint's integer codes, run by torch's low-bit kernels.

`quantize_structure` turns the decoder's linears into the checkpoint's layout before loading (see
`internray.models.quantized`): `qweight`, `scales` (and `zeros`) parameters that carry the dense
weight's `tp_dim`/`parts`, so the loader shards and fuses them like any weight. After loading,
`prepare_quantized_linears` hands each one its kernel:
- CPU int8: `aten._weight_int8pack_mm` (int8 weights, per-channel scales, float activations);
- CPU int4: `aten._weight_int4pack_mm_for_cpu` on codes packed by
  `aten._convert_weight_to_int4pack_for_cpu` (two codes per byte, the kernel's tiled layout);
- elsewhere (a GPU, until its kernels are wired here): the codes are dequantized once into a dense
  weight, which keeps the model's accuracy but none of the memory saving.
"""
from __future__ import annotations

import torch
from torch import nn

from internray.models.quantized import QUANTIZED_MODULES, dequantize


KERNEL_DTYPE = torch.bfloat16
"""torch's CPU low-bit kernels are fast for bf16 activations only (fp32 takes a reference path
20-50x slower), so activations are cast to bf16 around them."""


class QuantizedMatmul:
    """x @ W^T for one quantized linear, with the kernel chosen for the device it lives on."""

    def __init__(self, linear: nn.Module, method: str, group_size: int, dtype: torch.dtype):
        codes = linear.qweight.data
        scales = linear.scales.data.to(dtype if codes.device.type != "cpu" else KERNEL_DTYPE)
        self.method, self.group_size = method, group_size
        self.dense: torch.Tensor | None = None
        if codes.device.type != "cpu":
            zeros = linear.zeros.data if method == "awq-int4" else None
            self.dense = dequantize(codes, scales, zeros).to(dtype)
        elif method == "int8":
            self.codes, self.scales = codes, scales
        else:
            self.codes = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
            self.scale_zeros = torch.stack([scales.T, linear.zeros.data.to(KERNEL_DTYPE).T], dim=-1).contiguous()
        for name in ("qweight", "scales", "zeros"):  # the kernel holds what it needs; free the rest
            if hasattr(linear, name):
                getattr(linear, name).data = torch.empty(0)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.dense is not None:
            return nn.functional.linear(x, self.dense, bias)
        flat = x.reshape(-1, x.shape[-1]).to(KERNEL_DTYPE)
        if self.method == "int8":
            y = torch.ops.aten._weight_int8pack_mm(flat, self.codes, self.scales)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.codes, self.group_size, self.scale_zeros)
        y = y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)
        return y if bias is None else y + bias


def quantize_structure(model: nn.Module, qconfig: dict) -> None:
    """Replace the dense weights of the quantized linears with empty code/scale parameters."""
    from internray.serve.model.layers import Linear

    method, group_size = qconfig["method"], qconfig.get("group_size")
    for name, module in model.named_modules():
        if not isinstance(module, Linear) or not _quantized(name):
            continue
        out_features, in_features = module.weight.shape
        tp_dim, parts = module.weight.tp_dim, getattr(module.weight, "parts", None)
        del module.weight
        module.quant_method, module.group_size = method, group_size
        int8 = method == "int8"
        module.qweight = _param(torch.empty(out_features, in_features, dtype=torch.int8 if int8 else torch.uint8),
                                tp_dim, parts)
        if int8:  # one scale per output channel: split with the rows, replicated when the inputs are split
            module.scales = _param(torch.empty(out_features), 0 if tp_dim == 0 else None, parts)
            continue
        if in_features % group_size:
            raise ValueError(f"{name}: {in_features} input features per rank are not a multiple of group_size "
                             f"{group_size}; quantize with a smaller --group-size or use fewer TP ranks")
        module.scales = _param(torch.empty(out_features, in_features // group_size), tp_dim, parts)
        module.zeros = _param(torch.empty(out_features, in_features // group_size), tp_dim, parts)


def prepare_quantized_linears(model: nn.Module, dtype: torch.dtype) -> None:
    from internray.serve.model.layers import Linear

    for module in model.modules():
        if isinstance(module, Linear) and hasattr(module, "qweight"):
            module.quantized = QuantizedMatmul(module, module.quant_method, module.group_size, dtype)


def _quantized(module_name: str) -> bool:
    """Checkpoint names are what count: the engine fuses q/k/v and gate/up, so accept those too."""
    leaf = module_name.rsplit(".", 1)[-1]
    return leaf in QUANTIZED_MODULES or leaf in ("qkv_proj", "gate_up_proj")


def _param(tensor: torch.Tensor, tp_dim: int | None, parts: list[int] | None) -> nn.Parameter:
    param = nn.Parameter(tensor, requires_grad=False)
    param.tp_dim = tp_dim
    if parts is not None:
        param.parts = parts
    return param
