"""Decode attention: the compiled paged-cache kernel against gather + SDPA, per layer call.

Claim: reading the paged KV cache where it lies (internray/serve/model/cpu_attention.py) beats the
plain PyTorch path the engine falls back to without a compiler (copy every sequence's blocks into
one padded tensor, then one masked SDPA), at every batch size, and most where there are many
sequences. Both are the engine's own `paged_attention` (model/layers.py) on one decode step, with
and without the compiled kernels: each call stores the step's new keys and values, then attends.
Both compute the same attention (checked here on every case) over the same cache.

Cases: SmolLM2-135M's shapes (9 query / 3 KV heads of 64) and a Llama-3-8B-like layer (32 / 8 of
128), bf16, 16-token blocks, --batch sequences of --context tokens (the context spread +-25% so
sequences end in different blocks). Block tables come two ways:
- `in cache`: every sequence reads the same blocks, which stay in the CPU's caches (a best case),
  except for its last block, its own, where its new token is stored;
- `scattered`: distinct blocks in random order, cycling through --layers layers' worth of them, so
  each call streams its context from memory, as in a server whose free list has been shuffled by
  a while of traffic (the engine's usual case: a step's KV over all layers is far beyond cache).
Reported: ms per call for each path (median of --repeats timings of --calls calls each), the ratio
SDPA / kernel, and the kernel's effective read bandwidth in the scattered case (KV bytes / time).

Run:  .venv/bin/python benchmarks/decode_attention.py [--threads 2] [--batch 1,8,64] [--context 256]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from internray.serve.model import cpu_kernels  # noqa: E402
from internray.serve.model.kv_cache import KVCache  # noqa: E402
from internray.serve.model.layers import AttentionBatch, paged_attention  # noqa: E402

SHAPES = {"smollm2 9/3x64": (9, 3, 64), "llama3-8b 32/8x128": (32, 8, 128)}
BLOCK = 16


def decode_batch(tables: torch.Tensor, lengths: torch.Tensor, kernels) -> AttentionBatch:
    """One decode step's batch as the model runner builds it: each sequence's new token goes to
    the last slot of its context; without kernels, SDPA gets the padding mask."""
    last = lengths - 1
    slots = tables.gather(1, (last // BLOCK)[:, None])[:, 0] * BLOCK + last % BLOCK
    mask = None if kernels else (torch.arange(tables.shape[1] * BLOCK)[None] < lengths[:, None])[:, None, None]
    return AttentionBatch(slots, torch.arange(len(lengths)), tables, lengths, mask, kernels)


def timed(fn, calls: int, repeats: int) -> float:
    """Median ms per call over `repeats` runs of `calls` calls (after one untimed call)."""
    fn(0)
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(calls):
            fn(i)
        runs.append((time.perf_counter() - start) / calls * 1000)
    return statistics.median(runs)


def case(kernels, shape, batch: int, context: int, layers: int, calls: int, repeats: int, seed: int) -> list[dict]:
    heads, kv_heads, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(int(context * 0.75), 1), int(context * 1.25) + 1, (batch,), generator=gen)
    width = -(-int(lengths.max()) // BLOCK)
    cache = KVCache.allocate(batch * width * layers, BLOCK, kv_heads, head_dim, torch.bfloat16, torch.device("cpu"),
                             int8=False)
    cache.data.normal_(generator=gen)
    q = torch.randn(batch, heads, head_dim, generator=gen).bfloat16()
    k, v = (torch.randn(batch, kv_heads, head_dim, generator=gen).bfloat16() for _ in range(2))
    shared = torch.arange(width).repeat(batch, 1)
    shared[torch.arange(batch), (lengths - 1) // BLOCK] = width + torch.arange(batch)  # no two new tokens share a slot
    tables = {"in cache": shared[None],
              "scattered": torch.randperm(batch * width * layers, generator=gen).view(layers, batch, width)}
    rows = []
    for layout, table in tables.items():
        def step(path_kernels, table=table):
            batches = [decode_batch(t, lengths, path_kernels) for t in table]
            return lambda i: paged_attention(q, k, v, cache, batches[i % len(batches)])

        kernel, sdpa = step(kernels), step(None)
        torch.testing.assert_close(kernel(0).float(), sdpa(0).float(), atol=2e-2, rtol=2e-2)
        kernel_ms, sdpa_ms = timed(kernel, calls, repeats), timed(sdpa, calls, repeats)
        kv_bytes = int(lengths.sum()) * kv_heads * head_dim * 2 * cache.data.element_size()
        rows.append({"layout": layout, "kernel_ms": kernel_ms, "sdpa_ms": sdpa_ms, "ratio": sdpa_ms / kernel_ms,
                     "kernel_gb_s": kv_bytes / kernel_ms / 1e6})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--batch", default="1,8,64", help="comma-separated sequence counts")
    p.add_argument("--context", type=int, default=256, help="mean context length (tokens)")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument("--layers", type=int, default=30, help="layers' worth of distinct blocks the scattered case cycles")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kernels = cpu_kernels.load()
    if kernels is None:
        sys.exit("the compiled CPU kernels are unavailable here (see the warning above): nothing to compare")
    print(f"decode attention, bf16, {args.threads} threads, mean context {args.context} tokens, "
          f"AVX-512 kernel: {kernels.has_avx512()}")
    print(f"{'shape':20s} {'batch':>5s} {'blocks':>9s} {'kernel ms':>10s} {'sdpa ms':>9s} {'sdpa/kernel':>12s} "
          f"{'kernel GB/s':>12s}")
    for name in args.shapes.split(","):
        for batch in (int(b) for b in args.batch.split(",")):
            for row in case(kernels, SHAPES[name], batch, args.context, args.layers, args.calls, args.repeats,
                            args.seed):
                print(f"{name:20s} {batch:5d} {row['layout']:>9s} {row['kernel_ms']:10.3f} {row['sdpa_ms']:9.3f} "
                      f"{row['ratio']:11.2f}x {row['kernel_gb_s']:12.1f}")


if __name__ == "__main__":
    main()
