"""Decode attention read straight from the paged KV cache, compiled for this CPU on first use.

Why a kernel: in pure PyTorch a decoding batch must first gather every sequence's context out of
the paged cache into one padded tensor (a copy of all K and V, every layer, every step) and then
run SDPA over the padding. On CPUs memory bandwidth is the limit, so that copy costs as much as
the attention itself. This kernel reads the cache where it lies: one task per (sequence, KV
head) walks the sequence's blocks once, scoring a block's keys for every query head of the group
(GQA), updating an online softmax in fp32 (flash-decoding's recurrence) and adding the block's
values. No padded batch tensor, no work on padding, no copy of the context; each key and value
is read once and converted to fp32 once for its whole head group. Against the previous version
(blocks first copied side by side per sequence, one head at a time) attention went from 56 to
39 ms of a 64-sequence SmolLM2 decode step (bf16, 2 threads). vLLM's CPU backend does the
same with its own C++ kernels.

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
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

// One cached key or value vector as fp32: a cast, or for an int8 cache its codes times its scale.
template <typename S, int DT>
static inline void load_row(const S* src, float scale, float* dst, int64_t d) {
  const int64_t D = DT ? DT : d;
  if constexpr (std::is_same_v<S, int8_t>) {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) dst[i] = scale * static_cast<float>(src[i]);
  } else {
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<float>(src[i]);
  }
}

// The G query heads that share KV head `g` attend over one sequence's blocks in a single pass:
// a block's scores, then an online-softmax update (flash-decoding's recurrence: rescale what was
// summed so far when the running max grows), then its values. Every key and value is read from
// the paged cache once and converted to fp32 once for all G heads; no copy of the context.
// q: G prescaled fp32 heads; work: G * block + G * D + D + 2 * G floats; out: G heads of D.
template <typename T, typename S, int DT>
static void attend(const float* q, const S* cache, const float* scales, const int64_t* table, int64_t len,
                   int64_t block, int64_t Hkv, int64_t g, int64_t G, int64_t d, float* work, T* out) {
  const int64_t D = DT ? DT : d, token_stride = 2 * Hkv * D;
  float *s = work, *acc = s + G * block, *row = acc + G * D, *m = row + D, *l = m + G;
  std::fill(m, m + G, -std::numeric_limits<float>::infinity());
  std::fill(l, l + G, 0.f);
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t start = 0, i = 0; start < len; start += block, ++i) {
    const int64_t n = std::min(block, len - start), first = table[i] * block;  // first: the block's first slot
    for (int64_t t = 0; t < n; ++t) {
      const int64_t slot = first + t;
      load_row<S, DT>(cache + slot * token_stride + g * D, scales ? scales[slot * 2 * Hkv + g] : 1.f, row, D);
      for (int64_t j = 0; j < G; ++j) {
        const float* qj = q + j * D;
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t x = 0; x < D; ++x) dot += qj[x] * row[x];
        s[j * block + t] = dot;
      }
    }
    for (int64_t j = 0; j < G; ++j) {
      float* sj = s + j * block;
      const float top = std::max(m[j], *std::max_element(sj, sj + n));
      const float shrink = std::exp(m[j] - top);  // 0 on the first block (m = -inf)
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < n; ++t) { sj[t] = std::exp(sj[t] - top); sum += sj[t]; }
      l[j] = l[j] * shrink + sum;
      m[j] = top;
      if (shrink != 1.f) {
        float* a = acc + j * D;
#pragma omp simd
        for (int64_t x = 0; x < D; ++x) a[x] *= shrink;
      }
    }
    for (int64_t t = 0; t < n; ++t) {
      const int64_t slot = first + t;
      load_row<S, DT>(cache + slot * token_stride + (Hkv + g) * D, scales ? scales[slot * 2 * Hkv + Hkv + g] : 1.f,
                      row, D);
      for (int64_t j = 0; j < G; ++j) {
        const float p = s[j * block + t];
        float* a = acc + j * D;
#pragma omp simd
        for (int64_t x = 0; x < D; ++x) a[x] += p * row[x];
      }
    }
  }
  for (int64_t j = 0; j < G; ++j)
    for (int64_t x = 0; x < D; ++x) out[j * D + x] = static_cast<T>(acc[j * D + x] / l[j]);
}

// One task per (sequence, KV head): B * Hkv tasks keep both threads busy even for one sequence.
// With `scales` the cache holds int8 codes and a scale per (token, key|value, head).
template <typename T, typename S, int DT>
static void run(const at::Tensor& q, const at::Tensor& cache, const at::Tensor* scales, const at::Tensor& tables,
                const at::Tensor& lengths, at::Tensor& out, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t block = cache.size(1), Hkv = cache.size(3), G = H / Hkv;
  const int64_t table_width = tables.size(1);
  const T* qp = q.data_ptr<T>();
  const S* cp = cache.data_ptr<S>();
  const float* sp = scales ? scales->data_ptr<float>() : nullptr;
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), work(G * block + G * D + D + 2 * G);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, g = task % Hkv;
      const T* qg = qp + (b * H + g * G) * D;
      for (int64_t i = 0; i < G * D; ++i) qf[i] = static_cast<float>(qg[i]) * static_cast<float>(scale);
      attend<T, S, DT>(qf.data(), cp, sp, tp + b * table_width, lp[b], block, Hkv, g, G, D, work.data(),
                       op + (b * H + g * G) * D);
    }
  });
}

template <typename T, typename S>
static void run_for_head_dim(const at::Tensor& q, const at::Tensor& cache, const at::Tensor* scales,
                             const at::Tensor& tables, const at::Tensor& lengths, at::Tensor& out, double scale) {
  switch (q.size(2)) {  // the common head sizes get loops of a known length
    case 64: return run<T, S, 64>(q, cache, scales, tables, lengths, out, scale);
    case 128: return run<T, S, 128>(q, cache, scales, tables, lengths, out, scale);
    default: return run<T, S, 0>(q, cache, scales, tables, lengths, out, scale);
  }
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
    if (scales) run_for_head_dim<scalar_t, int8_t>(q, cache, &*scales, tables, lengths, out, scale);
    else run_for_head_dim<scalar_t, scalar_t>(q, cache, nullptr, tables, lengths, out, scale);
  });
  return out;
}
"""


@cache
def cpu_flags() -> tuple[str, ...]:
    """This CPU's feature flags as Linux lists them (/proc/cpuinfo); empty elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        line = ""
    return tuple(line.partition(":")[2].split())


def _cpu_flavour() -> str:
    """A short tag of this CPU's instruction set: the build uses -march=native, so machines that
    share a home directory but not a CPU must not share the binary."""
    return hashlib.sha1(f"{platform.machine()} {' '.join(cpu_flags())}".encode()).hexdigest()[:10]


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
