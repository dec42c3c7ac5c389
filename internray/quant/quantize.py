"""`internray quantize`: a dense checkpoint in, a quantized one out (format: models/quantized.py).

int8 rounds each output channel's weights to the nearest of 255 levels: no data needed. awq-int4
first measures activations on calibration text (a sample of the data stage's corpus), searches
and folds AWQ scales (awq.py), then rounds groups of `group_size` input channels to 16 levels,
with GPTQ's error compensation (gptq.py) unless `rounding: nearest`.
The run's manifest records the model, the calibration data with its content hash, and per group
the chosen exponent, so a quantized checkpoint traces back to the text it was calibrated on.
"""
from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from internray.corpus import load_documents
from internray.models.quantized import QUANT_METHOD, QUANTIZED_MODULES, quantize_int4, quantize_int8
from internray.offline import stdlib_dir
from internray.quant.awq import apply_scale, collect_input_stats, scale_groups, search_clip, search_scale
from internray.quant.config import CalibrationSection, QuantConfig
from internray.quant.gptq import gptq_layers
from internray.runs import Run, content_hash, open_run, write_json


def run_quantize(config: QuantConfig) -> Run:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = open_run("quant", config, config.run.root, config.run.resume)
    run.add_input(config.model, role="model", files=sorted(config.model.glob("*.json")))
    print(f"[quant] {config.method} of {config.model} in {run.dir}", flush=True)
    model = AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    layers = _decoder_layers(model)
    quant = {"quant_method": QUANT_METHOD, "method": config.method, "modules": list(QUANTIZED_MODULES)}
    started, codes = time.monotonic(), {}
    if config.method == "awq-int4":
        _check_group_size(layers, config.group_size)
        source, files = calibration_source(config.calibration)
        run.add_input(source, role="calibration", files=files)
        batches = token_windows(tokenizer, calibration_texts(source, files), config.calibration)
        alphas = awq_scale(model, layers, batches, config)
        if config.rounding == "gptq":
            names = [name for name, m in layers[0].named_modules() if name.rsplit(".", 1)[-1] in QUANTIZED_MODULES]
            codes = gptq_layers(model, layers, batches, names, config.group_size)
        quant |= {"group_size": config.group_size, "calibration": {
            "data": str(source), "sha256": content_hash(source, files), "samples": len(batches),
            "seq_len": config.calibration.seq_len, "seed": config.calibration.seed}, "clip": config.clip,
            "rounding": config.rounding}
        run.update(metrics={"awq_mean_alpha": round(sum(alphas.values()) / len(alphas), 4)})
        write_json(run.path("awq_alphas.json"), alphas)
    out = Path(config.out) if config.out else run.path("hf")
    dense_bytes, quant_bytes = write_checkpoint(model, tokenizer, quant, config, out, codes)
    run.add_output("hf", out)
    run.update(metrics={"linear_bytes_dense_fp32": dense_bytes, "linear_bytes_quantized": quant_bytes,
                        "seconds": round(time.monotonic() - started, 1)})
    run.finish()
    print(f"[quant] wrote {out}: quantized linears take {quant_bytes / 2**20:.1f} MiB in memory "
          f"(fp32: {dense_bytes / 2**20:.1f} MiB)", flush=True)
    return run


def calibration_source(section: CalibrationSection) -> tuple[Path, list[Path] | None]:
    """(path, the files used when it is a directory of sources) of the calibration text."""
    if section.data is not None:
        return Path(section.data), None
    root = stdlib_dir()
    return root, sorted(root.glob("*.py"))


def calibration_texts(source: Path, files: list[Path] | None) -> list[str]:
    if files is not None:
        return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    return [d["text"] for d in load_documents(source)]


def token_windows(tokenizer, texts: list[str], section: CalibrationSection) -> list[torch.Tensor]:
    """`samples` windows of `seq_len` tokens from documents in a seeded order (AWQ's recipe)."""
    order = list(range(len(texts)))
    random.Random(section.seed).shuffle(order)
    need, ids = section.samples * section.seq_len, []
    for i in order:
        ids += tokenizer(texts[i], add_special_tokens=False)["input_ids"]
        if len(ids) >= need:
            break
    windows = len(ids) // section.seq_len
    if windows == 0:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one window of {section.seq_len}")
    ids = torch.tensor(ids[:min(windows, section.samples) * section.seq_len])
    return list(ids.view(-1, 1, section.seq_len))


def awq_scale(model, layers, batches: list[torch.Tensor], config: QuantConfig) -> dict[str, float]:
    """Search and fold one scale per group of linears sharing an input; returns each group's alpha."""
    from tqdm.auto import tqdm

    groups = {f"{i}.{name}": (layer, members, producer)
              for i, layer in enumerate(layers) for name, members, producer in scale_groups(layer, model.config)}
    first = {key: layer.get_submodule(members[0]) for key, (layer, members, _) in groups.items()}
    stats = collect_input_stats(model, batches, first, seed=config.calibration.seed)
    alphas = {}
    for key, (layer, members, producer) in tqdm(groups.items(), desc="awq search", unit="group"):
        linears = [layer.get_submodule(m) for m in members]
        scale, alphas[key] = search_scale(linears, stats[key], config.group_size, config.grid)
        apply_scale(scale, linears, producer)
        for member, linear in zip(members, linears):
            if config.clip and not member.endswith(("q_proj", "k_proj")):  # as AWQ: attention scores are too sensitive
                search_clip(linear, stats[key].sample(512) / scale, config.group_size)
    return alphas


def write_checkpoint(model, tokenizer, quant: dict, config: QuantConfig, out: Path,
                     codes: dict | None = None) -> tuple[int, int]:
    """Save the quantized state dict, config and tokenizer; (fp32 bytes, quantized bytes) of the
    quantized linears as the engine holds them (int4: two codes per byte once packed). `codes`
    holds int4 codes already chosen for some linears (GPTQ's); the rest are rounded here."""
    from safetensors.torch import save_file

    chosen = {f"{name}.": codes[m] for name, m in model.named_modules() if m in (codes or {})}
    tensors, dense_bytes, quant_bytes = {}, 0, 0
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # the engine ties it to the embedding again
        module = name.rsplit(".", 2)
        if len(module) == 3 and module[1] in QUANTIZED_MODULES and module[2] == "weight":
            prefix = name.removesuffix("weight")
            dense_bytes += tensor.numel() * 4
            if config.method == "int8":
                q, scales = quantize_int8(tensor.float())
                tensors |= {prefix + "qweight": q, prefix + "scales": scales}
                quant_bytes += q.numel() + scales.numel() * 4
            else:
                q, scales, zeros = chosen.get(prefix) or quantize_int4(tensor.float(), config.group_size)
                tensors |= {prefix + "qweight": q, prefix + "scales": scales, prefix + "zeros": zeros}
                quant_bytes += q.numel() // 2 + (scales.numel() + zeros.numel()) * 4
        else:
            tensors[name] = tensor
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.config.quantization_config = quant
    model.config.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return dense_bytes, quant_bytes


def _decoder_layers(model) -> list:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") and hasattr(layer, "mlp") for layer in layers):
        raise ValueError(f"{model.config.model_type}: only Llama-family decoders (self_attn + mlp layers) "
                         "can be quantized")
    return list(layers)


def _check_group_size(layers, group_size: int) -> None:
    sizes = {layers[0].self_attn.q_proj.in_features, layers[0].self_attn.o_proj.in_features,
             layers[0].mlp.down_proj.in_features}
    bad = sorted(s for s in sizes if s % group_size)
    if bad:
        fits = [g for g in (128, 64, 32, 16) if all(s % g == 0 for s in sizes)]
        raise ValueError(f"group_size {group_size} does not divide the input sizes {bad}"
                         + (f"; use group_size={fits[0]}" if fits else ""))
