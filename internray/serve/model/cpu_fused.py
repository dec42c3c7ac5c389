"""Fused elementwise ops for bf16/fp16 activations on CPU (C++, built by cpu_kernels.py).

Between its matmuls a Llama layer runs about twenty small PyTorch ops (residual adds, RMSNorm's
upcast/square/mean/rsqrt/scale/downcast, rotary's multiplies and half-swaps, SiLU times up), each
a pass over memory and a dispatch. Three kernels do the same in one pass each, as vLLM's CPU
build does:
- `rms_norm`: residual add (written back in place) + RMSNorm,
- `rotary_`: rotary embedding of the q and k heads in place in the fused qkv output,
- `silu_and_mul`: SiLU(gate) * up of the fused gate/up output.
Each keeps eager PyTorch's rounding between ops (a 16-bit result wherever an op on 16-bit
tensors would leave one), so they match the unfused path to the last bit except where fp32 sums
are ordered differently or exp differs by an ulp (tests/test_serve_cpu_fused.py bounds this).
fp32 models keep the plain ops, whose results the engine's tests compare token for token with
Hugging Face. The kernels exist where the CPU has AVX-512 (`has_avx512`); elsewhere the
model runs the plain ops.

SmolLM2 in bf16, 2 threads: unfused, these ops took 270 ms of a 2,048-token prefill step and
13 ms of a 64-sequence decode step (torch profiler). Fused, the serve benchmark's offline batch
(64 prompts x 128 tokens, prefix caching off) took 22.5 s instead of 23.7 s, best of three runs
of each, alternated in one process (1.05x; prefill alone 1.04x).
"""
from __future__ import annotations

import torch

SOURCE = r"""
#ifdef INTERNRAY_AVX512
// Rows go to threads in chunks of ~32k numbers: a decode step's few rows stay on one thread.
static int64_t row_grain(int64_t row_size) { return std::max<int64_t>(1, (int64_t(1) << 15) / row_size); }

// residual += x (rounded to T, written back), then RMSNorm of the sum: fp32 statistics, the
// normalized row rounded to T, times the weight. Without a residual, RMSNorm of x.
template <typename T>
static void rms_norm_rows(const T* x, T* residual, const T* weight, T* out, int64_t rows, int64_t n, float eps) {
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * n;
      T* sum = residual ? residual + r * n : nullptr;
      __m512 squares = _mm512_setzero_ps();
      for (int64_t i = 0; i < n; i += 16) {
        __m512 v = load16(xr + i);
        if (sum) {
          v = rounded<T>(_mm512_add_ps(v, load16(sum + i)));
          store16(sum + i, v);
        }
        squares = _mm512_fmadd_ps(v, v, squares);
      }
      const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(squares) / n + eps));
      const T* src = sum ? sum : xr;
      for (int64_t i = 0; i < n; i += 16)
        store16(out + r * n + i, _mm512_mul_ps(load16(weight + i), rounded<T>(_mm512_mul_ps(load16(src + i), inv))));
    }
  });
}

// x: [rows, 2n] = gate | up -> [rows, n] = SiLU(gate) * up, SiLU rounded to T first.
template <typename T>
static void silu_and_mul_rows(const T* x, T* out, int64_t rows, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.f), zero = _mm512_setzero_ps();
  at::parallel_for(0, rows, row_grain(2 * n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T *gate = x + r * 2 * n, *up = gate + n;
      for (int64_t i = 0; i < n; i += 16) {
        const __m512 g = load16(gate + i);
        const __m512 silu = rounded<T>(_mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(zero, g)))));
        store16(out + r * n + i, _mm512_mul_ps(silu, load16(up + i)));
      }
    }
  });
}

// In place on the first `heads` heads of each row: x * cos + rotate_half(x) * sin, with
// rotate_half(x) = (-x2, x1); each product rounded to T, then the sum.
template <typename T>
static void rotary_rows(T* x, const T* cos, const T* sin, int64_t rows, int64_t row_stride, int64_t heads, int64_t d) {
  const int64_t half = d / 2;
  const __m512 zero = _mm512_setzero_ps();
  at::parallel_for(0, rows, row_grain(heads * d), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T *c = cos + r * d, *s = sin + r * d;
      for (int64_t h = 0; h < heads; ++h) {
        T* head = x + r * row_stride + h * d;
        for (int64_t i = 0; i < half; i += 16) {
          const __m512 a = load16(head + i), b = load16(head + half + i);
          const __m512 lo = _mm512_add_ps(rounded<T>(_mm512_mul_ps(a, load16(c + i))),
                                          rounded<T>(_mm512_mul_ps(_mm512_sub_ps(zero, b), load16(s + i))));
          const __m512 hi = _mm512_add_ps(rounded<T>(_mm512_mul_ps(b, load16(c + half + i))),
                                          rounded<T>(_mm512_mul_ps(a, load16(s + half + i))));
          store16(head + i, lo);
          store16(head + half + i, hi);
        }
      }
    }
  });
}
#endif

static void check_rows(const at::Tensor& x, int64_t multiple, const char* what) {
  TORCH_CHECK(has_avx512(), "fused ops need AVX-512 (check has_avx512() first)");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), what, ": needs a contiguous 2-d tensor");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf, what, ": bf16 or fp16 only");
  TORCH_CHECK(x.size(1) % multiple == 0, what, ": row size must be a multiple of ", multiple);
}

at::Tensor rms_norm(at::Tensor x, std::optional<at::Tensor> residual, at::Tensor weight, double eps) {
  check_rows(x, 16, "rms_norm");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type() && weight.is_contiguous() && weight.numel() == x.size(1),
              "rms_norm: weight must match the rows' size and dtype");
  if (residual) {
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->scalar_type() == x.scalar_type() &&
                residual->is_contiguous(), "rms_norm: residual must match x");
  }
  auto out = at::empty_like(x);
#ifdef INTERNRAY_AVX512
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "rms_norm", [&] {
    rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), residual ? residual->data_ptr<scalar_t>() : nullptr,
                            weight.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.size(0), x.size(1), eps);
  });
#endif
  return out;
}

at::Tensor silu_and_mul(at::Tensor x) {
  check_rows(x, 32, "silu_and_mul");
  auto out = at::empty({x.size(0), x.size(1) / 2}, x.options());
#ifdef INTERNRAY_AVX512
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "silu_and_mul", [&] {
    silu_and_mul_rows<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), x.size(0), x.size(1) / 2);
  });
#endif
  return out;
}

void rotary_(at::Tensor x, at::Tensor cos, at::Tensor sin, int64_t heads, int64_t head_dim) {
  check_rows(x, 1, "rotary_");
  TORCH_CHECK(head_dim % 32 == 0 && heads * head_dim <= x.size(1), "rotary_: heads of a multiple of 32 within a row");
  for (const auto* t : {&cos, &sin})
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->is_contiguous() && t->dim() == 2 &&
                t->size(0) == x.size(0) && t->size(1) == head_dim, "rotary_: cos/sin must be [rows, head_dim] in x's dtype");
#ifdef INTERNRAY_AVX512
  AT_DISPATCH_REDUCED_FLOATING_TYPES(x.scalar_type(), "rotary_", [&] {
    rotary_rows<scalar_t>(x.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(), x.size(0),
                          x.size(1), heads, head_dim);
  });
#endif
}
"""

FUNCTIONS = ["rms_norm", "silu_and_mul", "rotary_"]

FUSED_DTYPES = (torch.bfloat16, torch.float16)


def usable(kernel, dtype: torch.dtype, hidden_size: int, intermediate_size: int, head_dim: int) -> bool:
    """Whether the model's shapes (per tensor-parallel rank) and dtype suit the fused kernels built
    for this CPU."""
    return (kernel is not None and kernel.has_avx512() and dtype in FUSED_DTYPES and hidden_size % 16 == 0
            and intermediate_size % 16 == 0 and head_dim % 32 == 0)
