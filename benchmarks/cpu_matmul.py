"""bf16 linears on CPU: the engine's kernel (serve/model/cpu_matmul.py) against oneDNN's packed
matmul (`torch.ops.mkldnn._linear_pointwise` on a weight reordered for --batch-hint rows, what
the engine used before), both on the same weights, in the same run.

Claim: the kernel is faster at the row counts decoding runs (1-64: it streams the weights once per
call, where oneDNN read them at half of a streaming read's speed for few rows) and not slower at
prefill's thousands.

Case: SmolLM2-135M's 30 layers of linears (q/k/v 960x576, o 576x576, gate/up 3072x576, down
576x1536; random bf16 weights, one set per layer, 212 MB), called layer after layer as a forward
does, so every weight comes from memory, not from cache, as in a real step. Reported per row
count: ms per 30-layer pass (best of --repeats), GFLOP/s, the weight bytes read per second, and
oneDNN / kernel. A plain streaming read of the same bytes (a sum over them) is printed first as
the memory's ceiling. The kernel's results are checked against fp32 arithmetic (within bf16
rounding and fp32 summation order).

Run:  .venv/bin/python benchmarks/cpu_matmul.py [--rows 1,5,16,64,256,2048] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from internray.serve.model import cpu_kernels, cpu_matmul  # noqa: E402

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}
LAYERS = 30


def pass_seconds(calls: dict[str, list], inputs: dict[str, torch.Tensor], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for layer in range(LAYERS):
            for name, fns in calls.items():
                fns[layer](inputs[name])
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1,5,16,64,256,2048")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batch-hint", type=int, default=64,
                   help="rows oneDNN's reorder is told to expect (the engine passes its max_num_seqs)")
    p.add_argument("--repeats", type=int, default=4)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kernel = cpu_kernels.load()
    if kernel is None or not kernel.has_bf16_matmul():
        sys.exit("this CPU or build has no bf16 matmul kernel (needs AVX512_BF16 and a C++ compiler)")
    gen = torch.Generator().manual_seed(0)
    dense = {name: [torch.randn(n, k, generator=gen).bfloat16() for _ in range(LAYERS)]
             for name, (n, k) in SHAPES.items()}
    weight_bytes = sum(w.numel() * w.element_size() for ws in dense.values() for w in ws)
    flops_per_row = 2 * (weight_bytes // 2)  # a multiply and an add per bf16 weight

    onednn_weights = {name: [torch.ops.mkldnn._reorder_linear_weight(w, args.batch_hint) for w in ws]
                      for name, ws in dense.items()}
    kernel_weights = {name: [cpu_matmul.pack_bf16(w) for w in ws] for name, ws in dense.items()}
    onednn = {name: [lambda x, w=w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "") for w in ws]
              for name, ws in onednn_weights.items()}
    ours = {name: [lambda x, w=w, n=SHAPES[name][0]: kernel.bf16_matmul(x, w, None, n) for w in ws]
            for name, ws in kernel_weights.items()}

    flat = torch.cat([w.flatten() for ws in dense.values() for w in ws]).view(torch.int64)
    stream = min(_timed(lambda: flat.sum()) for _ in range(args.repeats))
    print(f"{LAYERS} layers of SmolLM2-135M linears, {weight_bytes / 1e6:.0f} MB of bf16 weights, "
          f"{args.threads} threads")
    print(f"streaming read of the same bytes: {stream * 1e3:.1f} ms, {weight_bytes / stream / 1e9:.1f} GB/s")
    columns = f"{'GF/s':>5} {'GB/s':>5}"
    print(f"{'rows':>5}  {'oneDNN ms':>9} {columns}  {'kernel ms':>9} {columns}  oneDNN/kernel")
    for rows in (int(r) for r in args.rows.split(",")):
        inputs = {name: torch.randn(rows, k, generator=gen).bfloat16() for name, (n, k) in SHAPES.items()}
        x, w = inputs["down"].float(), dense["down"][0].float()
        exact, magnitude = x @ w.T, x.abs() @ w.abs().T
        slack = (2 * exact.abs() * torch.finfo(torch.bfloat16).eps
                 + x.shape[1] * torch.finfo(torch.float32).eps * magnitude)
        assert ((ours["down"][0](inputs["down"]).float() - exact).abs() <= slack).all(), "kernel != fp32 sums, rounded"
        repeats = args.repeats if rows <= 256 else max(1, args.repeats // 2)
        a, b = pass_seconds(onednn, inputs, repeats), pass_seconds(ours, inputs, repeats)
        print(f"{rows:5d}  {a * 1e3:9.1f} {rows * flops_per_row / a / 1e9:5.0f} {weight_bytes / a / 1e9:5.1f}  "
              f"{b * 1e3:9.1f} {rows * flops_per_row / b / 1e9:5.0f} {weight_bytes / b / 1e9:5.1f}  {a / b:.2f}x")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
