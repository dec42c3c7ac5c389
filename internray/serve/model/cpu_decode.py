"""A decode-only step's decoder layers in one C++ call (C++, built by cpu_kernels.py).

Why: decoding a few sequences costs what streaming the weights costs, ~11 ms of SmolLM2's
one-sequence step in bf16 on 2 CPUs, and its 30 layers' Python around the kernels (module calls,
the q/k/v split and views, the cache write's and attention's wrappers: a dozen calls a layer, each
a few microseconds) added ~2.5 ms more. `decode_layers` calls the same kernels (cpu_fused.py,
cpu_attention.py, cpu_matmul.py) in the same order on the same tensors, so its results are the
Python path's bit for bit, with the interpreter lock released while it runs. Measured with
`benchmarks/decode_layers.py` (SmolLM2-135M-Instruct, bf16, 2 CPUs, four runs): 11.1-14.0 ms a
step instead of 12.6-18.2 at one sequence (1.14-1.30x), 1.08-1.14x at five, and at 64 three
runs of 1.00-1.13x and one of 0.89x (a noisy neighbour's, or a real loss there: not pinned down).

It covers what CPU serving of a Llama-family model mostly is: every step in which each sequence
decodes one token, with a single rank (no all-reduce between the halves of a layer), bias-free
linears on the bf16 matmul kernel, and a KV cache at the model's precision. Anything else (prefill
chunks in the step, tensor parallelism, biases, quantized weights, an int8 cache) runs the layers
in Python (llama.py).
"""
from __future__ import annotations

SOURCE = r"""
// x [B, hidden] (the embedded tokens) through every layer; per layer six tensors in `weights`:
// input norm, packed qkv, packed o, post-attention norm, packed gate/up, packed down. Returns
// [the last layer's MLP output, the residual stream] for the final norm. Each decoding sequence's
// key and value go to its slot in `slots`; `tables` and `lengths` as decode_attention takes them.
std::vector<at::Tensor> decode_layers(at::Tensor x, std::vector<at::Tensor> weights, std::vector<at::Tensor> caches,
                                      at::Tensor cos, at::Tensor sin, at::Tensor slots, at::Tensor tables,
                                      at::Tensor lengths, int64_t heads, int64_t kv_heads, double eps, double scale) {
  TORCH_CHECK(!caches.empty() && weights.size() == 6 * caches.size(), "decode_layers: six weights per layer's cache");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "decode_layers: x must be [sequences, hidden]");
  pybind11::gil_scoped_release released;  // plain ATen below: other Python threads may run meanwhile
  const int64_t t = x.size(0), hidden = x.size(1), d = caches[0].size(4), q_size = heads * d, kv_size = kv_heads * d;
  std::optional<at::Tensor> residual;
  for (size_t layer = 0; layer < caches.size(); ++layer) {
    const at::Tensor* w = &weights[6 * layer];
    at::Tensor h = rms_norm(x, residual, w[0], eps);  // adds x into the residual in place
    if (!residual) residual = x;
    at::Tensor qkv = bf16_matmul(h, w[1], std::nullopt, q_size + 2 * kv_size);
    rotary_(qkv, cos, sin, heads + kv_heads, d);
    at::Tensor q = qkv.narrow(1, 0, q_size).view({t, heads, d});
    store_kv(caches[layer], slots, qkv.narrow(1, q_size, kv_size).view({t, kv_heads, d}),
             qkv.narrow(1, q_size + kv_size, kv_size).view({t, kv_heads, d}));
    at::Tensor attended = decode_attention(q, caches[layer], std::nullopt, tables, lengths, scale);
    h = rms_norm(bf16_matmul(attended.view({t, q_size}), w[2], std::nullopt, hidden), residual, w[3], eps);
    const int64_t intermediate = w[5].size(1) * 2;  // the down weight's inputs: [tiles, K / 2, 32]
    x = bf16_matmul(silu_and_mul(bf16_matmul(h, w[4], std::nullopt, 2 * intermediate)), w[5], std::nullopt, hidden);
  }
  return {x, *residual};
}
"""

FUNCTIONS = ["decode_layers"]
