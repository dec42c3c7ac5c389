"""Decode attention read straight from the paged KV cache (C++, built by cpu_kernels.py).

Why a kernel: in pure PyTorch a decoding batch must first gather every sequence's context out of
the paged cache into one padded tensor (a copy of all K and V, every layer, every step) and then
run SDPA over the padding. On CPUs memory bandwidth is the limit, so that copy costs as much as
the attention itself. This kernel reads the cache where it lies: one task per (sequence, KV
head) walks the sequence's blocks once, scoring a block's keys for every query head of the group
(GQA), updating an online softmax in fp32 (flash-decoding's recurrence) and adding the block's
values. No padded batch tensor, no work on padding, no copy of the context; each key and value
is read once and converted to fp32 once for its whole head group. vLLM's CPU backend does the
same with its own C++ kernels.

Head sizes 32, 64 and 128 run in AVX-512 where the CPU has it (keys converted and
dotted in registers, a vectorized exp for the softmax, each head's output held in registers
across a block); other sizes and CPUs take the portable loop the compiler vectorizes. SmolLM2
shapes (9 query / 3 KV heads of 64, bf16, 2 threads), ms per layer call, portable -> AVX-512:
64 sequences of 150-400 tokens 2.75 -> 0.97, 8 of them 0.23 -> 0.08, one of 2,000 0.33 -> 0.08.
In a 64-sequence decode step attention went from 39 to 21 ms.
"""
from __future__ import annotations

import torch

from internray.serve.model.kv_cache import KVCache

SOURCE = r"""
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

#ifdef INTERNRAY_AVX512
// attend() in AVX-512 for head sizes that are a multiple of 16, the same recurrence. Every key
// row is converted in registers and dotted with all G query heads; a block's values are
// converted once into `rows`, then each head's output stays in registers while the block's
// tokens are added in.
// work: G * block (scores) + block * D (value rows) + G * D (outputs) + 2 * G floats.
template <typename T, typename S, int D>
static void attend_avx512(const float* q, const S* cache, const float* scales, const int64_t* table, int64_t len,
                          int64_t block, int64_t Hkv, int64_t g, int64_t G, float* work, T* out) {
  constexpr int C = D / 16;  // 16-lane chunks per head
  const int64_t token_stride = 2 * Hkv * D;
  float *s = work, *rows = s + G * block, *acc = rows + block * D, *m = acc + G * D, *l = m + G;
  std::fill(m, m + G, -std::numeric_limits<float>::infinity());
  std::fill(l, l + G, 0.f);
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t start = 0, i = 0; start < len; start += block, ++i) {
    const int64_t n = std::min(block, len - start), first = table[i] * block;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t slot = first + t;
      const S* k = cache + slot * token_stride + g * D;
      const float ks = scales ? scales[slot * 2 * Hkv + g] : 1.f;
      __m512 key[C];
      for (int c = 0; c < C; ++c) key[c] = load16(k + 16 * c, ks);
      for (int64_t j = 0; j < G; ++j) {
        __m512 dot = _mm512_mul_ps(_mm512_loadu_ps(q + j * D), key[0]);
        for (int c = 1; c < C; ++c) dot = _mm512_fmadd_ps(_mm512_loadu_ps(q + j * D + 16 * c), key[c], dot);
        s[j * block + t] = _mm512_reduce_add_ps(dot);
      }
    }
    for (int64_t j = 0; j < G; ++j) {
      float* sj = s + j * block;
      __m512 top16 = _mm512_set1_ps(m[j]);
      for (int64_t t = 0; t < n; t += 16)
        top16 = _mm512_mask_max_ps(top16, first_lanes(n - t), top16, _mm512_maskz_loadu_ps(first_lanes(n - t), sj + t));
      const float top = _mm512_reduce_max_ps(top16);
      const float shrink = std::exp(m[j] - top);  // 0 on the first block (m = -inf)
      __m512 sum = _mm512_setzero_ps();
      for (int64_t t = 0; t < n; t += 16) {
        const __mmask16 lanes = first_lanes(n - t);
        const __m512 e = _mm512_maskz_mov_ps(lanes, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, sj + t),
                                                                          _mm512_set1_ps(top))));
        _mm512_mask_storeu_ps(sj + t, lanes, e);
        sum = _mm512_add_ps(sum, e);
      }
      l[j] = l[j] * shrink + _mm512_reduce_add_ps(sum);
      m[j] = top;
      if (shrink != 1.f)
        for (int c = 0; c < C; ++c)
          _mm512_storeu_ps(acc + j * D + 16 * c, _mm512_mul_ps(_mm512_set1_ps(shrink), _mm512_loadu_ps(acc + j * D + 16 * c)));
    }
    for (int64_t t = 0; t < n; ++t) {
      const int64_t slot = first + t;
      const S* v = cache + slot * token_stride + (Hkv + g) * D;
      const float vs = scales ? scales[slot * 2 * Hkv + Hkv + g] : 1.f;
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(rows + t * D + 16 * c, load16(v + 16 * c, vs));
    }
    for (int64_t j = 0; j < G; ++j) {
      __m512 a[C];
      for (int c = 0; c < C; ++c) a[c] = _mm512_loadu_ps(acc + j * D + 16 * c);
      for (int64_t t = 0; t < n; ++t) {
        const __m512 p = _mm512_set1_ps(s[j * block + t]);
        for (int c = 0; c < C; ++c) a[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(rows + t * D + 16 * c), a[c]);
      }
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + j * D + 16 * c, a[c]);
    }
  }
  for (int64_t j = 0; j < G; ++j)
    for (int64_t x = 0; x < D; ++x) out[j * D + x] = static_cast<T>(acc[j * D + x] / l[j]);
}
#endif

// The AVX-512 loops cover fp32, bf16 and fp16 queries with a cache of the same type or int8,
// at the common head sizes; anything else (fp64, other head sizes, other CPUs) takes attend().
template <typename T, typename S, int DT>
constexpr bool vectorized() {
#ifdef INTERNRAY_AVX512
  return DT % 16 == 0 && DT > 0 && !std::is_same_v<T, double>;
#else
  return false;
#endif
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
    std::vector<float> qf(G * D), work(G * block + block * D + G * D + D + 2 * G);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, g = task % Hkv;
      const T* qg = qp + (b * H + g * G) * D;
      for (int64_t i = 0; i < G * D; ++i) qf[i] = static_cast<float>(qg[i]) * static_cast<float>(scale);
      const int64_t* table = tp + b * table_width;
      T* o = op + (b * H + g * G) * D;
#ifdef INTERNRAY_AVX512
      if constexpr (vectorized<T, S, DT>()) {
        attend_avx512<T, S, DT>(qf.data(), cp, sp, table, lp[b], block, Hkv, g, G, work.data(), o);
        continue;
      }
#endif
      attend<T, S, DT>(qf.data(), cp, sp, table, lp[b], block, Hkv, g, G, D, work.data(), o);
    }
  });
}

template <typename T, typename S>
static void run_for_head_dim(const at::Tensor& q, const at::Tensor& cache, const at::Tensor* scales,
                             const at::Tensor& tables, const at::Tensor& lengths, at::Tensor& out, double scale) {
  switch (q.size(2)) {  // the common head sizes get loops of a known length
    case 32: return run<T, S, 32>(q, cache, scales, tables, lengths, out, scale);
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

FUNCTIONS = ["decode_attention"]


def decode_attention(q: torch.Tensor, kv_cache: KVCache, tables: torch.Tensor, lengths: torch.Tensor,
                     kernel) -> torch.Tensor:
    """q: [B, H, D]; tables: [B, max blocks] (int64); lengths: [B] context lengths including the
    new token -> [B, H, D]. `kernel`: the module cpu_kernels.load() built."""
    return kernel.decode_attention(q, kv_cache.data, kv_cache.scales, tables, lengths, q.shape[-1] ** -0.5)
