"""Decode attention read straight from the paged KV cache, compiled for this CPU on first use.

Why a kernel: in pure PyTorch a decoding batch must first gather every sequence's context out of
the paged cache into one padded tensor (a copy of all K and V, every layer, every step) and then
run SDPA over the padding. On CPUs memory bandwidth is the limit, so that copy costs as much as
the attention itself. This kernel takes one sequence at a time: it copies the sequence's blocks
side by side into a per-thread buffer that stays in L2 (whole-block copies stream at memory speed),
then computes every head (GQA included) from there with an exact, max-subtracted softmax in fp32.
No padded batch tensor, no work on padding, each K/V byte read from memory once. vLLM's CPU
backend does the same with its own C++ kernels.

It is built with `torch.utils.cpp_extension.load_inline` (needs a C++ compiler, as vLLM's CPU
build and `torch.compile` do), for this machine's instruction set, into torch's extension cache
(one build per CPU flavour, ~30 s, then reused). Without a compiler `load()` returns None, says
why once, and attention takes the portable gather + SDPA path (model/layers.py).
"""
from __future__ import annotations

import hashlib
import platform
import warnings
from functools import cache

import torch

from internray.serve.model.kv_cache import KVCache

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

template <typename T>
static inline float dot(const float* q, const T* k, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += q[i] * static_cast<float>(k[i]);
  return s;
}

template <typename T>
static inline void axpy(float a, const T* v, float* acc, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) acc[i] += a * static_cast<float>(v[i]);
}

// Attention of one sequence's query (all heads, pre-scaled) over its context rows laid side by
// side (a token's keys then values, every KV head): an exact, max-subtracted softmax in fp32.
template <typename C, typename T>
static void attend(const float* qf, const C* context, int64_t len, int64_t H, int64_t Hkv, int64_t D,
                   float* scores, float* total, float* acc, T* out) {
  const int64_t G = H / Hkv, token_stride = 2 * Hkv * D;
  for (int64_t t = 0; t < len; ++t) {
    const C* k = context + t * token_stride;
    for (int64_t h = 0; h < H; ++h) scores[h * len + t] = dot(&qf[h * D], k + (h / G) * D, D);
  }
  for (int64_t h = 0; h < H; ++h) {
    float* s = &scores[h * len];
    const float m = *std::max_element(s, s + len);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < len; ++t) { s[t] = std::exp(s[t] - m); sum += s[t]; }
    total[h] = sum;
  }
  std::fill(acc, acc + H * D, 0.f);
  for (int64_t t = 0; t < len; ++t) {
    const C* v = context + t * token_stride + Hkv * D;
    for (int64_t h = 0; h < H; ++h) axpy(scores[h * len + t], v + (h / G) * D, &acc[h * D], D);
  }
  for (int64_t h = 0; h < H; ++h)
    for (int64_t i = 0; i < D; ++i) out[h * D + i] = static_cast<T>(acc[h * D + i] / total[h]);
}

// One task per sequence, all heads together (a token's keys and values for every head are one
// contiguous row, a block is `block` consecutive rows). With `scales` the cache holds int8 codes
// and a scale per (token, key|value, head): rows are dequantized into the buffer instead of copied.
template <typename T, typename S>
static void run(const at::Tensor& q, const at::Tensor& cache, const at::Tensor* scales, const at::Tensor& tables,
                const at::Tensor& lengths, at::Tensor& out, double scale) {
  using C = std::conditional_t<std::is_same_v<S, int8_t>, float, T>;
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t block = cache.size(1), Hkv = cache.size(3);
  const int64_t token_stride = 2 * Hkv * D, block_stride = block * token_stride;
  const int64_t table_width = tables.size(1);
  const T* qp = q.data_ptr<T>();
  const S* cp = cache.data_ptr<S>();
  const float* sp = scales ? scales->data_ptr<float>() : nullptr;
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const int64_t max_len = *std::max_element(lp, lp + B);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(H * D), acc(H * D), scores(H * max_len), total(H);
    std::vector<C> context(((max_len + block - 1) / block) * block_stride);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = lp[b], blocks = (len + block - 1) / block;
      const int64_t* table = tp + b * table_width;
      // Lay the sequence's blocks side by side first: whole-block reads stream at memory speed,
      // and both passes of `attend` then read a buffer that stays in this core's L2.
      for (int64_t i = 0; i < blocks; ++i) {
        if constexpr (std::is_same_v<S, int8_t>) {
          const int8_t* codes = cp + table[i] * block_stride;
          const float* row_scales = sp + table[i] * block * 2 * Hkv;
          float* dst = &context[i * block_stride];
          for (int64_t r = 0; r < block * 2 * Hkv; ++r) {
            const float s = row_scales[r];
#pragma omp simd
            for (int64_t j = 0; j < D; ++j) dst[r * D + j] = s * static_cast<float>(codes[r * D + j]);
          }
        } else {
          std::memcpy(&context[i * block_stride], cp + table[i] * block_stride, block_stride * sizeof(T));
        }
      }
      for (int64_t i = 0; i < H * D; ++i) qf[i] = static_cast<float>(qp[b * H * D + i]) * scale;
      attend(qf.data(), context.data(), len, H, Hkv, D, scores.data(), total.data(), acc.data(), op + b * H * D);
    }
  });
}

at::Tensor decode_attention(at::Tensor q, at::Tensor cache, std::optional<at::Tensor> scales, at::Tensor tables,
                            at::Tensor lengths, double scale) {
  TORCH_CHECK(q.dim() == 3 && cache.dim() == 5 && tables.dim() == 2 && lengths.dim() == 1, "bad ranks");
  TORCH_CHECK(q.size(1) % cache.size(3) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(cache.is_contiguous(), "the cache must be contiguous");
  if (scales) {
    TORCH_CHECK(cache.scalar_type() == at::kChar && scales->scalar_type() == at::kFloat && scales->is_contiguous(),
                "an int8 cache needs contiguous float32 scales");
  } else {
    TORCH_CHECK(q.scalar_type() == cache.scalar_type(), "q and cache dtypes differ");
  }
  q = q.contiguous();
  tables = tables.contiguous();
  lengths = lengths.contiguous();
  auto out = at::empty_like(q);
  if (q.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    if (scales) run<scalar_t, int8_t>(q, cache, &*scales, tables, lengths, out, scale);
    else run<scalar_t, scalar_t>(q, cache, nullptr, tables, lengths, out, scale);
  });
  return out;
}
"""


def _cpu_flavour() -> str:
    """A short tag of this CPU's instruction set: the build uses -march=native, so machines that
    share a home directory but not a CPU must not share the binary."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {flags}".encode()).hexdigest()[:10]


@cache
def load():
    """The compiled kernel module, or None (with one warning naming the reason) where it cannot be
    built; the engine then attends through gather + SDPA."""
    try:
        from torch.utils.cpp_extension import load_inline

        source_tag = hashlib.sha1(SOURCE.encode()).hexdigest()[:8]
        return load_inline(
            name=f"internray_cpu_attention_{source_tag}_{_cpu_flavour()}", cpp_sources=SOURCE,
            functions=["decode_attention"], extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"],
            extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no headers, an unusual platform: the portable path still works
        warnings.warn(f"internray: compiled CPU decode attention unavailable ({type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}); using gather + SDPA")
        return None


def decode_attention(q: torch.Tensor, kv_cache: KVCache, tables: torch.Tensor, lengths: torch.Tensor,
                     kernel) -> torch.Tensor:
    """q: [B, H, D]; tables: [B, max blocks] (int64); lengths: [B] context lengths including the
    new token -> [B, H, D]."""
    return kernel.decode_attention(q, kv_cache.data, kv_cache.scales, tables, lengths, q.shape[-1] ** -0.5)
