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
With many sequences a task takes all KV heads of one sequence and walks its blocks once,
prefetching the next block into L2 (after a sequence's last block, the first block of the task's
next sequence), a few cache lines per key scored so that the prefetches overlap the arithmetic
rather than queue up in front of it: blocks scattered across the cache (the free list's order
after a server has run a while) cost 0.8-0.9 ms per layer for 64 x 200-256 tokens, where one
task per KV group without prefetch took 2.2-2.5 ms and the whole next block prefetched at once,
at a block's start, 1.3-1.6 ms (Llama-3-8B shapes, 64 x 256: 10.3 -> 4.4 ms). In a 64-sequence
SmolLM2 decode step (serve benchmark, contexts 16-384) that is 33 -> 17 ms of attention.
`benchmarks/decode_attention.py` times it against the gather + SDPA fallback (~20x faster for
that case scattered, 30-40x in cache) and prints the read bandwidth it reaches on scattered blocks:
12-14 GB/s, where a plain streaming read gets ~23 GB/s on this machine.

Prefill chunks have a kernel of their own (AVX-512, head sizes 32/64/128): tiles of 16 query
tokens against the keys before each, read from the cache where the chunk's keys were just
written, so a chunk after earlier context needs no gather either. Against SDPA's flash kernel on
one prompt (SmolLM2 shapes, bf16): 64 tokens 0.18 -> 0.08 ms, 136 tokens 0.66 -> 0.29 ms, 248
tokens 1.6 -> 1.1 ms per layer; prefilling the serve benchmark's 64 prompts took 6.75 s instead
of 7.7 s. Since then, with a bf16 cache and AVX512_BF16, the scores are vdpbf16ps on the keys as
stored, 1.4-1.55x faster again (see prefill_tile). Elsewhere prefill takes SDPA (model/layers.py).

The cache's writer is here too (`store_kv`, any CPU): each token's keys and values copied into its
slot's record, 1-3 us per layer call for a decode step's 5-64 tokens where PyTorch's stack +
index_copy_ took 15-32 us (104 against 479 us for a 2,048-token prefill chunk).
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
// One block of KV group g for attend_avx512, the same recurrence as attend(): each key row is
// converted in registers and dotted with all G query heads; then the online-softmax update of
// (m, l, acc); then the block's values, each converted in registers once for up to 16 / C heads
// whose outputs stay in registers across the block (reading converted rows back from a scratch
// buffer per head was L1-bound: 20% slower with the cache resident). s: G * block floats, scratch;
// `ahead`: `ahead_bytes` to prefetch into L2, a few lines before each key is scored.
template <typename S, int D>
static inline void attend_block_avx512(const float* q, const S* cache, const float* scales, int64_t first, int64_t n,
                                       int64_t block, int64_t Hkv, int64_t g, int64_t G, float* s,
                                       float* acc, float* m, float* l, const char* ahead, int64_t ahead_bytes) {
  constexpr int C = D / 16;  // 16-lane chunks per head
  const int64_t token_stride = 2 * Hkv * D;
  const int64_t ahead_step = (ahead_bytes + 64 * n - 1) / (64 * n) * 64;  // whole cache lines per token
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t b = t * ahead_step, e = std::min(b + ahead_step, ahead_bytes); b < e; b += 64)
      _mm_prefetch(ahead + b, _MM_HINT_T1);
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
  constexpr int HB = 16 / C;  // heads whose outputs fit in 16 registers together
  for (int64_t j0 = 0; j0 < G; j0 += HB) {
    const int64_t heads = std::min<int64_t>(HB, G - j0);
    __m512 a[HB][C];
    for (int h = 0; h < HB; ++h)
      for (int c = 0; c < C; ++c) a[h][c] = h < heads ? _mm512_loadu_ps(acc + (j0 + h) * D + 16 * c) : _mm512_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      const int64_t slot = first + t;
      const S* v = cache + slot * token_stride + (Hkv + g) * D;
      const float vs = scales ? scales[slot * 2 * Hkv + Hkv + g] : 1.f;
      __m512 value[C];
      for (int c = 0; c < C; ++c) value[c] = load16(v + 16 * c, vs);
      for (int h = 0; h < HB; ++h) {
        if (h >= heads) break;
        const __m512 p = _mm512_set1_ps(s[(j0 + h) * block + t]);
        for (int c = 0; c < C; ++c) a[h][c] = _mm512_fmadd_ps(p, value[c], a[h][c]);
      }
    }
    for (int h = 0; h < heads; ++h)
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + (j0 + h) * D + 16 * c, a[h][c]);
  }
}

// attend() in AVX-512 for head sizes that are a multiple of 16, for the KV groups [g0, g1) of one
// sequence: block by block, each group's share of a block before the next block, with the next
// block (all heads' keys and values, one contiguous run) prefetched into L2 meanwhile. Blocks are
// wherever the block manager's free list put them; scattered across the cache, as in a server
// that has run a while, one task per KV group reading a strided third of each block without
// prefetch took 2.2-2.5 ms per layer for 64 sequences x 256 tokens (SmolLM2 shapes, bf16, 2
// threads) against 0.6 ms with the blocks in cache; one task per sequence prefetching each next
// block whole at the block's start, 1.3-1.6 ms; with the prefetches spread over the score loop
// (and the next sequence's first block after the last), 0.8-0.9 ms. (Into L1 was slower; two or
// three blocks ahead, no faster.) next_table/next_len: the block table and length of the sequence to
// prefetch after this one's last block; next_len 0 for none.
// q: (g1 - g0) * G prescaled heads; work: G * block + (g1 - g0) * G * (D + 2) floats.
template <typename T, typename S, int D>
static void attend_avx512(const float* q, const S* cache, const float* scales, const int64_t* table, int64_t len,
                          int64_t block, int64_t Hkv, int64_t g0, int64_t g1, int64_t G, float* work, T* out,
                          const int64_t* next_table, int64_t next_len) {
  const int64_t heads = (g1 - g0) * G, record = 2 * Hkv * D * static_cast<int64_t>(sizeof(S));
  float *s = work, *acc = s + G * block, *m = acc + heads * D, *l = m + heads;
  std::fill(m, m + heads, -std::numeric_limits<float>::infinity());
  std::fill(l, l + heads, 0.f);
  std::fill(acc, acc + heads * D, 0.f);
  for (int64_t start = 0, i = 0; start < len; start += block, ++i) {
    const int64_t n = std::min(block, len - start), first = table[i] * block;
    // the next block: its first slot's record onward, every token of it; after the last block,
    // the first block of the task's next sequence (or its absence: next_len 0)
    const bool last = start + block >= len;
    const char* next = reinterpret_cast<const char*>(cache) + (last ? next_table[0] : table[i + 1]) * block * record;
    const int64_t bytes = (last ? std::min(block, next_len) : std::min(block, len - start - block)) * record;
    const int64_t share = (bytes + 64 * (g1 - g0) - 1) / (64 * (g1 - g0)) * 64;  // spread over the groups' score loops
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t h = (g - g0) * G, from = std::min(bytes, (g - g0) * share);
      attend_block_avx512<S, D>(q + h * D, cache, scales, first, n, block, Hkv, g, G, s, acc + h * D, m + h, l + h,
                                next + from, std::min(share, bytes - from));
    }
  }
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t x = 0; x < D; ++x) out[h * D + x] = static_cast<T>(acc[h * D + x] / l[h]);
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

// Tasks: one per (sequence, KV head) while sequences are few, so both threads have work even for
// one; with plenty of them (and AVX-512), one per sequence, all its heads, each block read once.
// With `scales` the cache holds int8 codes and a scale per (token, key|value, head).
template <typename T, typename S, int DT>
static void run(const at::Tensor& q, const at::Tensor& cache, const at::Tensor* scales, const at::Tensor& tables,
                const at::Tensor& lengths, at::Tensor& out, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t block = cache.size(1), Hkv = cache.size(3), G = H / Hkv;
  const int64_t table_width = tables.size(1);
  const int64_t per_task = vectorized<T, S, DT>() && B >= 4 * at::get_num_threads() ? Hkv : 1;  // KV groups
  const T* qp = q.data_ptr<T>();
  const S* cp = cache.data_ptr<S>();
  const float* sp = scales ? scales->data_ptr<float>() : nullptr;
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lengths.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  at::parallel_for(0, B * (Hkv / per_task), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(per_task * G * D), work(G * block + per_task * G * (D + 2) + D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (Hkv / per_task), g = task % (Hkv / per_task) * per_task;
      const T* qg = qp + b * q.stride(0) + g * G * D;  // q's tokens may be rows of the fused qkv output
      for (int64_t i = 0; i < per_task * G * D; ++i) qf[i] = static_cast<float>(qg[i]) * static_cast<float>(scale);
      const int64_t* table = tp + b * table_width;
      T* o = op + (b * H + g * G) * D;
#ifdef INTERNRAY_AVX512
      if constexpr (vectorized<T, S, DT>()) {
        const int64_t next_b = per_task == Hkv && task + 1 < end ? b + 1 : b;  // whole sequences: prefetch the next one
        attend_avx512<T, S, DT>(qf.data(), cp, sp, table, lp[b], block, Hkv, g, g + per_task, G, work.data(), o,
                                tp + next_b * table_width, next_b != b ? lp[next_b] : 0);
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

#ifdef INTERNRAY_AVX512
#ifdef __AVX512BF16__
// A 16 x 16 matrix of int32 in registers, transposed: row i's lane j becomes row j's lane i.
static inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8)
    for (int k = 0; k < 4; ++k) {
      t[i + k] = _mm512_shuffle_i32x4(r[i + k], r[i + k + 4], 0x88);
      t[i + k + 4] = _mm512_shuffle_i32x4(r[i + k], r[i + k + 4], 0xdd);
    }
  for (int k = 0; k < 8; ++k) {
    r[k] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0x88);
    r[k + 8] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0xdd);
  }
}
#endif

// Whether prefill scores bf16 keys with vdpbf16ps (see prefill_tile).
template <typename S, int D>
constexpr bool scores_in_pairs() {
#ifdef __AVX512BF16__
  return std::is_same_v<S, c10::BFloat16> && D % 32 == 0;
#else
  return false;
#endif
}

// Prefill: up to 16 consecutive query tokens (every head of KV group g) against the keys before
// each of them, read from the paged cache, where the chunk's own keys were written just before.
// Each 16 keys are converted once for the whole tile, the keys transposed to [D][16] so that a
// row's 16 scores are D broadcast-FMAs with no horizontal sums; every (token, head) row keeps
// flash attention's running max, sum and output. q's rows are `q_stride` apart, out's `out_stride`.
// A bf16 cache (with AVX512_BF16) skips the conversion: the 16 keys' dimension pairs are
// transposed in registers to [D / 2][16] (`pairs`) and a row's scores are D / 2 vdpbf16ps, its
// bf16 query pairs broadcast, `scale` applied to the sums (products of bf16 numbers are exact in
// fp32, so only the order of the sums differs). Against the converting loop, one prompt, 2
// threads: SmolLM2 shapes 144 tokens 0.36 -> 0.25 ms, 1,024 tokens 19.6 -> 13.8 ms; Llama-3-8B
// shapes 512 tokens 26.3 -> 16.9 ms; in the serve benchmark's 2,048-token prefill steps, 223-243
// -> 167-178 ms of attention per step. (Decode attention was tried the same way: 1.1-1.2x for
// heads of 64, slower for heads of 128, and not kept.)
// work: 2 * R * D + 3 * R + 32 * D + 16 * R floats, R = 16 * G; pairs: R * D / 2 + 8 * D int32.
template <typename T, typename S, int D>
static void prefill_tile(const T* q, int64_t q_stride, T* out, int64_t out_stride, int64_t rows, int64_t first_pos, const S* cache,
                         const float* scales, const int64_t* table, int64_t block, int64_t Hkv, int64_t g, int64_t G,
                         float scale, float* work, int32_t* pairs) {
  constexpr int C = D / 16;
  constexpr bool by_pairs = scores_in_pairs<S, D>();
  const int64_t R = rows * G, token_stride = 2 * Hkv * D;
  float *qf = work, *acc = qf + R * D, *m = acc + R * D, *l = m + R, *shrink = l + R, *keys_t = shrink + R,
        *values = keys_t + 16 * D, *p = values + 16 * D;  // p: a row's 16 scores, then their exps
  int32_t *q_pairs = pairs, *keys_pairs = pairs + R * D / 2;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < G; ++j) {
      if constexpr (by_pairs) {
        std::memcpy(q_pairs + (i * G + j) * D / 2, q + i * q_stride + (g * G + j) * D, D * sizeof(T));
        continue;
      }
      for (int64_t x = 0; x < D; ++x)
        qf[(i * G + j) * D + x] = static_cast<float>(q[i * q_stride + (g * G + j) * D + x]) * scale;
    }
  std::fill(m, m + R, -std::numeric_limits<float>::infinity());
  std::fill(l, l + R, 0.f);
  std::fill(acc, acc + R * D, 0.f);
  std::fill(keys_t, keys_t + 16 * D, 0.f);
  const int64_t end = first_pos + rows;  // the tile's last token sees keys [0, end)
  for (int64_t k0 = 0; k0 < end; k0 += 16) {
    const int64_t kn = std::min<int64_t>(16, end - k0);
    int64_t slots[16];
    for (int64_t t = 0; t < kn; ++t) slots[t] = table[(k0 + t) / block] * block + (k0 + t) % block;
#ifdef __AVX512BF16__
    if constexpr (by_pairs)
      for (int c = 0; c < D / 32; ++c) {  // 16 keys x 16 pairs at a time
        __m512i key_rows[16];
        for (int t = 0; t < 16; ++t)
          key_rows[t] = t < kn ? _mm512_loadu_si512(cache + slots[t] * token_stride + g * D + 32 * c) : _mm512_setzero_si512();
        transpose16x16(key_rows);
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(keys_pairs + (16 * c + i) * 16, key_rows[i]);
      }
#endif
    for (int64_t t = 0; t < kn; ++t) {
      const S* k = cache + slots[t] * token_stride + g * D;
      const S* v = k + Hkv * D;
      const float vs = scales ? scales[slots[t] * 2 * Hkv + Hkv + g] : 1.f;
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(values + t * D + 16 * c, load16(v + 16 * c, vs));
      if constexpr (!by_pairs) {
        const float ks = scales ? scales[slots[t] * 2 * Hkv + g] : 1.f;
        alignas(64) float row[D];
        for (int c = 0; c < C; ++c) _mm512_store_ps(row + 16 * c, load16(k + 16 * c, ks));
        for (int x = 0; x < D; ++x) keys_t[x * 16 + t] = row[x];
      }
    }
    // Three passes over the rows, each row independent of the others within a pass, so the
    // CPU overlaps them (one row's scores -> max -> exp -> sum is a long chain of latencies).
    const int64_t first_row = std::clamp<int64_t>(k0 - first_pos, 0, rows) * G;  // rows seeing none of these keys
    for (int64_t r = first_row; r < R; ++r) {
      __m512 part[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
#ifdef __AVX512BF16__
      if constexpr (by_pairs) {
        const int32_t* qr = q_pairs + r * D / 2;
        for (int x = 0; x < D / 2; x += 4)
          for (int u = 0; u < 4; ++u)
            part[u] = _mm512_dpbf16_ps(part[u], (__m512bh)_mm512_loadu_si512(keys_pairs + (x + u) * 16),
                                       (__m512bh)_mm512_set1_epi32(qr[x + u]));
      }
#endif
      if constexpr (!by_pairs) {
        const float* qr = qf + r * D;
        for (int x = 0; x < D; x += 4)  // four independent sums: one chain of D FMAs would wait on each
          for (int u = 0; u < 4; ++u)
            part[u] = _mm512_fmadd_ps(_mm512_set1_ps(qr[x + u]), _mm512_loadu_ps(keys_t + (x + u) * 16), part[u]);
      }
      const int64_t allowed = std::min(kn, first_pos + r / G + 1 - k0);  // causal: keys up to the token itself
      __m512 sum = _mm512_add_ps(_mm512_add_ps(part[0], part[1]), _mm512_add_ps(part[2], part[3]));
      if constexpr (by_pairs) sum = _mm512_mul_ps(sum, _mm512_set1_ps(scale));
      _mm512_storeu_ps(p + r * 16, _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()),
                                                      first_lanes(allowed), sum));
    }
    for (int64_t r = first_row; r < R; ++r) {
      const __m512 s = _mm512_loadu_ps(p + r * 16);
      const float top = std::max(m[r], _mm512_reduce_max_ps(s));
      shrink[r] = std::exp(m[r] - top);  // 0 on the first keys (m = -inf)
      const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s, _mm512_set1_ps(-std::numeric_limits<float>::infinity()),
                                                              _CMP_NEQ_OQ), exp16(_mm512_sub_ps(s, _mm512_set1_ps(top))));
      _mm512_storeu_ps(p + r * 16, e);
      l[r] = l[r] * shrink[r] + _mm512_reduce_add_ps(e);
      m[r] = top;
    }
    for (int64_t r = first_row; r < R; ++r) {
      const int64_t allowed = std::min(kn, first_pos + r / G + 1 - k0);
      __m512 a[C];
      for (int c = 0; c < C; ++c) a[c] = _mm512_mul_ps(_mm512_set1_ps(shrink[r]), _mm512_loadu_ps(acc + r * D + 16 * c));
      for (int64_t t = 0; t < allowed; ++t) {
        const __m512 pt = _mm512_set1_ps(p[r * 16 + t]);
        for (int c = 0; c < C; ++c) a[c] = _mm512_fmadd_ps(pt, _mm512_loadu_ps(values + t * D + 16 * c), a[c]);
      }
      for (int c = 0; c < C; ++c) _mm512_storeu_ps(acc + r * D + 16 * c, a[c]);
    }
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < G; ++j)
      for (int64_t x = 0; x < D; ++x)
        out[i * out_stride + (g * G + j) * D + x] = static_cast<T>(acc[(i * G + j) * D + x] / l[i * G + j]);
}

// One task per (tile of 16 tokens, KV head). Later tiles see more keys, so tiles are dealt out
// first, last, second, second to last, ...: each thread's contiguous share gets a fair mix.
template <typename T, typename S, int D>
static void prefill_run(const at::Tensor& q, const at::Tensor& cache, const at::Tensor* scales, const at::Tensor& table,
                        int64_t context_len, at::Tensor& out, double scale) {
  const int64_t L = q.size(0), H = q.size(1), block = cache.size(1), Hkv = cache.size(3), G = H / Hkv;
  const int64_t tiles = (L + 15) / 16, first = context_len - L, q_stride = q.stride(0);
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const S* cp = cache.data_ptr<S>();
  const float* sp = scales ? scales->data_ptr<float>() : nullptr;
  const int64_t* tp = table.data_ptr<int64_t>();
  at::parallel_for(0, tiles * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> work(2 * 16 * G * D + 3 * 16 * G + 32 * D + 16 * 16 * G);
    std::vector<int32_t> pairs(scores_in_pairs<S, D>() ? 16 * G * D / 2 + 8 * D : 0);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t k = task / Hkv, g = task % Hkv, tile = k % 2 ? tiles - 1 - k / 2 : k / 2, i0 = tile * 16;
      prefill_tile<T, S, D>(qp + i0 * q_stride, q_stride, op + i0 * H * D, H * D, std::min<int64_t>(16, L - i0),
                            first + i0, cp, sp, tp, block, Hkv, g, G, float(scale), work.data(), pairs.data());
    }
  });
}
#endif

at::Tensor prefill_attention(at::Tensor q, at::Tensor cache, std::optional<at::Tensor> scales, at::Tensor table,
                             int64_t context_len, double scale) {
#ifdef INTERNRAY_AVX512
  TORCH_CHECK(q.dim() == 3 && cache.dim() == 5 && table.dim() == 1, "bad ranks");
  TORCH_CHECK(q.size(1) % cache.size(3) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2), "q's heads must be contiguous within a token");
  TORCH_CHECK(cache.is_contiguous() && table.is_contiguous(), "the cache and block table must be contiguous");
  TORCH_CHECK(context_len >= q.size(0) && table.size(0) * cache.size(1) >= context_len,
              "the block table must cover the context, chunk included");
  if (scales) {
    TORCH_CHECK(cache.scalar_type() == at::kChar && scales->scalar_type() == at::kFloat && scales->is_contiguous(),
                "an int8 cache needs contiguous float32 scales");
  } else {
    TORCH_CHECK(q.scalar_type() == cache.scalar_type(), "q and cache dtypes differ");
  }
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  if (q.size(0) == 0) return out;
  const auto dispatch = [&](auto tag) {
    using T = decltype(tag);
    const auto run = [&](auto d) {
      constexpr int D = decltype(d)::value;
      if (scales) prefill_run<T, int8_t, D>(q, cache, &*scales, table, context_len, out, scale);
      else prefill_run<T, T, D>(q, cache, nullptr, table, context_len, out, scale);
    };
    switch (q.size(2)) {
      case 32: return run(std::integral_constant<int, 32>());
      case 64: return run(std::integral_constant<int, 64>());
      case 128: return run(std::integral_constant<int, 128>());
      default: TORCH_CHECK(false, "prefill_attention: head size ", q.size(2), " is not 32, 64 or 128");
    }
  };
  switch (q.scalar_type()) {
    case at::kFloat: dispatch(float()); break;
    case at::kBFloat16: dispatch(c10::BFloat16()); break;
    case at::kHalf: dispatch(c10::Half()); break;
    default: TORCH_CHECK(false, "prefill_attention: fp32, bf16 or fp16 queries only");
  }
  return out;
#else
  TORCH_CHECK(false, "prefill_attention needs AVX-512 (check has_avx512() first)");
#endif
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
  if (q.stride(2) != 1 || q.stride(1) != q.size(2)) q = q.contiguous();
  tables = tables.contiguous();
  lengths = lengths.contiguous();
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  if (q.size(0) == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    if (scales) run_for_head_dim<scalar_t, int8_t>(q, cache, &*scales, tables, lengths, out, scale);
    else run_for_head_dim<scalar_t, scalar_t>(q, cache, nullptr, tables, lengths, out, scale);
  });
  return out;
}

// This step's keys and values [T, Hkv, D] (rows may lie apart, as inside the fused qkv output) to
// their cache slots [T]: per token, two row copies into its [2, Hkv, D] record. In PyTorch it took
// a stack of k and v and an index_copy_: 2 ms of a 64-sequence decode step (SmolLM2, 30 layers).
void store_kv(at::Tensor cache, at::Tensor slots, at::Tensor k, at::Tensor v) {
  TORCH_CHECK(cache.device().is_cpu() && cache.dim() == 5 && cache.is_contiguous(), "store_kv: a contiguous CPU cache");
  const int64_t tokens = k.size(0), Hkv = cache.size(3), D = cache.size(4), num_slots = cache.size(0) * cache.size(1);
  for (const auto* x : {&k, &v})
    TORCH_CHECK(x->scalar_type() == cache.scalar_type() && x->dim() == 3 && x->size(0) == tokens &&
                x->size(1) == Hkv && x->size(2) == D && x->stride(2) == 1 && (Hkv == 1 || x->stride(1) == D),
                "store_kv: keys and values must be [tokens, KV heads, head dim] rows in the cache's dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.numel() == tokens && slots.is_contiguous(),
              "store_kv: one int64 slot per token");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(sp[t] >= 0 && sp[t] < num_slots, "store_kv: slot ", sp[t], " outside the cache's ", num_slots);
  const int64_t item = cache.element_size(), bytes = Hkv * D * item;
  char* base = static_cast<char*>(cache.data_ptr());
  const char *kp = static_cast<const char*>(k.data_ptr()), *vp = static_cast<const char*>(v.data_ptr());
  at::parallel_for(0, tokens, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      char* record = base + sp[t] * 2 * bytes;
      std::memcpy(record, kp + t * k.stride(0) * item, bytes);
      std::memcpy(record + bytes, vp + t * v.stride(0) * item, bytes);
    }
  });
}
"""

FUNCTIONS = ["decode_attention", "prefill_attention", "store_kv"]
PREFILL_HEAD_SIZES = (32, 64, 128)
"""Head sizes the compiled prefill attention covers (where the CPU has AVX-512)."""


def decode_attention(q: torch.Tensor, kv_cache: KVCache, tables: torch.Tensor, lengths: torch.Tensor,
                     kernel) -> torch.Tensor:
    """q: [B, H, D]; tables: [B, max blocks] (int64); lengths: [B] context lengths including the
    new token -> [B, H, D]. `kernel`: the module cpu_kernels.load() built."""
    return kernel.decode_attention(q, kv_cache.data, kv_cache.scales, tables, lengths, q.shape[-1] ** -0.5)


def prefill_attention(q: torch.Tensor, kv_cache: KVCache, table: torch.Tensor, context_len: int,
                      kernel) -> torch.Tensor:
    """One sequence's chunk: q [L, H, D] for its last L positions of `context_len`, whose keys and
    values (chunk included) are in the blocks `table` lists -> [L, H, D], causal."""
    return kernel.prefill_attention(q, kv_cache.data, kv_cache.scales, table, context_len, q.shape[-1] ** -0.5)
