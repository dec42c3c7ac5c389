"""Load an HF checkpoint directory (safetensors) into this rank's shard of the paged model."""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import safe_open
from transformers import AutoConfig

from internray.models.quantized import quantization_config
from internray.serve.model.cpu_kernels import cpu_flags
from internray.serve.model.layers import TPInfo
from internray.serve.model.llama import FUSED, LlamaForCausalLM
from internray.serve.model.quantization import prepare_quantized_linears, quantize_structure


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" is bf16 on GPUs and on CPUs with bf16 instructions (vLLM's CPU default too), fp32 on
    other CPUs, where bf16 matmuls are emulated and slower than fp32. With avx512_bf16 a SmolLM2
    decode step is 1.3-1.5x faster in bf16 than in fp32 (batches of 1 to 32, 2 threads)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_bf16_instructions() else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def cpu_has_bf16_instructions() -> bool:
    """Whether this CPU computes bf16 natively: x86 avx512_bf16 or AMX."""
    return not {"avx512_bf16", "amx_bf16"}.isdisjoint(cpu_flags())


def load_model(model_dir: str | Path, tp: TPInfo, dtype: torch.dtype, device: torch.device,
               weights: Mapping[str, torch.Tensor] | None = None) -> LlamaForCausalLM:
    """Read each checkpoint tensor once, slice out this rank's shard (`tp_dim`), and place it in
    its (possibly fused, `FUSED`) parameter. `weights` (HF names, e.g. a trainer's state dict)
    replace the directory's safetensors, which is how the align stage refreshes a rollout engine."""
    model_dir = Path(model_dir)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(model_dir), tp)
    qconfig = quantization_config(model.config)
    if qconfig is not None:
        quantize_structure(model, qconfig)
    params = dict(model.named_parameters(remove_duplicate=False))
    for param in params.values():  # integer codes of a quantized checkpoint keep their type
        param.data = torch.empty(param.shape, dtype=dtype if param.is_floating_point() else param.dtype,
                                 device=device)
    loaded = set()
    tensors = _files(model_dir) if weights is None else (("weights", n, t) for n, t in weights.items())
    for origin, name, tensor in tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        target, part = fused_name(name)
        if target not in params:
            raise ValueError(f"{origin}: unexpected tensor {name!r} for a {model.config.model_type} model")
        param = params[target]
        rows = slice(None)
        size = param.shape[param.tp_dim] if param.tp_dim is not None else None
        if part is not None:
            size = param.parts[part]
            rows = slice(sum(param.parts[:part]), sum(param.parts[:part + 1]))
        index = [slice(None)] * (len(tensor.get_shape()) if hasattr(tensor, "get_shape") else tensor.dim())
        if param.tp_dim is not None:
            index[param.tp_dim] = slice(tp.rank * size, (tp.rank + 1) * size)
        tensor = tensor[tuple(index)]
        destination = param.data[rows]
        if tensor.shape != destination.shape:
            raise ValueError(f"{origin}: {name} has shape {tuple(tensor.shape)} on rank {tp.rank}, "
                             f"expected {tuple(destination.shape)}")
        destination.copy_(tensor)
        loaded.add((target, part))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        loaded.add(("lm_head.weight", None))
    expected = {(n, i) for n, p in params.items() for i in (range(len(p.parts)) if hasattr(p, "parts") else [None])}
    missing = sorted(f"{n}[{i}]" if i is not None else n for n, i in expected - loaded)
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    model = model.to(device).eval()
    if qconfig is not None:
        prepare_quantized_linears(model, dtype)
    release_freed_heap()
    return model


def release_freed_heap() -> None:
    """Hand the C heap's free pages back to the OS. Loading frees a lot (each tensor's staging
    copy; a quantized checkpoint's one-code-per-byte tensors once packed for the kernel), and
    glibc keeps freed blocks in its arenas, so a server would otherwise stay as large as its
    loading peak: SmolLM2-135M AWQ-int4 went from 857 to 670 MiB resident (bf16: 832 to 811).
    glibc only; elsewhere nothing to do."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _files(model_dir: Path) -> Iterator[tuple[str, str, object]]:
    """(file name, tensor name, lazily sliceable tensor) for every tensor of the checkpoint."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files (export or import the checkpoint first)")
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                yield file.name, name, f.get_slice(name)


def fused_name(name: str) -> tuple[str, int | None]:
    """`...self_attn.k_proj.weight` -> (`...self_attn.qkv_proj.weight`, 1); others unchanged."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in FUSED:
        module, index = FUSED[parts[-2]]
        return ".".join(parts[:-2] + [module, parts[-1]]), index
    return name, None
