"""bf16 matmuls for CPUs with AVX512_BF16 (C++, built by cpu_kernels.py).

Why a kernel: decoding a handful of sequences multiplies a few rows by every weight of the model,
so a step costs what streaming the weights from memory costs. oneDNN's packed matmul, which the
engine used for every bf16 linear, read SmolLM2's 212 MB of layer weights at 11-16 GB/s for 1-16
rows (2 threads, weights cold as in a real step), where a plain streaming read of the same bytes
reaches 30-45 GB/s. (Why was not pinned down: an earlier profile found 50-70 us per call spent in
PyTorch's `_linear_pointwise` outside oneDNN's own execution, 121 calls a step.) This kernel
streams each weight once per call at any row count: the weight is packed once at load time, 32
output columns at a time, as [K / 2][32 columns][2] (the layout `vdpbf16ps` reads: one
instruction multiplies a pair of inputs into 16 columns), so a tile of 32 columns is one
contiguous stream; each pair of a row's inputs is broadcast to all 32 columns; up to 12 rows x 32
columns of fp32 sums stay in registers while the tile streams past, and each sum is rounded to
bf16 once, after the bias (as oneDNN and `F.linear` do). SmolLM2's 30 layers of linears against
oneDNN (`benchmarks/cpu_matmul.py`, 2 threads): 2.2x at 1 row (31 GB/s), 1.6x at 5, 1.3x at 16,
1.2-1.35x at 64, equal at 2,048; the serve benchmark's offline batch (64 prompts x 128 tokens)
went from 477 to 522 tok/s.

Threads split the work by (tile of 32 columns, chunk of 48 rows), consecutive tasks sharing a tile,
so a thread keeps a weight tile in L2 across its chunks of rows; chunks of 96 rows were 10-15%
slower at 64 rows (one chunk: whole tiles per thread, uneven for small matrices), equal at 2,048.
"""
from __future__ import annotations

import torch

SOURCE = r"""
#include <array>
#include <utility>

#if defined(INTERNRAY_AVX512) && defined(__AVX512BF16__)
#define INTERNRAY_BF16_DOT 1
constexpr int64_t kTile = 32;     // output columns per packed tile: two vectors of 16 fp32 sums
constexpr int64_t kRows = 12;     // rows per register block: 12 x 2 sums + 2 weight vectors < 32 registers
constexpr int64_t kChunk = 48;    // rows per task: a multiple of kRows (see the module's docstring)

// rows (<= kRows) of x times one packed tile: `pairs` steps of (two inputs x 32 columns).
template <int R>
static inline void tile_rows(const c10::BFloat16* x, int64_t ldx, const int32_t* w, int64_t pairs, const float* bias,
                             c10::BFloat16* out, int64_t ldo, int64_t cols) {
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t p = 0; p < pairs; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + p * kTile), w1 = (__m512bh)_mm512_loadu_si512(w + p * kTile + 16);
    for (int r = 0; r < R; ++r) {
      int32_t pair;
      std::memcpy(&pair, x + r * ldx + 2 * p, sizeof(pair));
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, xb);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w1, xb);
    }
  }
  const __mmask16 lo = first_lanes(cols), hi = first_lanes(std::max<int64_t>(cols - 16, 0));
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(lo, bias) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(hi, bias + 16) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r) {
    c10::BFloat16* o = out + r * ldo;
    _mm256_mask_storeu_epi16(o, lo, bf16_bits(_mm512_add_ps(acc[r][0], b0)));
    if (hi) _mm256_mask_storeu_epi16(o + 16, hi, bf16_bits(_mm512_add_ps(acc[r][1], b1)));
  }
}

using TileRows = void (*)(const c10::BFloat16*, int64_t, const int32_t*, int64_t, const float*, c10::BFloat16*,
                          int64_t, int64_t);
template <int... R>
static constexpr std::array<TileRows, sizeof...(R)> tile_table(std::integer_sequence<int, R...>) {
  return {&tile_rows<R + 1>...};
}
static constexpr auto kTileRows = tile_table(std::make_integer_sequence<int, kRows>());
#endif

bool has_bf16_matmul() {
#ifdef INTERNRAY_BF16_DOT
  return true;
#else
  return false;
#endif
}

// x [M, K] (rows may lie apart) times a weight packed by pack_bf16 (`n` real columns) plus an
// optional fp32 bias -> [M, n] bf16.
at::Tensor bf16_matmul(at::Tensor x, at::Tensor packed, std::optional<at::Tensor> bias, int64_t n) {
#ifdef INTERNRAY_BF16_DOT
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.stride(1) == 1, "bf16_matmul: x must be [M, K] bf16 rows");
  TORCH_CHECK(packed.scalar_type() == at::kInt && packed.dim() == 3 && packed.is_contiguous() && packed.size(2) == kTile,
              "bf16_matmul: the weight must come from pack_bf16");
  const int64_t M = x.size(0), K = x.size(1), tiles = packed.size(0), pairs = packed.size(1);
  TORCH_CHECK(K == 2 * pairs && n <= tiles * kTile && n > (tiles - 1) * kTile, "bf16_matmul: x has ", K,
              " features, the packed weight ", 2 * pairs, " (", n, " columns in ", tiles, " tiles)");
  if (bias) TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == n,
                        "bf16_matmul: bias must be ", n, " contiguous fp32 numbers");
  auto out = at::empty({M, n}, x.options());
  if (M == 0) return out;
  const auto* xp = x.data_ptr<c10::BFloat16>();
  const auto* wp = packed.data_ptr<int32_t>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  auto* op = out.data_ptr<c10::BFloat16>();
  const int64_t ldx = x.stride(0), chunks = (M + kChunk - 1) / kChunk;
  at::parallel_for(0, tiles * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile = task / chunks, c0 = tile * kTile, cols = std::min(kTile, n - c0);
      const int64_t m_end = std::min(M, (task % chunks + 1) * kChunk);
      for (int64_t m = task % chunks * kChunk; m < m_end; m += kRows) {
        const int64_t rows = std::min(kRows, m_end - m);
        kTileRows[rows - 1](xp + m * ldx, ldx, wp + tile * pairs * kTile, pairs, bp ? bp + c0 : nullptr,
                            op + m * n + c0, n, cols);
      }
    }
  });
  return out;
#else
  TORCH_CHECK(false, "bf16_matmul needs AVX512_BF16 (check has_bf16_matmul() first)");
#endif
}
"""

FUNCTIONS = ["has_bf16_matmul", "bf16_matmul"]
TILE = 32
"""Output columns per packed tile (kTile in the source)."""


def usable(kernel, weight: torch.Tensor) -> bool:
    """Whether `weight` can run on this build's bf16 kernel: a 2-d bf16 CPU weight with an even
    number of input features, on a CPU with AVX512_BF16."""
    return (kernel is not None and kernel.has_bf16_matmul() and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and weight.shape[1] % 2 == 0 and weight.device.type == "cpu")


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] bf16 weight (K even) -> int32 [tiles, K / 2, 32]: each int32 a pair of consecutive
    inputs' weights for one column, 32 columns per tile, the last tile padded with zero columns."""
    n, k = weight.shape
    if k % 2:
        raise ValueError(f"bf16_matmul needs an even number of input features, not {k}")
    tiles = -(-n // TILE)
    padded = torch.zeros(tiles * TILE, k, dtype=torch.bfloat16)
    padded[:n] = weight
    pairs = padded.view(tiles, TILE, k // 2, 2).permute(0, 2, 1, 3).contiguous()
    return pairs.view(torch.int32).view(tiles, k // 2, TILE)


def bf16_matmul(kernel, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                out_features: int) -> torch.Tensor:
    """x [..., K] bf16 times the packed weight, plus `bias` (fp32) -> [..., out_features] bf16."""
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return kernel.bf16_matmul(rows, packed, bias, out_features).view(*x.shape[:-1], out_features)
