"""Load an HF checkpoint directory (safetensors) into this rank's shard of the paged model."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig

from internray.serve.model.layers import TPInfo
from internray.serve.model.llama import LlamaForCausalLM


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" is bf16 on GPUs and fp32 on CPUs (CPU bf16 matmuls are slow without AMX)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_model(model_dir: str | Path, tp: TPInfo, dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files (export or import the checkpoint first)")
    model = LlamaForCausalLM(AutoConfig.from_pretrained(model_dir), tp)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = set()
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name not in params:
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    raise ValueError(f"{file.name}: unexpected tensor {name!r} for a {model.config.model_type} model")
                param = params[name]
                tensor = f.get_slice(name)
                if param.tp_dim is not None:
                    size = param.shape[param.tp_dim]
                    index = [slice(None)] * len(tensor.get_shape())
                    index[param.tp_dim] = slice(tp.rank * size, (tp.rank + 1) * size)
                    tensor = tensor[tuple(index)]
                else:
                    tensor = tensor[:]
                if tensor.shape != param.shape:
                    raise ValueError(f"{file.name}: {name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
                param.data = tensor.to(device=device, dtype=dtype)
                loaded.add(name)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        loaded.add("lm_head.weight")
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return model.to(device).eval()
