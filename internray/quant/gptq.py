"""GPTQ rounding (Frantar et al. 2022): int4 codes that compensate each other's error.

Round-to-nearest treats every weight alone. GPTQ rounds one input column at a time and spreads
that column's rounding error over the columns not yet rounded, weighted by the inverse Hessian
of the layer's output error, H = 2 X^T X over calibration inputs X: the correlations between
input channels let later weights absorb earlier mistakes. It is orthogonal to AWQ's scaling (the
AWQ paper combines the two), so `internray quantize --method awq-int4` folds AWQ's scales first
and then rounds with GPTQ, writing codes in the same group-wise format (models/quantized.py).

Layers are done in order, each fed the output of the layers before it *after* they were
quantized (GPTQ's sequential mode), so a layer corrects for what its inputs have already lost.
Only one layer's Hessians are held at a time, which keeps memory flat in the model's depth.
Columns go in act order (largest Hessian diagonal first) against grids fixed per contiguous group
before any rounding, so the codes keep the engine's group layout.
"""
from __future__ import annotations

import torch
from torch import nn

from internray.models.quantized import dequantize


class _Stop(Exception):
    """Raised by the hook that captures the first layer's inputs: nothing after it is needed."""


@torch.no_grad()
def first_layer_inputs(model: nn.Module, layer: nn.Module, batches: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) the model passes its first decoder layer for each calibration batch."""
    captured = []

    def capture(_, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    hook = layer.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(batch)
            except _Stop:
                pass
    finally:
        hook.remove()
    return captured


@torch.no_grad()
def gptq_layers(model: nn.Module, layers: list[nn.Module], batches: list[torch.Tensor], names: list[str],
                group_size: int, damp: float = 0.01) -> dict[nn.Linear, tuple[torch.Tensor, ...]]:
    """Quantize the linears `names` (paths within a layer) of every layer with GPTQ, in place
    (their weights become what the codes stand for); returns each linear's codes."""
    from tqdm.auto import tqdm

    inputs = first_layer_inputs(model, layers[0], batches)
    codes = {}
    for layer in tqdm(layers, desc="gptq", unit="layer"):
        linears = {name: layer.get_submodule(name) for name in names}
        hessians = {name: torch.zeros(m.in_features, m.in_features) for name, m in linears.items()}
        rows = dict.fromkeys(names, 0)
        last = {}  # q/k/v (and gate/up) are called on one input tensor: its 2 X^T X is computed once

        def accumulate(name, x):
            if last.get("input") is not x:
                flat = x.reshape(-1, x.shape[-1]).float()
                last.update(input=x, gram=2 * flat.T @ flat, rows=flat.shape[0])
            hessians[name] += last["gram"]
            rows[name] += last["rows"]

        hooks = [m.register_forward_pre_hook(lambda _, args, name=name: accumulate(name, args[0]))
                 for name, m in linears.items()]
        try:
            for args, kwargs in inputs:
                layer(*args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
            last.clear()
        for name, linear in linears.items():
            q = gptq_quantize(linear.weight.float(), hessians[name] / rows[name], group_size, damp)
            codes[linear] = q
            linear.weight.copy_(dequantize(*q).to(linear.weight.dtype))
        inputs = [((layer(*args, **kwargs), *args[1:]), kwargs) for args, kwargs in inputs]
    return codes


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, damp: float = 0.01,
                  block: int = 128, act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes uint8 0..15 [out, in], scales, zeros [out, in / group_size]) for `weight`, in the
    format of models.quantized.quantize_int4: w ~= (codes - 8) * scale + zero per group.

    Each group's grid is fixed up front from its weights (GPTQ's static groups), which is what
    lets `act_order` round the columns with the largest Hessian diagonal (the inputs with the most
    energy) first, while the most other columns are still free to absorb their error, and still
    write contiguous groups."""
    w = weight.clone().float()
    out_features, columns = w.shape
    h = hessian.clone().float()
    dead = torch.diag(h) == 0  # an input channel that is always zero: its weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0
    groups = w.reshape(out_features, columns // group_size, group_size)
    lows = groups.amin(dim=-1)
    scales = ((groups.amax(dim=-1) - lows) / 15).clamp(min=1e-8)
    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(columns)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diag(h).mean() * torch.eye(columns)  # GPTQ's dampening keeps the inverse stable
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(out_features, columns, dtype=torch.uint8)
    for start in range(0, columns, block):
        end = min(start + block, columns)
        chunk, errors = w[:, start:end].clone(), torch.zeros(out_features, end - start)
        for i in range(end - start):
            column = int(order[start + i])
            low, scale = lows[:, column // group_size], scales[:, column // group_size]
            q = torch.round((chunk[:, i] - low) / scale).clamp(0, 15)
            codes[:, column] = q.to(torch.uint8)
            error = (chunk[:, i] - (q * scale + low)) / h_inv[start + i, start + i]
            chunk[:, i:] -= error[:, None] * h_inv[start + i, start + i:end][None, :]
            errors[:, i] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return codes, scales, lows + 8 * scales
