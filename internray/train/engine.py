"""Everything DeepSpeed-specific, built from the typed config in one place.

The model stays a plain transformers module; ZeRO sharding, mixed precision, clipping and
accumulation are applied from outside by `deepspeed_config` + `deepspeed.initialize`
(torchtitan's "parallelize from outside" idea, with DeepSpeed as the parallelizer).
"""
from __future__ import annotations

import math
import time

import torch

from internray.train.config import TrainConfig

GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
"""Dense bf16 tensor-core peaks (vendor datasheets, no sparsity), for MFU."""


def deepspeed_config(config: TrainConfig) -> dict:
    """The DeepSpeed JSON config that the typed sections describe."""
    zero: dict = {"stage": config.scaling.zero_stage}
    if config.scaling.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": config.scaling.use_gpu}
    if config.scaling.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": config.scaling.use_gpu}
    if config.scaling.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False  # we consolidate from the shards
    return {
        "train_micro_batch_size_per_gpu": config.training.micro_batch_size,
        "gradient_accumulation_steps": config.training.grad_accum_steps,
        "gradient_clipping": config.training.max_grad_norm,
        "bf16": {"enabled": config.training.precision == "bf16"},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def scaling_kwargs(config: TrainConfig) -> dict:
    """The keyword arguments of `ray.train.ScalingConfig` for this job (the planner prints them)."""
    scaling = config.scaling
    return {"num_workers": scaling.num_workers, "use_gpu": scaling.use_gpu,
            "resources_per_worker": {"CPU": scaling.cpus_per_worker}}


def optimizer_and_schedule(model: torch.nn.Module, config: TrainConfig):
    """AdamW (no decay on norms and biases) and linear warmup + cosine decay to min_lr_ratio.

    torch's fused AdamW: one vectorized pass over each tensor instead of a dozen elementwise
    kernels. ZeRO hands the optimizer one flat fp32 partition per group, where the unfused
    step took 30 ms for 5M parameters on one CPU thread and the fused one 4 ms."""
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    opt = config.optimizer
    groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]],  # LoRA has no 1-d parameters
                                  lr=opt.lr, betas=opt.betas, eps=opt.eps, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    return optimizer, schedule


def lr_factor(step: int, config: TrainConfig) -> float:
    warmup, total = config.lr_scheduler.warmup_steps, config.training.steps
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = config.lr_scheduler.min_lr_ratio
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def flops_per_token(model_config, seq_len: int) -> float:
    """Training FLOPs per token: 6 N + 12 L d T (PaLM appendix B).

    N counts every weight used in a matmul (input embeddings excluded: a lookup, not a matmul;
    the output head included). 12 L d T is attention's score and value matmuls over a
    context of T = seq_len, forward and backward.
    """
    from internray.models.presets import parameter_count

    d, layers = model_config.hidden_size, model_config.num_hidden_layers
    matmul_params = parameter_count(model_config) - model_config.vocab_size * d
    if getattr(model_config, "tie_word_embeddings", False):
        matmul_params += model_config.vocab_size * d
    return 6 * matmul_params + 12 * layers * d * seq_len


def peak_flops(config: TrainConfig) -> float:
    """Per-worker peak for MFU: configured, else the GPU's datasheet bf16 peak, else measured."""
    if config.scaling.peak_flops_per_worker:
        return config.scaling.peak_flops_per_worker
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value
    return measured_matmul_flops(torch.bfloat16 if config.training.precision == "bf16" else torch.float32)


def measured_matmul_flops(dtype: torch.dtype, size: int = 1024, repeats: int = 4, trials: int = 3) -> float:
    """What this worker's threads achieve on a large square matmul (best of `trials`): a CPU's
    practical peak. Noisy on a shared machine; set `scaling.peak_flops_per_worker` to pin it."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best
