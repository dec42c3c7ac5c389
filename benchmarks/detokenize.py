"""Detokenization per engine step: incremental (serve/engine/detokenizer.py) against decoding the
whole completion again after every token (what the engine did before).

Claim: the incremental detokenizer's cost per step stays flat as completions grow, while a full
decode per token grows with the completion's length (O(n^2) per request). Both produce the same
text (checked here on every case, and in tests/test_serve_engine.py).

Case: --sequences completions of --lengths tokens each (stdlib source tokenized by the serve
benchmark's SmolLM2 tokenizer, built by benchmarks/serve.py into $INTERNRAY_CACHE/bench-serve), fed
one token at a time as the engine does. Reported per length: ms per step (all sequences' text
updated once) for both, the last --window steps of the completion (where a long completion
spends its time), and the ratio full / incremental.

Run:  .venv/bin/python benchmarks/detokenize.py [--lengths 128,1024,2048] [--sequences 64]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from internray.serve.engine.detokenizer import IncrementalDetokenizer  # noqa: E402


def per_step_ms(tokenizer, completions: list[list[int]], window: int) -> tuple[float, float]:
    """ms per step over the last `window` steps: (full decode, incremental); asserts equal texts."""
    length = len(completions[0])
    detokenizers = [IncrementalDetokenizer(tokenizer, True) for _ in completions]
    texts = [""] * len(completions)
    incremental = 0.0
    for n in range(1, length + 1):
        start = time.perf_counter()
        for i, (ids, detokenizer) in enumerate(zip(completions, detokenizers)):
            texts[i] += detokenizer.step(ids[:n], final=n == length)
        if n > length - window:
            incremental += time.perf_counter() - start
    full = 0.0
    for n in range(length - window + 1, length + 1):
        start = time.perf_counter()
        decoded = [tokenizer.decode(ids[:n], skip_special_tokens=True) for ids in completions]
        full += time.perf_counter() - start
    assert texts == decoded, "incremental text differs from the full decode"
    return full / window * 1000, incremental / window * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="128,1024,2048", help="completion lengths (tokens)")
    p.add_argument("--sequences", type=int, default=64, help="sequences updated per step")
    p.add_argument("--window", type=int, default=32, help="timed steps at the end of each completion")
    args = p.parse_args()

    import serve as bench  # the serve benchmark's model directory and prompt text
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bench.smollm2_dir())
    lengths = [int(x) for x in args.lengths.split(",")]
    completions = bench.make_prompts(bench.smollm2_dir(), args.sequences, max(lengths), max(lengths), seed=0)
    print(f"SmolLM2 tokenizer, {args.sequences} sequences, ms per step over the last {args.window} steps")
    print(f"{'tokens':>7s} {'full decode':>12s} {'incremental':>12s} {'ratio':>7s}")
    for length in lengths:
        full, incremental = per_step_ms(tokenizer, [c[:length] for c in completions], min(args.window, length))
        print(f"{length:7d} {full:12.2f} {incremental:12.2f} {full / incremental:6.1f}x")


if __name__ == "__main__":
    main()
