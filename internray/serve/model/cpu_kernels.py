"""The engine's C++ kernels for CPUs, compiled for this machine on first use: decode attention
(cpu_attention.py), the fused elementwise ops around the matmuls (cpu_fused.py), the bf16
matmul (cpu_matmul.py) and, built from those three, a decode-only step's layers in one call
(cpu_decode.py).

They are built together with `torch.utils.cpp_extension.load_inline` (needs a C++ compiler, as
vLLM's CPU build and `torch.compile` do), for this machine's instruction set, into torch's
extension cache (one build per CPU flavour and source, ~40 s, then reused). Without a compiler
`load()` returns None, says why once, and the model runs on plain PyTorch ops (gather + SDPA
attention, unfused norms and activations).

`PRELUDE` holds what the sources share: the AVX-512 conversions between 16 lanes of fp32 and
16-bit or int8 storage, and a vectorized exp. Only decode attention also has a portable loop
(other CPUs and head sizes); prefill attention and the fused ops exist in AVX-512 builds alone
(`has_avx512()`), and elsewhere the model uses SDPA and the plain ops for them; the bf16 matmul
needs AVX512_BF16 too (`has_bf16_matmul()`), and elsewhere linears run on oneDNN.
"""
from __future__ import annotations

import hashlib
import platform
import warnings
from functools import cache

PRELUDE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define INTERNRAY_AVX512 1

// 16 stored numbers as fp32 lanes: bf16 is fp32's top half, fp16 has a conversion instruction,
// int8 codes are widened and scaled.
static inline __m512 load16(const float* p, float = 1.f) { return _mm512_loadu_ps(p); }
static inline __m512 load16(const c10::BFloat16* p, float = 1.f) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
static inline __m512 load16(const c10::Half* p, float = 1.f) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
static inline __m512 load16(const int8_t* p, float scale) {
  const __m512i wide = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_mul_ps(_mm512_set1_ps(scale), _mm512_cvtepi32_ps(wide));
}

// fp32 lanes rounded to the nearest even bf16 (torch's rounding, NaN kept), as 16 bf16 bits.
static inline __m256i bf16_bits(__m512 x) {
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}
static inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
static inline void store16(c10::BFloat16* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), bf16_bits(x));
}
static inline void store16(c10::Half* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
}

// x rounded to T and back: what an eager PyTorch op on T tensors leaves between two ops.
template <typename T> static inline __m512 rounded(__m512 x);
template <> inline __m512 rounded<c10::BFloat16>(__m512 x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_bits(x)), 16));
}
template <> inline __m512 rounded<c10::Half>(__m512 x) {
  return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
}

// e^x for 16 lanes (Cephes' expf: x = n ln2 + r, a degree-7 polynomial in r, then 2^n by scalef),
// within 2 ulp; inputs below -87 give ~1e-38, which callers mask or which vanishes in sums.
static inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

static inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
#endif

// Whether this build has the AVX-512 kernels (prefill attention, fused ops); decode attention
// always has its portable loop.
bool has_avx512() {
#ifdef INTERNRAY_AVX512
  return true;
#else
  return false;
#endif
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
    built; the model then runs on plain PyTorch ops."""
    from internray.serve.model import cpu_attention, cpu_decode, cpu_fused, cpu_matmul

    source = PRELUDE + cpu_attention.SOURCE + cpu_fused.SOURCE + cpu_matmul.SOURCE + cpu_decode.SOURCE
    try:
        from torch.utils.cpp_extension import load_inline

        source_tag = hashlib.sha1(source.encode()).hexdigest()[:8]
        return load_inline(
            name=f"internray_cpu_kernels_{source_tag}_{_cpu_flavour()}", cpp_sources=source,
            functions=["has_avx512"] + cpu_attention.FUNCTIONS + cpu_fused.FUNCTIONS + cpu_matmul.FUNCTIONS
                      + cpu_decode.FUNCTIONS,
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-math-errno"], extra_ldflags=["-fopenmp"],
            verbose=False)
    except Exception as exc:  # no compiler, no headers, an unusual platform: the portable path still works
        warnings.warn(f"internray: compiled CPU kernels unavailable ({type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}); "
                      "using plain PyTorch ops (gather + SDPA attention)")
        return None
