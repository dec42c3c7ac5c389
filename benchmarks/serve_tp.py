"""Tensor parallelism on one node: what handing each step to the other ranks costs.

Claim: with steps carried through the shared-memory ring (internray/serve/engine/step_ring.py), a
TP=2 decode step costs about what the forward costs; through one Ray actor call per step (the path
ranks on other nodes take) it costs milliseconds more. Variants, all on the benchmark's tiny Llama
(benchmarks/serve.py; SmolLM2's 9 heads do not split in two), bf16, the machine's CPUs shared out
evenly between ranks:
- `tp1`: one rank, all threads (the reference a TP group has to approach on a CPU box);
- `tp2 ray calls`: two ranks, steps sent by `execute.remote` per rank and step;
- `tp2 ring`: two ranks, steps through the ring.
Each variant runs in a fresh process with its own embedded Ray (DeepSpeed's shared-memory
all-reduce joins once per process), --rounds times, alternated so drifts in machine load hit all
alike; reported: the median decode tokens/s at batch 1 and batch --batch (--tokens new tokens
after a 32-token prompt, greedy), and ratios against `tp2 ray calls`. Token agreement between the
variants is not claimed here: in bf16 a different summation order may part greedy paths
(tests/test_serve_tp.py checks TP=2 against TP=1 in fp32).

Run:  .venv/bin/python benchmarks/serve_tp.py [--rounds 3] [--tokens 48] [--batch 8]
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {"tp1": (1, True), "tp2 ray calls": (2, False), "tp2 ring": (2, True)}


def decode_speed(model: str, tp: int, ring: bool, tokens: int, batch: int) -> dict:
    """tokens/s at batch 1 and `batch`, in this (fresh) process."""
    from internray import runtime
    from internray.serve.config import EngineConfig
    from internray.serve.engine.llm_engine import LLM
    from internray.serve.engine.sampling_params import SamplingParams
    from internray.serve.engine.tp_workers import TensorParallelGroup

    cpus = len(os.sched_getaffinity(0))
    runtime.connect(num_cpus=cpus)
    TensorParallelGroup.step_ring = ring
    llm = LLM(EngineConfig(model=model, dtype="bfloat16", kv_cache_gib=0.25, tensor_parallel_size=tp,
                           threads_per_rank=max(cpus // tp, 1)), verbose=False)
    try:
        prompts = [[100 + 7 * i + j for j in range(32)] for i in range(batch)]
        llm.generate(prompts[:1], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
        speed = {}
        for size in (1, batch):
            start = time.perf_counter()
            llm.generate(prompts[:size], SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
            speed[f"batch {size}"] = size * tokens / (time.perf_counter() - start)
        return speed
    finally:
        llm.engine.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args()
    from serve import tiny_model_dir

    model = str(tiny_model_dir())
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    spawn = multiprocessing.get_context("spawn")
    for round_ in range(args.rounds):
        for name, (tp, ring) in VARIANTS.items():
            with ProcessPoolExecutor(1, mp_context=spawn) as pool:
                result = pool.submit(decode_speed, model, tp, ring, args.tokens, args.batch).result()
            runs[name].append(result)
            print(f"[serve_tp] round {round_ + 1} {name}: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in result.items()),
                  flush=True)
    keys = list(runs["tp1"][0])
    median = {name: {k: statistics.median(r[k] for r in results) for k in keys} for name, results in runs.items()}
    print(f"\ntiny Llama, bf16, {len(os.sched_getaffinity(0))} CPUs, {args.tokens} new tokens; median of "
          f"{args.rounds} alternated rounds, tokens/s (x = against tp2 ray calls)")
    print(f"{'variant':<16}" + "".join(f"{k:>22}" for k in keys))
    for name, speeds in median.items():
        cells = [f"{speeds[k]:>12.0f} ({speeds[k] / median['tp2 ray calls'][k]:4.2f}x)" for k in keys]
        print(f"{name:<16}" + "".join(f"{c:>22}" for c in cells))


if __name__ == "__main__":
    main()
