"""Activation-aware weight quantization (AWQ, Lin et al. 2023), the part that makes int4 usable.

A weight's input channels that meet large activations matter most. AWQ scales those columns up
before quantizing (so they lose less to rounding) and divides the same factor out of the input,
by folding it into the operation that produces that input (an RMSNorm's weight, or the previous
linear's rows): the model computes the same function, but its int4 codes fit it better. The
factor is s = mean|x|^alpha per channel, with alpha searched per group of linears that share an
input, by the output error on calibration activations. Optionally (`clip`), each group of weights
is then clipped to the fraction of its range that minimizes that group's output error
(`search_clip`, AWQ's second step): outliers stretch a 16-level grid and cost every other weight
precision. Not done here:
scaling o_proj when query and key/value head counts differ (there is no linear to fold into).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from internray.models.quantized import dequantize, quantize_int4


@dataclass
class InputStats:
    """What calibration keeps about one linear's input: mean |x| per channel, and a row sample."""

    abs_sum: torch.Tensor | None = None
    count: int = 0
    rows: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor, keep_rows: int, generator: torch.Generator) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        total = x.abs().sum(dim=0)
        self.abs_sum = total if self.abs_sum is None else self.abs_sum + total
        self.count += x.shape[0]
        pick = torch.randperm(x.shape[0], generator=generator)[:keep_rows]
        self.rows.append(x[pick])

    @property
    def mean(self) -> torch.Tensor:
        return self.abs_sum / self.count

    def sample(self, rows: int) -> torch.Tensor:
        return torch.cat(self.rows)[:rows]


@torch.no_grad()
def collect_input_stats(model: nn.Module, batches: list[torch.Tensor], modules: dict[str, nn.Linear],
                        rows_per_batch: int = 64, seed: int = 0) -> dict[str, InputStats]:
    """Run the calibration batches through `model`, recording each named linear's input."""
    stats = {name: InputStats() for name in modules}
    generator = torch.Generator().manual_seed(seed)
    hooks = [module.register_forward_pre_hook(
        lambda _, args, name=name: stats[name].add(args[0], rows_per_batch, generator))
        for name, module in modules.items()]
    try:
        for batch in batches:
            model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    return stats


@torch.no_grad()
def search_scale(linears: list[nn.Linear], stats: InputStats, group_size: int, grid: int) -> tuple[torch.Tensor, float]:
    """(per-channel scale, alpha) minimizing the group's int4 output error on the sampled inputs;
    alpha 0 (scale 1) is plain round-to-nearest, so the result is never worse than that."""
    x = stats.sample(512)
    weights = [linear.weight.float() for linear in linears]
    reference = [x @ w.T for w in weights]
    best = (float("inf"), torch.ones_like(stats.mean), 0.0)
    for step in range(grid + 1):
        alpha = step / grid
        scale = stats.mean.clamp(min=1e-5) ** alpha
        scale = scale / (scale.max() * scale.min()).sqrt()
        error = 0.0
        for w, ref in zip(weights, reference):
            fitted = dequantize(*quantize_int4(w * scale, group_size)) / scale
            error += (x @ fitted.T - ref).pow(2).mean().item()
        if error < best[0]:
            best = (error, scale, alpha)
    return best[1], best[2]


@torch.no_grad()
def search_clip(linear: nn.Linear, inputs: torch.Tensor, group_size: int,
                ratios: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)) -> torch.Tensor:
    """Clip each (output channel, input group) of the weight to +-ratio * its largest magnitude,
    with the ratio whose int4 rounding changes that group's share of the output least on
    `inputs`; ratio 1 (no clipping) is among them. Returns the per-group ratios chosen."""
    w = linear.weight.float()
    out_features, in_features = w.shape
    groups = w.reshape(out_features, in_features // group_size, group_size)
    x = inputs.reshape(inputs.shape[0], in_features // group_size, group_size)
    limit = groups.abs().amax(dim=-1, keepdim=True)
    best_error = torch.full(groups.shape[:2], float("inf"))
    best_ratio = torch.ones(groups.shape[:2])
    for ratio in ratios:
        clipped = torch.maximum(torch.minimum(groups, limit * ratio), -limit * ratio)
        fitted = dequantize(*quantize_int4(clipped.reshape(out_features, in_features), group_size))
        delta = fitted.reshape_as(groups) - groups
        error = torch.einsum("ogk,ngk->ong", delta, x).pow(2).mean(dim=1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    bound = limit * best_ratio[..., None]
    linear.weight.copy_(torch.maximum(torch.minimum(groups, bound), -bound).reshape_as(w).to(linear.weight.dtype))
    return best_ratio


@torch.no_grad()
def apply_scale(scale: torch.Tensor, linears: list[nn.Linear], producer: nn.Module) -> None:
    """Multiply the linears' input columns by `scale` and divide it out of what feeds them: an
    RMSNorm's weight, or a previous linear's output rows (and bias)."""
    for linear in linears:
        linear.weight.mul_(scale.to(linear.weight.dtype))
    if isinstance(producer, nn.Linear):
        producer.weight.div_(scale.to(producer.weight.dtype)[:, None])
        if producer.bias is not None:
            producer.bias.div_(scale.to(producer.bias.dtype))
    else:
        producer.weight.div_(scale.to(producer.weight.dtype))


def scale_groups(layer: nn.Module, config) -> list[tuple[str, list[str], nn.Module]]:
    """(name, linears sharing one input, the module producing that input) for one Llama layer."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = [("qkv", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], layer.input_layernorm),
              ("gate_up", ["mlp.gate_proj", "mlp.up_proj"], layer.post_attention_layernorm),
              ("down", ["mlp.down_proj"], mlp.up_proj)]
    if config.num_attention_heads == getattr(config, "num_key_value_heads", config.num_attention_heads):
        groups.append(("o", ["self_attn.o_proj"], attn.v_proj))
    return groups
